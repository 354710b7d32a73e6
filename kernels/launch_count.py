"""Count the kernel launches of a piece of code on any device, CPU included (the Triton interpreter).

On a GPU, a small op's time is often its launches; this counts them without a GPU, so that tests can
hold an op to a launch budget:

    with count_launches() as count:
        loss = op(x, y); loss.backward()
    count.launches, count.triton, count.torch_ops

Two sources, both in call order:
- Triton: every ``kernel[grid](...)`` call (``KernelInterface.__getitem__``, which the JIT, the
  interpreter, autotuners and heuristics share; an autotuner's benchmarking runs are not counted).
- PyTorch: the ATen ops dispatched, seen by a ``TorchDispatchMode`` (below autograd, after
  decomposition: the ops that reach a device). Views and uninitialised allocations launch nothing and are
  listed apart (``free_ops``); so are custom ops (``torch.library``), whose own ops are counted instead.

A launch here is a call that would start a device kernel; on the CPU nothing is launched, but the same
calls are made. Kernels that inductor generates and launches itself are not seen.

``record_launches`` keeps each Triton launch with its arguments (optionally without running it): what the
ahead-of-time compile checks need to build exactly the kernel the JIT builds at a real shape.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from triton.runtime.jit import KernelInterface

# Allocation ops that only reserve memory: no kernel runs.
_ALLOCATIONS = {"empty.memory_format", "empty_strided.default", "empty_like.default", "new_empty.default",
                "new_empty_strided.default"}


@dataclass
class LaunchCount:
    """What ran inside ``count_launches``: names in call order."""

    triton: list[str] = field(default_factory=list)  # Triton kernels launched
    torch_ops: list[str] = field(default_factory=list)  # ATen ops that run a kernel
    free_ops: list[str] = field(default_factory=list)  # views, empty allocations, custom-op calls

    @property
    def launches(self) -> int:
        return len(self.triton) + len(self.torch_ops)

    def __str__(self) -> str:
        return f"{self.launches} launches: triton {self.triton}, torch {self.torch_ops}"


@dataclass
class Launch:
    """One ``kernel[grid](...)`` call as ``record_launches`` saw it."""

    kernel: str
    grid: tuple
    args: dict  # every kernel argument by name (constexprs included)
    options: dict  # the launch options: num_warps, num_stages, ...
    constexpr_names: tuple[str, ...] = ()  # the arguments declared tl.constexpr

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    def specialization(self) -> tuple[dict[str, str], dict, tuple[str, ...]]:
        """(signature, constexprs, divisible): what the JIT compiles for these arguments, by Triton's own
        specialisation (an integer equal to 1 becomes a constexpr; integers and pointers divisible by 16 get
        the divisibility hint), in the form ``kernels.aot.compile_for_h200`` takes."""
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        signature, constexprs, divisible = {}, {}, []
        for name, value in self.args.items():
            if name in self.constexpr_names:
                signature[name], constexprs[name] = "constexpr", value
                continue
            kind, attr = native_specialize_impl(BaseBackend, value, False, True, True)
            if kind == "constexpr":
                signature[name], constexprs[name] = "constexpr", attr
            else:
                signature[name] = kind
                if attr == "D":
                    divisible.append(name)
        return signature, constexprs, tuple(divisible)


_BELOW_PYTHON = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.Python).raw_repr()
_LISTENERS: list = []  # callables (kernel name, Launch) -> whether the launch may run
_LOCK = threading.Lock()
_ORIGINAL_GETITEM = KernelInterface.__getitem__


def _constexpr_names(kernel) -> tuple[str, ...]:
    params = inspect.signature(getattr(kernel, "fn", kernel)).parameters
    return tuple(name for name, p in params.items() if "constexpr" in str(p.annotation))


def _kernel_name(kernel) -> str:
    return getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", repr(kernel))


def _watched_getitem(kernel, grid):
    launch = _ORIGINAL_GETITEM(kernel, grid)

    def watched(*args, **kwargs):
        names = list(kernel.arg_names)
        seen = Launch(_kernel_name(kernel), tuple(grid) if not callable(grid) else grid,
                      {**dict(zip(names, args, strict=False)), **{k: v for k, v in kwargs.items() if k in names}},
                      {k: v for k, v in kwargs.items() if k not in names}, _constexpr_names(kernel))
        run = all([listener(seen) for listener in list(_LISTENERS)])
        if run:
            # The launch itself is one; the interpreter's copies of the arguments to and from numpy are not.
            with _disable_current_modes():
                return launch(*args, **kwargs)

    return watched


@contextlib.contextmanager
def _listening(listener) -> Iterator[None]:
    with _LOCK:
        if not _LISTENERS:
            KernelInterface.__getitem__ = _watched_getitem
        _LISTENERS.append(listener)
    try:
        yield
    finally:
        with _LOCK:
            _LISTENERS.remove(listener)
            if not _LISTENERS:
                KernelInterface.__getitem__ = _ORIGINAL_GETITEM


def _backend_keys(args, kwargs) -> torch._C.DispatchKeySet:
    """The dispatch keys of the tensor arguments below the Python key: where the op's kernel is found."""
    keys = 0
    for t in torch.utils._pytree.tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor):
            keys |= torch._C._dispatch_keys(t).raw_repr()
    return torch._C.DispatchKeySet.from_raw_repr(keys & _BELOW_PYTHON)


class _OpCounter(TorchDispatchMode):
    def __init__(self, count: LaunchCount):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = f"{func.namespace}.{func._opname}.{func._overloadname}"
        if func.namespace not in ("aten", "prims"):
            # A custom op: what it runs is what launches. The mode is off while this handler runs; turn it
            # back on for the op's own implementation, reached below the Python dispatch key (else the call
            # would come straight back here).
            self.count.free_ops.append(name)
            with self:
                return func.redispatch(_backend_keys(args, kwargs), *args, **kwargs)
        if func.is_view or f"{func._opname}.{func._overloadname}" in _ALLOCATIONS:
            self.count.free_ops.append(name)
        else:
            self.count.torch_ops.append(name)
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_launches() -> Iterator[LaunchCount]:
    """Count the Triton kernel launches and the kernel-running torch ops of the code inside (see module doc)."""
    count = LaunchCount()

    def listener(launch: Launch) -> bool:
        count.triton.append(launch.kernel)
        return True

    with _listening(listener), _OpCounter(count):
        yield count


@contextlib.contextmanager
def record_launches(execute: bool = True) -> Iterator[list[Launch]]:
    """The Triton launches of the code inside, with their arguments; ``execute=False`` skips the kernels
    (outputs stay unwritten), so that host code can be run at real shapes on a CPU to see what it launches."""
    launches: list[Launch] = []

    def listener(launch: Launch) -> bool:
        launches.append(launch)
        return execute

    with _listening(listener):
        yield launches
