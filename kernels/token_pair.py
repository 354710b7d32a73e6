"""What the fused ops on a pair of token tensors (align_loss, token_gram) share: input checks, unit-stride rows,
the launch-config record."""

from __future__ import annotations

from typing import NamedTuple

import torch


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
