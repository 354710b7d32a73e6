"""Fused AlignHead: 1x1 conv + GroupNorm + GELU + bilinear upsample + token flatten + per-token L2 norm.

The math is ``AlignHead.reference`` in ``repa_fast/models/align_head.py``; this module is the fast
version of it, forward and backward, with fp32 statistics and deterministic reductions.

Forward (two kernels):
  1. ``_align_head_proj_forward_kernel``: GEMM feat^T [HW, C] x W^T [C, D] per sample; one tile holds
     every map position of one sample and whole GroupNorm groups, so the group statistics are local to
     the tile. Epilogue: GroupNorm + exact GELU. Writes the small [B, HW, D] maps x_hat (normalised,
     saved for backward) and act (GELU output, read by kernel 2 and then freed).
  2. ``_align_head_token_forward_kernel``: bilinear upsample (4 source rows per token) + L2 norm of
     each token over the full D; writes the [B, N, D] tokens and the fp32 per-token rstd.

Backward (four kernels; nothing of size [B, N, D] was saved, the tokens are recomputed from x_hat):
  1. ``_align_head_token_dot_kernel``: per (sample, channel block) partial dot products g_t . u_t of
     the upstream gradient with the unnormalised tokens (u = M @ act as a small tensor-core product,
     M the [N, HW] bilinear matrix, made once per shape); the L2-norm backward needs them over all D,
     so the partials are summed on the host in a fixed order ([B, D/64, N] fp32, tiny).
  2. ``_align_head_backward_kernel``: per (sample, whole groups): L2-norm backward, upsample adjoint
     M^T @ dU (a gather, no atomics), GELU backward, GroupNorm backward -> dy [B, HW, D]; dgamma and
     dbeta as per-sample fp32 partials summed on the host in a fixed order.
  3. ``_align_head_dx_kernel`` and 4. ``_align_head_dw_kernel``: the two plain GEMMs dX = W^T dy and
     dW = dy^T X, read with the caller's strides (no transposed copies of feat).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_L2_EPS = tl.constexpr(1e-12)  # F.normalize's default
# fp32 elements of one [map positions, channels] tile that a kernel keeps in registers: a GroupNorm
# group must fit into one tile with the whole map (16x16 maps: up to 32 channels a group; 8x8: 128).
_MAX_GROUP_TILE = 8192
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# --------------------------------------------------------------------------------------------------
# Helpers shared by the kernels.


@triton.jit
def _source_index(dst, scale, in_size):
    # F.interpolate(mode="bilinear", align_corners=False): source coordinate (dst + 0.5) * in/out - 0.5
    # clamped at 0; the lower neighbour is clamped to the last index, the upper one to the edge.
    src = tl.maximum((dst.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)
    lam = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    i1 = tl.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, lam


@triton.jit
def _group_sum(col, GROUPS: tl.constexpr, GROUP_BLOCK: tl.constexpr):
    # col: one value per tile column, the columns laid out as [GROUPS, GROUP_BLOCK]; returns, for each
    # column, the total over the columns of its group.
    total = tl.sum(tl.reshape(col, [GROUPS, GROUP_BLOCK]), axis=1)
    return tl.reshape(tl.broadcast_to(total[:, None], [GROUPS, GROUP_BLOCK]), [GROUPS * GROUP_BLOCK])


@triton.jit
def _group_columns(i_g, G, GROUP_SIZE: tl.constexpr, GROUP_BLOCK: tl.constexpr, GROUPS_PER_BLOCK: tl.constexpr):
    # Channel index of each tile column: GROUPS_PER_BLOCK groups, each padded to a power of two.
    col = tl.arange(0, GROUPS_PER_BLOCK * GROUP_BLOCK)
    grp = i_g * GROUPS_PER_BLOCK + col // GROUP_BLOCK
    j = col % GROUP_BLOCK
    return grp * GROUP_SIZE + j, grp, (j < GROUP_SIZE) & (grp < G), j == 0


@triton.jit
def _gelu(z):
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def _recompute_act(x_hat, gamma, beta, mask):
    """act = GELU(x_hat * gamma + beta) in fp32, recomputed from the saved map (the backward kernels)."""
    act = tl.where(mask, _gelu(x_hat * gamma[None, :] + beta[None, :]), 0.0)
    return act


@triton.jit
def _token_chunk(interp_ptr, act, act_lp, offs_t, mask_t, offs_p, mask_p, stride_in,
                 UPSAMPLE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Unnormalised tokens of one chunk, u = M[offs_t] @ act, and the bilinear rows m used (map == grid:
    one chunk, token t is map position t, and m is unused)."""
    if UPSAMPLE:
        m = tl.load(interp_ptr + offs_t[:, None] * stride_in + offs_p[None, :],
                    mask=mask_t[:, None] & mask_p[None, :], other=0.0)
        u = tl.dot(m, act_lp, input_precision=DOT_PRECISION)
    else:
        m = act_lp
        u = act
    return m, u


