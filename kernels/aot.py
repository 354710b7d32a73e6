"""Ahead-of-time compile of a Triton kernel for the H200 (sm_90a), no GPU needed.

Used by the tests that check GPU code on CPU machines: registers, spills and stack from
``ptxas -v``, shared memory from Triton's metadata, and whether the SASS holds HGMMA (wgmma) where
the kernel multiplies matrices. The ptxas and cuobjdump are those Triton's wheel bundles.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

H200_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90


@dataclass
class KernelReport:
    name: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    hgmma: bool
    ptxas_log: str

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


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
    ptxas = get_ptxas(90).path
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

    return KernelReport(
        name=fn.__name__,
        registers=number(r"Used (\d+) registers"),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
        stack=number(r"(\d+) bytes stack frame"),
        shared=int(compiled.metadata.shared),
        hgmma="HGMMA" in sass,
        ptxas_log=log,
    )


def compile_for_h200_isolated(module: str, kernel: str, signature: dict, constexprs: dict | None = None,
                              num_warps: int = 4, num_stages: int = 3, timeout: float = 600,
                              divisible: tuple[str, ...] = ()) -> KernelReport:
    """``compile_for_h200`` in a child process without TRITON_INTERPRET.

    Under the interpreter ``@triton.jit`` yields interpreted functions that cannot be compiled, and
    the switch is read at import time, so CPU test runs compile their kernels in a fresh interpreter.
    """
    import json
    import sys

    spec = json.dumps({"module": module, "kernel": kernel, "signature": signature,
                       "constexprs": constexprs or {}, "num_warps": num_warps, "num_stages": num_stages,
                       "divisible": list(divisible)})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "repa_fast.kernels.aot", spec], capture_output=True,
                          text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile of {module}.{kernel} for sm_90 failed:\n{proc.stderr[-4000:]}")
    return KernelReport(**json.loads(proc.stdout.strip().splitlines()[-1]))


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
