"""Align heads: U-Net feature map -> unit-norm tokens on the DINOv2 patch grid.

Two projectors, chosen by the config key ``align_head``:
  conv_gn  AlignHead: the source design's Conv1x1 + GroupNorm + GELU (the fused Triton op exists for it)
  mlp      MLPAlignHead: REPA's projector, Linear-SiLU-Linear-SiLU-Linear per feature-map position
Both then resample bilinearly to the token grid, flatten and L2-normalise each token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from repa_fast.config import ALIGN_HEADS, use_triton

MLP_HIDDEN = 2048  # REPA's projector_dim


def token_grid(num_tokens: int) -> tuple[int, int]:
    """The square patch grid of ``num_tokens`` tokens (256 -> 16x16 for ViT-L/14 at 224 px)."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"num_tokens={num_tokens} does not form a square token grid")
    return side, side


def map_to_tokens(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, D, H, W] projected map -> [B, N, D] unit tokens: bilinear to ``grid``, flatten, L2 per token."""
    if tuple(x.shape[-2:]) != grid:
        x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False)
    return F.normalize(x.flatten(2).transpose(1, 2), dim=-1)


def _check_feature_map(head: nn.Module, feat: torch.Tensor) -> None:
    if feat.ndim != 4 or feat.shape[1] != head.in_ch:
        raise ValueError(f"{type(head).__name__}: expected a feature map [B,{head.in_ch},H,W], "
                         f"got {list(feat.shape)}")


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
        _check_feature_map(self, feat)
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
        return map_to_tokens(self.proj(feat), self.grid)


class MLPAlignHead(nn.Module):
    """REPA's projector on the feature grid, then bilinear to the token grid and L2 per token.

    Per position: Linear(C, hidden) - SiLU - Linear(hidden, hidden) - SiLU - Linear(hidden, D), hidden
    2048 as in REPA; the MLP runs before the upsampling (U-REPA reports MLP-then-upsample best, and it
    is 16x cheaper at SD-1.5's 8x8 mid map). There is no fused kernel for it: it always runs in torch,
    whatever the ``kernels`` switch says (the alignment loss still uses the fused op there).
    """

    def __init__(self, in_ch: int = 1280, D: int = 1024, num_tokens: int = 256, hidden: int = MLP_HIDDEN):
        super().__init__()
        self.in_ch, self.D, self.num_tokens = in_ch, D, num_tokens
        self.grid = token_grid(num_tokens)
        self.mlp = nn.Sequential(
            nn.Linear(in_ch, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, D),
        )

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        _check_feature_map(self, feat)
        x = self.mlp(feat.permute(0, 2, 3, 1))  # [B, H, W, D]: one MLP per feature-map position
        return map_to_tokens(x.permute(0, 3, 1, 2), self.grid)


def build_align_head(kind: str, in_ch: int, D: int, num_tokens: int, kernels: str = "torch") -> nn.Module:
    """The head the config key ``align_head`` names: ``conv_gn`` (AlignHead) or ``mlp`` (MLPAlignHead)."""
    if kind == "conv_gn":
        return AlignHead(in_ch, D, num_tokens=num_tokens, kernels=kernels)
    if kind == "mlp":
        return MLPAlignHead(in_ch, D, num_tokens=num_tokens)
    raise ValueError(f"option 'align_head': {kind!r} is not one of {list(ALIGN_HEADS)}")
