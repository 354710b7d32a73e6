"""Fused AlignHead: 1x1 conv + GroupNorm + GELU + bilinear upsample + token flatten + per-token L2 norm.

The math is ``AlignHead.reference`` in ``repa_fast/models/align_head.py``; this module is the fast version
of it, forward and backward, registered as the torch custom ops ``repa_fast::align_head`` and
``repa_fast::align_head_backward`` (so ``torch.compile`` holds each as one node). Shapes: feat x
[B, C, HW] (the feature map with its spatial dims flattened), W [D, C], G GroupNorm groups, M the
[N, HW] bilinear matrix (tokens = M @ map; the identity when the map is the token grid):

    y = x^T W^T [B, HW, D];  x_hat = GroupNorm(y) (fp32 statistics);  act = GELU(x_hat gamma + beta)
    u = M act [B, N, D];     tok = u r,  r_t = 1 / max(|u_t|, 1e-12)   (F.normalize)

Forward, two kernels:
  1. ``_align_head_proj_kernel``: the GEMM, tiles of SAMPLES whole samples x whole groups (>= 128 rows,
     so the GroupNorm statistics of each (sample, group) are exact within the tile). Epilogue: two-pass
     fp32 statistics, normalise. Writes only the small map x_hat [B, HW, D] and mean/rstd [B, G].
  2. ``_align_head_token_kernel``: GELU of the 4 source rows of each token (the map is L2-resident),
     bilinear blend, L2 norm over the whole D; writes tokens [B, N, D] and r [B, N] (fp32).

Backward (g = dL/dtok), nothing of size [B, N, D] saved, g read once:
    dU = r g - r^3 (g.u) u                    (F.normalize)
    dA = M^T dU = P1 - M^T (c u),  P1 = M^T (r g),  c_t = r_t^3 (g_t . u_t)
    dz = dA GELU'(z),  z = x_hat gamma + beta
    dy = rstd (gamma dz - mean_g(gamma dz) - x_hat mean_g(gamma dz x_hat))      (GroupNorm)
  3. ``_align_head_bwd_token_kernel`` (sample, channel block): the one pass over g: P1 [B, HW, D] and
     the partial sums of g.u over its channels, [B, D blocks, N] fp32 (u = M act recomputed on tensor cores).
  4. ``_align_head_bwd_map_kernel`` (sample, whole groups): c from the partials (summed in a fixed order),
     dA, GELU and GroupNorm backward -> dy [B, HW, D]; dgamma/dbeta per-sample fp32 partials.
  5. ``_align_head_dx_kernel``: dX = dy W, one [B*HW, D] x [D, C] GEMM stored in feat's layout.
  6. ``_align_head_dw_kernel``: dW = dy^T x, [D, B*HW] x [B*HW, C] with a deterministic split-K: fp32
     partials [SPLIT, D, C], no atomics.
  7. ``_align_head_reduce_kernel``: dW, dgamma, dbeta = the partials summed in a fixed order.

Names in the kernels follow flash-linear-attention: ``i_`` program ids, ``o_`` offsets, ``m_`` masks,
``p_`` pointers, ``b_`` blocks (with their shape in a comment where it is not obvious).
The fused REPA branch (``align_branch.py``) reuses kernels 1 and 4-7 and the helpers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .token_pair import NORM_EPS, dot_precision, rows_contiguous

GELU_SQRT_HALF = 0.7071067811865476  # 1/sqrt(2): GELU(z) = z Phi(z), Phi(z) = (1 + erf(z / sqrt(2))) / 2
GELU_INV_SQRT_2PI = 0.3989422804014327  # 1/sqrt(2 pi): Phi'(z) = exp(-z^2 / 2) / sqrt(2 pi)
_EPS = tl.constexpr(NORM_EPS)
_SQRT_HALF = tl.constexpr(GELU_SQRT_HALF)
_INV_SQRT_2PI = tl.constexpr(GELU_INV_SQRT_2PI)

# fp32 elements of the projection's [rows, columns] accumulator (64 a thread at 8 warps): a GroupNorm group
# must fit one tile with the whole map (16x16 maps: groups of up to 64 channels; 8x8: 256).
MAX_TILE = 16384
# Programs a launch should have where the shape allows: two waves on an H200's 132 SMs. A constant, not
# the device's SM count, so that block sizes, the dW split and with them the summation order (and the
# result, bit for bit) depend on the shape only.
TARGET_PROGRAMS = 2 * 132
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Helpers shared by the kernels (align_branch.py uses them too).


@triton.jit
def _gelu(b_z):
    return 0.5 * b_z * (1.0 + tl.math.erf(b_z * _SQRT_HALF))


@triton.jit
def _gelu_grad(b_z):
    # d/dz z Phi(z) = Phi(z) + z Phi'(z)
    return 0.5 * (1.0 + tl.math.erf(b_z * _SQRT_HALF)) + b_z * tl.exp(-0.5 * b_z * b_z) * _INV_SQRT_2PI


@triton.jit
def _source_index(o_dst, IN_SIZE: tl.constexpr, OUT_SIZE: tl.constexpr):
    # F.interpolate(mode="bilinear", align_corners=False): source coordinate (dst + 0.5) * in/out - 0.5
    # clamped at 0; the lower neighbour is clamped to the last index, the upper one to the edge.
    # Returns the two source indices and the weight of the upper one.
    b_src = tl.maximum((o_dst.to(tl.float32) + 0.5) * (IN_SIZE / OUT_SIZE) - 0.5, 0.0)
    o_lo = tl.minimum(b_src.to(tl.int32), IN_SIZE - 1)
    b_w = tl.minimum(tl.maximum(b_src - o_lo.to(tl.float32), 0.0), 1.0)
    o_hi = tl.where(o_lo < IN_SIZE - 1, o_lo + 1, o_lo)
    return o_lo, o_hi, b_w


@triton.jit
def _group_columns(i_g, G, GROUP_SIZE: tl.constexpr, GROUP_BLOCK: tl.constexpr, GROUPS: tl.constexpr):
    # The [GROUPS * GROUP_BLOCK] columns of a tile: GROUPS whole GroupNorm groups, each padded to a power of
    # two. Returns their channels and mask (contiguous runs of GROUP_SIZE channels).
    o_col = tl.arange(0, GROUPS * GROUP_BLOCK)
    o_grp = i_g * GROUPS + o_col // GROUP_BLOCK
    o_j = o_col % GROUP_BLOCK
    return o_grp * GROUP_SIZE + o_j, (o_j < GROUP_SIZE) & (o_grp < G)


@triton.jit
def _sample_group_sum(b_v, SAMPLES: tl.constexpr, BLOCK_HW: tl.constexpr, GROUPS: tl.constexpr,
                      GROUP_BLOCK: tl.constexpr):
    # b_v [SAMPLES * BLOCK_HW, GROUPS * GROUP_BLOCK] -> [SAMPLES, GROUPS]: the total of each sample's rows
    # and each group's columns.
    b_cols = tl.sum(tl.reshape(b_v, [SAMPLES, BLOCK_HW, GROUPS * GROUP_BLOCK]), axis=1)
    return tl.sum(tl.reshape(b_cols, [SAMPLES, GROUPS, GROUP_BLOCK]), axis=2)


@triton.jit
def _sample_group_broadcast(b_sg, SAMPLES: tl.constexpr, BLOCK_HW: tl.constexpr, GROUPS: tl.constexpr,
                            GROUP_BLOCK: tl.constexpr):
    # [SAMPLES, GROUPS] -> [SAMPLES * BLOCK_HW, GROUPS * GROUP_BLOCK], the inverse layout of _sample_group_sum.
    b_v = tl.broadcast_to(b_sg[:, None, :, None], [SAMPLES, BLOCK_HW, GROUPS, GROUP_BLOCK])
    return tl.reshape(b_v, [SAMPLES * BLOCK_HW, GROUPS * GROUP_BLOCK])


@triton.jit
def _map_act(p_xhat, o_pos, m_pos, b_gamma, b_beta, o_d, m_d, D):
    """act = GELU(x_hat gamma + beta) in fp32 at map positions o_pos of one sample: [len(o_pos), len(o_d)],
    zero where masked."""
    m_pd = m_pos[:, None] & m_d[None, :]
    b_xhat = tl.load(p_xhat + o_pos[:, None].to(tl.int64) * D + o_d[None, :], mask=m_pd, other=0.0).to(tl.float32)
    return tl.where(m_pd, _gelu(b_xhat * b_gamma[None, :] + b_beta[None, :]), 0.0)


@triton.jit
def _token_rows(p_xhat, b_gamma, b_beta, o_t, m_t, o_d, m_d, D, MAP_H: tl.constexpr, MAP_W: tl.constexpr,
                GRID_H: tl.constexpr, GRID_W: tl.constexpr, UPSAMPLE: tl.constexpr):
    """The unnormalised tokens u = M act of rows o_t of one sample, fp32 [len(o_t), len(o_d)]: a bilinear
    blend of the act of four map positions (recomputed from x_hat), or one position without resampling."""
    if UPSAMPLE:
        o_y0, o_y1, b_wy = _source_index(o_t // GRID_W, MAP_H, GRID_H)  # [BLOCK_T] each
        o_x0, o_x1, b_wx = _source_index(o_t % GRID_W, MAP_W, GRID_W)
        b_top = ((1.0 - b_wx)[:, None] * _map_act(p_xhat, o_y0 * MAP_W + o_x0, m_t, b_gamma, b_beta, o_d, m_d, D)
                 + b_wx[:, None] * _map_act(p_xhat, o_y0 * MAP_W + o_x1, m_t, b_gamma, b_beta, o_d, m_d, D))
        b_bottom = ((1.0 - b_wx)[:, None] * _map_act(p_xhat, o_y1 * MAP_W + o_x0, m_t, b_gamma, b_beta, o_d, m_d, D)
                    + b_wx[:, None] * _map_act(p_xhat, o_y1 * MAP_W + o_x1, m_t, b_gamma, b_beta, o_d, m_d, D))
        b_u = (1.0 - b_wy)[:, None] * b_top + b_wy[:, None] * b_bottom
    else:
        b_u = _map_act(p_xhat, o_t, m_t, b_gamma, b_beta, o_d, m_d, D)
    return b_u


@triton.jit
def _bwd_token_chunk(b_g, b_r, b_act, b_act_lp, b_p1, p_interp, o_t, m_t, o_p, m_p, HW: tl.constexpr,
                     UPSAMPLE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One chunk of tokens of the backward's pass over g (b_g [BLOCK_T, BLOCK_D] fp32, b_r [BLOCK_T] their r):
    P1 += M^T (r g) and the partial sums g.u over the block's channels ([BLOCK_T]). Without resampling the
    chunk is the whole map (token t is position t) and P1 = r g."""
    b_rg = b_g * b_r[:, None]
    if UPSAMPLE:
        b_m = tl.load(p_interp + o_t[:, None] * HW + o_p[None, :], mask=m_t[:, None] & m_p[None, :],
                      other=0.0)  # [BLOCK_T, BLOCK_HW]: rows of M
        b_u = tl.dot(b_m, b_act_lp, input_precision=DOT_PRECISION)
        b_p1 = tl.dot(tl.trans(b_m), b_rg.to(b_m.dtype), b_p1, input_precision=DOT_PRECISION)
    else:
        b_u = b_act
        b_p1 = b_rg
    return b_p1, tl.sum(b_g * b_u, axis=1)


