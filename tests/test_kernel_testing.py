"""The shared kernel-test helpers (tests/kernel_testing.py) catch what they are meant to catch."""

import pytest
import torch
from kernel_testing import (
    assert_as_accurate_as_eager,
    assert_close,
    float64_oracle,
    outputs_and_grads,
    rel_err,
    tolerance,
)


def test_rel_err_and_tolerance():
    e = torch.tensor([3.0, 4.0])
    assert rel_err(e + torch.tensor([0.0, 0.5]), e) == pytest.approx(0.1)
    assert rel_err(torch.zeros(2), torch.zeros(2)) == 0.0 and rel_err(e, torch.zeros(2)) == float("inf")
    assert tolerance(torch.float32) == 1e-5 and tolerance(torch.float16) == 2 * 2.0**-11
    assert tolerance(torch.bfloat16, roundings=3) == 3 * 2.0**-8


def test_oracle_and_assert_close():
    x = torch.randn(4, 5, dtype=torch.float16)
    fn = lambda t, k: ((t * k).square().sum(), t.sum(-1))  # noqa: E731
    upstream = [torch.tensor(2.0), torch.randn(4)]
    (o1, o2), (dx,) = float64_oracle(fn, (x, 3.0), [0], upstream)
    # the oracle's gradient is exact: d/dx (2 * 9 sum x^2 + g . rowsum x) = 36 x + g
    assert torch.equal(dx, 36 * x.double() + upstream[1].double()[:, None])
    (a1, a2), (adx,) = outputs_and_grads(fn, (x, 3.0), [0], upstream)
    assert adx.dtype == a1.dtype == torch.float16
    assert_close({"o1": a1, "o2": a2, "dx": adx}, {"o1": o1, "o2": o2, "dx": dx}, tolerance(torch.float16, 8))
    with pytest.raises(AssertionError, match="dx"):
        assert_close({"dx": adx * 1.01}, {"dx": dx}, tolerance(torch.float16, 8))
    with pytest.raises(AssertionError, match="o2"):  # an absolute allowance for one name does not cover another
        assert_close({"o1": a1, "o2": a2 + 1}, {"o1": o1, "o2": o2}, 1e-3, atol={"o1": 10.0})
    with pytest.raises(AssertionError, match="float64"):  # a reference that drops to fp32 is refused
        float64_oracle(lambda t: t.float().sum(), (x,), [0], [torch.tensor(1.0)])


def test_as_accurate_as_eager():
    e = torch.ones(100)
    off = lambda r: e * (1 + r)  # noqa: E731 (relative error r)
    expected, eager = {"a": e, "b": e}, {"a": off(1e-3), "b": off(1e-3)}
    assert_as_accurate_as_eager({"a": off(3e-3), "b": off(3.9e-3)}, eager, expected, torch.bfloat16)  # 2 * 1e-3 + 2e-3
    with pytest.raises(AssertionError, match=r"\{'b': "):
        assert_as_accurate_as_eager({"a": off(3e-3), "b": off(5e-3)}, eager, expected, torch.bfloat16)
    with pytest.raises(AssertionError, match=r"\{'a': "):  # never above the 2e-2 cap, however far off eager is
        assert_as_accurate_as_eager({"a": off(2.5e-2)}, {"a": off(5e-2)}, {"a": e}, torch.bfloat16)
