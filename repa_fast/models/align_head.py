"""AlignHead: U-Net feature map -> unit-norm tokens on the DINOv2 patch grid."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from repa_fast.config import use_triton


def token_grid(num_tokens: int) -> tuple[int, int]:
    """The square patch grid of ``num_tokens`` tokens (256 -> 16x16 for ViT-L/14 at 224 px)."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"num_tokens={num_tokens} does not form a square token grid")
    return side, side


class AlignHead(nn.Module):
    """Conv1x1 (no bias) + GroupNorm + GELU, bilinear to the token grid, flatten, L2 per token.

    ``kernels`` picks the implementation: ``torch`` (this reference), ``triton`` (the fused op in
    ``repa_fast.kernels.align_head``) or ``auto`` (triton for CUDA inputs). Called with ``target`` (the
    DINO tokens) on the triton path it returns the alignment losses of the fused REPA branch
    (``repa_fast.kernels.align_branch``) instead of tokens: those tokens never reach memory.
    """

    fused_branch = True  # on the triton path the model hands it targets (see AlignmentLoss.fuses_with)

    def __init__(self, in_ch: int = 1280, D: int = 1024, num_tokens: int = 256, num_groups: int = 32,
                 kernels: str = "torch"):
        super().__init__()
        if D % num_groups:
            raise ValueError(f"AlignHead: D={D} is not divisible by num_groups={num_groups}")
        self.in_ch, self.D, self.num_tokens = in_ch, D, num_tokens
        self.grid = token_grid(num_tokens)
        self.kernels = kernels
        self.proj = nn.Sequential(
            nn.Conv2d(in_ch, D, kernel_size=1, bias=False),
            nn.GroupNorm(num_groups, D),
            nn.GELU(),
        )

    def forward(self, feat: torch.Tensor, target: torch.Tensor | None = None, upper_only: bool = False,
                mask_diag: bool = False):
        if feat.ndim != 4 or feat.shape[1] != self.in_ch:
            raise ValueError(f"AlignHead: expected a feature map [B,{self.in_ch},H,W], got {list(feat.shape)}")
        if target is not None:
            if not use_triton(self.kernels, feat.device):
                raise ValueError("AlignHead: targets are scored here only by the fused branch (kernels=triton)")
            from repa_fast.kernels.align_branch import align_branch_loss

            conv, norm = self.proj[0], self.proj[1]
            return align_branch_loss(feat, conv.weight, norm.weight, norm.bias, norm.num_groups, self.grid, norm.eps,
                                     target, upper_only, mask_diag)
        if use_triton(self.kernels, feat.device):
            from repa_fast.kernels.align_head import align_head

            conv, norm = self.proj[0], self.proj[1]
            return align_head(feat, conv.weight, norm.weight, norm.bias, norm.num_groups, self.grid, norm.eps)
        return self.reference(feat)

    def reference(self, feat: torch.Tensor) -> torch.Tensor:
        x = self.proj(feat)  # [B, D, H, W]
        if tuple(x.shape[-2:]) != self.grid:
            x = F.interpolate(x, size=self.grid, mode="bilinear", align_corners=False)
        x = x.flatten(2).transpose(1, 2)  # [B, N, D]
        return F.normalize(x, dim=-1)
