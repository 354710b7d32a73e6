"""The fused token-form manifold loss (kernels/token_gram.py) against repa_fast.losses.token_gram_loss.

On CPU the kernels run in the Triton interpreter (fp32, fp16); the H200 build is checked ahead of time at
the real shape (B=48, N=256, D=1024, x bf16, y fp16); bf16 at the real shape runs only on a GPU.
"""

import pytest
import torch
from kernel_testing import (
    FP32_RTOL,
    assert_close,
    assert_compiles_whole,
    compile_recorded_for_h200,
    float64_oracle,
    outputs_and_grads,
    tolerance,
)

from repa_fast.kernels import aot
from repa_fast.kernels import token_gram as token_gram_module
from repa_fast.kernels.launch_count import count_launches, record_launches
from repa_fast.kernels.token_gram import token_gram_backward, token_gram_configs, token_gram_forward, token_gram_loss
from repa_fast.losses import token_gram_loss as reference_loss

# The loss is an fp32 sum of fp32 squares of Gram entries computed from the stored inputs: FP32_RTOL for every
# dtype. dx: the backward rounds P = E diag(r) to x's dtype for the tensor cores, then dx to x's dtype; each
# rounding moves an element by up to u, and the two together came to 1.5 u in norm on these draws (fp16):
# three roundings' worth (fp32: FP32_RTOL).
DX_ROUNDINGS = 3


def tokens(shape, dtype, generator, correlated_with=None):
    t = torch.randn(shape, generator=generator, dtype=torch.float64)
    if correlated_with is not None:  # trained tokens resemble DINO's: Grams far from independent noise
        t = t + correlated_with.double()
    return t.to(dtype)


def check(x, y, generator):
    upstream = [torch.randn((), generator=generator, dtype=torch.float64) * 10]
    (loss,), (dx,) = outputs_and_grads(token_gram_loss, (x, y), [0], upstream)
    assert loss.dtype == torch.float32 and loss.ndim == 0 and dx.dtype == x.dtype
    (expected,), (edx,) = float64_oracle(reference_loss, (x, y), [0], upstream)
    assert_close({"loss": loss, "dx": dx}, {"loss": expected, "dx": edx},
                 {"loss": FP32_RTOL, "dx": tolerance(x.dtype, DX_ROUNDINGS)})


@pytest.mark.parametrize("shape", [(1, 256, 24), (3, 200, 20), (3, 37, 72)], ids=["B1-N256", "B3-N200", "B3-N37"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matches_float64_reference(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = tokens(shape, dtype, g)
    check(x, tokens(shape, dtype, g, correlated_with=x), g)


def test_mixed_dtypes_and_strides():
    g = torch.Generator().manual_seed(3)
    x = tokens((2, 19, 80), torch.float32, g)[..., 8:48]  # rows of a wider buffer
    y = tokens((19, 2, 40), torch.float16, g).transpose(0, 1)  # token-major storage
    assert not x.is_contiguous() and not y.is_contiguous()
    check(x, y, g)


def test_zero_rows():
    g = torch.Generator().manual_seed(5)
    x, y = tokens((2, 21, 16), torch.float32, g), tokens((2, 21, 16), torch.float32, g)
    x[0, 3] = 0.0
    y[1, 4] = 0.0
    x[1, 7] *= 1e-14  # 0 < |x| < eps: clamped, no gradient through its norm
    check(x, y, g)


def test_three_launches_and_no_big_saved_tensor():
    """Forward: the kernel and the sum of its partials; backward: one kernel. Saved: x and y only."""
    g = torch.Generator().manual_seed(7)
    x, y = tokens((2, 40, 24), torch.float32, g).requires_grad_(), tokens((2, 40, 24), torch.float16, g)
    saved = []
    with count_launches() as count, torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                                               lambda t: t):
        loss = token_gram_loss(x, y)
        torch.autograd.grad(loss, x, torch.tensor(1.0))
    assert count.triton == ["_token_gram_forward_kernel", "_token_gram_backward_kernel"]
    assert count.torch_ops == ["aten.sum.default"] and count.launches == 3, count
    assert {t.data_ptr() for t in saved} == {x.data_ptr(), y.data_ptr()}


def test_torch_op_opcheck_and_compile():
    g = torch.Generator().manual_seed(11)
    x, y = tokens((2, 24, 32), torch.float32, g).requires_grad_(), tokens((2, 24, 32), torch.float16, g)
    torch.library.opcheck(torch.ops.repa_fast.token_gram_loss.default, (x, y))
    torch.library.opcheck(torch.ops.repa_fast.token_gram_loss_backward.default, (x.detach(), y, torch.tensor(2.0)))

    assert_compiles_whole(lambda x, y: 3.0 * token_gram_loss(x * 2.0, y), x, y)


def test_input_errors():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="y requires grad"):
        token_gram_loss(x, torch.randn(2, 3, 4, requires_grad=True))
    with pytest.raises(ValueError, match=r"\[2, 3, 4\] and \[2, 3, 5\]"):
        token_gram_loss(x, torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="N = 300 tokens is above"):
        token_gram_loss(torch.randn(1, 300, 4), torch.randn(1, 300, 4))


# --- the H200 build, ahead of time ---------------------------------------------------------------------

REAL_SHAPE = (48, 256, 1024)


def test_compiles_for_h200():
    """Both kernels as the host launches them at the real shape (x bf16, y fp16), compiled for sm_90 with the
    JIT's specialisation: no spills, shared memory fits, every tl.dot on HGMMA. Waves: the forward has >= 2;
    the backward has one program per 64 rows of a sample (192): more would recompute its Gram rows."""
    x, y = torch.empty(REAL_SHAPE, dtype=torch.bfloat16), torch.empty(REAL_SHAPE, dtype=torch.float16)
    with record_launches(execute=False) as launches:
        token_gram_forward(x, y)
        token_gram_backward(x, y, torch.empty(()))
    assert [launch.kernel for launch in launches] == list(token_gram_configs(*REAL_SHAPE))
    for launch in launches:
        signature, divisible, report = compile_recorded_for_h200(token_gram_module, launch)
        assert {"D", "stride_xn", "stride_yn"} & set(signature) <= set(divisible)
        assert report.hgmma, f"{launch.kernel}: its Gram products (tl.dot in _gram_block) are not on HGMMA"
    forward, backward = launches
    assert aot.waves(forward.programs) >= 2
    assert backward.programs == REAL_SHAPE[0] * REAL_SHAPE[1] // 64


# --- on the GPU ----------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_real_shape_bf16_gpu():
    g = torch.Generator().manual_seed(13)
    x = tokens(REAL_SHAPE, torch.bfloat16, g).cuda()
    y = tokens(REAL_SHAPE, torch.float16, g, correlated_with=x.cpu()).cuda()
    upstream = [torch.tensor(3.0, dtype=torch.float64)]
    (loss,), (dx,) = outputs_and_grads(token_gram_loss, (x, y), [0], upstream)
    (expected,), (edx,) = float64_oracle(reference_loss, (x, y), [0], upstream)
    assert_close({"loss": loss, "dx": dx}, {"loss": expected, "dx": edx},
                 {"loss": FP32_RTOL, "dx": tolerance(torch.bfloat16, DX_ROUNDINGS)})
    again = outputs_and_grads(token_gram_loss, (x, y), [0], upstream)  # deterministic: bitwise the same
    assert torch.equal(loss, again[0][0]) and torch.equal(dx, again[1][0])
