"""Alignment loss (L_token + L_manifold) on the GPU: eager reference vs torch.compile vs the fused kernels.

    python benchmarks/bench_align_loss.py --out benchmarks/results/align_loss_h200.json

Times forward, backward and forward+backward with triton.testing.do_bench (median and 20/80% quantiles)
and the peak memory of forward+backward above the inputs, at the real shape B=48, N=256, D=1024 with
x bf16 (the AlignHead's tokens) and y fp16 (the DINO cache). Beside each time is the byte floor at
~4.3 TB/s (the H200 copy rate measured in this workplace): forward must read x and y, backward must
read them again and write dx. Writes one JSON row per (implementation, pass) with the GPU name, the
date and the command. Needs CUDA; without it, says so and exits 0 (it is not part of CI).
"""

from __future__ import annotations

import argparse
import sys

import torch
from bench_common import COPY_BYTES_PER_S, gpu_ready, max_relative_difference, time_passes, time_table
from torch._functorch import config as functorch_config

# measure() times the backward by running one graph's backward again and again (retain_graph=True), which a
# compiled backward that donates its saved buffers refuses; donation only lets it reuse their memory.
functorch_config.donated_buffer = False


def byte_floor_us(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    read = x.numel() * x.element_size() + y.numel() * y.element_size()
    write_dx = x.numel() * x.element_size()
    floors = {"forward": read, "backward": read + write_dx, "full": 2 * read + write_dx}
    return {name: bytes_ / COPY_BYTES_PER_S * 1e6 for name, bytes_ in floors.items()}


def make_inputs(shape, device, x_dtype=torch.bfloat16, y_dtype=torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """x (the AlignHead's tokens) and y (the DINO cache, correlated with x) of ``shape``."""
    x = torch.randn(shape, device=device).to(x_dtype)
    y = (x.float() + torch.randn(shape, device=device)).to(y_dtype)
    return x, y


def implementations(upper_only: bool, mask_diag: bool, compile_backend: str = "inductor"):
    """name -> f(x, y) returning (L_token, L_manifold)."""
    from repa_fast.losses import alignment_losses

    def eager(x, y):
        return alignment_losses(x, y, upper_only, mask_diag, kernels="torch")

    def fused(x, y):
        return alignment_losses(x, y, upper_only, mask_diag, kernels="triton")

    return {"eager": eager, "compiled": torch.compile(eager, backend=compile_backend), "fused": fused}


def measure(fn, x0: torch.Tensor, y: torch.Tensor, manifold_coeff: float, quantiles, bench=None) -> dict:
    """Times (ms at ``quantiles``) of forward, backward and both by ``bench`` (do_bench's signature; default
    do_bench), and on CUDA the peak memory of forward+backward above the inputs (None elsewhere)."""
    x = x0.detach().clone().requires_grad_()

    def forward():
        lt, lm = fn(x, y)
        return lt + manifold_coeff * lm

    return time_passes(forward, None, [x], quantiles, bench)


def check_agreement(impls, x0, y, manifold_coeff) -> dict[str, float]:
    """Relative differences of each implementation's losses and dx from the eager reference."""
    results = {}
    for name, fn in impls.items():
        x = x0.detach().clone().requires_grad_()
        lt, lm = fn(x, y)
        (lt + manifold_coeff * lm).backward()
        results[name] = (lt.detach().double(), lm.detach().double(), x.grad.double())
    return max_relative_difference(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=False, help="JSON file for the result rows")
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--upper-only", action="store_true")
    parser.add_argument("--mask-diag", action="store_true")
    parser.add_argument("--manifold-coeff", type=float, default=3.0)
    args = parser.parse_args(argv)
    if not gpu_ready("bench_align_loss"):
        return 0

    torch.manual_seed(0)
    shape = (args.batch, args.tokens, args.dim)
    x, y = make_inputs(shape, "cuda")
    impls = implementations(args.upper_only, args.mask_diag)
    floors = byte_floor_us(x, y)
    print(f"{torch.cuda.get_device_name()}; x {list(shape)} bf16, y fp16; "
          f"upper_only={args.upper_only} mask_diag={args.mask_diag}")
    for name, diff in check_agreement(impls, x, y, args.manifold_coeff).items():
        print(f"  {name}: max relative difference from eager (losses, dx) = {diff:.2e}")

    fields = {"shape": list(shape), "x_dtype": "bfloat16", "y_dtype": "float16", "upper_only": args.upper_only,
              "mask_diag": args.mask_diag}
    time_table("align_loss", impls, lambda fn, q: measure(fn, x, y, args.manifold_coeff, q), floors,
               {p: {"byte_floor_us": f} for p, f in floors.items()}, fields, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
