"""The fused REPA branch: AlignHead + alignment loss in one op, the [B, N, D] tokens never in memory.

    (L_token, L_manifold) = align_branch_loss(feat, conv_weight, gn_weight, gn_bias, num_groups, grid, eps, y)
        = (token_loss(tok, y), manifold_gram_loss(tok, y, upper_only, mask_diag)),  tok = AlignHead(feat)

with the math of ``repa_fast.losses`` (sample form) and of ``AlignHead.reference``: for unit tokens t_bn
(the head's output) and DINO tokens y_bn, y^ = y / max(|y|, 1e-12),

    L_token    = mean_{b,n} (1 - t_bn . y^_bn)
    m_b        = mean_n t_bn,  p_b = m_b / max(|m_b|, eps);  q_b likewise from y^
    L_manifold = sum_{b,c} w_bc (p_b.p_c - q_b.q_c)^2     (w: 1 / #kept on the kept entries; upper_only, mask_diag)

Registered as the custom ops ``repa_fast::align_branch_loss`` and ``repa_fast::align_branch_loss_backward``.
Forward (4 kernels; the head's projection, then):
  2. ``_align_branch_token_kernel`` (token run, sample): tokens recomputed from x_hat as the head's token
     kernel does, but instead of storing them: r and |y| per token (fp32 [B, N]), the sum of cosines and the
     sums of t and y^ over the run (fp32 partials [2, B, splits, D]).
  3. ``_align_branch_gram_partial_kernel`` (channel chunk): m and m^y over its channels (the partials summed
     in a fixed order; m saved for the backward) and their [B, B] partial Grams m m^T on tensor cores
     (tf32x3: fp32 accuracy), [chunks, 2, B, B].
  4. ``_align_branch_loss_kernel`` (one program): the Grams (|m_b|^2 is the diagonal), both losses, and for
     the backward G_x and dL_m/dG = 2 w (G_x - G_y).
Backward: dL/dt_bn = s_b - (g_token / (B N)) y^_bn, the same s_b [D] for all tokens of sample b (the Gram
part through m_b: s_b = (sum_c S_bc p_c - p_b sum_c S_bc G_bc) / (max(|m_b|, eps) N), S = g_manifold (dG + dG^T)),
built inside ``_align_branch_bwd_token_kernel``, which is the head's pass over the token gradient with y
read instead of g; then the head's map kernel, dX, dW and reduce kernels.

A token whose unnormalised norm is below 1e-12 (all its GELU outputs zero: never in practice) gets the
gradient of one normalisation; the reference normalises twice (head, then loss) and there multiplies by 1e12
once more.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .align_head import (
    TARGET_PROGRAMS,
    AlignHeadBlocks,
    _bwd_map_act,
    _bwd_token_chunk,
    _token_rows,
    align_head_blocks,
    check_inputs,
    grads_fake,
    grads_or_none,
    interp_operator,
    map_backward,
    project,
)
from .token_pair import NORM_EPS, kept_entries, rows_contiguous

_EPS = tl.constexpr(NORM_EPS)
MAX_BATCH = 128  # the [B, B] Grams live in one program's registers
GRAM_CHUNK = 64  # channels per program of the partial Grams (16 programs at D = 1024)


# Program (i_s, i_b): tokens [i_s * tokens_per_split, ...) of sample i_b, BLOCK_T at a time, whole D each.
@triton.jit
def _align_branch_token_kernel(
    xhat_ptr, gamma_ptr, beta_ptr, y_ptr, tok_rstd_ptr, y_rstd_ptr, cos_ptr, sum_ptr,
    B, N, D, stride_yb, stride_yn, tokens_per_split,
    MAP_H: tl.constexpr, MAP_W: tl.constexpr, GRID_H: tl.constexpr, GRID_W: tl.constexpr, UPSAMPLE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_s = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    n_splits = tl.num_programs(0)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_gamma = tl.load(gamma_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_beta = tl.load(beta_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    p_xhat = xhat_ptr + i_b * (MAP_H * MAP_W) * D
    b_sx = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)  # running sums of unit tokens t and y^
    b_sy = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    b_cos = tl.zeros((BLOCK_T,), dtype=tl.float32)
    t_start = i_s * tokens_per_split
    for t0 in range(t_start, tl.minimum(t_start + tokens_per_split, N), BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < N
        b_u = _token_rows(p_xhat, b_gamma, b_beta, o_t, m_t, o_d, m_d, D, MAP_H, MAP_W, GRID_H, GRID_W,
                          UPSAMPLE)  # [BLOCK_T, BLOCK_D], zero outside the valid rows
        b_r = 1.0 / tl.maximum(tl.sqrt_rn(tl.sum(b_u * b_u, axis=1)), _EPS)
        b_t = b_u * b_r[:, None]
        b_y = tl.load(y_ptr + i_b * stride_yb + o_t[:, None] * stride_yn + o_d[None, :],
                      mask=m_t[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        b_ry = 1.0 / tl.maximum(tl.sqrt_rn(tl.sum(b_y * b_y, axis=1)), _EPS)
        b_cos += tl.sum(b_t * b_y, axis=1) * b_ry
        b_sx += b_t
        b_sy += b_y * b_ry[:, None]
        tl.store(tok_rstd_ptr + i_b * N + o_t, b_r, mask=m_t)
        tl.store(y_rstd_ptr + i_b * N + o_t, b_ry, mask=m_t)
    tl.store(cos_ptr + i_b * n_splits + i_s, tl.sum(b_cos, axis=0))
    o_sum = (i_b * n_splits + i_s) * D + o_d
    tl.store(sum_ptr + o_sum, tl.sum(b_sx, axis=0), mask=m_d)
    tl.store(sum_ptr + B * n_splits * D + o_sum, tl.sum(b_sy, axis=0), mask=m_d)


# Program i_k: BLOCK_K channels. m = (1/N) sum of the token-run partials, then its partial Gram over these
# channels; the diagonal of the summed Grams is |m_b|^2.
@triton.jit
def _align_branch_gram_partial_kernel(
    sum_ptr, mx_ptr, gram_part_ptr,
    B, N, D, n_splits,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    i_k = tl.program_id(0).to(tl.int64)
    o_b = tl.arange(0, BLOCK_B)
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_bk = (o_b < B)[:, None] & (o_k < D)[None, :]  # [BLOCK_B, BLOCK_K]
    o_gram = tl.arange(0, BLOCK_B)[:, None] * BLOCK_B + tl.arange(0, BLOCK_B)[None, :]
    for side in tl.static_range(2):  # x (the head's tokens), then y
        b_m = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
        for s in range(0, n_splits):
            b_m += tl.load(sum_ptr + ((side * B + o_b[:, None]) * n_splits + s) * D + o_k[None, :], mask=m_bk,
                           other=0.0)
        b_m = b_m / N
        if side == 0:
            tl.store(mx_ptr + o_b[:, None] * D + o_k[None, :], b_m, mask=m_bk)
        b_gram = tl.dot(b_m, tl.trans(b_m), input_precision="tf32x3")  # [BLOCK_B, BLOCK_B]
        tl.store(gram_part_ptr + (i_k * 2 + side) * BLOCK_B * BLOCK_B + o_gram, b_gram)


@triton.jit
def _diagonal(b_a, o_r, o_c):
    # The diagonal of a square block as a column and as a row vector.
    b_diag = tl.where(o_r[:, None] == o_c[None, :], b_a, 0.0)
    return tl.sum(b_diag, axis=1), tl.sum(b_diag, axis=0)


# One program: the Grams, both losses and what the backward needs of them.
@triton.jit
def _align_branch_loss_kernel(
    gram_part_ptr, cos_ptr, loss_token_ptr, loss_manifold_ptr, gram_ptr, dgram_ptr, nx_ptr,
    B, N, n_chunks, n_cos,
    inv_kept,  # 1 / (number of kept Gram entries); 0 when none is kept (B = 1, mask_diag: the loss is 0)
    UPPER_ONLY: tl.constexpr, MASK_DIAG: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_COS: tl.constexpr,
):
    o_r = tl.arange(0, BLOCK_B)
    o_c = tl.arange(0, BLOCK_B)
    o_gram = o_r[:, None] * BLOCK_B + o_c[None, :]
    b_ux = tl.zeros((BLOCK_B, BLOCK_B), dtype=tl.float32)  # m_b . m_c
    b_uy = tl.zeros((BLOCK_B, BLOCK_B), dtype=tl.float32)
    for k in range(0, n_chunks):
        b_ux += tl.load(gram_part_ptr + (k * 2) * BLOCK_B * BLOCK_B + o_gram)
        b_uy += tl.load(gram_part_ptr + (k * 2 + 1) * BLOCK_B * BLOCK_B + o_gram)
    b_nxr, b_nxc = _diagonal(b_ux, o_r, o_c)
    b_nyr, b_nyc = _diagonal(b_uy, o_r, o_c)
    b_nxr, b_nxc = tl.sqrt_rn(b_nxr), tl.sqrt_rn(b_nxc)
    b_gx = b_ux / (tl.maximum(b_nxr, _EPS)[:, None] * tl.maximum(b_nxc, _EPS)[None, :])
    b_gy = b_uy / (tl.maximum(tl.sqrt_rn(b_nyr), _EPS)[:, None] * tl.maximum(tl.sqrt_rn(b_nyc), _EPS)[None, :])
    m_rc = (o_r < B)[:, None] & (o_c < B)[None, :]
    m_keep = m_rc
    if UPPER_ONLY:
        m_keep = m_keep & (o_r[:, None] <= o_c[None, :])
    if MASK_DIAG:
        m_keep = m_keep & (o_r[:, None] != o_c[None, :])
    b_w = tl.where(m_keep, inv_kept, 0.0)
    b_diff = b_gx - b_gy
    o_out = o_r[:, None] * B + o_c[None, :]
    tl.store(gram_ptr + o_out, b_gx, mask=m_rc)
    tl.store(dgram_ptr + o_out, 2.0 * b_w * b_diff, mask=m_rc)
    tl.store(nx_ptr + o_r, b_nxr, mask=o_r < B)
    o_cos = tl.arange(0, BLOCK_COS)
    b_cos = tl.zeros((BLOCK_COS,), dtype=tl.float32)
    for i in range(0, n_cos, BLOCK_COS):
        b_cos += tl.load(cos_ptr + i + o_cos, mask=i + o_cos < n_cos, other=0.0)
    tl.store(loss_token_ptr, 1.0 - tl.sum(b_cos, axis=0) / (B * N))
    tl.store(loss_manifold_ptr, tl.sum(tl.sum(b_w * b_diff * b_diff, axis=1), axis=0))


# Program (i_d, i_b): the head's pass over the token gradient (BLOCK_D channels of sample i_b, the whole map),
# the gradient made here from y: dL/dt = s_b - (g_token / (B N)) y^.
@triton.jit
def _align_branch_bwd_token_kernel(
    xhat_ptr, gamma_ptr, beta_ptr, y_ptr, y_rstd_ptr, tok_rstd_ptr, interp_ptr, mx_ptr, nx_ptr, gram_ptr,
    dgram_ptr, grad_token_ptr, grad_manifold_ptr, p1_ptr, gu_ptr,
    B, N, D, stride_yb, stride_yn,
    HW: tl.constexpr, UPSAMPLE: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_d = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    # s_b over this block's channels: the Gram part of dL/dt, the same for every token of sample i_b
    o_c = tl.arange(0, BLOCK_B)
    m_c = o_c < B
    g_token = tl.load(grad_token_ptr).to(tl.float32)  # device scalars: no host sync
    g_manifold = tl.load(grad_manifold_ptr).to(tl.float32)
    b_s = g_manifold * (tl.load(dgram_ptr + i_b * B + o_c, mask=m_c, other=0.0)
                        + tl.load(dgram_ptr + o_c * B + i_b, mask=m_c, other=0.0))  # [BLOCK_B]: S[b, :]
    n_b = tl.load(nx_ptr + i_b)
    radial = tl.where(n_b >= _EPS, tl.sum(b_s * tl.load(gram_ptr + i_b * B + o_c, mask=m_c, other=0.0), axis=0), 0.0)
    b_nc = tl.maximum(tl.load(nx_ptr + o_c, mask=m_c, other=1.0), _EPS)
    b_pc = tl.load(mx_ptr + o_c[:, None] * D + o_d[None, :], mask=m_c[:, None] & m_d[None, :],
                   other=0.0) / b_nc[:, None]  # [BLOCK_B, BLOCK_D]: p_c
    b_pb = tl.load(mx_ptr + i_b * D + o_d, mask=m_d, other=0.0) / tl.maximum(n_b, _EPS)
    b_sg = (tl.sum(b_s[:, None] * b_pc, axis=0) - b_pb * radial) / (tl.maximum(n_b, _EPS) * N)  # [BLOCK_D]
    token_grad = g_token / (B * N)

    o_p, m_p, b_act, b_act_lp = _bwd_map_act(xhat_ptr, gamma_ptr, beta_ptr, i_b, o_d, m_d, D, HW, BLOCK_HW)
    b_p1 = tl.zeros((BLOCK_HW, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, N, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < N
        m_td = m_t[:, None] & m_d[None, :]  # [BLOCK_T, BLOCK_D]
        b_y = tl.load(y_ptr + i_b * stride_yb + o_t[:, None] * stride_yn + o_d[None, :], mask=m_td,
                      other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_D]
        b_ry = tl.load(y_rstd_ptr + i_b * N + o_t, mask=m_t, other=0.0)
        b_g = tl.where(m_td, b_sg[None, :] - token_grad * b_ry[:, None] * b_y, 0.0)
        b_r = tl.load(tok_rstd_ptr + i_b * N + o_t, mask=m_t, other=0.0)
        b_p1, b_gu = _bwd_token_chunk(b_g, b_r, b_act, b_act_lp, b_p1, interp_ptr, o_t, m_t, o_p, m_p, HW,
                                      UPSAMPLE, DOT_PRECISION)
        tl.store(gu_ptr + (i_b * tl.num_programs(0) + i_d) * N + o_t, b_gu, mask=m_t)
    tl.store(p1_ptr + (i_b * HW + o_p)[:, None] * D + o_d[None, :], b_p1.to(p1_ptr.dtype.element_ty),
             mask=m_p[:, None] & m_d[None, :])


# --------------------------------------------------------------------------------------------------
# Launch configuration.


@dataclass(frozen=True)
class AlignBranchBlocks:
    """The branch's own kernels' blocks (``align_branch_blocks``); the head's kernels use ``head``."""

    head: AlignHeadBlocks
    token_rows: int  # token kernel: tokens per step, whole D each
    token_block_d: int
    token_warps: int
    tokens_per_split: int  # ... tokens per program (a multiple of token_rows)
    splits: int  # ... programs per sample
    block_b: int  # the Grams' side, B padded
    gram_chunk: int  # channels per partial-Gram program
    gram_chunks: int
    gram_warps: int  # the [B, B] kernels: six [block_b, block_b] fp32 tiles live in the loss kernel


