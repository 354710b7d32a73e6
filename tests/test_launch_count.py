"""kernels/launch_count.py counts Triton launches and kernel-running torch ops of a forward+backward."""

import torch
import triton
import triton.language as tl
from triton.runtime.jit import KernelInterface

from repa_fast.kernels.launch_count import count_launches, record_launches

TRITON_GETITEM = KernelInterface.__getitem__  # Triton's own launch path, before any counter patched it


@triton.jit
def _scale_kernel(x_ptr, o_ptr, n, scale, BLOCK: tl.constexpr):
    o_i = tl.arange(0, BLOCK)
    m_i = o_i < n
    tl.store(o_ptr + o_i, tl.load(x_ptr + o_i, mask=m_i) * scale, mask=m_i)


def scale(x: torch.Tensor, s: float) -> torch.Tensor:
    out = torch.empty_like(x)
    _scale_kernel[(1,)](x, out, x.numel(), s, BLOCK=triton.next_power_of_2(x.numel()))
    return out


class Scale(torch.autograd.Function):
    """y = 3 x by a Triton kernel, dx = 3 dy by the same kernel (dy made contiguous: a torch op)."""

    @staticmethod
    def forward(ctx, x):
        return scale(x, 3.0)

    @staticmethod
    def backward(ctx, dy):
        return scale(dy.contiguous(), 3.0)


@torch.library.custom_op("repa_fast_test::scale_then_add", mutates_args=())
def scale_then_add(x: torch.Tensor) -> torch.Tensor:
    return scale(x, 2.0) + 1.0


def test_counts_triton_and_torch_launches_of_forward_and_backward():
    x = torch.randn(10, requires_grad=True)
    with count_launches() as count:
        y = Scale.apply(x).reshape(2, 5).t()  # a view: no launch
        loss = y.sum()
        (dx,) = torch.autograd.grad(loss, x, torch.tensor(2.0))
    assert torch.equal(dx, torch.full_like(x, 6.0))
    assert count.triton == ["_scale_kernel", "_scale_kernel"]  # forward, backward
    # the forward's reduction; backward: sum's gradient is an expand (a view) that contiguous() copies
    assert count.torch_ops == ["aten.sum.default", "aten.clone.default"]
    assert "aten.empty_like.default" in count.free_ops and "aten.t.default" in count.free_ops
    assert not {"aten.t.default", "aten.view.default", "aten.empty_like.default"} & set(count.torch_ops)
    assert count.launches == 4


def test_custom_op_contents_are_counted():
    x = torch.randn(6)
    with count_launches() as count:
        out = scale_then_add(x)
    torch.testing.assert_close(out, 2 * x + 1)
    assert count.free_ops == ["repa_fast_test.scale_then_add.default", "aten.empty_like.default"]
    assert count.triton == ["_scale_kernel"] and count.torch_ops == ["aten.add.Tensor"]
    assert count.launches == 2


def test_nested_counters_and_restored_dispatch():
    x = torch.randn(4)
    with count_launches() as outer:
        scale(x, 1.0)
        with count_launches() as inner:
            scale(x, 1.0) * 2
    assert inner.triton == ["_scale_kernel"] and inner.torch_ops == ["aten.mul.Tensor"]
    assert outer.triton == ["_scale_kernel"] * 2 and outer.torch_ops == ["aten.mul.Tensor"]
    # outside any counter the launch path is Triton's own again and nothing is recorded
    assert KernelInterface.__getitem__ is TRITON_GETITEM
    scale(x, 1.0)
    assert outer.launches == inner.launches + 1 == 3


def test_record_launches_with_and_without_running():
    x = torch.randn(5)
    with record_launches(execute=False) as launches:
        out = torch.full_like(x, 7.0)
        _scale_kernel[(1,)](x, out, 5, 2.0, BLOCK=8, num_warps=2)
    assert torch.equal(out, torch.full_like(x, 7.0))  # not run
    (launch,) = launches
    assert launch.kernel == "_scale_kernel" and launch.grid == (1,) and launch.options == {"num_warps": 2}
    assert launch.args["x_ptr"] is x and launch.args["o_ptr"] is out
    assert {k: launch.args[k] for k in ("n", "scale", "BLOCK")} == {"n": 5, "scale": 2.0, "BLOCK": 8}
    signature, constexprs, divisible = launch.specialization()
    assert signature == {"x_ptr": "*fp32", "o_ptr": "*fp32", "n": "i32", "scale": "fp32", "BLOCK": "constexpr"}
    assert constexprs == {"BLOCK": 8} and set(divisible) <= {"x_ptr", "o_ptr"}  # n = 5: no hint
    with record_launches(execute=False) as launches:  # what the JIT specialises: 1 -> constexpr, 32 -> divisible
        _scale_kernel[(1,)](x, out, 1, 2.0, BLOCK=8)
        _scale_kernel[(1,)](x, out, 32, 2.0, BLOCK=8)
    assert launches[0].specialization()[1] == {"n": 1, "BLOCK": 8}
    assert "n" in launches[1].specialization()[2] and launches[1].specialization()[0]["n"] == "i32"
    with record_launches() as launches:
        out = scale(x, 2.0)
    assert torch.equal(out, 2 * x) and [launch.kernel for launch in launches] == ["_scale_kernel"]