# --------------------------------------------------------------------------------------------------
# Forward.


# One program per (sample, block of whole groups): acc[p, d] = sum_c feat[b, c, p] * W[d, c] over all
# HW positions of the sample, then GroupNorm statistics (two-pass, fp32) over each group's HW x
# GROUP_SIZE values, normalise, affine, exact GELU. The GEMM is small per sample (M = HW), so the
# tile keeps the whole map and the statistics never leave the program.
@triton.jit
def _align_head_proj_forward_kernel(
    x_ptr, w_ptr, gamma_ptr, beta_ptr, xhat_ptr, act_ptr, mean_ptr, rstd_ptr,
    C, G, HW, W, eps,
    stride_xb, stride_xc, stride_xh, stride_xw, stride_wd, stride_wc, stride_mb, stride_mp, stride_sb,
    GROUP_SIZE: tl.constexpr, GROUP_BLOCK: tl.constexpr, GROUPS_PER_BLOCK: tl.constexpr,
    BLOCK_HW: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_g = tl.program_id(1).to(tl.int64)
    offs_d, grp, mask_d, first = _group_columns(i_g, G, GROUP_SIZE, GROUP_BLOCK, GROUPS_PER_BLOCK)
    offs_p = tl.arange(0, BLOCK_HW)
    mask_p = offs_p < HW
    x_sp = (offs_p // W).to(tl.int64) * stride_xh + (offs_p % W).to(tl.int64) * stride_xw
    offs_k = tl.arange(0, BLOCK_K)
    x_base = x_ptr + i_b * stride_xb

    acc = tl.zeros((BLOCK_HW, GROUPS_PER_BLOCK * GROUP_BLOCK), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < C
        x = tl.load(x_base + x_sp[:, None] + k[None, :].to(tl.int64) * stride_xc,
                    mask=mask_p[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + k[:, None].to(tl.int64) * stride_wc + offs_d[None, :] * stride_wd,
                    mask=mask_k[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)

    mask = mask_p[:, None] & mask_d[None, :]
    count = HW * GROUP_SIZE * 1.0
    mean = _group_sum(tl.sum(acc, axis=0), GROUPS_PER_BLOCK, GROUP_BLOCK) / count
    diff = tl.where(mask, acc - mean[None, :], 0.0)
    var = _group_sum(tl.sum(diff * diff, axis=0), GROUPS_PER_BLOCK, GROUP_BLOCK) / count
    rstd = 1.0 / tl.sqrt(var + eps)
    x_hat = diff * rstd[None, :]
    gamma = tl.load(gamma_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    act = _gelu(x_hat * gamma[None, :] + beta[None, :])

    offs_m = i_b * stride_mb + offs_p[:, None].to(tl.int64) * stride_mp + offs_d[None, :]
    tl.store(xhat_ptr + offs_m, x_hat.to(xhat_ptr.dtype.element_ty), mask=mask)
    tl.store(act_ptr + offs_m, act.to(act_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + i_b * stride_sb + grp, mean, mask=first & mask_d)
    tl.store(rstd_ptr + i_b * stride_sb + grp, rstd, mask=first & mask_d)


# One program per (sample, BLOCK_T consecutive tokens), full D per row: each token blends four rows
# of the act map (L1/L2-resident: the map is 1/4 of the tokens' size at 8x8 -> 16x16), then divides by
# max(||u||, 1e-12) as F.normalize does. The fp32 rstd is kept for the backward.
@triton.jit
def _align_head_token_forward_kernel(
    act_ptr, tok_ptr, tok_rstd_ptr,
    N, D, H, W, gw, scale_h, scale_w,
    stride_mb, stride_mp, stride_tb, stride_tn, stride_rb,
    UPSAMPLE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_t = tl.program_id(1).to(tl.int64)
    offs_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < N
    offs_d = tl.arange(0, BLOCK_D)
    mask = mask_t[:, None] & (offs_d < D)[None, :]
    a_base = act_ptr + i_b * stride_mb + offs_d[None, :]
    if UPSAMPLE:
        y0, y1, ly = _source_index(offs_t // gw, scale_h, H)
        x0, x1, lx = _source_index(offs_t % gw, scale_w, W)
        r0 = y0.to(tl.int64) * W
        r1 = y1.to(tl.int64) * W
        a00 = tl.load(a_base + (r0 + x0)[:, None] * stride_mp, mask=mask, other=0.0).to(tl.float32)
        a01 = tl.load(a_base + (r0 + x1)[:, None] * stride_mp, mask=mask, other=0.0).to(tl.float32)
        top = (1.0 - lx)[:, None] * a00 + lx[:, None] * a01
        a10 = tl.load(a_base + (r1 + x0)[:, None] * stride_mp, mask=mask, other=0.0).to(tl.float32)
        a11 = tl.load(a_base + (r1 + x1)[:, None] * stride_mp, mask=mask, other=0.0).to(tl.float32)
        bottom = (1.0 - lx)[:, None] * a10 + lx[:, None] * a11
        u = (1.0 - ly)[:, None] * top + ly[:, None] * bottom
    else:
        u = tl.load(a_base + offs_t[:, None] * stride_mp, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.maximum(tl.sqrt(tl.sum(u * u, axis=1)), _L2_EPS)
    tok = u * rstd[:, None]
    tl.store(tok_ptr + i_b * stride_tb + offs_t[:, None] * stride_tn + offs_d[None, :],
             tok.to(tok_ptr.dtype.element_ty), mask=mask)
    tl.store(tok_rstd_ptr + i_b * stride_rb + offs_t, rstd, mask=mask_t)


# --------------------------------------------------------------------------------------------------
# Backward.


# One program per (sample, BLOCK_D channels): recompute act = GELU(x_hat * gamma + beta) for the whole
# map, the unnormalised tokens u = M @ act chunk by chunk, and store the partial sums g_t . u_t over
# this program's channels. The L2-norm backward needs g_t . tok_t over all of D, which no single
# program of the fused backward sees; the host-side order of the partial sum is fixed (deterministic).
@triton.jit
def _align_head_token_dot_kernel(
    xhat_ptr, gamma_ptr, beta_ptr, grad_ptr, interp_ptr, part_ptr,
    N, D, HW,
    stride_mb, stride_mp, stride_gb, stride_gn, stride_in, stride_pb, stride_pk,
    UPSAMPLE: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1).to(tl.int64)
    offs_p = tl.arange(0, BLOCK_HW)
    mask_p = offs_p < HW
    offs_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask = mask_p[:, None] & mask_d[None, :]
    x_hat = tl.load(xhat_ptr + i_b * stride_mb + offs_p[:, None].to(tl.int64) * stride_mp + offs_d[None, :],
                    mask=mask, other=0.0).to(tl.float32)
    gamma = tl.load(gamma_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    act = _recompute_act(x_hat, gamma, beta, mask)
    act_lp = act.to(xhat_ptr.dtype.element_ty)

    for t0 in range(0, N, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < N
        _, u = _token_chunk(interp_ptr, act, act_lp, offs_t, mask_t, offs_p, mask_p, stride_in, UPSAMPLE,
                            DOT_PRECISION)
        g = tl.load(grad_ptr + i_b * stride_gb + offs_t[:, None].to(tl.int64) * stride_gn + offs_d[None, :],
                    mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        tl.store(part_ptr + i_b * stride_pb + i_d * stride_pk + offs_t, tl.sum(g * u, axis=1), mask=mask_t)


# One program per (sample, block of whole groups), the inverse of the forward chain:
#   dU = rstd_t * g - rstd_t^3 (g . u) u        (F.normalize backward; g . u from the token-dot kernel)
#   dA = M^T @ dU                               (upsample adjoint: a gather over the tokens, no atomics)
#   dz = dA * GELU'(z)                          (z = x_hat * gamma + beta recomputed)
#   dy = rstd_g (gamma dz - mean_g(gamma dz) - x_hat mean_g(gamma dz x_hat))   (GroupNorm backward)
# dgamma/dbeta partials per sample ([B, D] fp32) are summed on the host.
@triton.jit
def _align_head_backward_kernel(
    xhat_ptr, gamma_ptr, beta_ptr, grad_ptr, interp_ptr, gu_ptr, tok_rstd_ptr, gn_rstd_ptr,
    dy_ptr, dgamma_ptr, dbeta_ptr,
    N, G, HW,
    stride_mb, stride_mp, stride_gb, stride_gn, stride_in, stride_ub, stride_rb, stride_sb, stride_db,
    UPSAMPLE: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_BLOCK: tl.constexpr,
    GROUPS_PER_BLOCK: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_g = tl.program_id(1).to(tl.int64)
    offs_d, grp, mask_d, _ = _group_columns(i_g, G, GROUP_SIZE, GROUP_BLOCK, GROUPS_PER_BLOCK)
    offs_p = tl.arange(0, BLOCK_HW)
    mask_p = offs_p < HW
    mask = mask_p[:, None] & mask_d[None, :]
    offs_m = i_b * stride_mb + offs_p[:, None].to(tl.int64) * stride_mp + offs_d[None, :]
    gamma = tl.load(gamma_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    x_hat = tl.load(xhat_ptr + offs_m, mask=mask, other=0.0).to(tl.float32)
    act = _recompute_act(x_hat, gamma, beta, mask)
    act_lp = act.to(xhat_ptr.dtype.element_ty)

    d_act = tl.zeros((BLOCK_HW, GROUPS_PER_BLOCK * GROUP_BLOCK), dtype=tl.float32)
    for t0 in range(0, N, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < N
        m, u = _token_chunk(interp_ptr, act, act_lp, offs_t, mask_t, offs_p, mask_p, stride_in, UPSAMPLE,
                            DOT_PRECISION)
        g = tl.load(grad_ptr + i_b * stride_gb + offs_t[:, None].to(tl.int64) * stride_gn + offs_d[None, :],
                    mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        rstd_t = tl.load(tok_rstd_ptr + i_b * stride_rb + offs_t, mask=mask_t, other=0.0)
        gu = tl.load(gu_ptr + i_b * stride_ub + offs_t, mask=mask_t, other=0.0)
        # Below the eps clamp F.normalize is u / eps: no gradient through the norm.
        coef = tl.where(rstd_t * _L2_EPS < 1.0, rstd_t * rstd_t * rstd_t * gu, 0.0)
        d_u = rstd_t[:, None] * g - coef[:, None] * u
        if UPSAMPLE:
            d_act = tl.dot(tl.trans(m), d_u.to(xhat_ptr.dtype.element_ty), d_act, input_precision=DOT_PRECISION)
        else:
            d_act = d_u

    # GELU'(z) = Phi(z) + z phi(z); x_hat is reloaded (L2-hot) rather than kept live through the loop.
    x_hat = tl.load(xhat_ptr + offs_m, mask=mask, other=0.0).to(tl.float32)
    z = x_hat * gamma[None, :] + beta[None, :]
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
    dz = tl.where(mask, d_act * (cdf + z * pdf), 0.0)
    tl.store(dbeta_ptr + i_b * stride_db + offs_d, tl.sum(dz, axis=0), mask=mask_d)
    tl.store(dgamma_ptr + i_b * stride_db + offs_d, tl.sum(dz * x_hat, axis=0), mask=mask_d)

    count = HW * GROUP_SIZE * 1.0
    wdz = dz * gamma[None, :]
    c1 = _group_sum(tl.sum(wdz, axis=0), GROUPS_PER_BLOCK, GROUP_BLOCK) / count
    c2 = _group_sum(tl.sum(wdz * x_hat, axis=0), GROUPS_PER_BLOCK, GROUP_BLOCK) / count
    rstd_g = tl.load(gn_rstd_ptr + i_b * stride_sb + grp, mask=mask_d, other=0.0)
    dy = rstd_g[None, :] * (wdz - c1[None, :] - x_hat * c2[None, :])
    tl.store(dy_ptr + offs_m, dy.to(dy_ptr.dtype.element_ty), mask=mask)


# dX[b, c, p] = sum_d dy[b, p, d] * W[d, c]: one program per (sample, BLOCK_C channels), tile
# [HW, BLOCK_C] over K = D, stored straight into feat's layout (NCHW or any strides).
@triton.jit
def _align_head_dx_kernel(
    dy_ptr, w_ptr, dx_ptr,
    C, D, HW, W,
    stride_yb, stride_yp, stride_wd, stride_wc, stride_xb, stride_xc, stride_xh, stride_xw,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    offs_p = tl.arange(0, BLOCK_HW)
    mask_p = offs_p < HW
    offs_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    offs_k = tl.arange(0, BLOCK_K)
    y_base = dy_ptr + i_b * stride_yb + offs_p[:, None].to(tl.int64) * stride_yp
    acc = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < D
        dy = tl.load(y_base + k[None, :], mask=mask_p[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + k[:, None].to(tl.int64) * stride_wd + offs_c[None, :] * stride_wc,
                    mask=mask_k[:, None] & mask_c[None, :], other=0.0)
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
    x_sp = (offs_p // W).to(tl.int64) * stride_xh + (offs_p % W).to(tl.int64) * stride_xw
    tl.store(dx_ptr + i_b * stride_xb + x_sp[:, None] + offs_c[None, :] * stride_xc,
             acc.to(dx_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


# dW[d, c] = sum_{b,p} dy[b, p, d] * feat[b, c, p]: one program per [BLOCK_D, BLOCK_C] tile of dW,
# K = B * HW walked in a fixed order (deterministic, no split-K atomics); feat is read with its own
# strides, so no transposed copy of it is made.
@triton.jit
def _align_head_dw_kernel(
    dy_ptr, x_ptr, dw_ptr,
    C, D, HW, W, K,
    stride_yk, stride_xb, stride_xc, stride_xh, stride_xw, stride_wd, stride_wc,
    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_d = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    offs_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    acc = tl.zeros((BLOCK_D, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = k < K
        dy_t = tl.load(dy_ptr + k[None, :] * stride_yk + offs_d[:, None],
                       mask=mask_d[:, None] & mask_k[None, :], other=0.0)
        b = k // HW
        p = k % HW
        x_off = b * stride_xb + (p // W) * stride_xh + (p % W) * stride_xw
        x = tl.load(x_ptr + x_off[:, None] + offs_c[None, :] * stride_xc,
                    mask=mask_k[:, None] & mask_c[None, :], other=0.0)
        acc = tl.dot(dy_t, x, acc, input_precision=DOT_PRECISION)
    tl.store(dw_ptr + offs_d[:, None] * stride_wd + offs_c[None, :] * stride_wc,
             acc.to(dw_ptr.dtype.element_ty), mask=mask_d[:, None] & mask_c[None, :])



# --------------------------------------------------------------------------------------------------
# Launch configuration. One function decides every block size and the host code builds every kernel's
# arguments in one place (the *_plan functions), so the AOT test, which compiles each kernel for the
# H200 from ``align_head_aot_specs``, sees exactly what a launch would run.


@dataclass(frozen=True)
class KernelLaunch:
    kernel: object  # the @triton.jit function
    grid: tuple[int, ...]
    constexprs: dict
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return getattr(self.kernel, "fn", self.kernel).__name__


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def align_head_launch_configs(batch: int, in_ch: int, map_hw: tuple[int, int], grid: tuple[int, int],
                              D: int, num_groups: int, dtype: torch.dtype) -> dict[str, KernelLaunch]:
    """Grid, constexprs, num_warps and num_stages of every kernel for one problem shape, by kernel name."""
    H, W = map_hw
    gh, gw = grid
    HW, N = H * W, gh * gw
    if dtype not in _DTYPES:
        raise TypeError(f"align_head: feat dtype {dtype} is not one of {list(_DTYPES)}")
    if D % num_groups:
        raise ValueError(f"align_head: D={D} is not divisible by num_groups={num_groups}")
    upsample = (gh, gw) != (H, W)
    precision = "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    block_hw = max(16, _pow2(HW))
    group_size = D // num_groups
    group_block = _pow2(group_size)
    if block_hw * group_block > _MAX_GROUP_TILE:
        raise ValueError(
            f"align_head: a GroupNorm group of {group_size} channels over a {H}x{W} map does not fit one "
            f"tile ({block_hw} x {group_block} > {_MAX_GROUP_TILE} elements); use more groups "
            f"(num_groups={num_groups}, D={D}) or kernels='torch'")
    # Tokens per chunk of the backward's [tokens, HW] bilinear matrix.
    block_t = max(16, min(64, 4096 // block_hw, _pow2(N))) if upsample else block_hw

    def groups_per_block(budget: int, max_cols: int) -> int:
        gpb = max(1, 16 // group_block)  # tl.dot needs >= 16 columns
        while (gpb * 2 <= _pow2(num_groups) and block_hw * group_block * gpb * 2 <= budget
               and group_block * gpb * 2 <= max_cols):
            gpb *= 2
        return gpb

    def group_kw(gpb: int) -> dict:
        return {"GROUP_SIZE": group_size, "GROUP_BLOCK": group_block, "GROUPS_PER_BLOCK": gpb}

    gpb_fwd = groups_per_block(8192, 128)
    gpb_bwd = groups_per_block(4096, 64)
    # The fused backward keeps two [HW, cols] and three [tokens, cols] fp32 tiles live: wide tiles get
    # more warps and shorter token chunks.
    bwd_wide = block_hw * group_block * gpb_bwd > 4096
    block_t_bwd = max(16, block_t // 2) if bwd_wide and upsample else block_t
    block_d = _pow2(D)
    token_rows = max(1, min(4096 // block_d, _pow2(N)))
    dot_cols = max(16, min(64, (4096 if upsample else 8192) // block_hw, block_d))
    dx_cols = max(16, min(128, 8192 // block_hw, _pow2(in_ch)))
    k_fwd = max(16, min(64 if block_hw <= 128 else 32, _pow2(in_ch)))
    k_d = max(16, min(64, block_d))
    dw_rows = max(16, min(64, block_d))
    dw_cols = max(16, min(64, _pow2(in_ch)))
    cdiv = triton.cdiv
    launches = [
        KernelLaunch(_align_head_proj_forward_kernel, (batch, cdiv(num_groups, gpb_fwd)),
                     {**group_kw(gpb_fwd), "BLOCK_HW": block_hw, "BLOCK_K": k_fwd, "DOT_PRECISION": precision},
                     8, 3),
        KernelLaunch(_align_head_token_forward_kernel, (batch, cdiv(N, token_rows)),
                     {"UPSAMPLE": upsample, "BLOCK_T": token_rows, "BLOCK_D": block_d},
                     4 if token_rows * block_d <= 2048 else 8, 1),
        KernelLaunch(_align_head_token_dot_kernel, (batch, cdiv(D, dot_cols)),
                     {"UPSAMPLE": upsample, "BLOCK_HW": block_hw, "BLOCK_T": block_t, "BLOCK_D": dot_cols,
                      "DOT_PRECISION": precision},
                     4 if block_hw * dot_cols <= 4096 else 8, 2),
        KernelLaunch(_align_head_backward_kernel, (batch, cdiv(num_groups, gpb_bwd)),
                     {"UPSAMPLE": upsample, **group_kw(gpb_bwd), "BLOCK_HW": block_hw, "BLOCK_T": block_t_bwd,
                      "DOT_PRECISION": precision},
                     16 if bwd_wide else 8, 2),
        KernelLaunch(_align_head_dx_kernel, (batch, cdiv(in_ch, dx_cols)),
                     {"BLOCK_HW": block_hw, "BLOCK_C": dx_cols, "BLOCK_K": k_d, "DOT_PRECISION": precision},
                     8, 3),
        KernelLaunch(_align_head_dw_kernel, (cdiv(D, dw_rows), cdiv(in_ch, dw_cols)),
                     {"BLOCK_D": dw_rows, "BLOCK_C": dw_cols, "BLOCK_K": 64, "DOT_PRECISION": precision},
                     8, 3),
    ]
    return {launch.name: launch for launch in launches}


@functools.lru_cache(maxsize=16)
def _bilinear_operator(map_hw: tuple[int, int], grid: tuple[int, int], dtype: torch.dtype,
                       device: torch.device) -> torch.Tensor:
    # The [N, HW] matrix M with tokens = M @ map (at most four non-zeros a row), made by F.interpolate
    # itself from the identity, so its weights are the reference's. Tiny (32 KB at 8x8 -> 16x16 in bf16),
    # built once per shape and device; the backward kernels feed it to tl.dot (u = M @ act) and its
    # transpose (dA = M^T @ dU).
    H, W = map_hw
    eye = torch.eye(H * W, dtype=torch.float32, device=device).reshape(H * W, 1, H, W)
    m = F.interpolate(eye, size=grid, mode="bilinear", align_corners=False).reshape(H * W, -1)
    return m.t().contiguous().to(dtype)


def _sum_partials(parts: torch.Tensor, out: torch.Tensor) -> None:
    torch.sum(parts, dim=1, out=out)


def _run(plan: list[tuple]) -> None:
    # A plan is the host code's list of steps: (KernelLaunch, args) or (host function, args).
    for step, args in plan:
        if isinstance(step, KernelLaunch):
            step.kernel[step.grid](*args, **step.constexprs, num_warps=step.num_warps, num_stages=step.num_stages)
        else:
            step(*args)


# --------------------------------------------------------------------------------------------------
# Host functions.


def _check(feat, conv_weight, gn_weight, gn_bias, num_groups, grid):
    if feat.ndim != 4:
        raise ValueError(f"align_head: feat must be [B,C,H,W], got {list(feat.shape)}")
    B, C, H, W = feat.shape
    if conv_weight.ndim != 4 or tuple(conv_weight.shape[1:]) != (C, 1, 1):
        raise ValueError(f"align_head: conv_weight must be [D,{C},1,1], got {list(conv_weight.shape)}")
    D = conv_weight.shape[0]
    if tuple(gn_weight.shape) != (D,) or tuple(gn_bias.shape) != (D,):
        raise ValueError(f"align_head: gn_weight/gn_bias must be [{D}], got {list(gn_weight.shape)}, "
                         f"{list(gn_bias.shape)}")
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"align_head: grid must be (gh, gw), got {grid}")
    if B == 0 or C == 0 or H * W == 0:
        raise ValueError(f"align_head: empty feat {list(feat.shape)}")
    for name, t in (("conv_weight", conv_weight), ("gn_weight", gn_weight), ("gn_bias", gn_bias)):
        if t.device != feat.device:
            raise ValueError(f"align_head: {name} is on {t.device}, feat on {feat.device}")
    return B, C, H, W, D


def _forward_plan(feat, conv_weight, gn_weight, gn_bias, num_groups, grid, eps):
    B, C, H, W, D = _check(feat, conv_weight, gn_weight, gn_bias, num_groups, grid)
    gh, gw = grid
    HW, N = H * W, gh * gw
    cfg = align_head_launch_configs(B, C, (H, W), grid, D, num_groups, feat.dtype)
    w = conv_weight.reshape(D, C).to(feat.dtype)
    gamma, beta = gn_weight.contiguous(), gn_bias.contiguous()
    x_hat = torch.empty(B, HW, D, dtype=feat.dtype, device=feat.device)
    act = torch.empty_like(x_hat)
    mean = torch.empty(B, num_groups, dtype=torch.float32, device=feat.device)
    rstd = torch.empty_like(mean)
    tokens = torch.empty(B, N, D, dtype=feat.dtype, device=feat.device)
    tok_rstd = torch.empty(B, N, dtype=torch.float32, device=feat.device)
    plan = [
        (cfg["_align_head_proj_forward_kernel"],
         (feat, w, gamma, beta, x_hat, act, mean, rstd,
          C, num_groups, HW, W, eps,
          *feat.stride(), w.stride(0), w.stride(1), x_hat.stride(0), x_hat.stride(1), mean.stride(0))),
        (cfg["_align_head_token_forward_kernel"],
         (act, tokens, tok_rstd,
          N, D, H, W, gw, H / gh, W / gw,
          act.stride(0), act.stride(1), tokens.stride(0), tokens.stride(1), tok_rstd.stride(0))),
    ]
    return (tokens, x_hat, mean, rstd, tok_rstd), plan


def _backward_plan(grad_tokens, feat, conv_weight, gn_weight, gn_bias, x_hat, gn_rstd, tok_rstd, num_groups,
                   grid, needs_input_grad):
    B, C, H, W, D = _check(feat, conv_weight, gn_weight, gn_bias, num_groups, grid)
    gh, gw = grid
    HW, N = H * W, gh * gw
    cfg = align_head_launch_configs(B, C, (H, W), grid, D, num_groups, feat.dtype)
    grad = grad_tokens.contiguous()
    gamma, beta = gn_weight.contiguous(), gn_bias.contiguous()
    dev = feat.device
    dot = cfg["_align_head_token_dot_kernel"]
    parts = torch.empty(B, dot.grid[1], N, dtype=torch.float32, device=dev)
    gu = torch.empty(B, N, dtype=torch.float32, device=dev)
    dy = torch.empty(B, HW, D, dtype=feat.dtype, device=dev)
    dgamma_part = torch.empty(B, D, dtype=torch.float32, device=dev)
    dbeta_part = torch.empty_like(dgamma_part)
    # M is read only when the map is upsampled; otherwise any pointer of the dtype will do.
    interp = _bilinear_operator((H, W), (gh, gw), feat.dtype, dev) if (gh, gw) != (H, W) else x_hat
    plan = [
        (dot,
         (x_hat, gamma, beta, grad, interp, parts,
          N, D, HW,
          x_hat.stride(0), x_hat.stride(1), grad.stride(0), grad.stride(1), interp.stride(0),
          parts.stride(0), parts.stride(1))),
        # g . u over all D: the channel-block partials summed in a fixed order (deterministic).
        (_sum_partials, (parts, gu)),
        (cfg["_align_head_backward_kernel"],
         (x_hat, gamma, beta, grad, interp, gu, tok_rstd, gn_rstd, dy, dgamma_part, dbeta_part,
          N, num_groups, HW,
          x_hat.stride(0), x_hat.stride(1), grad.stride(0), grad.stride(1), interp.stride(0),
          gu.stride(0), tok_rstd.stride(0), gn_rstd.stride(0), dgamma_part.stride(0))),
    ]
    need_x, need_w = needs_input_grad[:2]
    dfeat = dw = None
    if need_x:
        w = conv_weight.reshape(D, C).to(feat.dtype)
        dfeat = torch.empty(B, C, H, W, dtype=feat.dtype, device=dev)
        plan.append((cfg["_align_head_dx_kernel"],
                     (dy, w, dfeat, C, D, HW, W, dy.stride(0), dy.stride(1), w.stride(0), w.stride(1),
                      *dfeat.stride())))
    if need_w:
        dw = torch.empty(D, C, 1, 1, dtype=conv_weight.dtype, device=dev)
        plan.append((cfg["_align_head_dw_kernel"],
                     (dy, feat, dw, C, D, HW, W, B * HW, dy.stride(1), *feat.stride(), dw.stride(0),
                      dw.stride(1))))
    return (dfeat, dw, dgamma_part, dbeta_part), plan


def align_head_forward(feat, conv_weight, gn_weight, gn_bias, num_groups: int, grid: tuple[int, int],
                       eps: float):
    """Tokens [B, N, D] plus what the backward needs: x_hat [B, HW, D], fp32 GroupNorm mean and rstd
    [B, G], fp32 per-token rstd [B, N]."""
    outputs, plan = _forward_plan(feat, conv_weight, gn_weight, gn_bias, num_groups, grid, eps)
    _run(plan)
    return outputs


def align_head_backward(grad_tokens, feat, conv_weight, gn_weight, gn_bias, x_hat, gn_rstd, tok_rstd,
                        num_groups: int, grid: tuple[int, int], needs_input_grad=(True, True, True, True)):
    """Gradients (feat, conv_weight, gn_weight, gn_bias); None where ``needs_input_grad`` is False."""
    (dfeat, dw, dgamma_part, dbeta_part), plan = _backward_plan(
        grad_tokens, feat, conv_weight, gn_weight, gn_bias, x_hat, gn_rstd, tok_rstd, num_groups, grid,
        needs_input_grad)
    _run(plan)
    # [B, D] fp32 partials summed over the batch in a fixed order: deterministic.
    dgamma = dgamma_part.sum(0).to(gn_weight.dtype) if needs_input_grad[2] else None
    dbeta = dbeta_part.sum(0).to(gn_bias.dtype) if needs_input_grad[3] else None
    return dfeat, dw, dgamma, dbeta


def _aot_signature(kernel, args) -> tuple[dict, dict, tuple[str, ...]]:
    # What Triton's launcher specialises on: tensors -> pointers, ints equal to 1 -> constexpr, ints that
    # are multiples of 16 -> divisibility hints (pointers are marked by kernels.aot itself).
    signature, constexprs, divisible = {}, {}, []
    params = list(inspect.signature(getattr(kernel, "fn", kernel)).parameters.values())
    runtime = [p for p in params if "constexpr" not in str(p.annotation)]
    if len(runtime) != len(args):
        raise AssertionError(f"{kernel}: {len(args)} arguments for {len(runtime)} parameters")
    for p in params:
        if "constexpr" in str(p.annotation):
            signature[p.name] = "constexpr"
    for p, arg in zip(runtime, args, strict=True):
        if isinstance(arg, torch.Tensor):
            signature[p.name] = "*" + _DTYPES[arg.dtype]
        elif isinstance(arg, bool):
            signature[p.name] = "i1"
        elif isinstance(arg, int):
            if arg == 1:
                signature[p.name], constexprs[p.name] = "constexpr", 1
            else:
                signature[p.name] = "i32" if -(2**31) <= arg < 2**31 else "i64"
                if arg % 16 == 0:
                    divisible.append(p.name)
        elif isinstance(arg, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{kernel}: argument {p.name} of type {type(arg)}")
    return signature, constexprs, tuple(divisible)


def align_head_aot_specs(batch: int, in_ch: int, map_hw: tuple[int, int], grid: tuple[int, int], D: int,
                         num_groups: int, dtype: torch.dtype, param_dtype: torch.dtype | None = None,
                         eps: float = 1e-5) -> list[dict]:
    """For every kernel of one forward + backward at this shape: ``kernel`` (name), ``signature``,
    ``constexprs``, ``num_warps``, ``num_stages`` and ``divisible``, as the host code would launch it
    (built from the host code's own arguments on meta tensors), for ``kernels.aot.compile_for_h200``."""
    meta = torch.device("meta")
    param_dtype = param_dtype or dtype
    feat = torch.empty(batch, in_ch, *map_hw, dtype=dtype, device=meta)
    conv_weight = torch.empty(D, in_ch, 1, 1, dtype=param_dtype, device=meta)
    gamma = torch.empty(D, dtype=param_dtype, device=meta)
    beta = torch.empty(D, dtype=param_dtype, device=meta)
    (tokens, x_hat, _mean, rstd, tok_rstd), fwd = _forward_plan(feat, conv_weight, gamma, beta, num_groups,
                                                                grid, eps)
    _, bwd = _backward_plan(torch.empty_like(tokens), feat, conv_weight, gamma, beta, x_hat, rstd, tok_rstd,
                            num_groups, grid, (True, True, True, True))
    specs = []
    for launch, args in fwd + bwd:
        if not isinstance(launch, KernelLaunch):
            continue
        signature, constexprs, divisible = _aot_signature(launch.kernel, args)
        specs.append({"kernel": launch.name, "signature": signature,
                      "constexprs": {**constexprs, **launch.constexprs},
                      "num_warps": launch.num_warps, "num_stages": launch.num_stages, "divisible": divisible})
    return specs


class AlignHeadFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feat, conv_weight, gn_weight, gn_bias, num_groups, grid, eps):
        tokens, x_hat, _mean, gn_rstd, tok_rstd = align_head_forward(
            feat, conv_weight, gn_weight, gn_bias, num_groups, grid, eps)
        ctx.save_for_backward(feat, conv_weight, gn_weight, gn_bias, x_hat, gn_rstd, tok_rstd)
        ctx.num_groups, ctx.grid = num_groups, grid
        return tokens

    @staticmethod
    def backward(ctx, grad_tokens):
        feat, conv_weight, gn_weight, gn_bias, x_hat, gn_rstd, tok_rstd = ctx.saved_tensors
        grads = align_head_backward(grad_tokens, feat, conv_weight, gn_weight, gn_bias, x_hat, gn_rstd,
                                    tok_rstd, ctx.num_groups, ctx.grid, ctx.needs_input_grad[:4])
        return (*grads, None, None, None)


def align_head(feat: torch.Tensor, conv_weight: torch.Tensor, gn_weight: torch.Tensor, gn_bias: torch.Tensor,
               num_groups: int, grid: tuple[int, int], eps: float = 1e-5) -> torch.Tensor:
    """Unit-norm tokens [B, gh*gw, D] from a feature map [B, C, H, W] (see ``AlignHead.reference``)."""
    grid = (int(grid[0]), int(grid[1]))
    return AlignHeadFunction.apply(feat, conv_weight, gn_weight, gn_bias, int(num_groups), grid, float(eps))
