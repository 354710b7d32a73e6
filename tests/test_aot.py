"""kernels/aot.py's SASS checks, on a made-up listing and on a known-bad and a known-good build of one small
GEMM (the same kernel; only the divisibility hint of one stride differs)."""

from __future__ import annotations

import textwrap
from concurrent.futures import ThreadPoolExecutor

from repa_fast.kernels import aot

SASS = """
        /*0100*/                   LDG.E.U16 R2, desc[UR4][R4.64] ;
        /*0110*/                   LDGSTS.E.BYPASS.128 [R93], desc[UR26][R30.64], P2 ;
        /*0120*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8].tnspB, R24 ;
        /*0130*/               @P0 LDG.E.U16 R6, desc[UR4][R8.64] ;
        /*0140*/                   STG.E.128 desc[UR26][R2.64], R8 ;
        /*0150*/               @P6 BRA 0x110 ;
        /*0160*/                   STG.E.U16 desc[UR26][R2.64], R8 ;
        /*0170*/                   BRA 0x160 ;
"""


def test_narrow_accesses_found_in_and_outside_the_mma_loop():
    in_loop, anywhere = aot.narrow_global_accesses(textwrap.dedent(SASS))
    assert in_loop == ["0x0130 LDG.E.U16"]  # the loop 0x110-0x150 runs HGMMA; the one at 0x160 does not
    assert anywhere == ["0x0100 LDG.E.U16", "0x0130 LDG.E.U16", "0x0160 STG.E.U16"]


PROBE = '''
import triton
import triton.language as tl


@triton.jit
def probe_gemm_kernel(a_ptr, b_ptr, c_ptr, K, stride_row, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # A [BM, K] with rows in runs of 8 contiguous elements, runs stride_row apart (as an 8x8 map's rows).
    o_m = tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        a = tl.load(a_ptr + (o_m[:, None] // 8) * stride_row + o_m[:, None] % 8 + o_k[None, :] * 4096)
        b = tl.load(b_ptr + o_k[:, None] * BN + o_n[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + o_m[:, None] * BN + o_n[None, :], acc.to(tl.bfloat16))
'''


def test_sass_check_tells_scalar_from_vector_loads(tmp_path):
    # stride_row = 8 (not divisible by 16): the compiler cannot prove the runs aligned, so the A loads are
    # scalar 16-bit loads inside the HGMMA loop; marked divisible by 16 they are 128-bit.
    (tmp_path / "aot_probe.py").write_text(PROBE)
    signature = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "K": "i32", "stride_row": "i32",
                 "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}

    def build(divisible):
        return aot.compile_for_h200_isolated("aot_probe", "probe_gemm_kernel", signature,
                                             {"BM": 128, "BN": 64, "BK": 64}, 4, 3, divisible=divisible,
                                             pythonpath=str(tmp_path))

    with ThreadPoolExecutor(2) as pool:
        scalar, vector = pool.map(build, [("K",), ("K", "stride_row")])
    assert scalar.dot and scalar.hgmma and vector.dot and vector.hgmma
    assert scalar.narrow_in_mma_loop and all("LDG.E.U16" in a for a in scalar.narrow_in_mma_loop)
    assert any("narrow global accesses" in p for p in aot.h200_problems(scalar, 264))
    assert not vector.narrow_global and aot.h200_problems(vector, 264) == aot.h200_problems(vector, None) == []
    assert aot.h200_problems(vector, 131) == ["131 programs: 0.99 waves < 2.0"]
