"""The fused alignment loss (kernels/align_loss.py) against the reference in repa_fast.losses.

On CPU the kernels run in the Triton interpreter (fp32, fp16; small shapes); the H200 build is
checked ahead of time (registers, spills, shared memory) at the real shape in bf16.
"""

import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import (
    FP32_RTOL,
    assert_close,
    assert_compiles_whole,
    compile_recorded_for_h200,
    float64_oracle,
    loss_atol,
    outputs_and_grads,
    rel_err,
    tolerance,
)

from repa_fast.kernels import align_loss as align_loss_module
from repa_fast.kernels import aot
from repa_fast.kernels.align_loss import align_loss, align_loss_backward, align_loss_configs, align_loss_forward
from repa_fast.kernels.launch_count import count_launches, record_launches
from repa_fast.losses import alignment_losses, manifold_gram_loss, token_loss

FLAGS = [(False, False), (True, False), (False, True), (True, True)]  # (upper_only, mask_diag)

# The kernels compute in fp32 from the stored input values, so the losses (fp32 scalars) are held to
# FP32_RTOL for every input dtype; dx is stored in x's dtype: tolerance(x.dtype) (two roundings).
# Besides the relative tolerance, each loss may be off by what a small absolute error in the quantities it
# averages makes of it: kernel_testing.loss_atol.


def upstream(B: int, N: int, generator: torch.Generator) -> torch.Tensor:
    # Random upstream gradients of (L_token, L_manifold), scaled by B*N as a loss scaler would: dx shrinks
    # as 1/(B N |x|) and at these sizes would fall into fp16's subnormals otherwise.
    return torch.randn(2, generator=generator, dtype=torch.float64) * (B * N)


def reference_losses(x, y, upper_only, mask_diag):
    return token_loss(x, y), manifold_gram_loss(x, y, upper_only, mask_diag)


def reference(x, y, upper_only, mask_diag, grads):
    """(L_token, L_manifold, dx) of repa_fast.losses evaluated in float64."""
    (lt, lm), (dx,) = float64_oracle(reference_losses, (x, y, upper_only, mask_diag), [0], grads)
    return lt, lm, dx


def fused(x, y, upper_only, mask_diag, grads):
    (lt, lm), (dx,) = outputs_and_grads(align_loss, (x, y, upper_only, mask_diag), [0], grads)
    assert lt.dtype == lm.dtype == torch.float32 and lt.ndim == lm.ndim == 0
    assert dx.dtype == x.dtype and dx.shape == x.shape
    return lt, lm, dx


def assert_losses_close(lt, lm, rt, rm, rtol=FP32_RTOL):
    assert_close({"L_token": lt, "L_manifold": lm}, {"L_token": rt, "L_manifold": rm}, rtol, loss_atol(rm))


def check(x, y, upper_only, mask_diag, generator, dx_rtol=None):
    """Run both on the same inputs and upstream gradients; assert finite outputs and agreement."""
    grads = upstream(x.shape[0], x.shape[1], generator)
    lt, lm, dx = fused(x, y, upper_only, mask_diag, grads)
    rt, rm, rdx = reference(x, y, upper_only, mask_diag, grads)
    assert_close({"L_token": lt, "L_manifold": lm, "dx": dx}, {"L_token": rt, "L_manifold": rm, "dx": rdx},
                 {"L_token": FP32_RTOL, "L_manifold": FP32_RTOL, "dx": dx_rtol or tolerance(x.dtype)},
                 loss_atol(rm))


def tokens(shape, dtype, generator):
    return torch.randn(shape, generator=generator).to(dtype)


# --- correctness in the interpreter ---------------------------------------------------------------------

