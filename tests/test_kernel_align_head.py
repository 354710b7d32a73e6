"""The fused AlignHead (kernels/align_head.py) against the PyTorch reference (AlignHead.reference).

On CPU the kernels run in the Triton interpreter (tests/conftest.py), so shapes are small and the
dtypes fp32/fp16 (the interpreter has no bf16 dot or maths). Every comparison is against the
reference module run in float64 on the same (rounded) inputs, with the same random upstream gradient:
the output and the gradients of feat, the conv weight, the GroupNorm weight and bias, by relative
norm error. The H200 build is checked ahead of time (no GPU needed); bf16 at the real shape runs only
on a GPU.
"""

from __future__ import annotations

import copy
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from kernel_testing import assert_as_accurate_as_eager, assert_close, assert_compiles_whole, rel_err, tolerance

import repa_fast.kernels.align_head as kah
from repa_fast.kernels import aot
from repa_fast.kernels.align_head import align_head, align_head_backward, align_head_forward
from repa_fast.kernels.launch_count import count_launches, record_launches
from repa_fast.models.align_head import AlignHead

# fp32: the kernels accumulate in fp32 (observed ~2e-7). fp16: the inputs are the same rounded values
# for both sides, but the kernels store x_hat, the tokens, P1 and dy in fp16 and feed fp16 operands to the
# GEMMs, each a rounding of unit 4.9e-4 (observed <= 6e-4): six roundings, 2.9e-3.
TOL = {torch.float32: tolerance(torch.float32), torch.float16: tolerance(torch.float16, roundings=6)}
# The interpreter runs on CPU tensors; a GPU run (REPA_FAST_GPU_TESTS=1, see conftest) compiles for CUDA.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def make_case(B, C, D, G, map_hw, side, dtype, seed=0, device=DEVICE):
    """A float64 reference AlignHead with random GroupNorm affine, and feat/upstream grad rounded to dtype."""
    gen = torch.Generator().manual_seed(seed)
    ref = AlignHead(in_ch=C, D=D, num_tokens=side * side, num_groups=G).double()
    with torch.no_grad():
        ref.proj[0].weight.copy_(torch.randn(D, C, 1, 1, generator=gen, dtype=torch.float64) / C**0.5)
        ref.proj[1].weight.copy_(1.0 + 0.5 * torch.randn(D, generator=gen, dtype=torch.float64))
        ref.proj[1].bias.copy_(0.5 * torch.randn(D, generator=gen, dtype=torch.float64))
        for p in ref.parameters():  # both sides see the same dtype-rounded values
            p.copy_(p.to(dtype).double())
    feat = torch.randn(B, C, *map_hw, generator=gen, dtype=torch.float64).to(dtype)
    grad = torch.randn(B, side * side, D, generator=gen, dtype=torch.float64).to(dtype)
    return ref.to(device), feat.to(device), grad.to(device)


def reference_and_kernel(ref, feat, grad, dtype):
    """(reference results, kernel results), each (tokens, dfeat, dconv, dgamma, dbeta)."""
    conv, norm = ref.proj[0], ref.proj[1]
    ref.zero_grad(set_to_none=True)
    x64 = feat.detach().double().requires_grad_()
    out64 = ref.reference(x64)
    out64.backward(grad.double())
    expected = (out64, x64.grad, conv.weight.grad, norm.weight.grad, norm.bias.grad)

    x = feat.detach().requires_grad_()  # a view with feat's strides (clone() would compact a crop)
    assert x.stride() == feat.stride()
    w, gamma, beta = (p.detach().to(dtype).requires_grad_() for p in (conv.weight, norm.weight, norm.bias))
    out = align_head(x, w, gamma, beta, norm.num_groups, ref.grid, norm.eps)
    assert out.dtype == dtype and out.shape == out64.shape
    out.backward(grad)
    return expected, (out, x.grad, w.grad, gamma.grad, beta.grad)


NAMES = ("tokens", "dfeat", "dconv_weight", "dgn_weight", "dgn_bias")


