"""Fused token-form manifold loss: per-sample token-token Gram matrices of unit tokens, flash-style.

The math is ``repa_fast.losses.token_gram_loss`` (the definition, SimpleTuner's U-REPA); for x, y [B, N, D]:

    u_i = x_i / max(|x_i|, eps),  v_i likewise from y          (per sample b; r_i = 1 / max(|x_i|, eps))
    E   = U U^T - V V^T                                         ([N, N] per sample, symmetric)
    L   = sum_b sum_{i,j} E_ij^2 / (B N^2)
    dL/du_i = c sum_j E_ij u_j = c W_i,   W = E diag(r) X,      c = 4 g / (B N^2)  (g: upstream gradient)
    dL/dx_i = c r_i (W_i - u_i (u_i . W_i)) [the radial part only where |x_i| >= eps]
    u_i . W_i = sum_j E_ij (U U^T)_ij                           (no second pass over D)

No [N, N] matrix is ever stored: every Gram block is made on chip from raw x and y (the dot products of
the raw tokens, scaled by r_i r_j afterwards: one rounding fewer than normalising 16-bit tokens first) and
used at once.

1. ``_token_gram_forward_kernel`` (grid: block pairs x samples): the [BLOCK_T, BLOCK_T] blocks (I, J) with
   J >= I of E (E is symmetric: the others are counted twice); writes sum E^2 / (B N^2) of its block.
   The host sums the [B, blocks^2] partials (a fixed order: deterministic).
2. ``_token_gram_backward_kernel`` (grid: row blocks x samples): the rows I of E against all N tokens,
   held on chip ([BLOCK_I, BLOCK_N] fp32; N <= MAX_N), then dx_I = c r_I (P X - u_I radial) block by
   block of D, with P = E diag(r) in x's dtype for the tensor cores.

Both read x and y as they are (unit stride in D); y is the target (no gradient). Registered as the torch
custom ops ``repa_fast::token_gram_loss`` and ``repa_fast::token_gram_loss_backward``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .token_pair import NORM_EPS, LaunchConfig, check_token_pair, dot_precision, rows_contiguous

_EPS = tl.constexpr(NORM_EPS)

MAX_N = 256  # the backward holds E's rows against all N tokens on chip: [64, N] fp32 twice, 8 warps
MAX_D = 65536  # D is looped over in blocks; this only bounds the int32 column offsets comfortably
GRAM_BLOCK = 64  # rows (and columns) of a Gram block: wgmma's smallest M, so every tl.dot runs on HGMMA
MIN_BLOCK = 16  # tl.dot's smallest block
K_BLOCK = 64  # D elements per step of a Gram's reduction
D_BLOCK = 64  # D columns of dx per step of the backward's second phase


@triton.jit
def _gram_block(p_i, p_j, m_i, m_j, D, PRECISION: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                BLOCK_K: tl.constexpr):
    # Raw dot products of tokens I with tokens J over all of D ([BLOCK_I, BLOCK_J] fp32), and both sides' |.|^2.
    b_g = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    b_sq_i = tl.zeros([BLOCK_I], dtype=tl.float32)
    b_sq_j = tl.zeros([BLOCK_J], dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        o_k = k + tl.arange(0, BLOCK_K)
        m_k = o_k < D
        b_ti = tl.load(p_i + o_k[None, :], mask=m_i[:, None] & m_k[None, :], other=0.0)  # [BLOCK_I, BLOCK_K]
        b_tj = tl.load(p_j + o_k[None, :], mask=m_j[:, None] & m_k[None, :], other=0.0)  # [BLOCK_J, BLOCK_K]
        b_g = tl.dot(b_ti, tl.trans(b_tj), b_g, input_precision=PRECISION)
        b_sq_i += tl.sum(b_ti.to(tl.float32) * b_ti.to(tl.float32), axis=1)
        b_sq_j += tl.sum(b_tj.to(tl.float32) * b_tj.to(tl.float32), axis=1)
    return b_g, b_sq_i, b_sq_j


@triton.jit
def _inv_norm(b_sq):
    return 1.0 / tl.maximum(tl.sqrt_rn(b_sq), _EPS)  # F.normalize's 1 / max(|t|, eps)


# Program (i_t, i_b): block (I, J) = divmod(i_t, n_tiles) of sample i_b's E, for J >= I (the others write 0).
@triton.jit
def _token_gram_forward_kernel(
    x_ptr,  # [B, N, D], unit stride in D
    y_ptr,  # [B, N, D], unit stride in D
    partial_ptr,  # [B, n_tiles * n_tiles] fp32 out: weight * sum E^2 * scale of the block
    N,
    D,
    stride_xb,
    stride_xn,
    stride_yb,
    stride_yn,
    n_tiles,
    scale,  # 1 / (B N^2)
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    X_PRECISION: tl.constexpr,
    Y_PRECISION: tl.constexpr,
):
    i_t = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    i_i = i_t // n_tiles
    i_j = i_t % n_tiles
    b_total = tl.full([], 0.0, dtype=tl.float32)
    if i_j >= i_i:
        o_i = i_i * BLOCK_T + tl.arange(0, BLOCK_T)
        o_j = i_j * BLOCK_T + tl.arange(0, BLOCK_T)
        m_i = o_i < N
        m_j = o_j < N
        b_gx, b_sq_xi, b_sq_xj = _gram_block(x_ptr + i_b * stride_xb + o_i[:, None] * stride_xn,
                                             x_ptr + i_b * stride_xb + o_j[:, None] * stride_xn, m_i, m_j, D,
                                             X_PRECISION, BLOCK_T, BLOCK_T, BLOCK_K)  # raw x_i . x_j, |x|^2
        b_gy, b_sq_yi, b_sq_yj = _gram_block(y_ptr + i_b * stride_yb + o_i[:, None] * stride_yn,
                                             y_ptr + i_b * stride_yb + o_j[:, None] * stride_yn, m_i, m_j, D,
                                             Y_PRECISION, BLOCK_T, BLOCK_T, BLOCK_K)
        b_e = (b_gx * _inv_norm(b_sq_xi)[:, None] * _inv_norm(b_sq_xj)[None, :]
               - b_gy * _inv_norm(b_sq_yi)[:, None] * _inv_norm(b_sq_yj)[None, :])  # [BLOCK_T, BLOCK_T]
        b_e = tl.where(m_i[:, None] & m_j[None, :], b_e, 0.0)
        b_weight = tl.where(i_j > i_i, 2.0, 1.0)  # an off-diagonal block stands for its mirror image too
        b_total = tl.sum(b_e * b_e) * b_weight * scale
    tl.store(partial_ptr + i_b * n_tiles * n_tiles + i_t, b_total)


@triton.jit
def _difference_rows(x_ptr, y_ptr, i_b, o_i, m_i, i_h, N, D, stride_xb, stride_xn, stride_yb, stride_yn,
                     X_PRECISION: tl.constexpr, Y_PRECISION: tl.constexpr, BLOCK_I: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    # Rows I of E against column half i_h: (P = E diag(r) in x's dtype, the half's share of u_i . W_i, |x_i|).
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_h = o_h < N
    b_gx, b_sq_xi, b_sq_xh = _gram_block(x_ptr + i_b * stride_xb + o_i[:, None] * stride_xn,
                                         x_ptr + i_b * stride_xb + o_h[:, None] * stride_xn, m_i, m_h, D,
                                         X_PRECISION, BLOCK_I, BLOCK_H, BLOCK_K)
    b_nxi = tl.sqrt_rn(b_sq_xi)
    b_rxh = _inv_norm(b_sq_xh)
    b_sx = b_gx * _inv_norm(b_sq_xi)[:, None] * b_rxh[None, :]  # [BLOCK_I, BLOCK_H]: (U U^T)_IH
    b_gy, b_sq_yi, b_sq_yh = _gram_block(y_ptr + i_b * stride_yb + o_i[:, None] * stride_yn,
                                         y_ptr + i_b * stride_yb + o_h[:, None] * stride_yn, m_i, m_h, D,
                                         Y_PRECISION, BLOCK_I, BLOCK_H, BLOCK_K)
    b_e = tl.where(m_h[None, :], b_sx - b_gy * _inv_norm(b_sq_yi)[:, None] * _inv_norm(b_sq_yh)[None, :], 0.0)
    b_p = (b_e * b_rxh[None, :]).to(x_ptr.dtype.element_ty)
    # u_i . W_i / r_i = sum_j P_ij (x_i . x_j) from the rounded P that W = P X uses: the radial part removed
    # is then the one W holds, and P's rounding does not survive the projection as a radial residue.
    return b_p, tl.sum(b_p.to(tl.float32) * b_gx, axis=1), b_nxi


# Program (i_i, i_b): rows I of sample i_b. Phase 1: E_I against all N tokens in two column halves (so that
# only one half's two Gram blocks are live at a time), kept as P = E diag(r); the radial terms u_i . W_i.
# Phase 2: dx_I one D block at a time, W = P X.
@triton.jit
def _token_gram_backward_kernel(
    x_ptr,  # [B, N, D], unit stride in D
    y_ptr,  # [B, N, D], unit stride in D
    grad_ptr,  # [] upstream gradient of L (read on the device: no host sync)
    dx_ptr,  # [B, N, D] out, x's dtype
    N,
    D,
    stride_xb,
    stride_xn,
    stride_yb,
    stride_yn,
    stride_dxb,
    stride_dxn,
    scale,  # 4 / (B N^2)
    BLOCK_I: tl.constexpr,
    BLOCK_H: tl.constexpr,  # half of the (padded) tokens
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    X_PRECISION: tl.constexpr,
    Y_PRECISION: tl.constexpr,
):
    i_i = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    o_i = i_i * BLOCK_I + tl.arange(0, BLOCK_I)
    m_i = o_i < N
    b_p0, b_radial0, b_nxi = _difference_rows(x_ptr, y_ptr, i_b, o_i, m_i, 0, N, D, stride_xb, stride_xn,
                                              stride_yb, stride_yn, X_PRECISION, Y_PRECISION, BLOCK_I, BLOCK_H,
                                              BLOCK_K)  # [BLOCK_I, BLOCK_H], [BLOCK_I], [BLOCK_I]
    b_p1, b_radial1, _ = _difference_rows(x_ptr, y_ptr, i_b, o_i, m_i, 1, N, D, stride_xb, stride_xn,
                                          stride_yb, stride_yn, X_PRECISION, Y_PRECISION, BLOCK_I, BLOCK_H, BLOCK_K)
    b_rxi = 1.0 / tl.maximum(b_nxi, _EPS)
    b_radial = tl.where(b_nxi >= _EPS, (b_radial0 + b_radial1) * b_rxi, 0.0)  # u_i . W_i; none if |x_i| clamped
    b_c = tl.load(grad_ptr).to(tl.float32) * scale

    o_h = tl.arange(0, BLOCK_H)
    p_x0 = x_ptr + i_b * stride_xb + o_h[:, None] * stride_xn  # tokens of half 0, [BLOCK_H, 1]
    p_x1 = p_x0 + BLOCK_H * stride_xn
    m_h0 = o_h < N
    m_h1 = o_h + BLOCK_H < N
    p_xi = x_ptr + i_b * stride_xb + o_i[:, None] * stride_xn
    for d in range(0, D, BLOCK_D):
        o_d = d + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_x0 = tl.load(p_x0 + o_d[None, :], mask=m_h0[:, None] & m_d[None, :], other=0.0)  # [BLOCK_H, BLOCK_D]
        b_x1 = tl.load(p_x1 + o_d[None, :], mask=m_h1[:, None] & m_d[None, :], other=0.0)
        b_w = tl.dot(b_p0, b_x0, input_precision=X_PRECISION)  # [BLOCK_I, BLOCK_D]
        b_w = tl.dot(b_p1, b_x1, b_w, input_precision=X_PRECISION)
        b_ui = tl.load(p_xi + o_d[None, :], mask=m_i[:, None] & m_d[None, :], other=0.0).to(tl.float32) * \
            b_rxi[:, None]
        b_dx = (b_w - b_ui * b_radial[:, None]) * (b_c * b_rxi)[:, None]
        tl.store(dx_ptr + i_b * stride_dxb + o_i[:, None] * stride_dxn + o_d[None, :],
                 b_dx.to(dx_ptr.dtype.element_ty), mask=m_i[:, None] & m_d[None, :])


def token_gram_configs(B: int, N: int, D: int, x_dtype: torch.dtype = torch.bfloat16,
                       y_dtype: torch.dtype = torch.float16) -> dict[str, LaunchConfig]:
    """{kernel name: LaunchConfig} that the host launches for x, y of shape [B, N, D].

    The heuristic: Gram blocks of GRAM_BLOCK (64: wgmma's M) tokens, or the next power of two >= N (>= 16)
    when N is smaller; reductions over D in K_BLOCK steps. The forward's [64, 64] blocks need 4 warps and 3
    pipeline stages (2 x 8 KB of 16-bit operands a stage); the backward makes E's rows in two column halves
    (two [64, N/2] fp32 Gram blocks live at a time, 8 warps) and pipelines 2 stages of a [64 + N/2, 64]
    operand pair; its second phase multiplies [64, N/2] by [N/2, D_BLOCK] twice per D block.
    """
    if N > MAX_N:
        raise ValueError(f"token_gram_loss: N = {N} tokens is above the backward kernel's limit {MAX_N} "
                         f"(use repa_fast.losses.token_gram_loss)")
    if D > MAX_D:
        raise ValueError(f"token_gram_loss: token width D = {D} is above the kernel's limit {MAX_D}")
    block_t = max(MIN_BLOCK, min(GRAM_BLOCK, triton.next_power_of_2(N)))
    block_h = max(MIN_BLOCK, triton.next_power_of_2(N) // 2)  # the backward's column halves
    n_tiles = triton.cdiv(N, block_t)
    precisions = {"X_PRECISION": dot_precision(x_dtype), "Y_PRECISION": dot_precision(y_dtype)}
    return {
        "_token_gram_forward_kernel": LaunchConfig(
            (n_tiles * n_tiles, B), {"BLOCK_T": block_t, "BLOCK_K": K_BLOCK, **precisions}, 4, 3,
            {"n_tiles": n_tiles}),
        "_token_gram_backward_kernel": LaunchConfig(
            (n_tiles, B), {"BLOCK_I": block_t, "BLOCK_H": block_h, "BLOCK_K": K_BLOCK, "BLOCK_D": D_BLOCK,
                           **precisions}, 8, 2),
    }


def token_gram_forward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L (fp32 scalar) for x, y [B, N, D]."""
    B, N, D = x.shape
    x_k, y_k = rows_contiguous(x), rows_contiguous(y)
    launch = token_gram_configs(B, N, D, x.dtype, y.dtype)["_token_gram_forward_kernel"]
    partial = torch.empty(launch.grid[::-1], dtype=torch.float32, device=x.device)  # [B, n_tiles^2]
    _token_gram_forward_kernel[launch.grid](
        x_ptr=x_k, y_ptr=y_k, partial_ptr=partial, N=N, D=D, stride_xb=x_k.stride(0), stride_xn=x_k.stride(1),
        stride_yb=y_k.stride(0), stride_yn=y_k.stride(1), scale=1.0 / (B * N * N), **launch.args,
        **launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return partial.sum()


def token_gram_backward(x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """dx (x's dtype, contiguous) for the upstream gradient ``grad`` (a 0-dim tensor) of L."""
    B, N, D = x.shape
    x_k, y_k = rows_contiguous(x), rows_contiguous(y)
    dx = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
    launch = token_gram_configs(B, N, D, x.dtype, y.dtype)["_token_gram_backward_kernel"]
    _token_gram_backward_kernel[launch.grid](
        x_ptr=x_k, y_ptr=y_k, grad_ptr=grad, dx_ptr=dx, N=N, D=D, stride_xb=x_k.stride(0), stride_xn=x_k.stride(1),
        stride_yb=y_k.stride(0), stride_yn=y_k.stride(1), stride_dxb=dx.stride(0), stride_dxn=dx.stride(1),
        scale=4.0 / (B * N * N), **launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return dx


# --- the torch ops: opaque to torch.compile (one node each), on any device Triton runs on -------------------

@torch.library.custom_op("repa_fast::token_gram_loss", mutates_args=())
def _token_gram_op(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return token_gram_forward(x, y)


@_token_gram_op.register_fake
def _(x, y):
    return x.new_empty((), dtype=torch.float32)


@torch.library.custom_op("repa_fast::token_gram_loss_backward", mutates_args=())
def _token_gram_backward_op(x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return token_gram_backward(x, y, grad)


@_token_gram_backward_op.register_fake
def _(x, y, grad):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])


def _backward(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return None, None
    x, y = ctx.saved_tensors
    return _token_gram_backward_op(x, y, grad), None


_token_gram_op.register_autograd(_backward, setup_context=_setup_context)


def token_gram_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fused token-form manifold loss (fp32 scalar) of predicted tokens x and target tokens y, both [B, N, D]
    with N <= MAX_N; x and y may differ in dtype (fp32, fp16, bf16); the gradient flows to x only. Runs as
    the custom op ``torch.ops.repa_fast.token_gram_loss``."""
    check_token_pair("token_gram_loss", x, y, "repa_fast.losses.token_gram_loss")
    return _token_gram_op(x, y)