@pytest.mark.parametrize("upper_only,mask_diag", FLAGS)
@pytest.mark.parametrize("shape", [(1, 7, 40), (3, 37, 72), (47, 5, 24)], ids=["B1", "B3", "B47"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matches_reference(dtype, shape, upper_only, mask_diag):
    g = torch.Generator().manual_seed(4 * sum(shape) + 2 * upper_only + mask_diag)
    # y correlated with x, as trained tokens are with DINO's: cosines far from 0
    x = tokens(shape, dtype, g)
    y = (x.float() + tokens(shape, torch.float32, g)).to(dtype)
    check(x, y, upper_only, mask_diag, g)


@pytest.mark.parametrize("x_dtype,y_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float32)],
                         ids=["x32-y16", "x16-y32"])
def test_mixed_dtypes(x_dtype, y_dtype):
    g = torch.Generator().manual_seed(5)
    x, y = tokens((4, 21, 48), x_dtype, g), tokens((4, 21, 48), y_dtype, g)
    check(x, y, False, False, g)


@pytest.mark.parametrize("layout", ["token-major", "wider-rows", "strided-d"])
def test_non_contiguous(layout):
    g = torch.Generator().manual_seed(7)
    B, N, D = 3, 11, 40
    if layout == "token-major":  # [N, B, D] storage seen as [B, N, D]: stride_b = D, stride_n = B D
        x = tokens((N, B, D), torch.float32, g).transpose(0, 1)
        y = tokens((N, B, D), torch.float16, g).transpose(0, 1)
    elif layout == "wider-rows":  # rows of a wider buffer: stride_n = 2 D
        x = tokens((B, N, 2 * D), torch.float32, g)[..., D:]
        y = tokens((B, N, 2 * D), torch.float32, g)[..., :D]
    else:  # last-dim stride 2: the host copies to unit stride
        x = tokens((B, N, 2 * D), torch.float32, g)[..., ::2]
        y = tokens((B, N, 2 * D), torch.float16, g)[..., 1::2]
    assert not x.is_contiguous() and not y.is_contiguous()
    check(x, y, True, False, g)


def test_zero_norm_rows():
    g = torch.Generator().manual_seed(11)
    B, N, D = 4, 9, 33
    x, y = tokens((B, N, D), torch.float32, g), tokens((B, N, D), torch.float32, g)
    x[0, 2] = 0.0  # a zero prediction token
    y[1, 3] = 0.0  # a zero target token
    x[1, 5] = y[1, 5] = 0.0  # both
    x[2] = 0.0  # a whole sample: its pooled mean is zero too (p_b = 0)
    x[3, 4] *= 1e-14  # 0 < |x| < eps: clamped, so no gradient through its norm
    grads = upstream(B, N, g)
    for upper_only, mask_diag in FLAGS:
        lt, lm, dx = fused(x, y, upper_only, mask_diag, grads)
        rt, rm, rdx = reference(x, y, upper_only, mask_diag, grads)
        assert torch.isfinite(dx).all()
        assert_losses_close(lt, lm, rt, rm)
        # A (near-)zero row's gradient is v / eps (F.normalize's clamp), up to 1e23 times the others:
        # compare row by row so that no row hides another.
        row_err = (dx.double() - rdx).norm(dim=-1) / rdx.norm(dim=-1)
        assert row_err.max() <= FP32_RTOL, f"worst row {divmod(row_err.argmax().item(), N)}: {row_err.max():.2e}"


def test_width_one():
    """D = 1: a unit token is sign(x), so both losses are piecewise constant and dx is 0 up to rounding
    (rounding that 1/|mean unit token| amplifies, so dx is only checked to be finite). N is odd so that
    the mean of the signs cannot cancel to a rounding residue whose sign would be arbitrary."""
    g = torch.Generator().manual_seed(23)
    x, y = tokens((6, 7, 1), torch.float32, g), tokens((6, 7, 1), torch.float32, g)
    grads = upstream(6, 7, g)
    for upper_only, mask_diag in FLAGS:
        lt, lm, dx = fused(x, y, upper_only, mask_diag, grads)
        rt, rm, _ = reference(x, y, upper_only, mask_diag, grads)
        assert_losses_close(lt, lm, rt, rm)
        assert torch.isfinite(dx).all()


def fp32_reference_dx_error(x, y, upper_only, mask_diag, generator) -> float:
    """Relative error of the fp32 PyTorch reference's dx against float64: how well fp32 can do on this draw."""
    grads = upstream(x.shape[0], x.shape[1], generator)
    _, (dx,) = outputs_and_grads(reference_losses, (x, y, upper_only, mask_diag), [0], grads)
    return rel_err(dx, reference(x, y, upper_only, mask_diag, grads)[2])


# D >= 2: see test_width_one. A random draw can be ill-conditioned (when few Gram entries are kept and
# their differences are small, dL/dp = 2 (G_x - G_y) p magnifies fp32 rounding in G): about 1 draw in
# 200 the fp32 reference itself misses float64 by more than 1e-5. So dx must be within 1e-5 or within
# twice the fp32 reference's own error, whichever is larger; draws are derandomized (no flaky CI).
@settings(max_examples=10, deadline=None, derandomize=True)
@given(B=st.integers(1, 5), N=st.integers(1, 40), D=st.integers(2, 80), upper_only=st.booleans(),
       mask_diag=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_drawn_shapes(B, N, D, upper_only, mask_diag, seed):
    x = tokens((B, N, D), torch.float32, torch.Generator().manual_seed(seed))
    y = tokens((B, N, D), torch.float32, torch.Generator().manual_seed(seed + 1))
    fp32_error = fp32_reference_dx_error(x, y, upper_only, mask_diag, torch.Generator().manual_seed(seed))
    check(x, y, upper_only, mask_diag, torch.Generator().manual_seed(seed), dx_rtol=max(FP32_RTOL, 2 * fp32_error))


def test_alignment_losses_switch():
    """repa_fast.losses.alignment_losses: kernels='triton' (this op) computes what kernels='torch' does."""
    g = torch.Generator().manual_seed(13)
    x0, y = tokens((5, 13, 56), torch.float32, g), tokens((5, 13, 56), torch.float16, g)
    results = {}
    for kernels in ("torch", "triton"):
        x = x0.clone().requires_grad_()
        lt, lm = alignment_losses(x, y, upper_only=True, mask_diag=True, kernels=kernels)
        (lt + 3.0 * lm).backward()
        results[kernels] = (lt, lm, x.grad, type(lt.grad_fn).__name__)
    assert "repa_fast_align_loss" in results["triton"][3] and "repa_fast" not in results["torch"][3]
    (lt, lm, dx, _), (rt, rm, rdx, _) = results["triton"], results["torch"]
    assert_close({"L_token": lt, "L_manifold": lm, "dx": dx}, {"L_token": rt, "L_manifold": rm, "dx": rdx},
                 FP32_RTOL, loss_atol(rm))


def test_saves_only_small_tensors():
    """Backward keeps x, y and tensors of size [B, D] / [B, B] at most: no extra [B, N, D]."""
    B, N, D = 3, 37, 72
    g = torch.Generator().manual_seed(17)
    x = tokens((B, N, D), torch.float32, g).requires_grad_()
    y = tokens((B, N, D), torch.float16, g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        align_loss(x, y)
    big = [t for t in saved if t.numel() >= N * D]
    assert sorted(t.data_ptr() for t in big) == sorted((x.data_ptr(), y.data_ptr()))
    assert all(t.numel() <= max(B * D, B * B) for t in saved if t.numel() < N * D)


def test_input_errors():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="y requires grad"):
        align_loss(x, torch.randn(2, 3, 4, requires_grad=True))
    with pytest.raises(ValueError, match=r"\[2, 3, 4\] and \[2, 3, 5\]"):
        align_loss(x, torch.randn(2, 3, 5))


# --- launches, the torch op, torch.compile ---------------------------------------------------------------

@pytest.mark.parametrize("upper_only,mask_diag", FLAGS)
@pytest.mark.parametrize("shape", [(1, 7, 40), (3, 37, 72)], ids=["B1", "B3"])
def test_four_launches_forward_and_backward(shape, upper_only, mask_diag):
    """Forward + backward: the tickets' memset and the three kernels, no torch glue, whatever the masks."""
    g = torch.Generator().manual_seed(29)
    x, y = tokens(shape, torch.float32, g).requires_grad_(), tokens(shape, torch.float16, g)
    grads = (torch.tensor(1.5), torch.tensor(3.0))
    with count_launches() as count:
        lt, lm = align_loss(x, y, upper_only, mask_diag)
        torch.autograd.grad((lt, lm), x, grads)
    assert count.triton == ["_align_loss_forward_kernel", "_align_loss_gram_kernel", "_align_loss_backward_kernel"]
    assert count.torch_ops == ["aten.zeros.default"], count
    assert count.launches <= 4


def test_one_loss_unused():
    """Only L_manifold reaches the loss: L_token's gradient is None, taken as 0 (one extra launch, a zero)."""
    g = torch.Generator().manual_seed(31)
    x, y = tokens((3, 9, 24), torch.float32, g), tokens((3, 9, 24), torch.float32, g)
    grads = (torch.tensor(0.0, dtype=torch.float64), torch.tensor(5.0, dtype=torch.float64))
    leaf = x.clone().requires_grad_()
    (_, lm) = align_loss(leaf, y)
    (dx,) = torch.autograd.grad(lm, leaf, grads[1].float())
    assert_close({"dx": dx}, {"dx": reference(x, y, False, False, grads)[2]}, FP32_RTOL)


def test_torch_op_opcheck():
    g = torch.Generator().manual_seed(37)
    x, y = tokens((3, 11, 40), torch.float32, g).requires_grad_(), tokens((3, 11, 40), torch.float16, g)
    torch.library.opcheck(torch.ops.repa_fast.align_loss.default, (x, y, True, False))
    s = torch.randn(3, 40, generator=g)
    torch.library.opcheck(torch.ops.repa_fast.align_loss_backward.default,
                          (x.detach(), y, s, torch.tensor(2.0), torch.tensor(-1.0)))


def test_compiles_whole_and_equals_eager():
    """torch.compile(fullgraph=True) holds the op as one node and computes what eager does, forward and backward."""
    g = torch.Generator().manual_seed(41)

    def step(x, y):
        lt, lm = align_loss(x * 2.0, y, True, True)  # an op before it, in the same graph
        return lt + 3.0 * lm

    assert_compiles_whole(step, tokens((3, 10, 32), torch.float32, g), tokens((3, 10, 32), torch.float16, g))


# --- the H200 build, ahead of time ---------------------------------------------------------------------

REAL_SHAPE = (48, 256, 1024)  # B, N = 16x16 DINOv2 tokens, D = ViT-L width


def real_shape_launches(x_dtype, y_dtype) -> list:
    """The forward's and backward's launches at the real shape, recorded on CPU without running the kernels
    (both masks on: the Gram kernel's largest variant)."""
    x, y = torch.empty(REAL_SHAPE, dtype=x_dtype), torch.empty(REAL_SHAPE, dtype=y_dtype)
    with record_launches(execute=False) as launches:
        _, _, sample_grad = align_loss_forward(x, y, True, True)
        align_loss_backward(x, y, sample_grad, torch.empty(()), torch.empty(()))
    return launches


@pytest.mark.parametrize("x_dtype,y_dtype", [(torch.bfloat16, torch.float16), (torch.bfloat16, torch.bfloat16)],
                         ids=["x-bf16-y-fp16", "bf16-bf16"])
def test_compiles_for_h200(x_dtype, y_dtype):
    """Each kernel as the host launches it at the real shape, compiled for sm_90 with the JIT's own
    specialisation (divisibility hints, 1 as a constant): no spills, shared memory fits, at least two waves."""
    launches = real_shape_launches(x_dtype, y_dtype)
    assert [launch.kernel for launch in launches] == sorted(align_loss_configs(*REAL_SHAPE), key=KERNEL_ORDER.index)
    for launch in launches:
        signature, divisible, _ = compile_recorded_for_h200(align_loss_module, launch)
        pointers = [name for name, kind in signature.items() if kind.startswith("*")]
        assert set(pointers) <= set(divisible), f"{launch.kernel}: a pointer is not 16-byte aligned"
        assert {"D", "stride_xn", "stride_yn"} & set(signature) <= set(divisible)  # vector loads along D
        assert "tl.dot" not in inspect.getsource(getattr(align_loss_module, launch.kernel).fn)  # no HGMMA to check
        assert aot.waves(launch.programs) >= 2, f"{launch.kernel}: {launch.programs} programs, under two waves"


KERNEL_ORDER = ["_align_loss_forward_kernel", "_align_loss_gram_kernel", "_align_loss_backward_kernel"]


def test_configs_cover_every_kernel():
    """align_loss_configs names every @triton.jit kernel of the module, so the AOT test compiles them all."""
    kernels = {name for name, obj in vars(align_loss_module).items()
               if name.endswith("_kernel") and hasattr(obj, "arg_names")}
    assert kernels == set(align_loss_configs(*REAL_SHAPE)) == set(KERNEL_ORDER)
    with pytest.raises(ValueError, match="D = 9000"):
        align_loss_configs(1, 1, 9000)
    with pytest.raises(ValueError, match="B = 5000"):
        align_loss_configs(5000, 1, 8)


# --- on the GPU ----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("y_dtype", [torch.float16, torch.bfloat16], ids=["y-fp16", "y-bf16"])
def test_real_shape_bf16_gpu(y_dtype):
    g = torch.Generator().manual_seed(19)
    x = tokens(REAL_SHAPE, torch.bfloat16, g).cuda()
    y = (x.float() + tokens(REAL_SHAPE, torch.float32, g).cuda()).to(y_dtype)
    grads = upstream(*REAL_SHAPE[:2], g).cuda()
    for upper_only, mask_diag in FLAGS:
        lt, lm, dx = fused(x, y, upper_only, mask_diag, grads)
        rt, rm, rdx = reference(x, y, upper_only, mask_diag, grads)
        assert_close({"L_token": lt, "L_manifold": lm, "dx": dx}, {"L_token": rt, "L_manifold": rm, "dx": rdx},
                     {"L_token": FP32_RTOL, "L_manifold": FP32_RTOL, "dx": tolerance(torch.bfloat16)}, loss_atol(rm))
        again = fused(x, y, upper_only, mask_diag, grads)  # deterministic: bitwise the same
        assert all(torch.equal(a, b) for a, b in zip((lt, lm, dx), again, strict=True))
