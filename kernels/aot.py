"""Ahead-of-time compile of a Triton kernel for the H200 (sm_90a), no GPU needed.

Used by the tests that check GPU code on CPU machines. What to compile comes from
``launch_count.record_launches(execute=False)``: an op's host code run at a real shape records every launch
with its arguments, and ``Launch.specialization()`` gives what Triton's JIT compiles for them (pointers
16-byte aligned, integers equal to 1 made constants, integers divisible by 16 marked so), so a test compiles
exactly the kernel that runs. ``compile_for_h200`` compiles for GPUTarget("cuda", 90, 32) and reads
registers, spills and stack from ``ptxas -v``, shared memory from Triton's metadata, whether the kernel
multiplies matrices (tt.dot in its IR) and whether the SASS runs HGMMA (wgmma), and which global
loads/stores are narrower than 32 bits, inside the loops that run HGMMA (a GEMM's main loop) and anywhere.
ptxas and cuobjdump are those Triton's wheel bundles. ``h200_problems`` turns a report into the list of
what is wrong with it.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

H200_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
H200_SMS = 132  # streaming multiprocessors of an H200 (SXM)


def waves(programs: int, sms: int = H200_SMS) -> float:
    """Programs per SM of one launch: below 1 part of the GPU idles; at 2 and above the tail is short."""
    return programs / sms


# --------------------------------------------------------------------------------------------------
# What the compiler made of it.


@dataclass
class KernelReport:
    name: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    dot: bool  # the kernel multiplies matrices (tl.dot: tt.dot in its Triton IR)
    hgmma: bool  # ... and the SASS runs HGMMA (wgmma)
    ptxas_log: str
    # SASS global loads/stores narrower than 32 bits ("address opcode"): inside a loop that runs HGMMA, anywhere
    narrow_in_mma_loop: list[str] = field(default_factory=list)
    narrow_global: list[str] = field(default_factory=list)

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_GLOBAL_ACCESS = ("LDG", "STG", "LDGSTS", "ATOMG", "RED")
_NARROW = {"U8", "S8", "U16", "S16"}


def narrow_global_accesses(sass: str) -> tuple[list[str], list[str]]:
    """(inside loops that contain HGMMA, anywhere): the global loads/stores of fewer than 32 bits in ``sass``.

    A loop is a backward branch ``BRA target`` and the instructions from its target to it.
    """
    instructions = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in _SASS_LINE.finditer(sass)]
    narrow = [(addr, op) for addr, op, _ in instructions
              if op.split(".")[0] in _GLOBAL_ACCESS and _NARROW & set(op.split(".")[1:])]
    loops = []
    for addr, op, operands in instructions:
        target = re.search(r"0x([0-9a-f]+)", operands) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    mma_loops = [(lo, hi) for lo, hi in loops
                 if any(lo <= addr <= hi and op.startswith("HGMMA") for addr, op, _ in instructions)]
    in_loops = [f"{addr:#06x} {op}" for addr, op in narrow if any(lo <= addr <= hi for lo, hi in mma_loops)]
    return in_loops, [f"{addr:#06x} {op}" for addr, op in narrow]


def compile_for_h200(fn, signature: dict, constexprs: dict | None = None, num_warps: int = 4,
                     num_stages: int = 3, divisible: tuple[str, ...] = ()) -> KernelReport:
    """Compile ``fn`` (a @triton.jit function) for GPUTarget("cuda", 90, 32) and inspect the result.

    As the JIT does for 16-byte aligned tensors, every pointer argument is marked divisible by 16
    (so loads vectorise as they will at run time); ``divisible`` names integer arguments (strides,
    sizes) to mark likewise, for the shapes where they are multiples of 16.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    constexprs = dict(constexprs or {})
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, ty in signature.items()
             if ty.startswith("*") or name in divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptxas = get_ptxas(90)
    ptxas = getattr(ptxas, "path", ptxas)  # a path object since Triton 3.4, a string before
    cuobjdump = os.path.join(os.path.dirname(ptxas), "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", ptx, "-o", os.path.join(tmp, "v.cubin")],
                             capture_output=True, text=True, check=True).stderr
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([cuobjdump, "--dump-sass", cubin], capture_output=True, text=True,
                              check=True).stdout

    def number(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    in_loops, anywhere = narrow_global_accesses(sass)
    return KernelReport(
        name=fn.__name__,
        registers=number(r"Used (\d+) registers"),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
        stack=number(r"(\d+) bytes stack frame"),
        shared=int(compiled.metadata.shared),
        dot="tt.dot" in compiled.asm["ttir"],
        hgmma="HGMMA" in sass,
        ptxas_log=log,
        narrow_in_mma_loop=in_loops,
        narrow_global=anywhere,
    )


def compile_for_h200_isolated(module: str, kernel: str, signature: dict, constexprs: dict | None = None,
                              num_warps: int = 4, num_stages: int = 3, timeout: float = 600,
                              divisible: tuple[str, ...] = (), pythonpath: str | None = None) -> KernelReport:
    """``compile_for_h200`` in a child process without TRITON_INTERPRET (``pythonpath``: a folder put first
    on its path, where ``module`` lives if it is not importable otherwise).

    Under the interpreter ``@triton.jit`` yields interpreted functions that cannot be compiled, and
    the switch is read at import time, so CPU test runs compile their kernels in a fresh interpreter.
    """
    import json
    import sys

    spec = json.dumps({"module": module, "kernel": kernel, "signature": signature,
                       "constexprs": constexprs or {}, "num_warps": num_warps, "num_stages": num_stages,
                       "divisible": list(divisible)})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "repa_fast.kernels.aot", spec], capture_output=True,
                          text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile of {module}.{kernel} for sm_90 failed:\n{proc.stderr[-4000:]}")
    return KernelReport(**json.loads(proc.stdout.strip().splitlines()[-1]))