def align_branch_blocks(batch: int, in_ch: int, map_hw: tuple[int, int], grid: tuple[int, int], D: int,
                        num_groups: int, dtype: torch.dtype) -> AlignBranchBlocks:
    """The launch configuration of the branch for one problem shape (a function of the shape only, so computed
    once per shape)."""
    key = (int(batch), int(in_ch), tuple(int(n) for n in map_hw), tuple(int(n) for n in grid), int(D),
           int(num_groups), dtype)
    # As align_head_blocks: Dynamo traces the plain function, eager calls hit the cache.
    return _compute_branch_blocks(*key) if torch.compiler.is_compiling() else _cached_branch_blocks(*key)


def _compute_branch_blocks(batch: int, in_ch: int, map_hw: tuple[int, ...], grid: tuple[int, ...], D: int,
                           num_groups: int, dtype: torch.dtype) -> AlignBranchBlocks:
    if batch > MAX_BATCH:
        raise ValueError(f"align_branch_loss: batch {batch} is above {MAX_BATCH} (the [B, B] Grams are one "
                         f"program's); use kernels='torch'")
    head = align_head_blocks(batch, in_ch, map_hw, grid, D, num_groups, dtype)
    N = grid[0] * grid[1]
    # Token kernel: 4 tokens of D = 1024 a step (the head's token tile); runs of tokens per program such that
    # B x splits reaches two waves (48 x 6 at the real shape), each run at least 16 tokens.
    token_rows = head.token_rows
    splits = max(1, min(triton.cdiv(TARGET_PROGRAMS, batch), triton.cdiv(N, 16)))
    tokens_per_split = triton.cdiv(triton.cdiv(N, splits), token_rows) * token_rows
    gram_chunk = max(16, min(GRAM_CHUNK, triton.next_power_of_2(D)))
    block_b = max(16, triton.next_power_of_2(batch))
    return AlignBranchBlocks(
        head=head, token_rows=token_rows, token_block_d=head.token_block_d,
        # five [token_rows, D] fp32 tiles live (u, t, y and the two running sums)
        token_warps=8 if token_rows * head.token_block_d > 1024 else 4,
        tokens_per_split=tokens_per_split, splits=triton.cdiv(N, tokens_per_split),
        block_b=block_b, gram_chunk=gram_chunk, gram_chunks=triton.cdiv(D, gram_chunk),
        gram_warps=4 if block_b <= 64 else 16,
    )


