"""Fused alignment loss: token cosine + sample-sample Gram ("manifold") loss, forward and backward.

The math is ``repa_fast.losses.token_loss`` and ``manifold_gram_loss`` (the definition); for x, y [B, N, D]:

    L_token    = mean_{b,n} (1 - <x_bn / max(|x_bn|, eps), y_bn / max(|y_bn|, eps)>)
    p_b        = normalize(mean_n normalize(x_bn)),  q_b likewise from y
    L_manifold = mean over kept (b, c) of (p_b.p_c - q_b.q_c)^2    (upper_only: b <= c; mask_diag: b != c)

Forward reads x and y once: each program streams a run of tokens of one sample, writes their cosines
and the fp32 sum of its unit x and unit y tokens. The [B, D] / [B, B] rest (pooling the partial sums
in a fixed order, normalising, the two Grams) is a handful of small torch ops. Backward reads x and
y once more and writes dx: the Gram part reaches a token only through the mean of the unit tokens
of its sample, so it enters the kernel as one fp32 vector per sample, made from the small tensors
saved by forward. Nothing of size [B, N, D] is saved besides x and y. No float atomics anywhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NORM_EPS = 1e-12  # F.normalize's eps, as in the reference: a zero row stays zero instead of NaN
_EPS = tl.constexpr(NORM_EPS)

MAX_D = 8192  # one program holds whole token rows (both norms in one pass); wider rows would spill
TILE_ELEMENTS = 4096  # BLOCK_N * BLOCK_D: 4 tokens of 1024 per step; 8192 spills in the forward kernel
ELEMENTS_PER_THREAD = 16  # of one tile: num_warps = tile / (32 * 16); forward at D=1024 holds 4 such tiles
TARGET_PROGRAMS = 1024  # forward: several waves of the H200's 132 SMs (2 programs each), so no long tail
MIN_TOKENS_PER_PROGRAM = 16  # ... but each forward program's [D] partial sums cover at least this many tokens


# For each sample b and each run of tokens: per token, |x|, |y| and x.y in fp32 give the cosine
# (stored, [B, N]), and x/|x|, y/|y| are summed over the run in a [BLOCK_N, BLOCK_D] accumulator that
# is reduced over tokens once at the end (one [D] partial per program and input). Whole rows per tile
# so that each token is read once; runs of several tiles per program keep the partial buffers small
# ([2, B, n_splits, D]) while leaving enough programs to fill the GPU.
@triton.jit
def _align_loss_forward_kernel(
    x_ptr,
    y_ptr,
    token_cos_ptr,
    x_unit_sum_ptr,
    y_unit_sum_ptr,
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
    n_start = i_s * blocks_per_split * BLOCK_N
    for i in range(0, blocks_per_split):
        o_n = n_start + i * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        m_nd = m_n[:, None] & m_d[None, :]
        b_x = tl.load(p_x + o_n[:, None] * stride_xn + o_d[None, :], mask=m_nd, other=0.0).to(tl.float32)
        b_y = tl.load(p_y + o_n[:, None] * stride_yn + o_d[None, :], mask=m_nd, other=0.0).to(tl.float32)
        b_rx = 1.0 / tl.maximum(tl.sqrt_rn(tl.sum(b_x * b_x, axis=1)), _EPS)
        b_ry = 1.0 / tl.maximum(tl.sqrt_rn(tl.sum(b_y * b_y, axis=1)), _EPS)
        b_cos = tl.sum(b_x * b_y, axis=1) * b_rx * b_ry
        tl.store(token_cos_ptr + i_b * N + o_n, b_cos, mask=m_n)
        b_sx += b_x * b_rx[:, None]
        b_sy += b_y * b_ry[:, None]
    o_out = (i_b * n_splits + i_s) * D + o_d
    tl.store(x_unit_sum_ptr + o_out, tl.sum(b_sx, axis=0), mask=m_d)
    tl.store(y_unit_sum_ptr + o_out, tl.sum(b_sy, axis=0), mask=m_d)


# dx for one tile of tokens of sample b. With u = x/max(|x|, eps) and v = dL/du =
# sample_grad_b - token_grad * y/max(|y|, eps) (the Gram part through the mean of unit tokens, the
# cosine part directly), dx = (v - [|x| >= eps] u (u.v)) / max(|x|, eps): F.normalize's backward,
# where a clamped (near-zero) row has no gradient through its norm. token_grad is g_token / (B N).
@triton.jit
def _align_loss_backward_kernel(
    x_ptr,
    y_ptr,
    sample_grad_ptr,
    token_grad_ptr,
    dx_ptr,
    N,
    D,
    stride_xb,
    stride_xn,
    stride_yb,
    stride_yn,
    stride_dxb,
    stride_dxn,
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
                  other=0.0).to(tl.float32)
    b_y = tl.load(y_ptr + i_b * stride_yb + o_n[:, None] * stride_yn + o_d[None, :], mask=m_nd,
                  other=0.0).to(tl.float32)
    b_g = tl.load(sample_grad_ptr + i_b * D + o_d, mask=m_d, other=0.0)
    token_grad = tl.load(token_grad_ptr)  # a single fp32 scalar (not a .item(): no host sync)
    b_nx = tl.sqrt_rn(tl.sum(b_x * b_x, axis=1))
    b_rx = 1.0 / tl.maximum(b_nx, _EPS)
    b_ry = 1.0 / tl.maximum(tl.sqrt_rn(tl.sum(b_y * b_y, axis=1)), _EPS)
    b_u = b_x * b_rx[:, None]
    # Zero outside the tile's valid rows: a padding row would be scaled by 1/eps (inf once cast to fp16).
    b_v = tl.where(m_nd, b_g[None, :] - token_grad * (b_y * b_ry[:, None]), 0.0)
    b_uv = tl.where(b_nx >= _EPS, tl.sum(b_u * b_v, axis=1), 0.0)
    b_dx = (b_v - b_u * b_uv[:, None]) * b_rx[:, None]
    tl.store(dx_ptr + i_b * stride_dxb + o_n[:, None] * stride_dxn + o_d[None, :],
             b_dx.to(dx_ptr.dtype.element_ty), mask=m_nd)


def align_loss_configs(B: int, N: int, D: int) -> dict[str, tuple[dict, int, int]]:
    """{kernel name: (constexprs, num_warps, num_stages)} that the host uses for x, y of shape [B, N, D].

    The AOT test compiles exactly these, so test and host cannot drift.
    """
    if D > MAX_D:
        raise ValueError(f"align_loss: token width D = {D} is above the kernel's limit {MAX_D}")
    block_d = triton.next_power_of_2(D)
    block_n = max(1, min(TILE_ELEMENTS // block_d, triton.next_power_of_2(N)))
    num_warps = max(1, min(16, block_n * block_d // (32 * ELEMENTS_PER_THREAD)))
    constexprs = {"BLOCK_N": block_n, "BLOCK_D": block_d}
    # num_stages 1: without tl.dot Triton does not software-pipeline these loads (the H200 build is the
    # same with 2 or 3); latency is hidden by having several programs per SM instead.
    return {
        "_align_loss_forward_kernel": (constexprs, num_warps, 1),
        "_align_loss_backward_kernel": (dict(constexprs), num_warps, 1),
    }


def _forward_splits(B: int, N: int, block_n: int) -> tuple[int, int]:
    """(blocks_per_split, n_splits): token tiles per forward program and programs per sample.

    A function of the shape only (not of the device), so the reduction order and the result are too.
    """
    n_blocks = triton.cdiv(N, block_n)
    splits = max(1, min(n_blocks, triton.cdiv(N, MIN_TOKENS_PER_PROGRAM), triton.cdiv(TARGET_PROGRAMS, B)))
    blocks_per_split = triton.cdiv(n_blocks, splits)
    return blocks_per_split, triton.cdiv(n_blocks, blocks_per_split)


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels take strides for b and n; a strided last dim is copied (unit stride gives wide loads).
    return t if t.stride(-1) == 1 else t.contiguous()


def _gram_weights(B: int, upper_only: bool, mask_diag: bool, device) -> torch.Tensor:
    """keep / (number kept) as fp32 [B, B]: the Gram loss is sum(diff^2 * weights); all zero if none is kept.

    The same mask as repa_fast.losses._gram_mask (kernels/ imports nothing from repa_fast).
    """
    keep = torch.ones(B, B, dtype=torch.bool, device=device)
    kept = B * B
    if upper_only:
        keep = torch.triu(keep)
        kept = B * (B + 1) // 2
    if mask_diag:
        keep &= ~torch.eye(B, dtype=torch.bool, device=device)
        kept -= B
    return keep.float() / kept if kept > 0 else torch.zeros(B, B, device=device)


def align_loss_forward(x: torch.Tensor, y: torch.Tensor, upper_only: bool, mask_diag: bool):
    """(loss_token, loss_manifold, saved): saved = (p [B, D], |mean unit x| [B, 1], dL_m/dG_x [B, B])."""
    B, N, D = x.shape
    x_k, y_k = _rows_contiguous(x), _rows_contiguous(y)
    constexprs, num_warps, num_stages = align_loss_configs(B, N, D)["_align_loss_forward_kernel"]
    blocks_per_split, n_splits = _forward_splits(B, N, constexprs["BLOCK_N"])
    token_cos = torch.empty((B, N), dtype=torch.float32, device=x.device)
    unit_sums = torch.empty((2, B, n_splits, D), dtype=torch.float32, device=x.device)
    _align_loss_forward_kernel[(n_splits, B)](
        x_k, y_k, token_cos, unit_sums[0], unit_sums[1], N, D,
        x_k.stride(0), x_k.stride(1), y_k.stride(0), y_k.stride(1), blocks_per_split, n_splits,
        **constexprs, num_warps=num_warps, num_stages=num_stages,
    )
    loss_token = 1.0 - token_cos.mean()
    means = unit_sums.sum(2) / N  # [2, B, D]: fixed-order reduction of the per-program partials
    norms = means.norm(dim=-1, keepdim=True)
    pq = means / norms.clamp_min(NORM_EPS)
    gram = pq @ pq.transpose(1, 2)  # [2, B, B]: G_x, G_y
    diff = gram[0] - gram[1]
    weighted = diff * _gram_weights(B, upper_only, mask_diag, x.device)
    loss_manifold = (weighted * diff).sum()
    return loss_token, loss_manifold, (pq[0], norms[0], 2.0 * weighted)


def align_loss_backward(x: torch.Tensor, y: torch.Tensor, grad_token: torch.Tensor, grad_manifold: torch.Tensor,
                        p: torch.Tensor, norm_mean_x: torch.Tensor, dgram: torch.Tensor) -> torch.Tensor:
    """dx (x's dtype) from the upstream gradients of both losses and forward's saved small tensors."""
    B, N, D = x.shape
    x_k, y_k = _rows_contiguous(x), _rows_contiguous(y)
    # Gram part, back to the mean of unit x tokens m_b (p_b = m_b / max(|m_b|, eps)), then / N to each token.
    dG = grad_manifold.float() * dgram
    dp = (dG + dG.T) @ p
    radial = (p * dp).sum(-1, keepdim=True) * (norm_mean_x >= NORM_EPS)
    sample_grad = ((dp - p * radial) / (norm_mean_x.clamp_min(NORM_EPS) * N)).contiguous()
    token_grad = (grad_token.float() / (B * N)).reshape(1)
    dx = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
    constexprs, num_warps, num_stages = align_loss_configs(B, N, D)["_align_loss_backward_kernel"]
    _align_loss_backward_kernel[(triton.cdiv(N, constexprs["BLOCK_N"]), B)](
        x_k, y_k, sample_grad, token_grad, dx, N, D,
        x_k.stride(0), x_k.stride(1), y_k.stride(0), y_k.stride(1), dx.stride(0), dx.stride(1),
        **constexprs, num_warps=num_warps, num_stages=num_stages,
    )
    return dx


class AlignLossFunction(torch.autograd.Function):
    """(L_token, L_manifold) of x, y [B, N, D]; differentiable in x only (y is the DINO target)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, upper_only: bool, mask_diag: bool):
        loss_token, loss_manifold, small = align_loss_forward(x, y, upper_only, mask_diag)
        ctx.save_for_backward(x, y, *small)
        return loss_token, loss_manifold

    @staticmethod
    def backward(ctx, grad_token: torch.Tensor, grad_manifold: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        x, y, p, norm_mean_x, dgram = ctx.saved_tensors
        return align_loss_backward(x, y, grad_token, grad_manifold, p, norm_mean_x, dgram), None, None, None


def align_loss(x: torch.Tensor, y: torch.Tensor, upper_only: bool = False,
               mask_diag: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused (L_token, L_manifold), fp32 scalars, for predicted tokens x and target tokens y, both [B, N, D].

    x and y may differ in dtype (fp32, fp16, bf16); the gradient flows to x only.
    """
    if x.ndim != 3 or x.shape != y.shape:
        raise ValueError(f"align_loss: x and y must both be [B,N,D], got {list(x.shape)} and {list(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"align_loss: x is on {x.device} but y is on {y.device}")
    if not (x.is_floating_point() and y.is_floating_point()):
        raise ValueError(f"align_loss: x and y must be floating point, got {x.dtype} and {y.dtype}")
    if y.requires_grad:
        raise ValueError("align_loss: y requires grad, but the fused kernel differentiates x only; "
                         "use repa_fast.losses (kernels='torch') for a trainable target")
    if x.numel() == 0:
        raise ValueError(f"align_loss: empty input {list(x.shape)}")
    return AlignLossFunction.apply(x, y, upper_only, mask_diag)
