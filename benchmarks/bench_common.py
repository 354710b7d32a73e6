"""What the op benchmarks share: timing forward / backward / both with peak memory, and agreement."""

from __future__ import annotations

import functools

import torch


def time_passes(forward, grad, leaves: list[torch.Tensor], quantiles, bench=None) -> dict:
    """Times (ms at ``quantiles``) of ``forward()``, its backward (with ``grad``, None for a scalar) and both,
    by ``bench`` (do_bench's signature; default do_bench), and on CUDA the peak memory of forward+backward
    above what is allocated before (None elsewhere)."""
    if bench is None:
        from triton.testing import do_bench as bench

    def full():
        forward().backward(grad)

    for _ in range(3):  # compile, autotune, allocator warm-up
        full()
    backward = functools.partial(forward().backward, grad, retain_graph=True)  # the same graph, again
    row = {
        "forward": bench(forward, quantiles=quantiles),
        "backward": bench(backward, grad_to_none=leaves, quantiles=quantiles),
        "full": bench(full, grad_to_none=leaves, quantiles=quantiles),
    }
    del backward  # frees the retained graph before the memory measurement
    for t in leaves:
        t.grad = None
    if not leaves[0].is_cuda:
        row["peak_mib"] = None
        return row
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    full()
    torch.cuda.synchronize()
    row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    for t in leaves:
        t.grad = None
    return row


def max_relative_difference(results: dict[str, list[torch.Tensor]], reference: str = "eager") -> dict[str, float]:
    """For each implementation but ``reference``: the largest relative norm difference of its tensors."""
    ref = results[reference]
    return {name: max(((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()
                      for a, b in zip(r, ref, strict=True))
            for name, r in results.items() if name != reference}
