"""Token-form manifold loss on the GPU: the chunked reference vs torch.compile of it vs the fused kernels.

    python benchmarks/bench_token_gram.py --out benchmarks/results/token_gram_h200.json

As bench_align_loss.py, for ``token_gram_loss`` (per sample, the [N, N] Grams of unit tokens compared entry
by entry) at B=48, N=256, D=1024, x bf16, y fp16. The floor: forward must read x and y and make both Grams
(symmetric: 2 B N^2 D FLOPs for the two); backward must read x and y again, write dx, make both Grams again
(nothing of size N x N is kept) and multiply E by the tokens (2 B N^2 D). Needs CUDA; without it, says so
and exits 0.
"""

from __future__ import annotations

import sys

import torch
from bench_align_loss import make_inputs
from bench_common import (
    floors_us,
    gpu_ready,
    loss_agreement,
    loss_launches,
    loss_timing,
    run_loss_bench,
    token_shape_parser,
)


def floor_us(x: torch.Tensor, y: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per pass: ``bytes_us``, ``flops_us`` and ``floor_us`` (the larger)."""
    B, N, D = x.shape
    read = x.numel() * x.element_size() + y.numel() * y.element_size()
    grams = 2.0 * B * N * N * D  # the symmetric halves of both Grams, 2 flops a multiply-add
    return floors_us({"forward": (read, grams), "backward": (read + x.numel() * x.element_size(), 2 * grams)})


def implementations(compile_backend: str = "inductor"):
    """name -> f(x, y) returning (L,)."""
    from repa_fast.kernels.token_gram import token_gram_loss as fused_loss
    from repa_fast.losses import token_gram_loss

    def eager(x, y):
        return (token_gram_loss(x, y),)

    def fused(x, y):
        return (fused_loss(x, y),)

    return {"eager": eager, "compiled": torch.compile(eager, backend=compile_backend), "fused": fused}


def measure(fn, x0, y, quantiles, bench=None) -> dict:
    return loss_timing(fn, (1.0,), x0, y, quantiles, bench)


def check_agreement(impls, x0, y) -> dict[str, float]:
    return loss_agreement(impls, (1.0,), x0, y)


def launches(impls, x0, y) -> dict[str, int | None]:
    return loss_launches(impls, (1.0,), x0, y)


def main(argv: list[str] | None = None) -> int:
    args = token_shape_parser(__doc__.splitlines()[0]).parse_args(argv)
    if not gpu_ready("bench_token_gram"):
        return 0

    torch.manual_seed(0)
    shape = (args.batch, args.tokens, args.dim)
    x, y = make_inputs(shape, "cuda")
    print(f"{torch.cuda.get_device_name()}; x {list(shape)} bf16, y fp16")
    run_loss_bench("token_gram", implementations(), (1.0,), x, y, floor_us(x, y),
                   "forward: read x + y, both Grams; backward: read x + y, write dx, both Grams and E U; full: the sum",
                   {"shape": list(shape), "x_dtype": "bfloat16", "y_dtype": "float16"}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
