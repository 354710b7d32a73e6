"""Fused alignment loss: token cosine + sample-sample Gram ("manifold") loss, forward and backward.

The math is ``repa_fast.losses.token_loss`` and ``manifold_gram_loss`` (the definition); for x, y [B, N, D]:

    L_token    = mean_{b,n} (1 - <u_bn, v_bn>)      u = x / max(|x|, eps) per token, v likewise from y
    m_b        = mean_n u_bn,  p_b = m_b / max(|m_b|, eps),  q_b likewise from v
    L_manifold = sum_{b,c} w_bc (p_b.p_c - q_b.q_c)^2    w_bc = keep_bc / (number kept)
                 (upper_only keeps b <= c, mask_diag drops b = c)

and, with d_bc = p_b.p_c - q_b.q_c and a_bc = 2 d_bc (w_bc + w_cb) (= dL_m/dG_bc + dL_m/dG_cb),

    dL_m/dp_b  = sum_c a_bc p_c
    dL_m/dm_b  = (dL_m/dp_b - [|m_b| >= eps] p_b (p_b . dL_m/dp_b)) / max(|m_b|, eps)    (F.normalize's backward)
    dL/du_bn   = g_m dL_m/dm_b / N  -  g_t v_bn / (B N)                                 (g: upstream gradients)
    dL/dx_bn   = (dL/du - [|x| >= eps] u (u . dL/du)) / max(|x|, eps)

where p_b . dL_m/dp_b = sum_c a_bc G_bc needs no second pass over D.

Three kernels, and one memset of the int32 tickets; the forward + backward is 4 launches, whatever the masks:

1. ``_align_loss_forward_kernel`` (grid: token runs x samples) streams x and y once: per token |x|, |y|,
   x.y in fp32; each program writes the sum of its cosines and the fp32 sum of its unit x and unit y
   tokens (one [D] partial each). The last program of a sample to finish (an int32 ticket) sums the
   sample's partials in a fixed order and writes p_b, q_b, |m_b| and the sample's cosine sum.
2. ``_align_loss_gram_kernel`` (grid: D blocks x samples) multiplies one [B, BLOCK_D] block of p and of q
   by p_b, q_b: a partial Gram row. The last program of row b sums the partials in a fixed order, forms
   d, the row's loss and a, and writes the per-sample vector s_b = dL_m/dm_b / N (fp32 [D]; it does not
   depend on the upstream gradient g_m, which the backward multiplies in). The last row to finish writes
   L_token and L_manifold.
3. ``_align_loss_backward_kernel`` reads x and y once more and writes dx from s_b, g_m and g_t.

Nothing of size [B, N, D] is saved besides x and y. The tickets are integer atomics; every float sum runs
in a fixed order whichever program arrives last, so the results are deterministic (no float atomics).
The op is registered as ``torch.ops.repa_fast.align_loss`` (and ``align_loss_backward``) so that
torch.compile keeps it whole as one node.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .token_pair import NORM_EPS, LaunchConfig, check_token_pair, kept_entries, rows_contiguous

_EPS = tl.constexpr(NORM_EPS)

MAX_D = 8192  # one program holds whole token rows (both norms in one pass); wider rows would spill
MAX_B = 4096  # the Gram kernel holds a whole Gram row ([BLOCK_B] fp32) in registers
TILE_ELEMENTS = 4096  # elements of one [rows, BLOCK_D] register tile: 4 tokens of 1024; 8192 spills
ELEMENTS_PER_THREAD = 16  # of one streaming tile: num_warps = tile / (32 * 16)
GRAM_WARPS = 4  # the Gram kernel's tiles are [BLOCK_B, BLOCK_D] <= TILE_ELEMENTS: 32 elements a thread
TARGET_PROGRAMS = 1024  # forward: several waves of the H200's 132 SMs (2 programs each), so no long tail
MIN_TOKENS_PER_PROGRAM = 16  # ... but each forward program's [D] partial sums cover at least this many tokens


# Program (i_s, i_b): tokens [i_s * blocks_per_split * BLOCK_N, ...) of sample i_b, BLOCK_N whole rows a
# tile so that each token is read once. The cosines and unit tokens are summed in registers over the run
# and reduced over tokens once at the end (one [D] partial per program and input).
@triton.jit
def _align_loss_forward_kernel(
    x_ptr,  # [B, N, D], unit stride in D
    y_ptr,  # [B, N, D], unit stride in D
    cos_partial_ptr,  # [B, n_splits] fp32: sum of the program's token cosines
    x_partial_ptr,  # [B, n_splits, D] fp32: sum of the program's unit x tokens
    y_partial_ptr,  # [B, n_splits, D] fp32: ... unit y tokens
    p_ptr,  # [B, D] fp32 out: p_b = normalize(mean unit x token)
    q_ptr,  # [B, D] fp32 out: q_b
    norm_mean_x_ptr,  # [B] fp32 out: |m_b|, before the clamp
    cos_sum_ptr,  # [B] fp32 out: the sample's sum of token cosines
    ticket_ptr,  # [B] int32, zero: finished programs per sample
    N,
    D,
    stride_xb,
    stride_xn,
    stride_yb,
    stride_yn,
    blocks_per_split,
    n_splits,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_s = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    p_x = x_ptr + i_b * stride_xb
    p_y = y_ptr + i_b * stride_yb
    b_sx = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_sy = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_cos = tl.zeros([BLOCK_N], dtype=tl.float32)
    n_start = i_s * blocks_per_split * BLOCK_N
    for i in range(0, blocks_per_split):
        o_n = n_start + i * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        m_nd = m_n[:, None] & m_d[None, :]
        b_x = tl.load(p_x + o_n[:, None] * stride_xn + o_d[None, :], mask=m_nd, other=0.0).to(tl.float32)
        b_y = tl.load(p_y + o_n[:, None] * stride_yn + o_d[None, :], mask=m_nd, other=0.0).to(tl.float32)
        b_rx = 1.0 / tl.maximum(tl.sqrt_rn(tl.sum(b_x * b_x, axis=1)), _EPS)  # [BLOCK_N]
        b_ry = 1.0 / tl.maximum(tl.sqrt_rn(tl.sum(b_y * b_y, axis=1)), _EPS)
        b_cos += tl.sum(b_x * b_y, axis=1) * b_rx * b_ry  # padding rows add 0
        b_sx += b_x * b_rx[:, None]
        b_sy += b_y * b_ry[:, None]
    o_part = (i_b * n_splits + i_s) * D + o_d
    tl.store(x_partial_ptr + o_part, tl.sum(b_sx, axis=0), mask=m_d)
    tl.store(y_partial_ptr + o_part, tl.sum(b_sy, axis=0), mask=m_d)
    tl.store(cos_partial_ptr + i_b * n_splits + i_s, tl.sum(b_cos, axis=0))

    # The last program of sample i_b pools its partials. The barrier puts every thread's stores before the
    # ticket (acq_rel: the last program then sees them); .cg loads read them from L2, past this SM's L1.
    tl.debug_barrier()
    if tl.atomic_add(ticket_ptr + i_b, 1, sem="acq_rel") == n_splits - 1:
        b_mx = tl.zeros([BLOCK_D], dtype=tl.float32)
        b_my = tl.zeros([BLOCK_D], dtype=tl.float32)
        b_cos_sum = tl.full([], 0.0, dtype=tl.float32)
        for i in range(0, n_splits):  # in split order: the same sums whichever program came last
            o_part = (i_b * n_splits + i) * D + o_d
            b_mx += tl.load(x_partial_ptr + o_part, mask=m_d, other=0.0, cache_modifier=".cg")
            b_my += tl.load(y_partial_ptr + o_part, mask=m_d, other=0.0, cache_modifier=".cg")
            b_cos_sum += tl.load(cos_partial_ptr + i_b * n_splits + i, cache_modifier=".cg")
        b_mx = b_mx / N
        b_my = b_my / N
        b_nx = tl.sqrt_rn(tl.sum(b_mx * b_mx, axis=0))
        b_ny = tl.sqrt_rn(tl.sum(b_my * b_my, axis=0))
        tl.store(p_ptr + i_b * D + o_d, b_mx / tl.maximum(b_nx, _EPS), mask=m_d)
        tl.store(q_ptr + i_b * D + o_d, b_my / tl.maximum(b_ny, _EPS), mask=m_d)
        tl.store(norm_mean_x_ptr + i_b, b_nx)
        tl.store(cos_sum_ptr + i_b, b_cos_sum)


# Program (i_j, i_b): Gram rows G_x[i_b, :], G_y[i_b, :] over the D block i_j. The last program of row i_b
# sums the blocks (in block order), then writes the row's loss and s_b; the last row writes both losses.
@triton.jit
def _align_loss_gram_kernel(
    p_ptr,  # [B, D] fp32
    q_ptr,  # [B, D] fp32
    norm_mean_x_ptr,  # [B] fp32
    cos_sum_ptr,  # [B] fp32
    gx_partial_ptr,  # [B, n_blocks, B] fp32 scratch: partial Gram rows of x
    gy_partial_ptr,  # [B, n_blocks, B] fp32 scratch: ... of y
    row_loss_ptr,  # [B] fp32 scratch: sum_c w_bc d_bc^2
    sample_grad_ptr,  # [B, D] fp32 out: s_b = dL_m/dm_b / N
    loss_token_ptr,  # [] fp32 out
    loss_manifold_ptr,  # [] fp32 out
    row_ticket_ptr,  # [B] int32, zero: finished D blocks per row
    ticket_ptr,  # [1] int32, zero: finished rows
    B,
    D,
    n_blocks,
    inv_kept,  # 1 / (number of kept Gram entries); 0 when none is kept
    inv_tokens,  # 1 / (B N)
    inv_n,  # 1 / N
    UPPER_ONLY: tl.constexpr,
    MASK_DIAG: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_j = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    o_c = tl.arange(0, BLOCK_B)
    m_c = o_c < B
    o_d = i_j * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    m_cd = m_c[:, None] & m_d[None, :]
    b_pb = tl.load(p_ptr + i_b * D + o_d, mask=m_d, other=0.0)  # [BLOCK_D]
    b_qb = tl.load(q_ptr + i_b * D + o_d, mask=m_d, other=0.0)
    b_p = tl.load(p_ptr + o_c[:, None] * D + o_d[None, :], mask=m_cd, other=0.0)  # [BLOCK_B, BLOCK_D]
    b_q = tl.load(q_ptr + o_c[:, None] * D + o_d[None, :], mask=m_cd, other=0.0)
    o_row = (i_b * n_blocks + i_j) * B + o_c
    tl.store(gx_partial_ptr + o_row, tl.sum(b_p * b_pb[None, :], axis=1), mask=m_c)
    tl.store(gy_partial_ptr + o_row, tl.sum(b_q * b_qb[None, :], axis=1), mask=m_c)

    tl.debug_barrier()  # as in the forward kernel: stores, barrier, ticket, .cg loads
    if tl.atomic_add(row_ticket_ptr + i_b, 1, sem="acq_rel") == n_blocks - 1:
        b_gx = tl.zeros([BLOCK_B], dtype=tl.float32)  # G_x[i_b, c]
        b_gy = tl.zeros([BLOCK_B], dtype=tl.float32)
        for j in range(0, n_blocks):
            o_row = (i_b * n_blocks + j) * B + o_c
            b_gx += tl.load(gx_partial_ptr + o_row, mask=m_c, other=0.0, cache_modifier=".cg")
            b_gy += tl.load(gy_partial_ptr + o_row, mask=m_c, other=0.0, cache_modifier=".cg")
        b_diff = b_gx - b_gy
        m_bc = m_c  # kept entries (i_b, c) and (c, i_b) of the Gram matrices
        m_cb = m_c
        if UPPER_ONLY:
            m_bc = m_bc & (o_c >= i_b)
            m_cb = m_cb & (o_c <= i_b)
        if MASK_DIAG:
            m_bc = m_bc & (o_c != i_b)
            m_cb = m_cb & (o_c != i_b)
        b_w_bc = tl.where(m_bc, inv_kept, 0.0)
        b_w_cb = tl.where(m_cb, inv_kept, 0.0)
        b_a = 2.0 * b_diff * (b_w_bc + b_w_cb)  # [BLOCK_B]: a_bc
        b_radial = tl.sum(b_a * b_gx, axis=0)  # p_b . dL_m/dp_b
        b_nx = tl.load(norm_mean_x_ptr + i_b)
        b_radial = tl.where(b_nx >= _EPS, b_radial, 0.0)  # a clamped |m_b| has no gradient through it
        b_scale = inv_n / tl.maximum(b_nx, _EPS)
        for j in range(0, n_blocks):
            o_dj = j * BLOCK_D + tl.arange(0, BLOCK_D)
            m_dj = o_dj < D
            b_pj = tl.load(p_ptr + o_c[:, None] * D + o_dj[None, :], mask=m_c[:, None] & m_dj[None, :], other=0.0)
            b_pbj = tl.load(p_ptr + i_b * D + o_dj, mask=m_dj, other=0.0)
            b_dp = tl.sum(b_a[:, None] * b_pj, axis=0)  # [BLOCK_D]: dL_m/dp_b
            tl.store(sample_grad_ptr + i_b * D + o_dj, (b_dp - b_pbj * b_radial) * b_scale, mask=m_dj)
        tl.store(row_loss_ptr + i_b, tl.sum(b_w_bc * b_diff * b_diff, axis=0))

        tl.debug_barrier()
        if tl.atomic_add(ticket_ptr, 1, sem="acq_rel") == B - 1:
            b_rows = tl.load(row_loss_ptr + o_c, mask=m_c, other=0.0, cache_modifier=".cg")
            b_cos = tl.load(cos_sum_ptr + o_c, mask=m_c, other=0.0)
            tl.store(loss_manifold_ptr, tl.sum(b_rows, axis=0))
            tl.store(loss_token_ptr, 1.0 - tl.sum(b_cos, axis=0) * inv_tokens)


# dx for one tile of tokens of sample b: with u = x/max(|x|, eps) and dL/du = g_m s_b - g_t v / (B N)
# (the Gram part through the mean of unit tokens, the cosine part directly),
# dx = (dL/du - [|x| >= eps] u (u . dL/du)) / max(|x|, eps): F.normalize's backward, where a clamped
# (near-zero) row has no gradient through its norm.
@triton.jit
def _align_loss_backward_kernel(
    x_ptr,  # [B, N, D], unit stride in D
    y_ptr,  # [B, N, D], unit stride in D
    sample_grad_ptr,  # [B, D] fp32: s_b
    grad_token_ptr,  # [] upstream gradient of L_token (read on the device: no host sync)
    grad_manifold_ptr,  # [] upstream gradient of L_manifold
    dx_ptr,  # [B, N, D] out, x's dtype
    N,
    D,
    stride_xb,
    stride_xn,
    stride_yb,
    stride_yn,
    stride_dxb,
    stride_dxn,
    inv_tokens,  # 1 / (B N)
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_n = o_n < N
    m_d = o_d < D
    m_nd = m_n[:, None] & m_d[None, :]
    b_x = tl.load(x_ptr + i_b * stride_xb + o_n[:, None] * stride_xn + o_d[None, :], mask=m_nd,
                  other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_D]
    b_y = tl.load(y_ptr + i_b * stride_yb + o_n[:, None] * stride_yn + o_d[None, :], mask=m_nd,
                  other=0.0).to(tl.float32)
    g_token = tl.load(grad_token_ptr).to(tl.float32) * inv_tokens
    g_manifold = tl.load(grad_manifold_ptr).to(tl.float32)
    b_g = tl.load(sample_grad_ptr + i_b * D + o_d, mask=m_d, other=0.0) * g_manifold  # [BLOCK_D]
    b_nx = tl.sqrt_rn(tl.sum(b_x * b_x, axis=1))  # [BLOCK_N]
    b_rx = 1.0 / tl.maximum(b_nx, _EPS)
    b_ry = 1.0 / tl.maximum(tl.sqrt_rn(tl.sum(b_y * b_y, axis=1)), _EPS)
    b_u = b_x * b_rx[:, None]
    # Zero outside the tile's valid rows: a padding row would be scaled by 1/eps (inf once cast to fp16).
    b_v = tl.where(m_nd, b_g[None, :] - g_token * (b_y * b_ry[:, None]), 0.0)
    b_uv = tl.where(b_nx >= _EPS, tl.sum(b_u * b_v, axis=1), 0.0)
    b_dx = (b_v - b_u * b_uv[:, None]) * b_rx[:, None]
    tl.store(dx_ptr + i_b * stride_dxb + o_n[:, None] * stride_dxn + o_d[None, :],
             b_dx.to(dx_ptr.dtype.element_ty), mask=m_nd)


def align_loss_configs(B: int, N: int, D: int) -> dict[str, LaunchConfig]:
    """{kernel name: LaunchConfig} that the host launches for x, y of shape [B, N, D]; the AOT test compiles
    exactly these, so test and host cannot drift.

    The heuristic, from the shape only (so the reduction order, hence the result, never depends on the
    device): streaming tiles hold whole rows, BLOCK_N x BLOCK_D = TILE_ELEMENTS (4 tokens of 1024), with 16
    elements a thread; the forward gives each program a run of tiles so that B x n_splits reaches about
    TARGET_PROGRAMS (several waves) while each [D] partial still covers MIN_TOKENS_PER_PROGRAM tokens; the
    backward has one tile a program (its programs write nothing but dx). The Gram kernel holds one row of
    B samples by a D block, BLOCK_B x BLOCK_D = TILE_ELEMENTS.
    num_stages 1 for the streaming kernels: without tl.dot Triton does not software-pipeline these loads
    (the H200 build is the same with 2 or 3); latency is hidden by several programs per SM instead.
    """
    if D > MAX_D:
        raise ValueError(f"align_loss: token width D = {D} is above the kernel's limit {MAX_D}")
    if B > MAX_B:
        raise ValueError(f"align_loss: batch B = {B} is above the Gram kernel's limit {MAX_B}")
    block_d = triton.next_power_of_2(D)
    block_n = max(1, min(TILE_ELEMENTS // block_d, triton.next_power_of_2(N)))
    num_warps = max(1, min(16, block_n * block_d // (32 * ELEMENTS_PER_THREAD)))
    n_blocks = triton.cdiv(N, block_n)
    splits = max(1, min(n_blocks, triton.cdiv(N, MIN_TOKENS_PER_PROGRAM), triton.cdiv(TARGET_PROGRAMS, B)))
    blocks_per_split = triton.cdiv(n_blocks, splits)
    n_splits = triton.cdiv(n_blocks, blocks_per_split)
    block_b = triton.next_power_of_2(B)
    gram_block_d = max(1, min(TILE_ELEMENTS // block_b, block_d))
    streaming = {"BLOCK_N": block_n, "BLOCK_D": block_d}
    return {
        "_align_loss_forward_kernel": LaunchConfig((n_splits, B), streaming, num_warps, 1,
                                                   {"blocks_per_split": blocks_per_split, "n_splits": n_splits}),
        "_align_loss_gram_kernel": LaunchConfig((triton.cdiv(D, gram_block_d), B),
                                                {"BLOCK_B": block_b, "BLOCK_D": gram_block_d}, GRAM_WARPS, 1),
        "_align_loss_backward_kernel": LaunchConfig((n_blocks, B), dict(streaming), num_warps, 1),
    }


def align_loss_forward(x: torch.Tensor, y: torch.Tensor, upper_only: bool,
                       mask_diag: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_token, L_manifold, s): fp32 scalars and the per-sample vectors s [B, D] fp32 the backward uses."""
    B, N, D = x.shape
    x_k, y_k = rows_contiguous(x), rows_contiguous(y)
    configs = align_loss_configs(B, N, D)
    stream, gram = configs["_align_loss_forward_kernel"], configs["_align_loss_gram_kernel"]
    n_splits, n_blocks = stream.grid[0], gram.grid[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    tickets = torch.zeros(2 * B + 1, dtype=torch.int32, device=x.device)  # the only launch besides the kernels
    cos_partial = torch.empty((B, n_splits), **f32)
    unit_partial = torch.empty((2, B, n_splits, D), **f32)
    pq = torch.empty((2, B, D), **f32)
    norm_mean_x, cos_sum, row_loss = torch.empty(B, **f32), torch.empty(B, **f32), torch.empty(B, **f32)
    gram_partial = torch.empty((2, B, n_blocks, B), **f32)
    sample_grad = torch.empty((B, D), **f32)
    loss_token, loss_manifold = torch.empty((), **f32), torch.empty((), **f32)
    _align_loss_forward_kernel[stream.grid](
        x_ptr=x_k, y_ptr=y_k, cos_partial_ptr=cos_partial, x_partial_ptr=unit_partial[0],
        y_partial_ptr=unit_partial[1], p_ptr=pq[0], q_ptr=pq[1], norm_mean_x_ptr=norm_mean_x,
        cos_sum_ptr=cos_sum, ticket_ptr=tickets[:B], N=N, D=D, stride_xb=x_k.stride(0), stride_xn=x_k.stride(1),
        stride_yb=y_k.stride(0), stride_yn=y_k.stride(1), **stream.args,
        **stream.constexprs, num_warps=stream.num_warps, num_stages=stream.num_stages,
    )
    kept = kept_entries(B, upper_only, mask_diag)
    _align_loss_gram_kernel[gram.grid](
        p_ptr=pq[0], q_ptr=pq[1], norm_mean_x_ptr=norm_mean_x, cos_sum_ptr=cos_sum, gx_partial_ptr=gram_partial[0],
        gy_partial_ptr=gram_partial[1], row_loss_ptr=row_loss, sample_grad_ptr=sample_grad,
        loss_token_ptr=loss_token, loss_manifold_ptr=loss_manifold, row_ticket_ptr=tickets[B:2 * B],
        ticket_ptr=tickets[2 * B:], B=B, D=D, n_blocks=n_blocks, inv_kept=1.0 / kept if kept > 0 else 0.0,
        inv_tokens=1.0 / (B * N), inv_n=1.0 / N, UPPER_ONLY=upper_only, MASK_DIAG=mask_diag,
        **gram.constexprs, num_warps=gram.num_warps, num_stages=gram.num_stages,
    )
    return loss_token, loss_manifold, sample_grad


def align_loss_backward(x: torch.Tensor, y: torch.Tensor, sample_grad: torch.Tensor, grad_token: torch.Tensor,
                        grad_manifold: torch.Tensor) -> torch.Tensor:
    """dx (x's dtype, contiguous) from the upstream gradients of both losses and forward's s [B, D]."""
    B, N, D = x.shape
    x_k, y_k = rows_contiguous(x), rows_contiguous(y)
    dx = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
    launch = align_loss_configs(B, N, D)["_align_loss_backward_kernel"]
    _align_loss_backward_kernel[launch.grid](
        x_ptr=x_k, y_ptr=y_k, sample_grad_ptr=sample_grad, grad_token_ptr=grad_token,
        grad_manifold_ptr=grad_manifold, dx_ptr=dx, N=N, D=D, stride_xb=x_k.stride(0), stride_xn=x_k.stride(1),
        stride_yb=y_k.stride(0), stride_yn=y_k.stride(1), stride_dxb=dx.stride(0), stride_dxn=dx.stride(1),
        inv_tokens=1.0 / (B * N), **launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return dx


# --- the torch ops: opaque to torch.compile (one node each), on any device Triton runs on -------------------

@torch.library.custom_op("repa_fast::align_loss", mutates_args=())
def _align_loss_op(x: torch.Tensor, y: torch.Tensor, upper_only: bool,
                   mask_diag: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return align_loss_forward(x, y, upper_only, mask_diag)


@_align_loss_op.register_fake
def _(x, y, upper_only, mask_diag):
    B, _, D = x.shape
    return x.new_empty((), dtype=torch.float32), x.new_empty((), dtype=torch.float32), \
        x.new_empty((B, D), dtype=torch.float32)


@torch.library.custom_op("repa_fast::align_loss_backward", mutates_args=())
def _align_loss_backward_op(x: torch.Tensor, y: torch.Tensor, sample_grad: torch.Tensor, grad_token: torch.Tensor,
                            grad_manifold: torch.Tensor) -> torch.Tensor:
    return align_loss_backward(x, y, sample_grad, grad_token, grad_manifold)


@_align_loss_backward_op.register_fake
def _(x, y, sample_grad, grad_token, grad_manifold):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, y, _, _ = inputs
    ctx.save_for_backward(x, y, output[2])
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for s (or an unused loss): no extra launch


def _backward(ctx, grad_token, grad_manifold, _grad_sample):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    x, y, sample_grad = ctx.saved_tensors
    zero = None
    if grad_token is None or grad_manifold is None:  # one of the losses unused: its gradient is zero
        zero = torch.zeros((), dtype=torch.float32, device=x.device)
    dx = _align_loss_backward_op(x, y, sample_grad, zero if grad_token is None else grad_token,
                                 zero if grad_manifold is None else grad_manifold)
    return dx, None, None, None


_align_loss_op.register_autograd(_backward, setup_context=_setup_context)


def align_loss(x: torch.Tensor, y: torch.Tensor, upper_only: bool = False,
               mask_diag: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused (L_token, L_manifold), fp32 scalars, for predicted tokens x and target tokens y, both [B, N, D].

    x and y may differ in dtype (fp32, fp16, bf16); the gradient flows to x only. Runs as the custom op
    ``torch.ops.repa_fast.align_loss``.
    """
    check_token_pair("align_loss", x, y, "repa_fast.losses (kernels='torch')")
    loss_token, loss_manifold, _ = _align_loss_op(x, y, upper_only, mask_diag)
    return loss_token, loss_manifold
