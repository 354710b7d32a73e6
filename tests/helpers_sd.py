"""Tiny stand-ins shared by the evaluation tests: a run folder as the launcher leaves it, and an SD folder; and
the check that a tool stops on bad input with one line."""

import json
import string

import pytest
import torch

from repa_fast.config import Config
from repa_fast.data.synthetic import write_synthetic_caches


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test (imported by a test module, it applies to all of its tests): the CI
    machine's cores are shared, and oversubscribed thread pools crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tiny_run(root, layers=("mid",), num_classes=4, **config_values) -> dict:
    """Synthetic caches under ``root/data`` and a run folder ``root/run``: config.json, lora/, lora_ema/."""
    from repa_fast.export import export_weights
    from repa_fast.models import build_aligned_unet

    paths = write_synthetic_caches(root / "data", num_samples=20, num_classes=num_classes, align_layers=list(layers),
                                   latent_shape=(4, 16, 16), num_tokens=64, dino_D=64, clip_shape=(77, 32))
    run = root / "run"
    config = Config(**paths, output_dir=str(run), model="tiny", align_layers=list(layers), dino_D=64, dino_N=64,
                    lora_rank=4, lora_alpha=8, mixed_precision="no", batch_size=4, **config_values)
    torch.manual_seed(config.seed)  # as the launcher builds the model
    model = build_aligned_unet(config)
    g = torch.Generator().manual_seed(1)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # stands in for training: LoRA B and the heads move away from their init
        for p in trainable.values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ema = {n: p.detach() + 0.02 * torch.randn(p.shape, generator=g) for n, p in trainable.items()}
    export_weights(model, run / "lora")
    export_weights(model, run / "lora_ema", weights=ema)
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    return {"root": root, "run": run, "config": config, "model": model, "ema": ema}


def write_sd_folder(path, unet, scheduler=None) -> None:
    """A StableDiffusionPipeline folder of tiny random components (VAE downsampling x8, CLIP hidden 32)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({f"{c}</w>": 26 + i for i, c in enumerate(string.ascii_lowercase)})
    vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
    tok_dir = path.parent / f"{path.name}_tokenizer_src"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        sample_size=64)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=54, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, bos_token_id=52,
                                        eos_token_id=53, pad_token_id=53))
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler or DDPMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)


def sd15_scheduler():
    """SD-1.5's scheduler as its folder holds it (PNDM with SD-1.5's published config, repa_fast.losses)."""
    from diffusers import PNDMScheduler

    from repa_fast.losses import SD15_SCHEDULER

    return PNDMScheduler.from_config({**SD15_SCHEDULER, "skip_prk_steps": True})


def write_standin_inception(path, num_features: int = 16, num_classes: int = 10, seed: int = 0) -> None:
    """A random-init network with the TorchScript interface of inception-2015-12-05.pt, scripted to ``path``:
    net(uint8 [B, 3, H, W], return_features=True) -> [B, num_features]; net(x, no_output_bias=True) -> probabilities.
    (The Inception-v3 architecture itself comes only with that file: no package here defines it without torchvision.)
    """
    from torch import nn
    from torch.nn import functional as F

    class StandIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, num_features, 3, 2, 1))
            self.fc = nn.Linear(num_features, num_classes)

        def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                    no_output_bias: bool = False) -> torch.Tensor:
            x = F.interpolate(img.to(torch.float32), size=(32, 32), mode="bilinear", align_corners=False)
            features = self.body((x - 128) / 128).mean([2, 3])
            if return_features:
                return features
            logits = features @ self.fc.weight.t()
            if not no_output_bias:
                logits = logits + self.fc.bias
            return logits.softmax(1)

    torch.manual_seed(seed)
    torch.jit.script(StandIn()).save(str(path))


def assert_one_line(main, argv: list[str], capsys, prog: str, words: list[str]) -> str:
    """``main(argv)`` exits with status 1 and exactly one line ``prog: ...`` on stderr holding every word, without
    a traceback; returns the line. A progress bar drawn before the failure (tqdm's ``\\r`` redraws) is not a line."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if line.strip() and not line.startswith("\r")]
    assert stop.value.code == 1 and "Traceback" not in err and len(lines) == 1, (argv, err)
    assert lines[0].startswith(f"{prog}: "), (argv, lines[0])
    for word in words:
        assert word in lines[0], (argv, word, lines[0])
    return lines[0]