@triton.jit
def _bwd_map_act(xhat_ptr, gamma_ptr, beta_ptr, i_b, o_d, m_d, D, HW: tl.constexpr, BLOCK_HW: tl.constexpr):
    """The whole map of sample i_b at channels o_d, for the pass over the token gradient: (positions, their mask,
    act fp32 [BLOCK_HW, BLOCK_D], act in the map's dtype for tl.dot)."""
    o_p = tl.arange(0, BLOCK_HW)
    m_p = o_p < HW
    b_gamma = tl.load(gamma_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_beta = tl.load(beta_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_act = _map_act(xhat_ptr + i_b * HW * D, o_p, m_p, b_gamma, b_beta, o_d, m_d, D)
    return o_p, m_p, b_act, b_act.to(xhat_ptr.dtype.element_ty)


# --------------------------------------------------------------------------------------------------
# Forward.


# Program (i_m, i_g): rows = the HW positions of SAMPLES consecutive samples, columns = GROUPS whole groups.
# acc[r, d] = sum_c x[b, c, p] W[d, c]; then GroupNorm statistics (two-pass, fp32) per (sample, group).
@triton.jit
def _align_head_proj_kernel(
    x_ptr, w_ptr, xhat_ptr, mean_ptr, rstd_ptr,
    B, C, G, D, eps,
    stride_xb, stride_xc, stride_xp, stride_wd, stride_wc,
    HW: tl.constexpr, SAMPLES: tl.constexpr, BLOCK_HW: tl.constexpr, GROUP_SIZE: tl.constexpr,
    GROUP_BLOCK: tl.constexpr, GROUPS: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_m = tl.program_id(0).to(tl.int64)
    i_g = tl.program_id(1).to(tl.int64)
    o_r = tl.arange(0, SAMPLES * BLOCK_HW)  # tile rows: sample-major, BLOCK_HW positions each
    o_b = i_m * SAMPLES + o_r // BLOCK_HW
    o_p = o_r % BLOCK_HW
    m_r = (o_b < B) & (o_p < HW)
    o_d, m_d = _group_columns(i_g, G, GROUP_SIZE, GROUP_BLOCK, GROUPS)
    p_x = x_ptr + o_b[:, None] * stride_xb + o_p[:, None] * stride_xp  # [ROWS, 1]
    p_w = w_ptr + o_d[None, :] * stride_wd  # [1, COLS]

    b_acc = tl.zeros((SAMPLES * BLOCK_HW, GROUPS * GROUP_BLOCK), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < C
        b_x = tl.load(p_x + o_k[None, :] * stride_xc, mask=m_r[:, None] & m_k[None, :], other=0.0)  # [ROWS, K]
        b_w = tl.load(p_w + o_k[:, None] * stride_wc, mask=m_k[:, None] & m_d[None, :], other=0.0)  # [K, COLS]
        b_acc = tl.dot(b_x, b_w.to(b_x.dtype), b_acc, input_precision=DOT_PRECISION)

    m_rd = m_r[:, None] & m_d[None, :]  # [ROWS, COLS]
    count = HW * GROUP_SIZE * 1.0
    b_mean = _sample_group_sum(b_acc, SAMPLES, BLOCK_HW, GROUPS, GROUP_BLOCK) / count  # [SAMPLES, GROUPS]
    b_diff = tl.where(m_rd, b_acc - _sample_group_broadcast(b_mean, SAMPLES, BLOCK_HW, GROUPS, GROUP_BLOCK), 0.0)
    b_var = _sample_group_sum(b_diff * b_diff, SAMPLES, BLOCK_HW, GROUPS, GROUP_BLOCK) / count
    b_rstd = 1.0 / tl.sqrt_rn(b_var + eps)
    b_xhat = b_diff * _sample_group_broadcast(b_rstd, SAMPLES, BLOCK_HW, GROUPS, GROUP_BLOCK)
    tl.store(xhat_ptr + (o_b * HW + o_p)[:, None] * D + o_d[None, :], b_xhat.to(xhat_ptr.dtype.element_ty), mask=m_rd)

    o_sb = i_m * SAMPLES + tl.arange(0, SAMPLES)
    o_sg = i_g * GROUPS + tl.arange(0, GROUPS)
    o_s = o_sb[:, None] * G + o_sg[None, :]
    m_s = (o_sb < B)[:, None] & (o_sg < G)[None, :]
    tl.store(mean_ptr + o_s, b_mean, mask=m_s)
    tl.store(rstd_ptr + o_s, b_rstd, mask=m_s)


# Program (i_t, i_b): BLOCK_T tokens of sample i_b with the whole D each (the L2 norm needs it).
@triton.jit
def _align_head_token_kernel(
    xhat_ptr, gamma_ptr, beta_ptr, tok_ptr, tok_rstd_ptr,
    N, D,
    MAP_H: tl.constexpr, MAP_W: tl.constexpr, GRID_H: tl.constexpr, GRID_W: tl.constexpr, UPSAMPLE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < N
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_gamma = tl.load(gamma_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_beta = tl.load(beta_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_u = _token_rows(xhat_ptr + i_b * (MAP_H * MAP_W) * D, b_gamma, b_beta, o_t, m_t, o_d, m_d, D,
                      MAP_H, MAP_W, GRID_H, GRID_W, UPSAMPLE)  # [BLOCK_T, BLOCK_D]
    b_r = 1.0 / tl.maximum(tl.sqrt_rn(tl.sum(b_u * b_u, axis=1)), _EPS)
    tl.store(tok_ptr + (i_b * N + o_t)[:, None] * D + o_d[None, :], (b_u * b_r[:, None]).to(tok_ptr.dtype.element_ty),
             mask=m_t[:, None] & m_d[None, :])
    tl.store(tok_rstd_ptr + i_b * N + o_t, b_r, mask=m_t)


# --------------------------------------------------------------------------------------------------
# Backward.


# Program (i_d, i_b): BLOCK_D channels of sample i_b over the whole map; the one pass over g (see the doc).
@triton.jit
def _align_head_bwd_token_kernel(
    xhat_ptr, gamma_ptr, beta_ptr, grad_ptr, tok_rstd_ptr, interp_ptr, p1_ptr, gu_ptr,
    N, D, stride_gb, stride_gn,
    HW: tl.constexpr, UPSAMPLE: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_d = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_p, m_p, b_act, b_act_lp = _bwd_map_act(xhat_ptr, gamma_ptr, beta_ptr, i_b, o_d, m_d, D, HW, BLOCK_HW)
    b_p1 = tl.zeros((BLOCK_HW, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, N, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < N
        b_g = tl.load(grad_ptr + i_b * stride_gb + o_t[:, None] * stride_gn + o_d[None, :],
                      mask=m_t[:, None] & m_d[None, :], other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_D]
        b_r = tl.load(tok_rstd_ptr + i_b * N + o_t, mask=m_t, other=0.0)
        b_p1, b_gu = _bwd_token_chunk(b_g, b_r, b_act, b_act_lp, b_p1, interp_ptr, o_t, m_t, o_p, m_p, HW,
                                      UPSAMPLE, DOT_PRECISION)
        tl.store(gu_ptr + (i_b * tl.num_programs(0) + i_d) * N + o_t, b_gu, mask=m_t)
    tl.store(p1_ptr + (i_b * HW + o_p)[:, None] * D + o_d[None, :], b_p1.to(p1_ptr.dtype.element_ty),
             mask=m_p[:, None] & m_d[None, :])


@triton.jit
def _radial_coef(gu_ptr, tok_rstd_ptr, i_b, o_t, m_t, N, n_dblocks):
    # c_t = r_t^3 (g_t . u_t), the partial sums over channel blocks added in a fixed order. Below the eps
    # clamp F.normalize is u / eps: no gradient through the norm.
    b_gu = tl.zeros(o_t.shape, dtype=tl.float32)
    for i in range(0, n_dblocks):
        b_gu += tl.load(gu_ptr + (i_b * n_dblocks + i) * N + o_t, mask=m_t, other=0.0)
    b_r = tl.load(tok_rstd_ptr + i_b * N + o_t, mask=m_t, other=0.0)
    return tl.where(b_r * _EPS < 1.0, b_r * b_r * b_r * b_gu, 0.0)


# Program (i_g, i_b): GROUPS whole groups of sample i_b over the whole map: dA, GELU and GroupNorm backward.
@triton.jit
def _align_head_bwd_map_kernel(
    xhat_ptr, gamma_ptr, beta_ptr, gn_rstd_ptr, p1_ptr, gu_ptr, tok_rstd_ptr, interp_ptr, dy_ptr, dgb_ptr,
    B, N, G, D, n_dblocks,
    HW: tl.constexpr, UPSAMPLE: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_T: tl.constexpr,
    GROUP_SIZE: tl.constexpr, GROUP_BLOCK: tl.constexpr, GROUPS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_g = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    o_p = tl.arange(0, BLOCK_HW)
    m_p = o_p < HW
    o_d, m_d = _group_columns(i_g, G, GROUP_SIZE, GROUP_BLOCK, GROUPS)
    m_pd = m_p[:, None] & m_d[None, :]  # [BLOCK_HW, COLS]
    o_map = (i_b * HW + o_p)[:, None] * D + o_d[None, :]  # [BLOCK_HW, COLS]
    b_gamma = tl.load(gamma_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_beta = tl.load(beta_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_xhat = tl.load(xhat_ptr + o_map, mask=m_pd, other=0.0).to(tl.float32)
    b_z = b_xhat * b_gamma[None, :] + b_beta[None, :]
    b_act = tl.where(m_pd, _gelu(b_z), 0.0)
    b_da = tl.load(p1_ptr + o_map, mask=m_pd, other=0.0).to(tl.float32)
    if UPSAMPLE:
        # dA = P1 - M^T (c u), u = M act recomputed chunk by chunk
        b_act_lp = b_act.to(xhat_ptr.dtype.element_ty)
        b_radial = tl.zeros((BLOCK_HW, GROUPS * GROUP_BLOCK), dtype=tl.float32)
        for t0 in range(0, N, BLOCK_T):
            o_t = t0 + tl.arange(0, BLOCK_T)
            m_t = o_t < N
            b_c = _radial_coef(gu_ptr, tok_rstd_ptr, i_b, o_t, m_t, N, n_dblocks)
            b_m = tl.load(interp_ptr + o_t[:, None] * HW + o_p[None, :], mask=m_t[:, None] & m_p[None, :],
                          other=0.0)  # [BLOCK_T, BLOCK_HW]
            b_u = tl.dot(b_m, b_act_lp, input_precision=DOT_PRECISION)
            b_radial = tl.dot(tl.trans(b_m), (b_c[:, None] * b_u).to(b_m.dtype), b_radial,
                              input_precision=DOT_PRECISION)
        b_da -= b_radial
    else:
        b_da -= _radial_coef(gu_ptr, tok_rstd_ptr, i_b, o_p, m_p, N, n_dblocks)[:, None] * b_act
    b_dz = tl.where(m_pd, b_da * _gelu_grad(b_z), 0.0)

    b_wdz = b_dz * b_gamma[None, :]
    count = HW * GROUP_SIZE * 1.0
    b_c1 = _sample_group_broadcast(_sample_group_sum(b_wdz, 1, BLOCK_HW, GROUPS, GROUP_BLOCK) / count,
                                   1, BLOCK_HW, GROUPS, GROUP_BLOCK)
    b_c2 = _sample_group_broadcast(_sample_group_sum(b_wdz * b_xhat, 1, BLOCK_HW, GROUPS, GROUP_BLOCK) / count,
                                   1, BLOCK_HW, GROUPS, GROUP_BLOCK)
    o_sg = i_g * GROUPS + tl.arange(0, GROUPS)
    b_rstd = tl.load(gn_rstd_ptr + i_b * G + o_sg, mask=o_sg < G, other=0.0)[None, :]  # [1, GROUPS]
    b_dy = _sample_group_broadcast(b_rstd, 1, BLOCK_HW, GROUPS, GROUP_BLOCK) * (b_wdz - b_c1 - b_xhat * b_c2)
    tl.store(dy_ptr + o_map, b_dy.to(dy_ptr.dtype.element_ty), mask=m_pd)
    # dgamma, dbeta of this sample: [2, B, D] fp32 partials
    tl.store(dgb_ptr + i_b * D + o_d, tl.sum(b_dz * b_xhat, axis=0), mask=m_d)
    tl.store(dgb_ptr + (B + i_b) * D + o_d, tl.sum(b_dz, axis=0), mask=m_d)


# Program (i_m, i_n): dX[b, c, p] = sum_d dy[b*HW + p, d] W[d, c] for BLOCK_M rows b*HW + p and BLOCK_N channels,
# stored into feat's layout (contiguous along p for NCHW, along c for channels-last).
@triton.jit
def _align_head_dx_kernel(
    dy_ptr, w_ptr, dx_ptr,
    M, C, D,
    stride_wd, stride_wc, stride_xb, stride_xc, stride_xp,
    HW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_m = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < C
    p_dy = dy_ptr + o_m[:, None] * D  # [BLOCK_M, 1]
    p_w = w_ptr + o_n[None, :] * stride_wc  # [1, BLOCK_N]
    b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < D
        b_dy = tl.load(p_dy + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        b_w = tl.load(p_w + o_k[:, None] * stride_wd, mask=m_k[:, None] & m_n[None, :], other=0.0)  # [K, N]
        b_acc = tl.dot(b_dy, b_w.to(b_dy.dtype), b_acc, input_precision=DOT_PRECISION)
    o_b = o_m // HW
    o_p = o_m % HW
    tl.store(dx_ptr + o_b[:, None] * stride_xb + o_p[:, None] * stride_xp + o_n[None, :] * stride_xc,
             b_acc.to(dx_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


# Program (i_d, i_c, i_s): the partial dW[d, c] = sum over rows k of split i_s of dy[k, d] x[b, c, p]
# (k = b*HW + p), [BLOCK_M, BLOCK_N] of it, fp32 into part[i_s]; feat is read with its own strides.
@triton.jit
def _align_head_dw_kernel(
    dy_ptr, x_ptr, part_ptr,
    M, C, D, k_per_split,
    stride_xb, stride_xc, stride_xp,
    HW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_d = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    i_s = tl.program_id(2).to(tl.int64)
    o_d = i_d * BLOCK_M + tl.arange(0, BLOCK_M)
    m_d = o_d < D
    o_c = i_c * BLOCK_N + tl.arange(0, BLOCK_N)
    m_c = o_c < C
    b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = i_s * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, M), BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < M
        b_dyt = tl.load(dy_ptr + o_k[None, :] * D + o_d[:, None], mask=m_d[:, None] & m_k[None, :],
                        other=0.0)  # [BLOCK_M, BLOCK_K]: dy^T
        b_x = tl.load(x_ptr + (o_k // HW)[:, None] * stride_xb + (o_k % HW)[:, None] * stride_xp
                      + o_c[None, :] * stride_xc, mask=m_k[:, None] & m_c[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        b_acc = tl.dot(b_dyt, b_x, b_acc, input_precision=DOT_PRECISION)
    tl.store(part_ptr + (i_s * D + o_d)[:, None] * C + o_c[None, :], b_acc, mask=m_d[:, None] & m_c[None, :])


# Programs [0, cdiv(n_w, BLOCK)): dW = the sum of the n_split partials; the rest: dgamma, dbeta = the sums of
# the per-sample partials. Fixed order: deterministic.
@triton.jit
def _align_head_reduce_kernel(
    wpart_ptr, dw_ptr, dgb_ptr, dgamma_ptr, dbeta_ptr,
    n_w, n_split, B, D,
    BLOCK: tl.constexpr,
):
    i_p = tl.program_id(0).to(tl.int64)
    n_wblocks = tl.cdiv(n_w, BLOCK)
    if i_p < n_wblocks:
        o_i = i_p * BLOCK + tl.arange(0, BLOCK)
        m_i = o_i < n_w
        b_sum = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, n_split):
            b_sum += tl.load(wpart_ptr + s * n_w + o_i, mask=m_i, other=0.0)
        tl.store(dw_ptr + o_i, b_sum.to(dw_ptr.dtype.element_ty), mask=m_i)
    else:
        o_i = (i_p - n_wblocks) * BLOCK + tl.arange(0, BLOCK)
        m_i = o_i < D
        b_dgamma = tl.zeros((BLOCK,), dtype=tl.float32)
        b_dbeta = tl.zeros((BLOCK,), dtype=tl.float32)
        for b in range(0, B):
            b_dgamma += tl.load(dgb_ptr + b * D + o_i, mask=m_i, other=0.0)
            b_dbeta += tl.load(dgb_ptr + (B + b) * D + o_i, mask=m_i, other=0.0)
        tl.store(dgamma_ptr + o_i, b_dgamma.to(dgamma_ptr.dtype.element_ty), mask=m_i)
        tl.store(dbeta_ptr + o_i, b_dbeta.to(dbeta_ptr.dtype.element_ty), mask=m_i)


# --------------------------------------------------------------------------------------------------
# Launch configuration: one heuristic for every kernel.


@dataclass(frozen=True)
class AlignHeadBlocks:
    """Block sizes, warps and the dW split of every kernel for one problem shape (``align_head_blocks``)."""

    group_size: int
    group_block: int  # GroupNorm group width padded to a power of two
    block_hw: int  # map positions padded to a power of two
    proj_samples: int  # projection: whole samples per tile (SAMPLES * block_hw rows)
    proj_groups: int  # ... and whole groups per tile
    proj_block_k: int
    proj_warps: int
    token_rows: int  # forward token kernel: tokens per program (whole D each)
    token_block_d: int
    token_warps: int
    bwd_block_d: int  # backward pass over g: channels per program
    bwd_block_t: int  # ... tokens per chunk
    bwd_warps: int
    map_groups: int  # backward map kernel: whole groups per program
    map_warps: int
    dx_block_m: int
    dx_block_n: int
    dx_block_k: int
    dx_warps: int
    dw_block_m: int
    dw_block_n: int
    dw_block_k: int
    dw_k_per_split: int  # rows of B*HW per split, a multiple of dw_block_k
    dw_split: int
    dw_warps: int
    reduce_block: int
    dot_precision: str


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _clamp_pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, _pow2(n)))


def align_head_blocks(batch: int, in_ch: int, map_hw: tuple[int, int], grid: tuple[int, int], D: int,
                      num_groups: int, dtype: torch.dtype) -> AlignHeadBlocks:
    """The launch configuration of every AlignHead kernel for one problem shape. A function of the shape only,
    so computed once per shape (the host calls it several times a step)."""
    key = (int(batch), int(in_ch), tuple(int(n) for n in map_hw), tuple(int(n) for n in grid), int(D),
           int(num_groups), dtype)
    # Dynamo (tracing the input checks of align_head) warns on lru_cache wrappers: it traces the plain function.
    return _compute_head_blocks(*key) if torch.compiler.is_compiling() else _cached_head_blocks(*key)


def _compute_head_blocks(batch: int, in_ch: int, map_hw: tuple[int, ...], grid: tuple[int, ...], D: int,
                         num_groups: int, dtype: torch.dtype) -> AlignHeadBlocks:
    H, W = map_hw
    HW, N = H * W, grid[0] * grid[1]
    upsample = grid != (H, W)
    if dtype not in _DTYPES:
        raise TypeError(f"align_head: feat dtype {dtype} is not one of {list(_DTYPES)}")
    if D % num_groups:
        raise ValueError(f"align_head: D={D} is not divisible by num_groups={num_groups}")
    group_size = D // num_groups
    group_block = _pow2(group_size)
    block_hw = _pow2(HW)
    if block_hw * group_block > MAX_TILE:
        raise ValueError(
            f"align_head: a GroupNorm group of {group_size} channels over a {H}x{W} map does not fit one "
            f"tile ({block_hw} x {group_block} > {MAX_TILE} elements); use more groups "
            f"(num_groups={num_groups}, D={D}) or kernels='torch'")
    M = batch * HW

    def fit_groups(rows: int, cols: int, budget: int) -> int:
        # Whole groups per tile: up to `cols` columns and `budget` fp32 elements, at least tl.dot's 16 columns.
        groups = max(1, 16 // group_block)
        while (groups * 2 <= _pow2(num_groups) and group_block * groups * 2 <= cols
               and rows * group_block * groups * 2 <= budget):
            groups *= 2
        return groups

    # Projection: whole samples per tile up to 128 rows (wgmma's 64-row tiles twice over; W is read once per
    # tile), at least 16 rows; 64 columns of whole groups (at 48 x 8x8 -> 384 programs, 16x16 -> 768).
    samples = max(1, min(128 // block_hw, _pow2(batch)), 16 // block_hw)
    proj_groups = fit_groups(samples * block_hw, 64, MAX_TILE)
    # Backward pass over g: the whole map x BLOCK_D channels (8x8 -> 16x16: 64, 16x16 map: 32, so that the
    # map tiles x_hat, act, P1 and the token chunks stay at <= 8192 fp32 elements); without resampling the
    # token chunk is the whole map.
    bwd_block_t = max(16, min(64, 4096 // block_hw, _pow2(N))) if upsample else block_hw
    bwd_block_d = _clamp_pow2(min(64, 8192 // max(block_hw, bwd_block_t)), 16, max(16, _pow2(D)))
    # dX: 128 x 128 tiles where that gives two waves, else 128 x 64 (48 x 8x8: 480 programs).
    dx_block_m = _clamp_pow2(M, 16, 128)
    dx_block_n = _clamp_pow2(in_ch, 16, 128)
    if triton.cdiv(M, dx_block_m) * triton.cdiv(in_ch, dx_block_n) < TARGET_PROGRAMS:
        dx_block_n = max(16, dx_block_n // 2)
    # dW: 128 x 128 tiles, K = B*HW split so that tiles x splits reach two waves (4 splits at the real shapes),
    # each split at least 4 steps of K.
    dw_block_m, dw_block_n = _clamp_pow2(D, 16, 128), _clamp_pow2(in_ch, 16, 128)
    dw_block_k = _clamp_pow2(M, 16, 64)
    tiles = triton.cdiv(D, dw_block_m) * triton.cdiv(in_ch, dw_block_n)
    split = max(1, min(triton.cdiv(TARGET_PROGRAMS, tiles), M // (4 * dw_block_k)))
    k_per_split = triton.cdiv(triton.cdiv(M, split), dw_block_k) * dw_block_k
    token_block_d = _pow2(D)
    token_rows = max(1, min(4096 // token_block_d, _pow2(N)))
    return AlignHeadBlocks(
        group_size=group_size, group_block=group_block, block_hw=block_hw,
        proj_samples=samples, proj_groups=proj_groups, proj_block_k=_clamp_pow2(in_ch, 16, 64),
        proj_warps=8 if samples * block_hw * proj_groups * group_block >= 8192 else 4,
        token_rows=token_rows, token_block_d=token_block_d, token_warps=8 if token_rows * token_block_d > 2048 else 4,
        bwd_block_d=bwd_block_d, bwd_block_t=bwd_block_t,
        bwd_warps=8 if max(block_hw, bwd_block_t) * bwd_block_d >= 4096 else 4,
        map_groups=fit_groups(block_hw, 64, 4096 if upsample else 8192), map_warps=8,
        dx_block_m=dx_block_m, dx_block_n=dx_block_n, dx_block_k=_clamp_pow2(D, 16, 64),
        dx_warps=8 if dx_block_m * dx_block_n >= 16384 else 4,
        dw_block_m=dw_block_m, dw_block_n=dw_block_n, dw_block_k=dw_block_k, dw_k_per_split=k_per_split,
        dw_split=triton.cdiv(M, k_per_split), dw_warps=8 if dw_block_m * dw_block_n >= 16384 else 4,
        reduce_block=1024,
        dot_precision=dot_precision(dtype),
    )


_cached_head_blocks = functools.lru_cache(maxsize=64)(_compute_head_blocks)


# --------------------------------------------------------------------------------------------------
# Host functions.


def check_inputs(feat, conv_weight, gn_weight, gn_bias, num_groups, grid, op: str = "align_head"):
    """(B, C, H, W, D) after checking the shapes and devices of the head's inputs; names what is wrong."""
    if feat.ndim != 4:
        raise ValueError(f"{op}: feat must be [B,C,H,W], got {list(feat.shape)}")
    B, C, H, W = feat.shape
    if conv_weight.ndim != 4 or tuple(conv_weight.shape[1:]) != (C, 1, 1):
        raise ValueError(f"{op}: conv_weight must be [D,{C},1,1], got {list(conv_weight.shape)}")
    D = conv_weight.shape[0]
    if tuple(gn_weight.shape) != (D,) or tuple(gn_bias.shape) != (D,):
        raise ValueError(f"{op}: gn_weight/gn_bias must be [{D}], got {list(gn_weight.shape)}, "
                         f"{list(gn_bias.shape)}")
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"{op}: grid must be (gh, gw), got {grid}")
    if B == 0 or C == 0 or H * W == 0:
        raise ValueError(f"{op}: empty feat {list(feat.shape)}")
    for name, t in (("conv_weight", conv_weight), ("gn_weight", gn_weight), ("gn_bias", gn_bias)):
        if t.device != feat.device:
            raise ValueError(f"{op}: {name} is on {t.device}, feat on {feat.device}")
    align_head_blocks(B, C, (H, W), grid, D, num_groups, feat.dtype)  # raises on shapes the kernels cannot tile
    return B, C, H, W, D


def _flat_map(feat: torch.Tensor) -> torch.Tensor:
    """feat [B, C, H, W] as [B, C, H*W]: a view for NCHW and channels-last, a copy for other spatial strides."""
    return feat.flatten(2)


def dfeat_like(feat: torch.Tensor) -> torch.Tensor:
    """The gradient buffer of feat: channels-last if feat is, else NCHW (so that its [B, C, HW] view exists)."""
    channels_last = feat.stride(1) == 1 and not feat.is_contiguous()
    return torch.empty_like(feat, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@functools.lru_cache(maxsize=16)
def _bilinear_operator(map_hw: tuple[int, int], grid: tuple[int, int], dtype: torch.dtype,
                       device: torch.device) -> torch.Tensor:
    # The [N, HW] matrix M with tokens = M @ map (at most four non-zeros a row), made by F.interpolate itself
    # from the identity, so its weights are the reference's. Tiny (32 KB at 8x8 -> 16x16 in bf16), built once
    # per shape and device; the backward kernels feed it to tl.dot (u = M act, M^T (r g), M^T (c u)).
    H, W = map_hw
    eye = torch.eye(H * W, dtype=torch.float32, device=device).reshape(H * W, 1, H, W)
    m = F.interpolate(eye, size=grid, mode="bilinear", align_corners=False).reshape(H * W, -1)
    return m.t().contiguous().to(dtype)


def interp_operator(x_hat: torch.Tensor, map_hw: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """M for the backward kernels; when the map is the grid nothing reads it, and x_hat stands in for the pointer."""
    return _bilinear_operator(tuple(map_hw), tuple(grid), x_hat.dtype, x_hat.device) if tuple(grid) != tuple(
        map_hw) else x_hat


def project(feat, conv_weight, num_groups: int, eps: float, blocks: AlignHeadBlocks):
    """Kernel 1: (x_hat [B, HW, D] in feat's dtype, GroupNorm mean and rstd [B, G] fp32)."""
    B, C, H, W = feat.shape
    D = conv_weight.shape[0]
    x = _flat_map(feat)
    w = conv_weight.reshape(D, C)
    x_hat = torch.empty(B, H * W, D, dtype=feat.dtype, device=feat.device)
    mean = torch.empty(B, num_groups, dtype=torch.float32, device=feat.device)
    rstd = torch.empty_like(mean)
    _align_head_proj_kernel[(triton.cdiv(B, blocks.proj_samples), triton.cdiv(num_groups, blocks.proj_groups))](
        x_ptr=x, w_ptr=w, xhat_ptr=x_hat, mean_ptr=mean, rstd_ptr=rstd,
        B=B, C=C, G=num_groups, D=D, eps=eps,
        stride_xb=x.stride(0), stride_xc=x.stride(1), stride_xp=x.stride(2), stride_wd=w.stride(0),
        stride_wc=w.stride(1),
        HW=H * W, SAMPLES=blocks.proj_samples, BLOCK_HW=blocks.block_hw, GROUP_SIZE=blocks.group_size,
        GROUP_BLOCK=blocks.group_block, GROUPS=blocks.proj_groups, BLOCK_K=blocks.proj_block_k,
        DOT_PRECISION=blocks.dot_precision, num_warps=blocks.proj_warps, num_stages=3,
    )
    return x_hat, mean, rstd


def align_head_forward(feat, conv_weight, gn_weight, gn_bias, num_groups: int, grid: tuple[int, int],
                       eps: float):
    """Tokens [B, N, D] plus what the backward needs: x_hat [B, HW, D], fp32 GroupNorm mean and rstd
    [B, G], fp32 per-token r = 1 / max(|u|, eps) [B, N]."""
    B, C, H, W, D = check_inputs(feat, conv_weight, gn_weight, gn_bias, num_groups, grid)
    gh, gw = grid
    N = gh * gw
    blocks = align_head_blocks(B, C, (H, W), grid, D, num_groups, feat.dtype)
    x_hat, mean, rstd = project(feat, conv_weight, num_groups, eps, blocks)
    gamma, beta = gn_weight.contiguous(), gn_bias.contiguous()
    tokens = torch.empty(B, N, D, dtype=feat.dtype, device=feat.device)
    tok_rstd = torch.empty(B, N, dtype=torch.float32, device=feat.device)
    _align_head_token_kernel[(triton.cdiv(N, blocks.token_rows), B)](
        xhat_ptr=x_hat, gamma_ptr=gamma, beta_ptr=beta, tok_ptr=tokens, tok_rstd_ptr=tok_rstd,
        N=N, D=D,
        MAP_H=H, MAP_W=W, GRID_H=gh, GRID_W=gw, UPSAMPLE=(gh, gw) != (H, W),
        BLOCK_T=blocks.token_rows, BLOCK_D=blocks.token_block_d, num_warps=blocks.token_warps, num_stages=1,
    )
    return tokens, x_hat, mean, rstd, tok_rstd


def map_backward(p1, gu, feat, conv_weight, gn_weight, gn_bias, x_hat, gn_rstd, tok_rstd, num_groups: int,
                 grid: tuple[int, int], blocks: AlignHeadBlocks, need_dfeat: bool = True, need_dweight: bool = True):
    """Kernels 4-7, from P1 [B, HW, D] and the g.u partials [B, D blocks, N] of the pass over the token
    gradient: (dfeat, dW, dgamma, dbeta); dfeat / dW empty ([0]) where not needed."""
    B, C, H, W = feat.shape
    D, HW, N = conv_weight.shape[0], H * W, grid[0] * grid[1]
    dev = feat.device
    upsample = tuple(grid) != (H, W)
    interp = interp_operator(x_hat, (H, W), grid)
    dy = torch.empty(B, HW, D, dtype=feat.dtype, device=dev)
    dgb = torch.empty(2, B, D, dtype=torch.float32, device=dev)
    _align_head_bwd_map_kernel[(triton.cdiv(num_groups, blocks.map_groups), B)](
        xhat_ptr=x_hat, gamma_ptr=gn_weight, beta_ptr=gn_bias, gn_rstd_ptr=gn_rstd, p1_ptr=p1, gu_ptr=gu,
        tok_rstd_ptr=tok_rstd, interp_ptr=interp, dy_ptr=dy, dgb_ptr=dgb,
        B=B, N=N, G=num_groups, D=D, n_dblocks=gu.shape[1],
        HW=HW, UPSAMPLE=upsample, BLOCK_HW=blocks.block_hw, BLOCK_T=blocks.bwd_block_t,
        GROUP_SIZE=blocks.group_size, GROUP_BLOCK=blocks.group_block, GROUPS=blocks.map_groups,
        DOT_PRECISION=blocks.dot_precision, num_warps=blocks.map_warps, num_stages=2,
    )
    x = _flat_map(feat)
    w = conv_weight.reshape(D, C)
    dfeat = feat.new_empty(0)
    if need_dfeat:
        dfeat = dfeat_like(feat)
        dx = dfeat.flatten(2)  # a view: dfeat is NCHW or channels-last
        _align_head_dx_kernel[(triton.cdiv(B * HW, blocks.dx_block_m), triton.cdiv(C, blocks.dx_block_n))](
            dy_ptr=dy, w_ptr=w, dx_ptr=dx,
            M=B * HW, C=C, D=D,
            stride_wd=w.stride(0), stride_wc=w.stride(1), stride_xb=dx.stride(0), stride_xc=dx.stride(1),
            stride_xp=dx.stride(2),
            HW=HW, BLOCK_M=blocks.dx_block_m, BLOCK_N=blocks.dx_block_n, BLOCK_K=blocks.dx_block_k,
            DOT_PRECISION=blocks.dot_precision, num_warps=blocks.dx_warps, num_stages=3,
        )
    dw = conv_weight.new_empty(0)
    wpart = dgb  # stands in for the pointers when dW is not needed (n_w = 0: never read)
    if need_dweight:
        dw = torch.empty(D, C, 1, 1, dtype=conv_weight.dtype, device=dev)
        wpart = torch.empty(blocks.dw_split, D, C, dtype=torch.float32, device=dev)
        _align_head_dw_kernel[(triton.cdiv(D, blocks.dw_block_m), triton.cdiv(C, blocks.dw_block_n), blocks.dw_split)](
            dy_ptr=dy, x_ptr=x, part_ptr=wpart,
            M=B * HW, C=C, D=D, k_per_split=blocks.dw_k_per_split,
            stride_xb=x.stride(0), stride_xc=x.stride(1), stride_xp=x.stride(2),
            HW=HW, BLOCK_M=blocks.dw_block_m, BLOCK_N=blocks.dw_block_n, BLOCK_K=blocks.dw_block_k,
            DOT_PRECISION=blocks.dot_precision, num_warps=blocks.dw_warps, num_stages=3,
        )
    dgamma = torch.empty(D, dtype=gn_weight.dtype, device=dev)
    dbeta = torch.empty(D, dtype=gn_bias.dtype, device=dev)
    n_w = D * C if need_dweight else 0
    _align_head_reduce_kernel[(triton.cdiv(n_w, blocks.reduce_block) + triton.cdiv(D, blocks.reduce_block),)](
        wpart_ptr=wpart, dw_ptr=dw if need_dweight else dgamma, dgb_ptr=dgb, dgamma_ptr=dgamma, dbeta_ptr=dbeta,
        n_w=n_w, n_split=blocks.dw_split, B=B, D=D,
        BLOCK=blocks.reduce_block, num_warps=4, num_stages=1,
    )
    return dfeat, dw, dgamma, dbeta


def align_head_backward(grad_tokens, feat, conv_weight, gn_weight, gn_bias, x_hat, gn_rstd, tok_rstd,
                        num_groups: int, grid: tuple[int, int], need_dfeat: bool = True, need_dweight: bool = True):
    """Gradients (feat, conv_weight, gn_weight, gn_bias) from the token gradient [B, N, D] and the forward's
    saved x_hat, GroupNorm rstd and token r; dfeat / dW empty ([0]) where not needed."""
    B, C, H, W, D = check_inputs(feat, conv_weight, gn_weight, gn_bias, num_groups, grid)
    HW, N = H * W, grid[0] * grid[1]
    blocks = align_head_blocks(B, C, (H, W), grid, D, num_groups, feat.dtype)
    grad = rows_contiguous(grad_tokens)
    gn_weight, gn_bias = gn_weight.contiguous(), gn_bias.contiguous()
    n_dblocks = triton.cdiv(D, blocks.bwd_block_d)
    p1 = torch.empty(B, HW, D, dtype=feat.dtype, device=feat.device)
    gu = torch.empty(B, n_dblocks, N, dtype=torch.float32, device=feat.device)
    _align_head_bwd_token_kernel[(n_dblocks, B)](
        xhat_ptr=x_hat, gamma_ptr=gn_weight, beta_ptr=gn_bias, grad_ptr=grad, tok_rstd_ptr=tok_rstd,
        interp_ptr=interp_operator(x_hat, (H, W), grid), p1_ptr=p1, gu_ptr=gu,
        N=N, D=D, stride_gb=grad.stride(0), stride_gn=grad.stride(1),
        HW=HW, UPSAMPLE=tuple(grid) != (H, W), BLOCK_HW=blocks.block_hw, BLOCK_T=blocks.bwd_block_t,
        BLOCK_D=blocks.bwd_block_d, DOT_PRECISION=blocks.dot_precision, num_warps=blocks.bwd_warps, num_stages=2,
    )
    return map_backward(p1, gu, feat, conv_weight, gn_weight, gn_bias, x_hat, gn_rstd, tok_rstd, num_groups, grid,
                        blocks, need_dfeat, need_dweight)


# --------------------------------------------------------------------------------------------------
# The custom ops: forward and backward, each one opaque node for torch.compile.


@torch.library.custom_op("repa_fast::align_head", mutates_args=())
def align_head_op(feat: torch.Tensor, conv_weight: torch.Tensor, gn_weight: torch.Tensor, gn_bias: torch.Tensor,
                  num_groups: int, grid: list[int], eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, x_hat, GroupNorm mean, GroupNorm rstd, token r): ``align_head_forward``."""
    return align_head_forward(feat, conv_weight, gn_weight, gn_bias, num_groups, tuple(grid), eps)


@align_head_op.register_fake
def _align_head_fake(feat, conv_weight, gn_weight, gn_bias, num_groups, grid, eps):
    B, _, H, W = feat.shape
    D, N = conv_weight.shape[0], grid[0] * grid[1]
    stats = feat.new_empty(B, num_groups, dtype=torch.float32)
    return (feat.new_empty(B, N, D), feat.new_empty(B, H * W, D), stats, torch.empty_like(stats),
            feat.new_empty(B, N, dtype=torch.float32))


@torch.library.custom_op("repa_fast::align_head_backward", mutates_args=())
def align_head_backward_op(grad_tokens: torch.Tensor, feat: torch.Tensor, conv_weight: torch.Tensor,
                           gn_weight: torch.Tensor, gn_bias: torch.Tensor, x_hat: torch.Tensor,
                           gn_rstd: torch.Tensor, tok_rstd: torch.Tensor, num_groups: int, grid: list[int],
                           need_dfeat: bool, need_dweight: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dfeat, dconv_weight, dgn_weight, dgn_bias): ``align_head_backward``."""
    return align_head_backward(grad_tokens, feat, conv_weight, gn_weight, gn_bias, x_hat, gn_rstd, tok_rstd,
                               num_groups, tuple(grid), need_dfeat, need_dweight)


def grads_fake(feat, conv_weight, gn_weight, gn_bias, need_dfeat: bool, need_dweight: bool):
    """Fake (dfeat, dW, dgamma, dbeta) as ``map_backward`` makes them (shared with the branch op)."""
    return (dfeat_like(feat) if need_dfeat else feat.new_empty(0),
            torch.empty_like(conv_weight, memory_format=torch.contiguous_format) if need_dweight
            else conv_weight.new_empty(0),
            torch.empty_like(gn_weight), torch.empty_like(gn_bias))


@align_head_backward_op.register_fake
def _align_head_backward_fake(grad_tokens, feat, conv_weight, gn_weight, gn_bias, x_hat, gn_rstd, tok_rstd,
                              num_groups, grid, need_dfeat, need_dweight):
    return grads_fake(feat, conv_weight, gn_weight, gn_bias, need_dfeat, need_dweight)


def _align_head_setup_context(ctx, inputs, output):
    feat, conv_weight, gn_weight, gn_bias, num_groups, grid, _eps = inputs
    _tokens, x_hat, mean, gn_rstd, tok_rstd = output
    ctx.save_for_backward(feat, conv_weight, gn_weight, gn_bias, x_hat, gn_rstd, tok_rstd)
    ctx.num_groups, ctx.grid = num_groups, grid
    ctx.mark_non_differentiable(x_hat, mean, gn_rstd, tok_rstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the saved-only outputs: launches saved


def grads_or_none(ctx, grads):
    """The custom op's gradients, None for the inputs that need none (then the op skipped or ignores them)."""
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad, strict=False))


def _align_head_autograd(ctx, grad_tokens, *_unused):
    feat, conv_weight, gn_weight, gn_bias, x_hat, gn_rstd, tok_rstd = ctx.saved_tensors
    grads = torch.ops.repa_fast.align_head_backward(
        grad_tokens, feat, conv_weight, gn_weight, gn_bias, x_hat, gn_rstd, tok_rstd, ctx.num_groups, ctx.grid,
        ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    return (*grads_or_none(ctx, grads), None, None, None)


align_head_op.register_autograd(_align_head_autograd, setup_context=_align_head_setup_context)


def align_head(feat: torch.Tensor, conv_weight: torch.Tensor, gn_weight: torch.Tensor, gn_bias: torch.Tensor,
               num_groups: int, grid: tuple[int, int], eps: float = 1e-5) -> torch.Tensor:
    """Unit-norm tokens [B, gh*gw, D] from a feature map [B, C, H, W] (see ``AlignHead.reference``)."""
    grid = [int(grid[0]), int(grid[1])]
    check_inputs(feat, conv_weight, gn_weight, gn_bias, int(num_groups), grid)
    return torch.ops.repa_fast.align_head(feat, conv_weight, gn_weight, gn_bias, int(num_groups), grid,
                                          float(eps))[0]