def assert_results_close(expected, actual, tol):
    """The kernel's results all in the tokens' dtype, each within ``tol`` of the reference's (relative norm)."""
    for n, a in zip(NAMES, actual, strict=True):
        assert a.dtype == actual[0].dtype, n
    assert_close(dict(zip(NAMES, actual, strict=True)), dict(zip(NAMES, expected, strict=True)), tol)


CASES = {
    # B, C, D, G, map, grid side
    "odd_batch_upsample": (3, 24, 64, 8, (4, 4), 8),
    "batch1_32groups": (1, 24, 64, 32, (4, 4), 8),
    "map_equals_grid": (3, 24, 64, 8, (4, 4), 4),
    "odd_map_odd_D": (2, 20, 48, 8, (3, 5), 7),
    "downsample": (2, 24, 64, 32, (8, 8), 3),
    # several token chunks (N=144 in chunks of 64) and channel blocks (D=96 in blocks of 64) in backward
    "chunks_and_blocks": (2, 16, 96, 8, (4, 4), 12),
    "tiny_unet_mid": (2, 128, 64, 32, (2, 2), 8),  # configs/tiny.yaml: mid 2x2 map, 8x8 tokens of dim 64
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_float64_reference(case, dtype):
    ref, feat, grad = make_case(*CASES[case], dtype=dtype, seed=len(case))
    expected, actual = reference_and_kernel(ref, feat, grad, dtype)
    assert_results_close(expected, actual, TOL[dtype])


@pytest.mark.parametrize("layout", ["channels_last", "channel_slice", "spatial_crop"])
def test_non_contiguous_feat(layout):
    B, C, D, G, hw, side = 3, 24, 64, 8, (4, 4), 8
    ref, feat, grad = make_case(B, C, D, G, hw, side, torch.float32, seed=7)
    if layout == "channels_last":
        feat = feat.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    elif layout == "channel_slice":  # every other channel of a tensor with twice the channels
        wide = torch.randn(B, 2 * C, *hw, dtype=torch.float32, device=feat.device)
        wide[:, ::2] = feat
        feat = wide[:, ::2]
    else:  # the left part of a wider map: row stride != width * column stride
        wide = torch.randn(B, C, hw[0], hw[1] + 3, dtype=torch.float32, device=feat.device)
        wide[..., : hw[1]] = feat
        feat = wide[..., : hw[1]]
    assert not feat.is_contiguous()
    expected, actual = reference_and_kernel(ref, feat, grad, torch.float32)
    assert actual[1].shape == feat.shape
    assert_results_close(expected, actual, TOL[torch.float32])


@settings(max_examples=6, deadline=None)
@given(
    B=st.integers(1, 3),
    C=st.integers(3, 40),
    G=st.sampled_from([1, 2, 4, 8]),
    group_size=st.integers(1, 9),
    H=st.integers(1, 6),
    W=st.integers(2, 6),
    side=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes(B, C, G, group_size, H, W, side, seed):
    # Degenerate cases whose exact gradient is 0 (or O(eps)), where any fp32 result is all rounding:
    # a 1-channel token is +-1 whatever the input; a 2-value GroupNorm group normalises to +-1.
    assume(G * group_size >= 2 and H * W * group_size >= 3)
    ref, feat, grad = make_case(B, C, G * group_size, G, (H, W), side, torch.float32, seed=seed)
    expected, actual = reference_and_kernel(ref, feat, grad, torch.float32)
    # Tiny random shapes can be ill-conditioned (a 2-channel token over a 1x2 map: gradients ~1e-2 of
    # the terms that cancel into them), where PyTorch's own fp32 is off by more than 1e-5 too. The
    # bound is 1e-5 or 4x the error of the reference module run in fp32, whichever is larger.
    ref32 = copy.deepcopy(ref).float()
    ref32.zero_grad(set_to_none=True)
    x32 = feat.detach().clone().requires_grad_()
    out32 = ref32.reference(x32)
    out32.backward(grad)
    torch_fp32 = (out32, x32.grad, *(p.grad for p in ref32.parameters()))
    for name, a, t, e in zip(NAMES, actual, torch_fp32, expected, strict=True):
        err, torch_err = rel_err(a, e), rel_err(t, e)
        assert err <= max(TOL[torch.float32], 4 * torch_err), f"{name}: {err:.2e} (torch fp32 {torch_err:.2e})"


def test_module_triton_equals_torch():
    B, C, D, G, side = 3, 24, 64, 8, 8
    torch.manual_seed(3)
    torch_head = AlignHead(in_ch=C, D=D, num_tokens=side * side, num_groups=G, kernels="torch")
    with torch.no_grad():
        torch_head.proj[1].weight.normal_(1.0, 0.5)
        torch_head.proj[1].bias.normal_(0.0, 0.5)
    triton_head = AlignHead(in_ch=C, D=D, num_tokens=side * side, num_groups=G, kernels="triton")
    triton_head.load_state_dict(torch_head.state_dict())
    torch_head.to(DEVICE)
    triton_head.to(DEVICE)
    feat = torch.randn(B, C, 4, 4, device=DEVICE)
    grad = torch.randn(B, side * side, D, device=DEVICE)
    results = []
    for head in (torch_head, triton_head):
        x = feat.clone().requires_grad_()
        out = head(x)
        out.backward(grad)
        results.append((out, x.grad, *(p.grad for p in head.parameters())))
    for name, a, e in zip(("tokens", "dfeat", "dconv", "dgamma", "dbeta"), results[1], results[0], strict=True):
        assert rel_err(a, e) <= TOL[torch.float32], name


def test_saved_statistics_match_groupnorm():
    # The fp32 GroupNorm mean/rstd and per-token rstd that the forward keeps for the backward.
    ref, feat, _ = make_case(3, 24, 64, 8, (4, 4), 8, torch.float32, seed=11)
    conv, norm = ref.proj[0], ref.proj[1]
    _, x_hat, mean, rstd, tok_rstd = align_head_forward(
        feat, conv.weight.float(), norm.weight.float(), norm.bias.float(), 8, ref.grid, norm.eps)
    y = torch.nn.functional.conv2d(feat.double(), conv.weight).reshape(3, 8, -1)  # [B, G, group values]
    assert mean.dtype == rstd.dtype == tok_rstd.dtype == torch.float32
    assert rel_err(mean, y.mean(-1)) <= 1e-5
    assert rel_err(rstd, (y.var(-1, unbiased=False) + norm.eps).rsqrt()) <= 1e-5
    with torch.no_grad():
        z = ref.proj(feat.double())
        u = torch.nn.functional.interpolate(z, size=ref.grid, mode="bilinear", align_corners=False)
    assert rel_err(tok_rstd, 1.0 / u.flatten(2).norm(dim=1)) <= 1e-5
    assert x_hat.shape == (3, 16, 64)  # the small pre-upsample map, not [B, N, D]


def test_rejects_groups_too_wide_for_one_tile():
    feat = torch.randn(1, 8, 16, 16, device=DEVICE)
    w, ones = torch.randn(256, 8, 1, 1, device=DEVICE), torch.ones(256, device=DEVICE)
    with pytest.raises(ValueError, match="does not fit one tile"):
        align_head(feat, w, ones, 0 * ones, 1, (16, 16))


# ---------------------------------------------------------------------------------------------------
# The custom ops: torch.library's own checks, and torch.compile holding the op as one node.


def small_inputs(dtype=torch.float32, seed=3):
    """(feat, conv_weight, gn_weight, gn_bias, upstream grad) of a small head: 16 channels -> D=32, 8 groups,
    4x4 map -> 8x8 grid; leaves that require grad."""
    ref, feat, grad = make_case(2, 16, 32, 8, (4, 4), 8, dtype, seed=seed)
    conv, norm = ref.proj[0], ref.proj[1]
    leaves = [t.detach().to(dtype).requires_grad_() for t in (feat, conv.weight, norm.weight, norm.bias)]
    return (*leaves, grad)


def test_opcheck():
    feat, w, gamma, beta, grad = small_inputs()
    torch.library.opcheck(torch.ops.repa_fast.align_head.default, (feat, w, gamma, beta, 8, [8, 8], 1e-5))
    with torch.no_grad():
        _, x_hat, _, rstd, tok_rstd = torch.ops.repa_fast.align_head(feat, w, gamma, beta, 8, [8, 8], 1e-5)
    for need_dfeat, need_dweight in ((True, True), (False, False)):
        torch.library.opcheck(torch.ops.repa_fast.align_head_backward.default,
                              (grad, feat.detach(), w.detach(), gamma.detach(), beta.detach(), x_hat, rstd,
                               tok_rstd, 8, [8, 8], need_dfeat, need_dweight))


def test_torch_compile_fullgraph_equals_eager():
    def loss_fn(feat, w, gamma, beta, grad):
        return (align_head(feat, w, gamma, beta, 8, (8, 8)) * grad).sum()

    assert_compiles_whole(loss_fn, *small_inputs(), wrt=4)  # bit for bit: the same kernels in the same order


def test_launches_per_forward_and_backward():
    # Two kernels forward, five backward, no torch op that runs a kernel (the upstream gradient is contiguous).
    feat, w, gamma, beta, grad = small_inputs()
    align_head(feat, w, gamma, beta, 8, (8, 8)).backward(grad)  # first call: the bilinear matrix, cached
    with count_launches() as count:
        tokens = align_head(feat, w, gamma, beta, 8, (8, 8))
        torch.autograd.grad(tokens, [feat, w, gamma, beta], grad)
    assert count.triton == ["_align_head_proj_kernel", "_align_head_token_kernel", "_align_head_bwd_token_kernel",
                            "_align_head_bwd_map_kernel", "_align_head_dx_kernel", "_align_head_dw_kernel",
                            "_align_head_reduce_kernel"]
    assert count.torch_ops == [], count


def test_gradients_only_where_needed():
    # The backward op skips the dX and dW GEMMs for inputs that need no gradient; the others are unchanged.
    feat, w, gamma, beta, grad = small_inputs()
    align_head(feat, w, gamma, beta, 8, (8, 8)).backward(grad)
    full = (gamma.grad, beta.grad)
    feat.grad = w.grad = gamma.grad = beta.grad = None
    feat.requires_grad_(False)
    w.requires_grad_(False)
    align_head(feat, w, gamma, beta, 8, (8, 8)).backward(grad)
    assert feat.grad is None and w.grad is None
    assert torch.equal(gamma.grad, full[0]) and torch.equal(beta.grad, full[1])


# ---------------------------------------------------------------------------------------------------
# H200 build, checked ahead of time on CPU: the real shapes, bf16, exactly the launches the host code makes
# (recorded from a forward + backward on meta tensors). "mid" is the shape (8x8 -> 16x16);
# "dec_first" is SD-1.5's up_blocks.0 (16x16, no upsample).

SHAPES = {
    "mid": {"batch": 48, "in_ch": 1280, "map_hw": (8, 8), "grid": (16, 16), "D": 1024, "num_groups": 32},
    "dec_first": {"batch": 48, "in_ch": 1280, "map_hw": (16, 16), "grid": (16, 16), "D": 1024, "num_groups": 32},
}
ALL_KERNELS = sorted(name for name in vars(kah) if name.startswith("_align_head") and name.endswith("_kernel"))


def recorded_launches(batch, in_ch, map_hw, grid, D, num_groups, dtype=torch.bfloat16):
    """The launches of one forward + backward at this shape, recorded on meta tensors (nothing runs)."""
    meta = torch.device("meta")
    feat = torch.empty(batch, in_ch, *map_hw, dtype=dtype, device=meta)
    conv_weight = torch.empty(D, in_ch, 1, 1, dtype=dtype, device=meta)
    gamma, beta = torch.empty(D, dtype=dtype, device=meta), torch.empty(D, dtype=dtype, device=meta)
    with record_launches(execute=False) as launches:
        tokens, x_hat, _mean, rstd, tok_rstd = align_head_forward(feat, conv_weight, gamma, beta, num_groups, grid,
                                                                  1e-5)
        align_head_backward(torch.empty_like(tokens), feat, conv_weight, gamma, beta, x_hat, rstd, tok_rstd,
                            num_groups, grid)
    return launches


LAUNCHES = {shape: recorded_launches(**kw) for shape, kw in SHAPES.items()}


@pytest.fixture(scope="module")
def h200_reports():
    jobs = [(shape, launch) for shape, launches in LAUNCHES.items() for launch in launches]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        reports = list(pool.map(lambda job: aot.compile_launch_isolated(job[1], kah.__name__), jobs))
    return {(shape, launch.kernel): (launch, report) for (shape, launch), report in zip(jobs, reports, strict=True)}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_h200_every_kernel_is_launched_once(shape):
    assert sorted(launch.kernel for launch in LAUNCHES[shape]) == ALL_KERNELS
    for launch in LAUNCHES[shape]:  # pointers 16-byte aligned, as the JIT sees CUDA allocations
        signature, _, divisible = launch.specialization()
        assert {name for name, kind in signature.items() if kind.startswith("*")} <= set(divisible), launch.kernel


# The kernels that multiply matrices at each shape (without resampling the backward token-stage kernels do not).
GEMM_KERNELS = {"_align_head_proj_kernel", "_align_head_dx_kernel", "_align_head_dw_kernel"}
DOT_KERNELS = {"mid": GEMM_KERNELS | {"_align_head_bwd_token_kernel", "_align_head_bwd_map_kernel"},
               "dec_first": GEMM_KERNELS}


@pytest.mark.parametrize("kernel", ALL_KERNELS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_h200_build(h200_reports, shape, kernel):
    # No spills, shared memory within the limit, every tl.dot on HGMMA, nothing narrower than 32 bits in a GEMM
    # main loop, at least two waves of programs on the 132 SMs.
    launch, report = h200_reports[shape, kernel]
    assert report.dot == (kernel in DOT_KERNELS[shape])
    problems = aot.h200_problems(report, launch.programs)
    assert not problems, (problems, report.ptxas_log)
    # At these shapes every global access of every kernel is at least 32 bits wide (the map, the tokens, dX).
    assert not report.narrow_global


def test_h200_blocks_meet_the_tiling_rules():
    # Projection tiles hold >= 128 rows of whole samples; dX is one GEMM over B*HW rows; dW is split over K.
    for kw in SHAPES.values():
        blocks = kah.align_head_blocks(kw["batch"], kw["in_ch"], kw["map_hw"], kw["grid"], kw["D"],
                                       kw["num_groups"], torch.bfloat16)
        assert blocks.proj_samples * blocks.block_hw >= 128 and blocks.block_hw == kw["map_hw"][0] * kw["map_hw"][1]
        assert blocks.dw_split > 1 and blocks.dw_k_per_split % blocks.dw_block_k == 0
    launches = {launch.kernel: launch for launch in LAUNCHES["mid"]}
    assert launches["_align_head_dx_kernel"].args["M"] == 48 * 64


# ---------------------------------------------------------------------------------------------------
# GPU: bf16 at the real shapes (REPA_FAST_GPU_TESTS=1 pytest -m gpu): 8x8 -> 16x16 and 16x16 without resampling.


@pytest.mark.gpu
@pytest.mark.parametrize("map_hw", [(8, 8), (16, 16)], ids=["8x8", "16x16"])
def test_bf16_real_shape_on_gpu(map_hw):
    dtype, dev = torch.bfloat16, "cuda"
    ref, feat, grad = make_case(48, 1280, 1024, 32, map_hw, 16, dtype, seed=5, device=dev)
    expected, actual = reference_and_kernel(ref, feat, grad, dtype)
    # Eager PyTorch in bf16 on the same inputs: the fused op must be about as accurate.
    eager = AlignHead(1280, 1024, 256, 32).to(dev, dtype)
    eager.load_state_dict(ref.state_dict())
    x = feat.clone().requires_grad_()
    out = eager.reference(x)
    out.backward(grad)
    eager_results = (out, x.grad, *(p.grad for p in eager.parameters()))
    assert_as_accurate_as_eager(*(dict(zip(NAMES, r, strict=True)) for r in (actual, eager_results, expected)),
                                dtype)
    # Deterministic: no atomics, so a second run gives the same bits.
    _, again = reference_and_kernel(ref, feat, grad, dtype)
    for a, b in zip(actual, again, strict=True):
        assert torch.equal(a, b)