def compile_launch_isolated(launch, module: str, timeout: float = 600) -> KernelReport:
    """``compile_for_h200_isolated`` of a launch that ``launch_count.record_launches`` recorded (``module``: where
    its kernel lives), with the JIT's specialisation of its arguments."""
    signature, constexprs, divisible = launch.specialization()
    return compile_for_h200_isolated(module, launch.kernel, signature, constexprs, launch.options.get("num_warps", 4),
                                     launch.options.get("num_stages", 3), timeout, divisible)


def h200_problems(report: KernelReport, programs: int | None, min_waves: float = 2.0) -> list[str]:
    """What is wrong with one kernel's H200 build (empty: nothing): spills, shared memory above the limit,
    tl.dot not on HGMMA, global loads/stores narrower than 32 bits in a loop that runs HGMMA (a GEMM's main
    loop), and a launch of ``programs`` with fewer than ``min_waves`` waves on the 132 SMs (None: not checked)."""
    problems = []
    if report.spills:
        problems.append(f"spills {report.spill_stores} B stored, {report.spill_loads} B loaded")
    if report.shared > H200_SHARED_LIMIT:
        problems.append(f"shared memory {report.shared} B > {H200_SHARED_LIMIT} B")
    if report.dot and not report.hgmma:
        problems.append("tl.dot did not lower to HGMMA (wgmma)")
    if report.narrow_in_mma_loop:
        problems.append(f"narrow global accesses in the GEMM main loop: {report.narrow_in_mma_loop[:8]}")
    if programs is not None and waves(programs) < min_waves:
        problems.append(f"{programs} programs: {waves(programs):.2f} waves < {min_waves}")
    return problems


def _main(argv: list[str]) -> None:
    import dataclasses
    import importlib
    import json

    spec = json.loads(argv[0])
    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    report = compile_for_h200(fn, spec["signature"], spec["constexprs"], spec["num_warps"], spec["num_stages"],
                              tuple(spec["divisible"]))
    print(json.dumps(dataclasses.asdict(report)))


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
