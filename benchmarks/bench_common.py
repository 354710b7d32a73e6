"""What the op benchmarks share: timing forward / backward / both with peak memory, and agreement."""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import operator
import os
import sys

import torch
from torch._functorch import config as functorch_config

# time_passes times the backward by running one graph's backward again and again (retain_graph=True), which a
# compiled backward that donates its saved buffers refuses; donation only lets it reuse their memory.
functorch_config.donated_buffer = False

COPY_BYTES_PER_S = 4.3e12  # H200 copy rate measured in this workplace (DESIGN.md)
MATMUL_FLOPS_PER_S = 790e12  # H200 bf16 dense matmul rate measured in this workplace (DESIGN.md)
PASSES = ("forward", "backward", "full")


def floors_us(passes: dict[str, tuple[float, float]]) -> dict[str, dict[str, float]]:
    """{pass: (bytes, FLOPs)} for forward and backward -> per pass (full: their sums) ``bytes_us`` at
    COPY_BYTES_PER_S, ``flops_us`` at MATMUL_FLOPS_PER_S and ``floor_us``, the larger."""
    passes = dict(passes)
    passes["full"] = tuple(f + b for f, b in zip(passes["forward"], passes["backward"], strict=True))
    out = {}
    for name, (bytes_, flops) in passes.items():
        b_us, f_us = bytes_ / COPY_BYTES_PER_S * 1e6, flops / MATMUL_FLOPS_PER_S * 1e6
        out[name] = {"bytes_us": b_us, "flops_us": f_us, "floor_us": max(b_us, f_us)}
    return out


def print_floors(floors: dict[str, dict[str, float]], work: str) -> None:
    """One line per pass: the floor and what it is made of; ``work`` says what each pass must do."""
    for pass_name, f in floors.items():
        print(f"  floor {pass_name}: max(bytes {f['bytes_us']:.1f} us at {COPY_BYTES_PER_S / 1e12:.1f} TB/s, "
              f"FLOPs {f['flops_us']:.1f} us at {MATMUL_FLOPS_PER_S / 1e12:.0f} TFLOP/s) = {f['floor_us']:.1f} us")
    print(f"  ({work})")


def weighted_sum(weights, losses) -> torch.Tensor:
    """The ``weights``-sum of ``losses``, with no zero to start from and no product by a weight of 1: only the
    adds and multiplies the sum needs (each is a kernel in the timed passes)."""
    terms = [loss if w == 1 else w * loss for w, loss in zip(weights, losses, strict=True)]
    return functools.reduce(operator.add, terms)


def losses_and_grad(fn, weights, x: torch.Tensor, y: torch.Tensor, params=()):
    """The losses ``fn(x, y)`` (a tuple) and the gradients of their ``weights``-sum w.r.t. x (a fresh leaf),
    then w.r.t. each of ``params`` (leaves ``fn`` uses, e.g. a head's weights)."""
    leaf = x.detach().clone().requires_grad_()
    losses = fn(leaf, y)
    grads = [torch.full((), w, dtype=loss.dtype, device=loss.device) for w, loss in zip(weights, losses, strict=True)]
    return losses, torch.autograd.grad(losses, [leaf, *params], grads)


def loss_timing(fn, weights, x0: torch.Tensor, y: torch.Tensor, quantiles, bench=None, params=()) -> dict:
    """``time_passes`` of the ``weights``-sum of the losses ``fn(x, y)`` (a tuple), x a leaf copy of x0; the
    leaves are x and ``params``."""
    x = x0.detach().clone().requires_grad_()
    return time_passes(lambda: weighted_sum(weights, fn(x, y)), None, [x, *params], quantiles, bench)


def loss_agreement(impls: dict, weights, x0: torch.Tensor, y: torch.Tensor, params=()) -> dict[str, float]:
    """Relative differences of each implementation's losses, dx and the gradients of ``params`` from the
    eager one."""
    results = {}
    for name, fn in impls.items():
        losses, grads = losses_and_grad(fn, weights, x0, y, params)
        results[name] = [*(loss.detach().double() for loss in losses), *(g.double() for g in grads)]
    return max_relative_difference(results)


def loss_launches(impls: dict, weights, x0: torch.Tensor, y: torch.Tensor,
                  uncounted: tuple[str, ...] = ("compiled",), params=()) -> dict[str, int | None]:
    """Kernel launches of one forward+backward (the gradients of x and ``params``) of each loss implementation
    ``fn(x, y)`` (``launches_per_step``)."""
    grads = [torch.full((), w, dtype=torch.float32, device=x0.device) for w in weights]

    def step(fn):
        leaf = x0.detach().clone().requires_grad_()
        return lambda: torch.autograd.grad(fn(leaf, y), [leaf, *params], grads)

    return launches_per_step(impls, step, uncounted)


