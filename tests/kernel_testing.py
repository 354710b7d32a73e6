"""What the kernel tests share: tolerances, the float64 oracle, closeness checks, the H200 build check, the
torch.compile check.

A fused op is checked against its PyTorch reference evaluated in float64 on the same (already rounded)
inputs with the same upstream gradients: outputs AND gradients, each by relative norm error

    rel_err(actual, expected) = |actual - expected| / |expected|      (norms over all elements, in float64)

so one number per tensor, independent of its size. The tolerance of a result follows from the dtype it
is stored in: rounding to nearest leaves each element within the unit roundoff u of that dtype, so a
result that went through k roundings of its own dtype is within ~k u; fp32 arithmetic inside a kernel
(reductions of a few thousand terms) stays below FP32_RTOL. On a GPU in bf16 a fused result is held to
eager PyTorch's accuracy in the same dtype instead (``assert_as_accurate_as_eager``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from repa_fast.kernels import aot
from repa_fast.selfcheck import ERROR_FLOOR, rel_err  # rel_err: the project's one relative error, re-exported

# Unit roundoff (half the machine epsilon) of each storage dtype.
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}
FP32_RTOL = 1e-5  # what fp32 accumulation in a kernel reaches at the tested sizes (observed ~2e-7)


# Absolute allowances of the two alignment losses, since either can be ~0 (B = 1 without mask_diag:
# G_x = G_y = [[1]]) and then a relative error means nothing. L_token = 1 - mean cos: cosines to COS_ATOL.
# L_manifold is a mean of squared Gram differences d: an error e in each entry moves it by at most
# 2 sqrt(L) e + e^2.
COS_ATOL = 1e-6  # a few fp32 ulps of 1
GRAM_ATOL = 1e-6
# A bf16 GPU result is at most this far from float64 however accurate eager PyTorch is.
EAGER_RULE_CAP = 2e-2


def loss_atol(expected_manifold: torch.Tensor) -> dict[str, float]:
    """``assert_close``'s atol for the names L_token and L_manifold, from the expected L_manifold."""
    return {"L_token": COS_ATOL,
            "L_manifold": GRAM_ATOL * (2 * abs(expected_manifold.item()) ** 0.5 + GRAM_ATOL)}


def tolerance(dtype: torch.dtype, roundings: int = 2) -> float:
    """Relative norm tolerance of a result stored in ``dtype`` after ``roundings`` roundings to that dtype."""
    return max(FP32_RTOL, roundings * UNIT_ROUNDOFF[dtype])


