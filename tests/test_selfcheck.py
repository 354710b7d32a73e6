"""Start-up self-checks: each fast part against its torch twin, both outcomes (a wrong part injected)."""

import json
import types

import pytest
import torch

import repa_fast.losses
import repa_fast.models.align_head
import repa_fast.selfcheck
from repa_fast.config import load_config
from repa_fast.losses import AlignmentLoss, SD15Loss
from repa_fast.models import SD15UNetAligned, build_unet
from repa_fast.selfcheck import SelfCheckError, SelfChecks

TINY = "configs/tiny.yaml"


@pytest.fixture
def auto_is_triton(monkeypatch):
    """On these CPUs `auto` means torch; make it mean triton (the interpreter), as it does on CUDA."""
    def use_triton(kernels, device):
        return kernels in ("triton", "auto")

    for module in (repa_fast.selfcheck, repa_fast.losses, repa_fast.models.align_head):
        monkeypatch.setattr(module, "use_triton", use_triton)


def tiny_model(kernels):
    torch.manual_seed(0)
    return SD15UNetAligned(build_unet("tiny"), ["mid"], D=64, num_tokens=64, kernels=kernels,
                           alignment_loss=AlignmentLoss(kernels=kernels))


def wrong_align_head(monkeypatch):
    import repa_fast.kernels.align_head as kah

    right = kah.align_head

    def wrong(*args, **kwargs):  # a kernel that is off by a little, as a miscompile would be
        return right(*args, **kwargs) * 1.01

    monkeypatch.setattr(kah, "align_head", wrong)


@pytest.mark.parametrize("kernels", ["triton", "auto"])
def test_kernels_that_agree_are_used(tmp_path, auto_is_triton, kernels):
    config = load_config(TINY, [f"kernels={kernels}"])
    model = tiny_model(kernels)
    checks = SelfChecks(config, tmp_path)
    checks.kernels(model, "cpu", torch.float32)
    checks.write()
    result = json.loads((tmp_path / "selfcheck.json").read_text())["kernels"]
    assert result["ok"] and result["used"] == "triton" and config.kernels == kernels
    assert {"mid/align_head[0]", "mid/align_head[1]", "align_loss[0]", "align_loss[2]"} <= set(result["errors"])
    assert all(e["error"] <= e["limit"] for e in result["errors"].values())


def test_a_wrong_kernel_under_auto_falls_back_with_one_warning(tmp_path, auto_is_triton, monkeypatch):
    wrong_align_head(monkeypatch)
    config = load_config(TINY, ["kernels=auto"])
    model = tiny_model("auto")
    checks = SelfChecks(config, tmp_path)
    with pytest.warns(RuntimeWarning, match=r"self-check of kernels \(kernels=auto\) failed: .*align_head: output 0 "
                                            r"has relative error .*falling back to kernels=torch") as caught:
        checks.kernels(model, "cpu", torch.float32)
    assert len(caught) == 1
    assert config.kernels == "torch" and model.alignment_loss.kernels == "torch"
    assert all(h.kernels == "torch" for h in model.align_heads.values())
    checks.write()
    assert json.loads((tmp_path / "selfcheck.json").read_text())["kernels"]["used"] == "torch"


def test_a_wrong_kernel_asked_for_explicitly_stops_the_run(tmp_path, monkeypatch):
    wrong_align_head(monkeypatch)
    config = load_config(TINY, ["kernels=triton"])
    with pytest.raises(SelfCheckError, match=r"kernels=triton\) failed.*align_head.*set kernels=auto to fall back"):
        SelfChecks(config, tmp_path).kernels(tiny_model("triton"), "cpu", torch.float32)
    assert not json.loads((tmp_path / "selfcheck.json").read_text())["kernels"]["ok"]  # written before stopping


def test_torch_kernels_are_not_checked():
    config = load_config(TINY, ["kernels=torch"])
    checks = SelfChecks(config)
    checks.kernels(tiny_model("torch"), "cpu", torch.float32)
    assert checks.results["kernels"] == {"selected": "torch", "used": "torch", "checked": False}


# --- DALI ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    from repa_fast.data.synthetic import write_synthetic_caches

    paths = write_synthetic_caches(tmp_path_factory.mktemp("caches"), num_samples=24, num_classes=3,
                                   latent_shape=(4, 16, 16), num_tokens=64, dino_D=64, clip_shape=(77, 32))
    return [f"{k}={v}" for k, v in paths.items()]