def launches_per_step(impls: dict, step, uncounted: tuple[str, ...] = ("compiled",)) -> dict[str, int | None]:
    """Kernel launches of one forward+backward of each implementation: ``step(fn)`` makes its inputs and returns
    the call to count (kernels/launch_count.py: Triton launches and the torch ops that run a kernel), counted
    after one uncounted call (first-call work: autotuning, caches); None for ``uncounted`` ones (compiled: the
    counter does not see the kernels inductor generates and launches)."""
    from repa_fast.kernels.launch_count import count_launches

    counts = {}
    for name, fn in impls.items():
        if name in uncounted:
            counts[name] = None
            continue
        step(fn)()
        run = step(fn)
        with count_launches() as count:
            run()
        counts[name] = count.launches
    return counts


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
    from repa_fast.selfcheck import rel_err

    return {name: max(rel_err(a, b) for a, b in zip(r, ref, strict=True))
            for name, r in results.items() if name != reference}


def gpu_ready(script: str) -> bool:
    """True when the compiled kernels can be timed here; otherwise says why (the scripts then exit 0)."""
    if not torch.cuda.is_available():
        print(f"{script}: needs a CUDA GPU (none found); nothing measured.")
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        print(f"{script}: TRITON_INTERPRET=1 is set; unset it to time the compiled kernels.")
        return False
    return True


def time_table(op: str, impls: dict, measure_one, floors: dict[str, dict], fields: dict, out: str | None,
               launches: dict[str, int | None] | None = None) -> list[dict]:
    """Time every implementation (``measure_one(fn, quantiles)``), print one table with the floor (``floors``,
    as ``floors_us`` makes them) beside each pass (and, given ``launches``, each implementation's kernel
    launches per forward+backward), and return (and with ``out``, write as JSON) one row per implementation
    and pass."""
    import triton

    quantiles = [0.5, 0.2, 0.8]
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    command = " ".join([os.path.basename(sys.executable)] + sys.argv)
    gpu = torch.cuda.get_device_name()
    rows = []
    header = (f"{'impl':<10}{'pass':<10}{'median us':>11}{'p20 us':>9}{'p80 us':>9}{'floor us':>10}{'peak MiB':>10}"
              + (f"{'launches':>10}" if launches else ""))
    print(header)
    print("-" * len(header))
    for name, fn in impls.items():
        timing = measure_one(fn, quantiles)
        for pass_name in PASSES:
            median, p20, p80 = (1e3 * t for t in timing[pass_name])
            peak = timing["peak_mib"] if pass_name == "full" else None
            count = launches.get(name) if launches and pass_name == "full" else None
            floor = floors[pass_name]["floor_us"]
            print(f"{name:<10}{pass_name:<10}{median:>11.1f}{p20:>9.1f}{p80:>9.1f}{floor:>10.1f}"
                  f"{peak if peak is not None else float('nan'):>10.1f}"
                  + (f"{'' if count is None else count:>10}" if launches else ""))
            rows.append({"op": op, "impl": name, "pass": pass_name, "median_us": median, "p20_us": p20,
                         "p80_us": p80, **floors[pass_name], "peak_mib": peak, "gpu": gpu, **fields,
                         **({"launches": count} if launches else {}),
                         "torch": torch.__version__, "triton": triton.__version__, "date": stamp,
                         "command": command})
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {len(rows)} rows to {out}")
    return rows


def token_shape_parser(description: str) -> argparse.ArgumentParser:
    """The options of a loss benchmark over x, y [B, N, D]: --out, --batch, --tokens, --dim (the real shape)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=False, help="JSON file for the result rows")
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--dim", type=int, default=1024)
    return parser


def run_loss_bench(op: str, impls: dict, weights, x: torch.Tensor, y: torch.Tensor, floors: dict, work: str,
                   fields: dict, out: str | None, params=()) -> list[dict]:
    """A loss benchmark after its set-up: the floors, each implementation's agreement with eager and launches,
    then the timing table (``time_table``) of the ``weights``-sum of its losses; ``params``: leaves of ``fn``
    besides x, whose gradients are checked and computed too."""
    print_floors(floors, work)
    what = "losses, dx" + (", parameter gradients" if params else "")
    for name, diff in loss_agreement(impls, weights, x, y, params).items():
        print(f"  {name}: max relative difference from eager ({what}) = {diff:.2e}")
    counts = loss_launches(impls, weights, x, y, params=params)
    return time_table(op, impls, lambda fn, q: loss_timing(fn, weights, x, y, q, params=params), floors, fields, out,
                      counts)
