"""What the fused ops on token tensors share: F.normalize's eps, the tl.dot precision of each dtype, input
checks, unit-stride rows, the kept entries of the sample Gram mask, the launch-config record."""

from __future__ import annotations

from typing import NamedTuple

import torch

NORM_EPS = 1e-12  # F.normalize's eps, as in the reference: a zero token stays zero instead of NaN


class LaunchConfig(NamedTuple):
    """How the host launches one kernel at one shape (what the AOT tests compile, too)."""

    grid: tuple[int, ...]
    constexprs: dict
    num_warps: int
    num_stages: int
    args: dict = {}  # shape-derived integer arguments besides the sizes and strides


def check_token_pair(op: str, x: torch.Tensor, y: torch.Tensor, reference: str) -> None:
    """Raise a ValueError naming ``op`` unless x (predicted tokens) and y (target tokens) are non-empty
    floating-point [B, N, D] tensors of one shape on one device, y without grad (``reference`` is what to use
    for a trainable target)."""
    if x.ndim != 3 or x.shape != y.shape:
        raise ValueError(f"{op}: x and y must both be [B,N,D], got {list(x.shape)} and {list(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"{op}: x is on {x.device} but y is on {y.device}")
    if not (x.is_floating_point() and y.is_floating_point()):
        raise ValueError(f"{op}: x and y must be floating point, got {x.dtype} and {y.dtype}")
    if y.requires_grad:
        raise ValueError(f"{op}: y requires grad, but the fused kernel differentiates x only; use {reference} for "
                         "a trainable target")
    if x.numel() == 0:
        raise ValueError(f"{op}: empty input {list(x.shape)}")


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim has unit stride (the kernels take the other strides), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for operands of ``dtype``: fp32 gets full fp32 products ("ieee"; TF32 would be
    1e-3 off); 16-bit operands run on the tensor cores' own precision ("tf32" is ignored for them)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def kept_entries(B: int, upper_only: bool, mask_diag: bool) -> int:
    """How many entries of the [B, B] sample Gram the manifold loss averages (the mask of
    repa_fast.losses._gram_mask: upper_only keeps b <= c, mask_diag drops b = c)."""
    return (B * (B + 1) // 2 if upper_only else B * B) - (B if mask_diag else 0)