_cached_branch_blocks = functools.lru_cache(maxsize=64)(_compute_branch_blocks)


# --------------------------------------------------------------------------------------------------
# Host functions.


def _check_y(y: torch.Tensor, B: int, N: int, D: int, device) -> None:
    if tuple(y.shape) != (B, N, D):
        raise ValueError(f"align_branch_loss: y (the DINO tokens) must be [{B},{N},{D}] like the head's tokens, "
                         f"got {list(y.shape)}")
    if y.device != device:
        raise ValueError(f"align_branch_loss: y is on {y.device}, feat on {device}")
    if not y.is_floating_point():
        raise ValueError(f"align_branch_loss: y must be floating point, got {y.dtype}")


def align_branch_forward(feat, conv_weight, gn_weight, gn_bias, num_groups: int, grid: tuple[int, int], eps: float,
                         y, upper_only: bool = False, mask_diag: bool = False):
    """(L_token, L_manifold) (fp32 scalars) and what the backward needs: x_hat [B, HW, D], GroupNorm rstd
    [B, G], token r and |y|^-1 [B, N], m [B, D], |m| [B], G_x and dL_m/dG_x [B, B] (all fp32 but x_hat)."""
    B, C, H, W, D = check_inputs(feat, conv_weight, gn_weight, gn_bias, num_groups, grid, "align_branch_loss")
    gh, gw = grid
    N = gh * gw
    _check_y(y, B, N, D, feat.device)
    blocks = align_branch_blocks(B, C, (H, W), grid, D, num_groups, feat.dtype)
    dev, f32 = feat.device, torch.float32
    x_hat, _mean, gn_rstd = project(feat, conv_weight, num_groups, eps, blocks.head)
    y = rows_contiguous(y)
    tok_rstd = torch.empty(B, N, dtype=f32, device=dev)
    y_rstd = torch.empty(B, N, dtype=f32, device=dev)
    cos = torch.empty(B, blocks.splits, dtype=f32, device=dev)
    sums = torch.empty(2, B, blocks.splits, D, dtype=f32, device=dev)
    _align_branch_token_kernel[(blocks.splits, B)](
        xhat_ptr=x_hat, gamma_ptr=gn_weight.contiguous(), beta_ptr=gn_bias.contiguous(), y_ptr=y,
        tok_rstd_ptr=tok_rstd, y_rstd_ptr=y_rstd, cos_ptr=cos, sum_ptr=sums,
        B=B, N=N, D=D, stride_yb=y.stride(0), stride_yn=y.stride(1), tokens_per_split=blocks.tokens_per_split,
        MAP_H=H, MAP_W=W, GRID_H=gh, GRID_W=gw, UPSAMPLE=(gh, gw) != (H, W),
        BLOCK_T=blocks.token_rows, BLOCK_D=blocks.token_block_d, num_warps=blocks.token_warps, num_stages=1,
    )
    mx = torch.empty(B, D, dtype=f32, device=dev)
    gram_part = torch.empty(blocks.gram_chunks, 2, blocks.block_b, blocks.block_b, dtype=f32, device=dev)
    _align_branch_gram_partial_kernel[(blocks.gram_chunks,)](
        sum_ptr=sums, mx_ptr=mx, gram_part_ptr=gram_part,
        B=B, N=N, D=D, n_splits=blocks.splits,
        BLOCK_B=blocks.block_b, BLOCK_K=blocks.gram_chunk, num_warps=blocks.gram_warps, num_stages=1,
    )
    kept = kept_entries(B, upper_only, mask_diag)
    loss_token = torch.empty((), dtype=f32, device=dev)
    loss_manifold = torch.empty((), dtype=f32, device=dev)
    gram = torch.empty(B, B, dtype=f32, device=dev)
    dgram = torch.empty(B, B, dtype=f32, device=dev)
    nx = torch.empty(B, dtype=f32, device=dev)
    _align_branch_loss_kernel[(1,)](
        gram_part_ptr=gram_part, cos_ptr=cos, loss_token_ptr=loss_token, loss_manifold_ptr=loss_manifold,
        gram_ptr=gram, dgram_ptr=dgram, nx_ptr=nx,
        B=B, N=N, n_chunks=blocks.gram_chunks, n_cos=B * blocks.splits, inv_kept=1.0 / kept if kept > 0 else 0.0,
        UPPER_ONLY=bool(upper_only), MASK_DIAG=bool(mask_diag), BLOCK_B=blocks.block_b, BLOCK_COS=256,
        num_warps=blocks.gram_warps, num_stages=1,
    )
    return loss_token, loss_manifold, x_hat, gn_rstd, tok_rstd, y_rstd, mx, nx, gram, dgram