def loader_check(caches, loader, tmp_path):
    from repa_fast.data.dataset import build_dataset

    config = load_config(TINY, [*caches, f"loader={loader}", "batch_size=4", "num_workers=1"])
    checks = SelfChecks(config, tmp_path)
    checks.loader(build_dataset(config), 0, 1, "cpu", torch.float32)
    return config, checks


def test_dali_that_matches_is_used(caches, tmp_path):
    pytest.importorskip("nvidia.dali")
    config, checks = loader_check(caches, "auto", tmp_path)
    assert config.loader == "dali" and checks.results["loader"] == {"selected": "auto", "used": "dali", "ok": True}


@pytest.fixture
def wrong_dali(monkeypatch):
    pytest.importorskip("nvidia.dali")
    import repa_fast.data.dali as dali

    build = dali.build_dali_loader

    class Wrong:  # DALI's batches, the latents a little off
        def __init__(self, *args, **kwargs):
            self.loader = build(*args, **kwargs)

        def __iter__(self):
            for batch in self.loader:
                batch["latent"] = batch["latent"] + 1e-3
                yield batch

        def close(self):
            self.loader.close()

    monkeypatch.setattr(dali, "build_dali_loader", Wrong)


def test_dali_that_differs_under_auto_falls_back(caches, tmp_path, wrong_dali):
    with pytest.warns(RuntimeWarning, match=r"self-check of loader \(loader=auto\) failed: .*latent differs"):
        config, checks = loader_check(caches, "auto", tmp_path)
    assert config.loader == "torch" and checks.results["loader"]["used"] == "torch"


def test_dali_that_differs_asked_for_explicitly_stops(caches, tmp_path, wrong_dali):
    with pytest.raises(SelfCheckError, match=r"loader=dali\) failed: .*latent differs"):
        loader_check(caches, "dali", tmp_path)


# --- compile ---------------------------------------------------------------------------------------


def compile_run(tmp_path):
    config = load_config(TINY, ["compile=inductor"])
    model = tiny_model("torch")
    g = torch.Generator().manual_seed(0)
    batch = {"latent": torch.randn(3, 4, 16, 16, generator=g), "dino_tokens": {"mid": torch.randn(3, 64, 64).half()},
             "encoder_hidden_states": torch.randn(3, 77, 32, generator=g)}
    return types.SimpleNamespace(config=config, engine=model, criterion=SD15Loss.from_config(config),
                                 eval_batch=batch, rank=0, device=torch.device("cpu"), dtype=torch.float32)


def corrupting_backend(gm, example_inputs):
    def run(*args):
        return [o * 1.5 if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in gm(*args)]

    return run


@pytest.mark.slow
def test_compile_that_agrees_passes_and_one_that_differs_stops(tmp_path):
    run = compile_run(tmp_path)
    checks = SelfChecks(run.config, tmp_path)
    torch._dynamo.reset()
    checks.compile(run, lambda engine: engine.compile(backend="eager"))
    assert checks.results["compile"]["ok"]
    torch._dynamo.reset()
    bad = compile_run(tmp_path)
    with pytest.raises(SelfCheckError, match=r"self-check of compile \(compile=inductor\) failed: .*compiled vs "
                                             r"eager: loss "):
        SelfChecks(bad.config, tmp_path).compile(bad, lambda engine: engine.compile(backend=corrupting_backend))
    torch._dynamo.reset()


@pytest.mark.gpu
def test_kernels_pass_their_self_check_in_bf16_on_the_gpu():
    """What a run on the H200 checks at start-up: SD-1.5's layout (1280 channels, 8x8 map, D 1024, N 256)."""
    from repa_fast.models import AlignHead

    model = types.SimpleNamespace(
        unet=types.SimpleNamespace(config=types.SimpleNamespace(block_out_channels=(320, 640, 1280, 1280),
                                                                sample_size=64)),
        align_heads={"mid": AlignHead(1280, 1024, 256)}, align_layers=["mid"], D=1024,
        alignment_loss=AlignmentLoss(kernels="auto"))
    checks = SelfChecks(load_config(None, ["kernels=auto"]))
    checks.kernels(model, "cuda", torch.bfloat16)
    result = checks.results["kernels"]
    assert result["ok"] and result["used"] == "triton", result
    assert any(k.startswith("mid/align_branch") for k in result["errors"])  # the fused branch was checked too
