"""Encode the subset's images into the DINO token cache (the alignment targets).

    python -m repa_fast.preprocessing.build_dino_cache --csv-path train_200k.csv --dino DINOV2_DIR \
        --layers mid --output-dir /data/dino_tokens --batch-size 64 --num-workers 8 [--shard 0/4]

``--dino`` is a local transformers folder (Dinov2Model or Dinov2WithRegistersModel; nothing is
downloaded) or a checkpoint file (.pth/.pt/.bin/.safetensors): a state dict in either the
transformers naming or the original facebookresearch/dinov2 naming (``dinov2_vitl14_pretrain.pth``),
loaded into a model built from ``--dino-config`` (``vitl14``, the default, or a config.json).

Images: the centre square (the same square the VAE encodes), bicubic resize to ``--size`` (224; no
256-then-crop-224, which would cut the border off the latent's view), x/255, ImageNet mean/std. A
record is the patch tokens of ``last_hidden_state`` (after the final layernorm, as REPA uses them),
CLS and register tokens dropped: fp16 [(size/patch)^2, hidden] = [256, 1024] for ViT-L/14 at 224.
The target is the same encoder output for every U-Net layer, so the same tokens are stored under
``dino_key(id, layer)`` for each of ``--layers``; ``__meta__`` lists them. Sharding, resume and
unreadable images: see ``repa_fast.preprocessing.image_cache``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from repa_fast.data.cache import dino_key
from repa_fast.errors import InputError, MissingFileError, run_main
from repa_fast.preprocessing.image_cache import (
    DTYPES,
    add_image_arguments,
    encode_rows,
    open_writer,
    read_image_rows,
    resolve_device,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DINOv2 ViT-L/14 as published (facebook/dinov2-large); its position embeddings are for 518 px and
# are interpolated to the input size.
CONFIG_PRESETS = {"vitl14": {"model_type": "dinov2", "hidden_size": 1024, "num_hidden_layers": 24,
                             "num_attention_heads": 16, "mlp_ratio": 4, "patch_size": 14, "image_size": 518,
                             "layerscale_value": 1.0}}


def _config(spec: str):
    from transformers import AutoConfig

    if spec in CONFIG_PRESETS:
        values = dict(CONFIG_PRESETS[spec])
    else:
        path = Path(spec)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise MissingFileError(f"--dino-config {spec!r}: not a preset ({sorted(CONFIG_PRESETS)}) "
                                   f"nor a config.json")
        values = json.loads(path.read_text(encoding="utf-8"))
    model_type = values.pop("model_type", "dinov2")
    if model_type not in ("dinov2", "dinov2_with_registers"):
        raise InputError(f"--dino-config {spec!r}: model_type {model_type!r} is not a DINOv2")
    return AutoConfig.for_model(model_type, **values)


def convert_original_state_dict(state: dict, model_keys) -> dict:
    """facebookresearch/dinov2 parameter names -> the names of the transformers model whose state-dict
    keys are ``model_keys`` (the mapping of transformers' convert_dinov2_to_hf.py; the fused qkv is
    split). transformers 5 names the attention projections q_proj/k_proj/v_proj/o_proj, earlier
    releases attention.{query,key,value} and output.dense."""
    if "encoder.layer.0.attention.q_proj.weight" in model_keys:
        qkv_names, proj = ("attention.q_proj", "attention.k_proj", "attention.v_proj"), "attention.o_proj"
    else:
        qkv_names = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
        proj = "attention.output.dense"
    renames = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
               "pos_embed": "embeddings.position_embeddings", "register_tokens": "embeddings.register_tokens",
               "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
               "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
               "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    block_renames = {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
                     "attn.proj": proj, "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"}
    out = {}
    for key, value in state.items():
        if key in renames:
            out[renames[key]] = value
            continue
        parts = key.split(".")
        if parts[0] != "blocks":
            out[key] = value  # left for load_state_dict to report
            continue
        block, name = f"encoder.layer.{parts[1]}", ".".join(parts[2:])
        module, _, param = name.rpartition(".")
        if module == "attn.qkv":
            for new_name, chunk in zip(qkv_names, value.chunk(3), strict=True):
                out[f"{block}.{new_name}.{param}"] = chunk
        elif name in block_renames:  # ls1.gamma, ls2.gamma
            out[f"{block}.{block_renames[name]}"] = value
        elif module in block_renames:
            out[f"{block}.{block_renames[module]}.{param}"] = value
        elif module == "mlp.w12":
            raise InputError("SwiGLU (ViT-g) checkpoints are not supported here: convert it to a transformers folder")
        else:
            out[key] = value
    return out


def load_dino(spec: str, config_spec: str, device: torch.device, dtype: torch.dtype):
    """(DINOv2 model in eval mode on ``device``, a description of its source)."""
    from transformers import AutoModel

    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MissingFileError(f"--dino {spec!r}: the folder has no config.json")
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
        if model.config.model_type not in ("dinov2", "dinov2_with_registers"):
            raise InputError(f"--dino {spec!r}: model_type {model.config.model_type!r} is not a DINOv2")
        source = str(path.resolve())
    elif path.is_file():
        config = _config(config_spec)
        model = AutoModel.from_config(config)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("model", "state_dict", "teacher"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
        if any(key.startswith("blocks.") for key in state):
            state = convert_original_state_dict(state, set(model.state_dict()))
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise InputError(f"--dino {spec!r} does not fit --dino-config {config_spec!r}: {err}") from None
        missing = [k for k in missing if k != "embeddings.mask_token"]  # used only for masked training
        if missing or unexpected:
            raise InputError(f"--dino {spec!r} does not fit --dino-config {config_spec!r}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        source = f"{path.resolve()} ({config_spec})"
    else:
        raise MissingFileError(f"--dino {spec!r} does not exist")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False), source


def token_shape(model, size: int) -> tuple[int, int]:
    patch = model.config.patch_size
    if size % patch:
        raise InputError(f"--size {size} is not a multiple of the patch size {patch}")
    return (size // patch) ** 2, model.config.hidden_size


def build_dino_cache(args: argparse.Namespace) -> dict:
    layers = [name for name in args.layers.split(",") if name]
    if not layers:
        raise InputError("--layers is empty")
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    model, source = load_dino(args.dino, args.dino_config, device, dtype)
    shape = token_shape(model, args.size)
    skip = 1 + getattr(model.config, "num_register_tokens", 0)  # CLS, then registers, then patches
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    rows = read_image_rows(args.csv_path, args.image_root)
    index, count = args.shard
    meta = {"created_by": "repa_fast.preprocessing.build_dino_cache", "source": source, "image_size": args.size,
            "patch_size": model.config.patch_size, "tokens": "last_hidden_state patches (final layernorm)",
            "csv": str(Path(args.csv_path).resolve())}

    def encode(pixels: torch.Tensor, ids: list[str]) -> torch.Tensor:
        x = ((pixels.to(device, non_blocking=True).float() / 255.0 - mean) / std).to(dtype)
        tokens = model(pixel_values=x).last_hidden_state[:, skip:]
        if tuple(tokens.shape[1:]) != shape:
            raise InputError(f"--dino {args.dino!r} gave tokens {list(tokens.shape[1:])}, expected {list(shape)}")
        return tokens

    with open_writer(args.output_dir, shape, "dino", len(rows) * len(layers), layers=layers, meta=meta,
                     must_match=("source", "image_size")) as writer:
        return encode_rows(rows[index::count], writer, lambda sample_id: [dino_key(sample_id, n) for n in layers],
                           encode, args.size, args.batch_size, args.num_workers, args.strict, "build_dino_cache",
                           pin_memory=device.type == "cuda")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dino", "--dino-ckpt", "--dino_ckpt", required=True,
                   help="local transformers DINOv2 folder, or a checkpoint file (see --dino-config)")
    p.add_argument("--dino-config", "--dino_config", default="vitl14",
                   help="for a checkpoint file: a preset (vitl14) or a transformers config.json")
    p.add_argument("--layers", default="mid", help="comma-separated U-Net layers that get these tokens")
    add_image_arguments(p, size=224, batch_size=64)
    return p


def main(argv: list[str] | None = None) -> None:
    run_main("repa-fast-build-dino", build_dino_cache, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