def align_branch_backward(grad_token, grad_manifold, feat, conv_weight, gn_weight, gn_bias, y, x_hat, gn_rstd,
                          tok_rstd, y_rstd, mx, nx, gram, dgram, num_groups: int, grid: tuple[int, int],
                          need_dfeat: bool = True, need_dweight: bool = True):
    """(dfeat, dconv_weight, dgn_weight, dgn_bias) from the two losses' upstream gradients (scalar tensors)
    and the forward's saved tensors; dfeat / dW empty ([0]) where not needed."""
    B, C, H, W, D = check_inputs(feat, conv_weight, gn_weight, gn_bias, num_groups, grid, "align_branch_loss")
    HW, N = H * W, grid[0] * grid[1]
    blocks = align_branch_blocks(B, C, (H, W), grid, D, num_groups, feat.dtype)
    head = blocks.head
    y = rows_contiguous(y)
    gn_weight, gn_bias = gn_weight.contiguous(), gn_bias.contiguous()
    n_dblocks = triton.cdiv(D, head.bwd_block_d)
    p1 = torch.empty(B, HW, D, dtype=feat.dtype, device=feat.device)
    gu = torch.empty(B, n_dblocks, N, dtype=torch.float32, device=feat.device)
    _align_branch_bwd_token_kernel[(n_dblocks, B)](
        xhat_ptr=x_hat, gamma_ptr=gn_weight, beta_ptr=gn_bias, y_ptr=y, y_rstd_ptr=y_rstd, tok_rstd_ptr=tok_rstd,
        interp_ptr=interp_operator(x_hat, (H, W), grid), mx_ptr=mx, nx_ptr=nx, gram_ptr=gram, dgram_ptr=dgram,
        grad_token_ptr=grad_token, grad_manifold_ptr=grad_manifold, p1_ptr=p1, gu_ptr=gu,
        B=B, N=N, D=D, stride_yb=y.stride(0), stride_yn=y.stride(1),
        HW=HW, UPSAMPLE=tuple(grid) != (H, W), BLOCK_HW=head.block_hw, BLOCK_T=head.bwd_block_t,
        BLOCK_D=head.bwd_block_d, BLOCK_B=blocks.block_b, DOT_PRECISION=head.dot_precision,
        num_warps=head.bwd_warps, num_stages=2,
    )
    return map_backward(p1, gu, feat, conv_weight, gn_weight, gn_bias, x_hat, gn_rstd, tok_rstd, num_groups, grid,
                        head, need_dfeat, need_dweight)


