"""Alignment loss (L_token + L_manifold) on the GPU: eager reference vs torch.compile vs the fused kernels.

    python benchmarks/bench_align_loss.py --out benchmarks/results/align_loss_h200.json

Times forward, backward and forward+backward with triton.testing.do_bench (median and 20/80% quantiles)
and the peak memory of forward+backward above the inputs, at the real shape B=48, N=256, D=1024 with
x bf16 (the AlignHead's tokens) and y fp16 (the DINO cache). Beside each time is the floor: the larger of
its bytes at ~4.3 TB/s and its FLOPs at ~790 TFLOP/s (the H200 rates measured in this workplace): forward
must read x and y, backward must read them again and write dx; the arithmetic (~8 B N D forward, ~10 B N D
backward, plus the [B, B] Grams) is far below the bytes. Also the kernel launches of one forward+backward
of eager and fused (kernels/launch_count.py; counted the same way on a CPU). Writes one JSON row per
(implementation, pass) with the GPU name, the date and the command. Needs CUDA; without it, says so and
exits 0 (it is not part of CI).
"""

from __future__ import annotations

import sys

import torch
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
    write_dx = x.numel() * x.element_size()
    # forward: per token |x|^2, |y|^2, x.y and two unit-token sums (8 D); Grams 2 x 2 B^2 D.
    # backward: per token |x|^2, |y|^2, v, u.v and dx (10 D); the [B, D] sample vectors 2 B^2 D.
    return floors_us({"forward": (read, 8.0 * B * N * D + 4.0 * B * B * D),
                      "backward": (read + write_dx, 10.0 * B * N * D + 2.0 * B * B * D)})


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
    """Times (ms at ``quantiles``) of forward, backward and both of L_token + manifold_coeff L_manifold by
    ``bench`` (do_bench's signature; default do_bench), and on CUDA the peak memory of forward+backward above
    the inputs (None elsewhere)."""
    return loss_timing(fn, (1.0, manifold_coeff), x0, y, quantiles, bench)


def check_agreement(impls, x0, y, manifold_coeff) -> dict[str, float]:
    """Relative differences of each implementation's losses and dx from the eager reference."""
    return loss_agreement(impls, (1.0, manifold_coeff), x0, y)


def launches(impls, x0, y, manifold_coeff) -> dict[str, int | None]:
    """Kernel launches of one forward+backward per implementation (None: compiled, not counted)."""
    return loss_launches(impls, (1.0, manifold_coeff), x0, y)


def main(argv: list[str] | None = None) -> int:
    parser = token_shape_parser(__doc__.splitlines()[0])
    parser.add_argument("--upper-only", action="store_true")
    parser.add_argument("--mask-diag", action="store_true")
    parser.add_argument("--manifold-coeff", type=float, default=3.0)
    args = parser.parse_args(argv)
    if not gpu_ready("bench_align_loss"):
        return 0

    torch.manual_seed(0)
    shape = (args.batch, args.tokens, args.dim)
    x, y = make_inputs(shape, "cuda")
    print(f"{torch.cuda.get_device_name()}; x {list(shape)} bf16, y fp16; "
          f"upper_only={args.upper_only} mask_diag={args.mask_diag}")
    fields = {"shape": list(shape), "x_dtype": "bfloat16", "y_dtype": "float16", "upper_only": args.upper_only,
              "mask_diag": args.mask_diag}
    run_loss_bench("align_loss", implementations(args.upper_only, args.mask_diag), (1.0, args.manifold_coeff), x, y,
                   floor_us(x, y), "forward: read x + y; backward: read x + y, write dx; full: the sum", fields,
                   args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
