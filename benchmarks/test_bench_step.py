"""One training step of the tiny U-Net (SD-1.5 topology, configs/tiny.yaml: LoRA r4 attn+conv, 8x8 tokens
of width 64, align layer mid) with SD15Loss and AdamW, single process on CPU, per setting of the switches
that change the step: ``kernels`` torch | triton and ``compile`` none | inductor.

kernels=triton runs the fused ops in the Triton interpreter here: its time is not a speed figure, the
benchmark checks that the switch computes the reference's step. ZeRO (a DeepSpeed launch) is left to
tests/test_train.py and the loader switch to test_bench_loader.py; the GPU figures of the whole step
come from gpu_report.py.
"""

from pathlib import Path

import pytest
import torch

from repa_fast.config import load_config
from repa_fast.losses import SD15Loss
from repa_fast.models import build_aligned_unet
from repa_fast.train import step_generator

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
BATCH = 2
# Measured here (2 shared CPU cores, 2026-11-29): inductor's first compile of this step (C++ code
# generation for the whole U-Net, forward and backward) had not finished after 3 minutes.
INDUCTOR_SKIP = ("compile=inductor: inductor's CPU compile of the tiny U-Net step takes minutes on these 2 cores "
                 "(unfinished after 3 min when measured), far above this suite's budget; the compiled step is "
                 "timed by gpu_report.py and the hooks' tracing is checked by tests/test_compile.py")
SETTINGS = [("torch", "none"), ("triton", "none"), ("torch", "inductor")]


def make_step(kernels: str):
    """(model, step): ``step(n)`` runs training step n (noise and times from step_generator) and returns
    its detached losses."""
    config = load_config(TINY, [f"kernels={kernels}", f"batch_size={BATCH}"])
    torch.manual_seed(config.seed)
    model = build_aligned_unet(config)
    criterion = SD15Loss.from_config(config)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=config.learning_rate)
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(BATCH, 4, 16, 16, generator=g)
    dino = {"mid": torch.randn(BATCH, config.dino_N, config.dino_D, generator=g)}
    ehs = torch.randn(BATCH, 77, model.unet.config.cross_attention_dim, generator=g)

    def step(n: int) -> dict[str, torch.Tensor]:
        losses = criterion(model, latent, dino, ehs, generator=step_generator(config.seed, 0, n, "cpu"))
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {k: v.detach() for k, v in losses.items() if isinstance(v, torch.Tensor)}  # lambda: a float

    return model, step


@pytest.mark.parametrize("kernels,compile", SETTINGS, ids=[f"kernels-{k}-compile-{c}" for k, c in SETTINGS])
def test_train_step(benchmark, kernels, compile):
    if compile == "inductor":
        pytest.skip(INDUCTOR_SKIP)
    model, step = make_step(kernels)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    first = step(1)  # untimed: allocator and interpreter warm-up
    steps = iter(range(2, 1_000_000))
    losses = benchmark.pedantic(lambda: step(next(steps)), rounds=3, iterations=1)
    assert all(torch.isfinite(v) for v in (*first.values(), *losses.values()))
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    # the step trains LoRA inside the U-Net (the alignment gradient reaches it) and the head
    assert any("lora" in n for n in changed) and any(n.startswith("align_heads.") for n in changed)
    if kernels != "torch":
        _, reference = make_step("torch")
        expected = reference(1)
        for key in ("loss", "loss_diff", "loss_token", "loss_manifold"):
            torch.testing.assert_close(first[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