# --------------------------------------------------------------------------------------------------
# The custom ops.

_Tensor = torch.Tensor


@torch.library.custom_op("repa_fast::align_branch_loss", mutates_args=())
def align_branch_loss_op(feat: _Tensor, conv_weight: _Tensor, gn_weight: _Tensor, gn_bias: _Tensor, num_groups: int,
                         grid: list[int], eps: float, y: _Tensor, upper_only: bool, mask_diag: bool
                         ) -> tuple[_Tensor, _Tensor, _Tensor, _Tensor, _Tensor, _Tensor, _Tensor, _Tensor, _Tensor,
                                    _Tensor]:
    """``align_branch_forward``: (L_token, L_manifold, then the tensors the backward needs)."""
    return align_branch_forward(feat, conv_weight, gn_weight, gn_bias, num_groups, tuple(grid), eps, y, upper_only,
                                mask_diag)


@align_branch_loss_op.register_fake
def _align_branch_loss_fake(feat, conv_weight, gn_weight, gn_bias, num_groups, grid, eps, y, upper_only, mask_diag):
    B, _, H, W = feat.shape
    D, N = conv_weight.shape[0], grid[0] * grid[1]

    def f32(*shape):
        return feat.new_empty(shape, dtype=torch.float32)

    return (f32(), f32(), feat.new_empty(B, H * W, D), f32(B, num_groups), f32(B, N), f32(B, N), f32(B, D), f32(B),
            f32(B, B), f32(B, B))


