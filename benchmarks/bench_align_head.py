"""AlignHead on the GPU: eager reference vs torch.compile vs the fused kernels.

    python benchmarks/bench_align_head.py --out benchmarks/results/align_head_h200.json

Times forward, backward and forward+backward with triton.testing.do_bench (median and 20/80% quantiles)
and the peak memory of forward+backward above the inputs, at the real shape: feat bf16 [48,1280,8,8]
-> tokens [48,256,1024] (8x8 map upsampled to the 16x16 token grid), GroupNorm with 32 groups, the head's
weights bf16. Beside each time is the floor: the larger of its bytes at ~4.3 TB/s and its GEMM FLOPs at
~790 TFLOP/s (the H200 rates measured in this workplace, DESIGN.md). Forward must read feat and W and
write the tokens (2 B*HW*C*D FLOPs); backward must read the upstream gradient, feat and W and write
dfeat and dW (two GEMMs, 4 B*HW*C*D FLOPs). Also the kernel launches of one forward+backward of eager and
fused (kernels/launch_count.py; counted the same way on a CPU). Writes one JSON row per (implementation,
pass) with the GPU name, the date and the command. Needs CUDA; without it, says so and exits 0 (it is not part of CI).
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
from bench_common import (
    floors_us,
    gpu_ready,
    launches_per_step,
    max_relative_difference,
    print_floors,
    time_passes,
    time_table,
)


def make_inputs(batch: int, in_ch: int, map_hw: tuple[int, int], dim: int, tokens: int, groups: int, device,
                dtype=torch.bfloat16):
    """(head, feat, grad): an AlignHead with a random GroupNorm affine in ``dtype``, a feature map
    [batch, in_ch, *map_hw] and an upstream gradient for its tokens [batch, tokens, dim]."""
    from repa_fast.models import AlignHead

    head = AlignHead(in_ch, dim, tokens, groups)
    with torch.no_grad():
        head.proj[1].weight.normal_(1.0, 0.5)
        head.proj[1].bias.normal_(0.0, 0.5)
    head = head.to(device, dtype)
    feat = torch.randn(batch, in_ch, *map_hw, device=device).to(dtype)
    grad = torch.randn(batch, tokens, dim, device=device).to(dtype)
    return head, feat, grad


def floor_us(head, feat: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per pass: ``bytes_us``, ``flops_us`` and ``floor_us`` (the larger)."""
    B, C, H, W = feat.shape
    N, D = head.num_tokens, head.D
    item = feat.element_size()
    w_bytes = D * C * head.proj[0].weight.element_size()
    feat_bytes, tok_bytes = B * C * H * W * item, B * N * D * item
    gemm = 2.0 * B * H * W * C * D
    passes = {
        "forward": (feat_bytes + w_bytes + tok_bytes, gemm),
        "backward": (tok_bytes + feat_bytes + w_bytes + feat_bytes + w_bytes, 2 * gemm),
    }
    return floors_us(passes)


def implementations(head, compile_backend: str = "inductor"):
    """name -> f(feat) returning the tokens: the reference module, it compiled, the fused op."""
    from repa_fast.kernels.align_head import align_head

    conv, norm = head.proj[0], head.proj[1]
    fused = functools.partial(align_head, conv_weight=conv.weight, gn_weight=norm.weight, gn_bias=norm.bias,
                              num_groups=norm.num_groups, grid=head.grid, eps=norm.eps)
    # inductor at its best (autotuned Triton GEMM templates) but without CUDA graphs: the timing loop keeps
    # outputs across calls, which graph replay overwrites (the first H200 run failed so); other backends: no mode.
    mode = "max-autotune-no-cudagraphs" if compile_backend == "inductor" else None
    return {"eager": head.reference, "compiled": torch.compile(head.reference, backend=compile_backend, mode=mode),
            "fused": fused}


def measure(fn, head, feat0: torch.Tensor, grad: torch.Tensor, quantiles, bench=None) -> dict:
    """Times (ms at ``quantiles``) of forward, backward and both by ``bench`` (do_bench's signature; default
    do_bench), and on CUDA the peak memory of forward+backward above the inputs (None elsewhere)."""
    feat = feat0.detach().clone().requires_grad_()
    return time_passes(lambda: fn(feat), grad, [feat, *head.parameters()], quantiles, bench)


def check_agreement(impls, head, feat0: torch.Tensor, grad: torch.Tensor) -> dict[str, float]:
    """Relative differences of each implementation's tokens and gradients (feat, conv, GroupNorm weight and
    bias) from the eager reference."""
    results = {}
    for name, fn in impls.items():
        feat = feat0.detach().clone().requires_grad_()
        head.zero_grad(set_to_none=True)
        tokens = fn(feat)
        tokens.backward(grad)
        results[name] = [t.detach().double() for t in (tokens, feat.grad, *(p.grad for p in head.parameters()))]
    head.zero_grad(set_to_none=True)
    return max_relative_difference(results)


def launches(impls, head, feat0: torch.Tensor, grad: torch.Tensor) -> dict[str, int | None]:
    """Kernel launches of one forward+backward (tokens, then the gradients of feat and the head's parameters)
    per implementation (None: compiled, not counted)."""
    def step(fn):
        feat = feat0.detach().clone().requires_grad_()
        return lambda: torch.autograd.grad(fn(feat), [feat, *head.parameters()], grad)

    return launches_per_step(impls, step)


def head_parser(description: str) -> argparse.ArgumentParser:
    """The options of a benchmark of the head: --out and the shape (default the real one)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=False, help="JSON file for the result rows")
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--in-ch", type=int, default=1280)
    parser.add_argument("--map", type=int, default=8, help="side of the square feature map")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--groups", type=int, default=32)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = head_parser(__doc__.splitlines()[0]).parse_args(argv)
    if not gpu_ready("bench_align_head"):
        return 0

    torch.manual_seed(0)
    map_hw = (args.map, args.map)
    head, feat, grad = make_inputs(args.batch, args.in_ch, map_hw, args.dim, args.tokens, args.groups, "cuda")
    impls = implementations(head)
    floors = floor_us(head, feat)
    print(f"{torch.cuda.get_device_name()}; feat {list(feat.shape)} bf16 -> "
          f"tokens [{args.batch},{args.tokens},{args.dim}], {args.groups} groups")
    print_floors(floors, "forward: read feat + W, write tokens, 2*B*HW*C*D FLOPs; backward: read dtokens + feat "
                         "+ W, write dfeat + dW, two GEMMs of 2*B*HW*C*D; full: the sum")
    for name, diff in check_agreement(impls, head, feat, grad).items():
        print(f"  {name}: max relative difference from eager (tokens, gradients) = {diff:.2e}")

    fields = {"feat_shape": list(feat.shape), "tokens": args.tokens, "dim": args.dim, "groups": args.groups,
              "dtype": "bfloat16"}
    time_table("align_head", impls, lambda fn, q: measure(fn, head, feat, grad, q), floors, fields, args.out,
               launches(impls, head, feat, grad))
    return 0


if __name__ == "__main__":
    sys.exit(main())