def outputs_and_grads(fn: Callable, args: Sequence, wrt: Sequence[int],
                      upstream: Sequence[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(outputs of ``fn(*args)``, gradients of the arguments at positions ``wrt``).

    The ``wrt`` arguments become fresh leaves (``detach()`` keeps their strides, so a non-contiguous input
    stays one); the outputs are back-propagated with ``upstream`` (one gradient per output, cast to its
    dtype and device).
    """
    args = list(args)
    for i in wrt:
        args[i] = args[i].detach().requires_grad_()
    outputs = fn(*args)
    outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
    if len(upstream) != len(outputs):
        raise ValueError(f"outputs_and_grads: {len(outputs)} outputs but {len(upstream)} upstream gradients")
    grads = torch.autograd.grad(outputs, [args[i] for i in wrt],
                                [g.to(device=o.device, dtype=o.dtype) for g, o in zip(upstream, outputs, strict=True)])
    return tuple(o.detach() for o in outputs), grads


def float64_oracle(fn: Callable, args: Sequence, wrt: Sequence[int],
                   upstream: Sequence[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """``outputs_and_grads`` of the reference ``fn`` on float64 copies of the floating-point tensor arguments
    (other arguments pass through), asserting that the reference really computed in float64."""
    args64 = [a.detach().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    outputs, grads = outputs_and_grads(fn, args64, wrt, upstream)
    dtypes = [t.dtype for t in outputs + grads]
    assert all(d == torch.float64 for d in dtypes), f"the reference did not run in float64: {dtypes}"
    return outputs, grads


def assert_close(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                 rtol: float | Mapping[str, float], atol: Mapping[str, float] | None = None) -> None:
    """Each named ``actual`` is finite, has ``expected``'s shape and differs from it by at most
    ``rtol |expected| + atol[name]`` (norms in float64; atol 0 unless given): a relative norm error within
    rtol, plus an absolute allowance for results that can be ~0, where a relative error means nothing.
    Names every tensor that is not close."""
    assert actual.keys() == expected.keys(), (sorted(actual), sorted(expected))
    atol = atol or {}
    bad = {}
    for name, a in actual.items():
        e = expected[name].detach().to(device=a.device, dtype=torch.float64)
        assert a.shape == e.shape, f"{name}: shape {list(a.shape)}, expected {list(e.shape)}"
        assert torch.isfinite(a).all(), f"{name}: not finite"
        tol = rtol[name] if isinstance(rtol, Mapping) else rtol
        diff, scale = (a.detach().double() - e).norm().item(), e.norm().item()
        if not diff <= tol * scale + atol.get(name, 0.0):
            bad[name] = f"|diff| {diff:.3e} > {tol:.1e} * |expected| {scale:.3e} + {atol.get(name, 0.0):.1e}"
    assert not bad, f"not close to the float64 reference: {bad}"


def assert_as_accurate_as_eager(actual: Mapping[str, torch.Tensor], eager: Mapping[str, torch.Tensor],
                                expected: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Each named fused result is about as accurate as eager PyTorch's in ``dtype``: its relative error against
    the float64 ``expected`` below EAGER_RULE_CAP and at most twice eager's plus ``ERROR_FLOOR[dtype]`` (the rule
    of repa_fast.selfcheck). Names every result that is not."""
    assert actual.keys() == eager.keys() == expected.keys(), (sorted(actual), sorted(eager), sorted(expected))
    bad = {}
    for name, a in actual.items():
        err, eager_err = rel_err(a, expected[name]), rel_err(eager[name], expected[name])
        if not (err < EAGER_RULE_CAP and err <= 2 * eager_err + ERROR_FLOOR[dtype]):
            bad[name] = f"{err:.2e} (eager {dtype}: {eager_err:.2e})"
    assert not bad, f"less accurate than eager: {bad}"


def compile_recorded_for_h200(module, launch):
    """A launch recorded by ``kernels.launch_count.record_launches``, compiled for sm_90 as the JIT compiles it
    (``aot.compile_launch_isolated``: Triton's own specialisation of the recorded arguments, divisibility hints,
    1 as a constant); asserts no spills and that shared memory fits. Returns (signature, divisible, report)."""
    signature, constexprs, divisible = launch.specialization()
    report = aot.compile_launch_isolated(launch, module.__name__)
    print(f"{launch.kernel} grid={launch.grid} {constexprs} {launch.options}: registers={report.registers} "
          f"spills={report.spills} shared={report.shared} hgmma={report.hgmma}")
    assert report.spills == 0, report.ptxas_log
    assert report.shared <= aot.H200_SHARED_LIMIT
    return signature, divisible, report


def assert_compiles_whole(step: Callable, *args, wrt: int = 1) -> None:
    """``step(*args)`` (a scalar) is one graph to dynamo, with no break, and ``torch.compile(fullgraph=True,
    backend="aot_eager")`` of it gives eager's value and gradients w.r.t. its first ``wrt`` arguments, bit for
    bit."""

    def leaves():
        return [a.detach().clone().requires_grad_() for a in args[:wrt]]

    explanation = torch._dynamo.explain(step)(*leaves(), *args[wrt:])
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        xs = leaves()
        loss = fn(*xs, *args[wrt:])
        loss.backward()
        results.append((loss.detach(), *(x.grad for x in xs)))
    for i, (eager, compiled) in enumerate(zip(*results, strict=True)):
        assert torch.equal(eager, compiled), "the loss" if i == 0 else f"the gradient of argument {i - 1}"