@torch.library.custom_op("repa_fast::align_branch_loss_backward", mutates_args=())
def align_branch_loss_backward_op(grad_token: _Tensor, grad_manifold: _Tensor, feat: _Tensor, conv_weight: _Tensor,
                                  gn_weight: _Tensor, gn_bias: _Tensor, y: _Tensor, x_hat: _Tensor, gn_rstd: _Tensor,
                                  tok_rstd: _Tensor, y_rstd: _Tensor, mx: _Tensor, nx: _Tensor, gram: _Tensor,
                                  dgram: _Tensor, num_groups: int, grid: list[int], need_dfeat: bool,
                                  need_dweight: bool) -> tuple[_Tensor, _Tensor, _Tensor, _Tensor]:
    """``align_branch_backward``: (dfeat, dconv_weight, dgn_weight, dgn_bias)."""
    return align_branch_backward(grad_token, grad_manifold, feat, conv_weight, gn_weight, gn_bias, y, x_hat, gn_rstd,
                                 tok_rstd, y_rstd, mx, nx, gram, dgram, num_groups, tuple(grid), need_dfeat,
                                 need_dweight)


@align_branch_loss_backward_op.register_fake
def _align_branch_loss_backward_fake(grad_token, grad_manifold, feat, conv_weight, gn_weight, gn_bias, *rest):
    need_dfeat, need_dweight = rest[-2:]
    return grads_fake(feat, conv_weight, gn_weight, gn_bias, need_dfeat, need_dweight)


