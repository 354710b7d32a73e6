"""The fused REPA branch (kernels/align_branch.py) against its definition: token_loss and manifold_gram_loss
of repa_fast.losses applied to AlignHead.reference's tokens, evaluated in float64.

On CPU the kernels run in the Triton interpreter (fp32, fp16; small shapes). Both losses and the gradients
of all four head parameters (feat, conv weight, GroupNorm weight and bias) are compared, by relative norm
error, with the same random upstream gradients of (L_token, L_manifold).
"""

from __future__ import annotations

import copy
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from kernel_testing import (
    FP32_RTOL,
    assert_as_accurate_as_eager,
    assert_close,
    assert_compiles_whole,
    float64_oracle,
    loss_atol,
    outputs_and_grads,
    tolerance,
)
from test_kernel_align_head import SHAPES, recorded_launches

import repa_fast.kernels.align_branch as kab
from repa_fast.kernels import aot
from repa_fast.kernels.align_branch import MAX_BATCH, align_branch_backward, align_branch_forward, align_branch_loss
from repa_fast.kernels.launch_count import count_launches, record_launches
from repa_fast.losses import manifold_gram_loss, token_loss
from repa_fast.models.align_head import AlignHead

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
NAMES = ("L_token", "L_manifold", "dfeat", "dconv_weight", "dgn_weight", "dgn_bias")
FLAGS = [(False, False), (True, False), (False, True), (True, True)]  # (upper_only, mask_diag)
# The losses are computed in fp32 from the stored x_hat map (the only rounded intermediate on their way):
# fp32 -> FP32_RTOL; fp16 -> one rounding of fp16 (observed <= 5e-5). The gradients are stored in the
# input dtype after the roundings of the head's backward (x_hat, P1, dy, the GEMM operands): the head's
# six roundings (observed <= 7e-4 in fp16). Either loss can be ~0 (B = 1 without mask_diag: G_x = G_y =
# [[1]]), where a relative error means nothing: the absolute allowances of the loss tests (loss_atol).


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    losses = FP32_RTOL if dtype == torch.float32 else tolerance(dtype, roundings=1)
    grads = tolerance(dtype, roundings=1 if dtype == torch.float32 else 6)
    return {name: losses if name.startswith("L_") else grads for name in NAMES}


