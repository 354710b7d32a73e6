"""The REPA branch on the GPU (AlignHead, then the alignment loss against the DINO tokens): eager head +
reference losses vs torch.compile of them vs the fused op (kernels/align_branch.py).

    python benchmarks/bench_align_branch.py --out benchmarks/results/align_branch_h200.json

Times forward, backward and forward+backward of L_token + 3 L_manifold with triton.testing.do_bench (median
and 20/80% quantiles) and the peak memory of forward+backward above the inputs, at the real shape: feat bf16
[48,1280,8,8] -> tokens [48,256,1024], GroupNorm with 32 groups, the head's weights bf16, y fp16 (the DINO
cache). Beside each time is the floor: the larger of its bytes at ~4.3 TB/s and its FLOPs at ~790 TFLOP/s.
Forward must read feat, W and y (the tokens need never be written) and run the projection GEMM
(2 B*HW*C*D FLOPs); backward must read feat, W and y again and write dfeat and dW (two GEMMs). Also the
kernel launches of one forward+backward of eager and fused (kernels/launch_count.py; counted the same way on
a CPU). Writes one JSON row per (implementation, pass) with the GPU name, the date and the command. Needs
CUDA; without it, says so and exits 0 (it is not part of CI).
"""

from __future__ import annotations

import sys

import torch
from bench_align_head import head_parser
from bench_align_head import make_inputs as head_inputs
from bench_common import floors_us, gpu_ready, loss_agreement, loss_launches, loss_timing, run_loss_bench

MANIFOLD_COEFF = 3.0  # L_token + 3 L_manifold, the configs' manifold_coeff
WEIGHTS = (1.0, MANIFOLD_COEFF)


def make_inputs(batch: int, in_ch: int, map_hw: tuple[int, int], dim: int, tokens: int, groups: int, device,
                dtype=torch.bfloat16, y_dtype=torch.float16):
    """(head, feat, y): bench_align_head's head (kernels=triton: called with targets it runs the fused branch,
    as in the model) and feature map, and DINO tokens [batch, tokens, dim] correlated with the head's tokens
    (so that neither loss is trivial)."""
    head, feat, _ = head_inputs(batch, in_ch, map_hw, dim, tokens, groups, device, dtype)
    head.kernels = "triton"
    with torch.no_grad():
        y = (head.reference(feat).float() + torch.randn(batch, tokens, dim, device=device)).to(y_dtype)
    return head, feat, y


def floor_us(head, feat: torch.Tensor, y: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per pass: ``bytes_us``, ``flops_us`` and ``floor_us`` (the larger)."""
    B, C, H, W = feat.shape
    D = head.D
    feat_bytes = feat.numel() * feat.element_size()
    w_bytes = D * C * head.proj[0].weight.element_size()
    y_bytes = y.numel() * y.element_size()
    gemm = 2.0 * B * H * W * C * D
    return floors_us({"forward": (feat_bytes + w_bytes + y_bytes, gemm),
                      "backward": (feat_bytes + w_bytes + y_bytes + feat_bytes + w_bytes, 2 * gemm)})


def implementations(head, upper_only: bool = False, mask_diag: bool = False, compile_backend: str = "inductor"):
    """name -> f(feat, y) returning (L_token, L_manifold): the reference head and losses, them compiled, the
    fused op as the model calls it (the head, kernels=triton, given the targets)."""
    from repa_fast.losses import alignment_losses

    def eager(feat, y):
        return alignment_losses(head.reference(feat), y, upper_only, mask_diag, kernels="torch")

    def fused(feat, y):
        return head(feat, target=y, upper_only=upper_only, mask_diag=mask_diag)

    # as bench_align_head: inductor's autotuned GEMM templates without CUDA graphs
    mode = "max-autotune-no-cudagraphs" if compile_backend == "inductor" else None
    return {"eager": eager, "compiled": torch.compile(eager, backend=compile_backend, mode=mode), "fused": fused}


def measure(fn, head, feat0: torch.Tensor, y: torch.Tensor, quantiles, bench=None) -> dict:
    """Times (ms at ``quantiles``) of forward, backward and both of L_token + 3 L_manifold by ``bench``
    (do_bench's signature; default do_bench), and on CUDA the peak memory of forward+backward above the inputs
    (None elsewhere)."""
    return loss_timing(fn, WEIGHTS, feat0, y, quantiles, bench, params=tuple(head.parameters()))


def check_agreement(impls, head, feat0: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Relative differences of each implementation's losses and gradients (feat, conv, GroupNorm weight and
    bias) from the eager reference."""
    return loss_agreement(impls, WEIGHTS, feat0, y, params=tuple(head.parameters()))


def launches(impls, head, feat0: torch.Tensor, y: torch.Tensor) -> dict[str, int | None]:
    """Kernel launches of one forward+backward per implementation (None: compiled, not counted)."""
    return loss_launches(impls, WEIGHTS, feat0, y, params=tuple(head.parameters()))


def main(argv: list[str] | None = None) -> int:
    parser = head_parser(__doc__.splitlines()[0])
    parser.add_argument("--upper-only", action="store_true")
    parser.add_argument("--mask-diag", action="store_true")
    args = parser.parse_args(argv)
    if not gpu_ready("bench_align_branch"):
        return 0

    torch.manual_seed(0)
    map_hw = (args.map, args.map)
    head, feat, y = make_inputs(args.batch, args.in_ch, map_hw, args.dim, args.tokens, args.groups, "cuda")
    print(f"{torch.cuda.get_device_name()}; feat {list(feat.shape)} bf16 -> tokens [{args.batch},{args.tokens},"
          f"{args.dim}] vs y fp16, {args.groups} groups; upper_only={args.upper_only} mask_diag={args.mask_diag}")
    fields = {"feat_shape": list(feat.shape), "tokens": args.tokens, "dim": args.dim, "groups": args.groups,
              "dtype": "bfloat16", "y_dtype": "float16", "upper_only": args.upper_only, "mask_diag": args.mask_diag}
    run_loss_bench("align_branch", implementations(head, args.upper_only, args.mask_diag), WEIGHTS, feat, y,
                   floor_us(head, feat, y), "forward: read feat + W + y, 2*B*HW*C*D FLOPs; backward: read feat + W "
                   "+ y, write dfeat + dW, two GEMMs of 2*B*HW*C*D; full: the sum", fields, args.out,
                   params=tuple(head.parameters()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