def _align_branch_setup_context(ctx, inputs, output):
    feat, conv_weight, gn_weight, gn_bias, num_groups, grid, _eps, y, _upper, _diag = inputs
    saved = output[2:]
    ctx.save_for_backward(feat, conv_weight, gn_weight, gn_bias, y, *saved)
    ctx.num_groups, ctx.grid = num_groups, grid
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the saved-only outputs: launches saved


def _align_branch_autograd(ctx, grad_token, grad_manifold, *_unused):
    feat, conv_weight, gn_weight, gn_bias, y, *saved = ctx.saved_tensors
    if grad_token is None or grad_manifold is None:  # one of the losses is not used
        zero = feat.new_zeros((), dtype=torch.float32)
        grad_token, grad_manifold = (zero if g is None else g for g in (grad_token, grad_manifold))
    grads = torch.ops.repa_fast.align_branch_loss_backward(
        grad_token, grad_manifold, feat, conv_weight, gn_weight, gn_bias, y, *saved, ctx.num_groups, ctx.grid,
        ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    return (*grads_or_none(ctx, grads), None, None, None, None, None, None)


align_branch_loss_op.register_autograd(_align_branch_autograd, setup_context=_align_branch_setup_context)


def align_branch_loss(feat: torch.Tensor, conv_weight: torch.Tensor, gn_weight: torch.Tensor, gn_bias: torch.Tensor,
                      num_groups: int, grid: tuple[int, int], eps: float, y: torch.Tensor, upper_only: bool = False,
                      mask_diag: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_token, L_manifold), fp32 scalars: ``token_loss`` and ``manifold_gram_loss`` (sample form) of the
    AlignHead's tokens of feat [B, C, H, W] against the DINO tokens y [B, gh*gw, D] (fp16/bf16/fp32, no grad).
    Differentiable in feat, conv_weight, gn_weight and gn_bias; the [B, N, D] tokens are never stored."""
    grid = [int(grid[0]), int(grid[1])]
    B, C, H, W, D = check_inputs(feat, conv_weight, gn_weight, gn_bias, int(num_groups), grid, "align_branch_loss")
    _check_y(y, B, grid[0] * grid[1], D, feat.device)
    if y.requires_grad:
        raise ValueError("align_branch_loss: y requires grad, but the fused op differentiates the head only; use "
                         "repa_fast.losses (kernels='torch') for a trainable target")
    align_branch_blocks(B, C, (H, W), grid, D, int(num_groups), feat.dtype)  # raises on a batch it cannot hold
    loss_token, loss_manifold, *_ = torch.ops.repa_fast.align_branch_loss(
        feat, conv_weight, gn_weight, gn_bias, int(num_groups), grid, float(eps), y, bool(upper_only), bool(mask_diag))
    return loss_token, loss_manifold