def make_case(B, C, D, G, map_hw, side, dtype, y_dtype=None, seed=0, device=DEVICE):
    """(reference head (float64), feat, conv_weight, gn_weight, gn_bias, y, upstream): dtype-rounded inputs, y
    correlated with the head's tokens (so that neither loss is trivial), upstream gradients of both losses
    scaled by B*N as a loss scaler would (the gradients shrink as 1/(B N) and would reach fp16's subnormals)."""
    gen = torch.Generator().manual_seed(seed)
    head = AlignHead(C, D, side * side, G).double()
    w = (torch.randn(D, C, 1, 1, generator=gen, dtype=torch.float64) / C**0.5).to(dtype)
    gamma = (1.0 + 0.5 * torch.randn(D, generator=gen, dtype=torch.float64)).to(dtype)
    beta = (0.5 * torch.randn(D, generator=gen, dtype=torch.float64)).to(dtype)
    feat = torch.randn(B, C, *map_hw, generator=gen, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        tokens = reference_tokens(head, feat.double(), w.double(), gamma.double(), beta.double())
    y = (tokens + 0.7 * torch.randn(tokens.shape, generator=gen, dtype=torch.float64)).to(y_dtype or dtype)
    upstream = torch.randn(2, generator=gen, dtype=torch.float64) * (B * side * side)
    to = lambda t: t.to(device)  # noqa: E731
    return head, to(feat), to(w), to(gamma), to(beta), to(y), list(upstream)


def reference_tokens(head, feat, w, gamma, beta):
    """AlignHead.reference with the given parameters (the module's forward on kernels='torch')."""
    params = {"proj.0.weight": w, "proj.1.weight": gamma, "proj.1.bias": beta}
    return torch.func.functional_call(head.to(feat.device), params, (feat,))


def reference(head, feat, w, gamma, beta, y, upper_only, mask_diag, upstream):
    def losses(feat, w, gamma, beta, y):
        tokens = reference_tokens(head, feat, w, gamma, beta)
        return token_loss(tokens, y), manifold_gram_loss(tokens, y, upper_only, mask_diag)

    (lt, lm), grads = float64_oracle(losses, (feat, w, gamma, beta, y), [0, 1, 2, 3], upstream)
    return dict(zip(NAMES, (lt, lm, *grads), strict=True))


def fused(head, feat, w, gamma, beta, y, upper_only, mask_diag, upstream):
    norm = head.proj[1]

    def losses(feat, w, gamma, beta, y):
        return align_branch_loss(feat, w, gamma, beta, norm.num_groups, head.grid, norm.eps, y, upper_only, mask_diag)

    (lt, lm), grads = outputs_and_grads(losses, (feat, w, gamma, beta, y), [0, 1, 2, 3], upstream)
    assert lt.dtype == lm.dtype == torch.float32 and lt.ndim == lm.ndim == 0
    for g, t in zip(grads, (feat, w, gamma, beta), strict=True):
        assert g.dtype == t.dtype and g.shape == t.shape
    return dict(zip(NAMES, (lt, lm, *grads), strict=True))


def check(case, dtype, upper_only, mask_diag):
    *inputs, upstream = case
    expected = reference(*inputs, upper_only, mask_diag, upstream)
    actual = fused(*inputs, upper_only, mask_diag, upstream)
    assert_close(actual, expected, tolerances(dtype), loss_atol(expected["L_manifold"]))
    return actual


CASES = {
    # B, C, D, G, map, grid side
    "upsample_batch3": (3, 24, 64, 8, (4, 4), 8),
    "equal_grid_batch3": (3, 24, 64, 8, (4, 4), 4),
    "batch1": (1, 24, 64, 8, (4, 4), 8),
    "odd_map_odd_D": (2, 20, 48, 8, (3, 5), 7),
}


@pytest.mark.parametrize("flags", [FLAGS[0], FLAGS[3]], ids=["no_masks", "upper_diag"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case, dtype, flags):
    check(make_case(*CASES[case], dtype, seed=len(case)), dtype, *flags)


@pytest.mark.parametrize("flags", [FLAGS[1], FLAGS[2]], ids=["upper_only", "mask_diag"])
def test_each_mask(flags):
    check(make_case(*CASES["upsample_batch3"], torch.float32, seed=5), torch.float32, *flags)


@pytest.mark.parametrize("y_dtype", [torch.float16, torch.bfloat16], ids=["y_fp16", "y_bf16"])
def test_dino_tokens_in_16_bit(y_dtype):
    check(make_case(*CASES["upsample_batch3"], torch.float32, y_dtype=y_dtype, seed=6), torch.float32, False, False)


def test_non_contiguous_inputs():
    head, feat, w, gamma, beta, y, upstream = make_case(*CASES["upsample_batch3"], torch.float32, seed=7)
    feat = feat.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last
    wide = torch.zeros(*y.shape[:2], 2 * y.shape[2], dtype=y.dtype, device=y.device)
    wide[..., ::2] = y
    y_strided = wide[..., ::2]  # a strided last dim: copied by the host
    wide = torch.zeros(y.shape[0], 2 * y.shape[1], y.shape[2], dtype=y.dtype, device=y.device)
    wide[:, ::2] = y
    y_rows = wide[:, ::2]  # strided token rows: read in place
    for y_nc in (y_strided, y_rows):
        assert not y_nc.is_contiguous()
        actual = check((head, feat, w, gamma, beta, y_nc, upstream), torch.float32, True, False)
        assert actual["dfeat"].is_contiguous(memory_format=torch.channels_last)


def test_saves_no_token_sized_tensor():
    head, feat, w, gamma, beta, y, _ = make_case(*CASES["upsample_batch3"], torch.float32, seed=8)
    saved = []
    leaves = [t.requires_grad_() for t in (feat, w, gamma, beta)]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        align_branch_loss(*leaves, 8, head.grid, 1e-5, y)
    inputs = {t.data_ptr() for t in (*leaves, y)}
    new = [tuple(t.shape) for t in saved if t.data_ptr() not in inputs]
    assert new and all(torch.Size(s).numel() < y.numel() for s in new), new  # x_hat is 1/4 of the tokens


def test_launches_per_forward_and_backward():
    # Forward: the head's projection, the token kernel, the partial Grams, the losses; backward: the pass over y
    # and the head's map, dX, dW and reduce kernels. No torch op that runs a kernel.
    head, feat, w, gamma, beta, y, _ = make_case(*CASES["upsample_batch3"], torch.float32, seed=12)
    leaves = [t.requires_grad_() for t in (feat, w, gamma, beta)]
    grads = [torch.tensor(1.0, device=feat.device), torch.tensor(3.0, device=feat.device)]
    torch.autograd.grad(align_branch_loss(*leaves, 8, head.grid, 1e-5, y), leaves, grads)  # first call: caches
    with count_launches() as count:
        torch.autograd.grad(align_branch_loss(*leaves, 8, head.grid, 1e-5, y), leaves, grads)
    assert count.triton == [
        "_align_head_proj_kernel", "_align_branch_token_kernel", "_align_branch_gram_partial_kernel",
        "_align_branch_loss_kernel", "_align_branch_bwd_token_kernel", "_align_head_bwd_map_kernel",
        "_align_head_dx_kernel", "_align_head_dw_kernel", "_align_head_reduce_kernel"]
    assert count.torch_ops == [], count


def test_one_loss_used():
    # Only L_token reaches the loss: L_manifold's gradient is zero (not materialised by autograd; made here).
    head, feat, w, gamma, beta, y, upstream = make_case(*CASES["batch1"], torch.float32, seed=13)
    expected = reference(head, feat, w, gamma, beta, y, False, False, [upstream[0], 0.0 * upstream[1]])
    leaves = [t.requires_grad_() for t in (feat, w, gamma, beta)]
    lt, _ = align_branch_loss(*leaves, 8, head.grid, 1e-5, y)
    grads = torch.autograd.grad(lt * upstream[0], leaves)
    actual = dict(zip(NAMES[2:], grads, strict=True))
    assert_close(actual, {name: expected[name] for name in NAMES[2:]}, tolerances(torch.float32))


def test_input_errors():
    head, feat, w, gamma, beta, y, _ = make_case(*CASES["upsample_batch3"], torch.float32, seed=9)
    with pytest.raises(ValueError, match=r"y \(the DINO tokens\) must be \[3,64,64\]"):
        align_branch_loss(feat, w, gamma, beta, 8, head.grid, 1e-5, y[:, :-1])
    with pytest.raises(ValueError, match="y requires grad"):
        align_branch_loss(feat, w, gamma, beta, 8, head.grid, 1e-5, y.clone().requires_grad_())
    with pytest.raises(ValueError, match="conv_weight must be"):
        align_branch_loss(feat, w[:, :-1], gamma, beta, 8, head.grid, 1e-5, y)
    big_feat = torch.empty(MAX_BATCH + 1, 24, 4, 4, device=feat.device)
    big_y = torch.empty(MAX_BATCH + 1, 64, 64, device=feat.device)
    with pytest.raises(ValueError, match=f"batch {MAX_BATCH + 1} is above {MAX_BATCH}"):
        align_branch_loss(big_feat, w, gamma, beta, 8, head.grid, 1e-5, big_y)


# ---------------------------------------------------------------------------------------------------
# The custom ops: torch.library's own checks, and torch.compile holding the op as one node.


def test_opcheck():
    head, feat, w, gamma, beta, y, _ = make_case(2, 16, 32, 8, (4, 4), 8, torch.float32, seed=10)
    leaves = [t.requires_grad_() for t in (feat, w, gamma, beta)]
    torch.library.opcheck(torch.ops.repa_fast.align_branch_loss.default,
                          (*leaves, 8, [8, 8], 1e-5, y, True, False))
    with torch.no_grad():
        saved = torch.ops.repa_fast.align_branch_loss(*leaves, 8, [8, 8], 1e-5, y, True, False)[2:]
    grads = (torch.tensor(1.5), torch.tensor(-2.0))
    for need_dfeat, need_dweight in ((True, True), (False, False)):
        torch.library.opcheck(torch.ops.repa_fast.align_branch_loss_backward.default,
                              (*grads, *(t.detach() for t in leaves), y, *saved, 8, [8, 8], need_dfeat, need_dweight))


def test_torch_compile_fullgraph_equals_eager():
    head, feat, w, gamma, beta, y, _ = make_case(2, 16, 32, 8, (4, 4), 8, torch.float32, seed=11)

    def loss_fn(feat, w, gamma, beta, y):
        lt, lm = align_branch_loss(feat, w, gamma, beta, 8, (8, 8), 1e-5, y, mask_diag=True)
        return lt + 3.0 * lm

    assert_compiles_whole(loss_fn, feat, w, gamma, beta, y, wrt=4)  # bit for bit: the same kernels in the same order


# ---------------------------------------------------------------------------------------------------
# GPU: bf16 at the real shapes (REPA_FAST_GPU_TESTS=1 pytest -m gpu), y fp16 (the DINO cache).


@pytest.mark.gpu
@pytest.mark.parametrize("map_hw", [(8, 8), (16, 16)], ids=["8x8", "16x16"])
def test_bf16_real_shape_on_gpu(map_hw):
    dtype = torch.bfloat16
    case = make_case(48, 1280, 1024, 32, map_hw, 16, dtype, y_dtype=torch.float16, seed=14, device="cuda")
    head, feat, w, gamma, beta, y, _ = case
    upstream = list(torch.tensor([1.0, 3.0], dtype=torch.float64))
    expected = reference(head, feat, w, gamma, beta, y, False, True, upstream)
    actual = fused(head, feat, w, gamma, beta, y, False, True, upstream)
    # Eager PyTorch in bf16 on the same inputs (the head in bf16, the losses in fp32 from its bf16 tokens): the
    # fused op must be about as accurate.
    eager_head = copy.deepcopy(head).to(dtype)

    def eager_losses(feat, w, gamma, beta, y):
        tokens = reference_tokens(eager_head, feat, w, gamma, beta)
        return token_loss(tokens, y), manifold_gram_loss(tokens, y, False, True)

    (lt, lm), grads = outputs_and_grads(eager_losses, (feat, w, gamma, beta, y), [0, 1, 2, 3], upstream)
    eager = dict(zip(NAMES, (lt, lm, *grads), strict=True))
    assert_as_accurate_as_eager(actual, eager, expected, dtype)
    # Deterministic: no atomics, so a second run gives the same bits.
    again = fused(head, feat, w, gamma, beta, y, False, True, upstream)
    assert all(torch.equal(actual[name], again[name]) for name in NAMES)


# ---------------------------------------------------------------------------------------------------
# H200 build, checked ahead of time on CPU at the real shapes (those of test_kernel_align_head.py: 8x8 -> 16x16
# and 16x16 without resampling), bf16 head, fp16 DINO tokens: the launches of one forward + backward.

BRANCH_KERNELS = sorted(name for name in vars(kab) if name.startswith("_align_branch") and name.endswith("_kernel"))
HEAD_KERNELS_USED = ["_align_head_bwd_map_kernel", "_align_head_dw_kernel", "_align_head_dx_kernel",
                     "_align_head_proj_kernel", "_align_head_reduce_kernel"]
# The [B, B] stage: D / 64 programs for the partial Grams and one for the losses, microseconds of work that
# B = 48 samples cannot spread over two waves.
SMALL_GRID = {"_align_branch_gram_partial_kernel", "_align_branch_loss_kernel"}


def recorded_branch_launches(batch, in_ch, map_hw, grid, D, num_groups, dtype=torch.bfloat16):
    meta = torch.device("meta")
    feat = torch.empty(batch, in_ch, *map_hw, dtype=dtype, device=meta)
    w = torch.empty(D, in_ch, 1, 1, dtype=dtype, device=meta)
    gamma, beta = torch.empty(D, dtype=dtype, device=meta), torch.empty(D, dtype=dtype, device=meta)
    y = torch.empty(batch, grid[0] * grid[1], D, dtype=torch.float16, device=meta)
    with record_launches(execute=False) as launches:
        lt, lm, *saved = align_branch_forward(feat, w, gamma, beta, num_groups, grid, 1e-5, y, False, True)
        align_branch_backward(torch.empty_like(lt), torch.empty_like(lm), feat, w, gamma, beta, y, *saved,
                              num_groups, grid)
    return launches


BRANCH_LAUNCHES = {shape: recorded_branch_launches(**kw) for shape, kw in SHAPES.items()}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_h200_branch_reuses_the_head_kernels(shape):
    # The head's kernels run as the head launches them, so test_kernel_align_head.py's build checks cover them.
    assert sorted(launch.kernel for launch in BRANCH_LAUNCHES[shape]) == sorted(BRANCH_KERNELS + HEAD_KERNELS_USED)
    head = {launch.kernel: launch for launch in recorded_launches(**SHAPES[shape])}
    for launch in BRANCH_LAUNCHES[shape]:
        if launch.kernel in HEAD_KERNELS_USED:
            mine, theirs = launch.specialization(), head[launch.kernel].specialization()
            assert mine == theirs and launch.grid == head[launch.kernel].grid, launch.kernel
            assert launch.options == head[launch.kernel].options, launch.kernel


@pytest.fixture(scope="module")
def h200_branch_reports():
    jobs = [(shape, launch) for shape, launches in BRANCH_LAUNCHES.items() for launch in launches
            if launch.kernel in BRANCH_KERNELS]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        reports = list(pool.map(lambda job: aot.compile_launch_isolated(job[1], kab.__name__), jobs))
    return {(shape, launch.kernel): (launch, report) for (shape, launch), report in zip(jobs, reports, strict=True)}


@pytest.mark.parametrize("kernel", BRANCH_KERNELS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_h200_build(h200_branch_reports, shape, kernel):
    launch, report = h200_branch_reports[shape, kernel]
    dots = {"_align_branch_gram_partial_kernel"} | ({"_align_branch_bwd_token_kernel"} if shape == "mid" else set())
    assert report.dot == (kernel in dots)
    problems = aot.h200_problems(report, None if kernel in SMALL_GRID else launch.programs)
    assert not problems, (problems, report.ptxas_log)
    assert not report.narrow_global
