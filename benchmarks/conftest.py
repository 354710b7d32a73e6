"""The CPU benchmark suite (``pytest benchmarks --benchmark-only``; CI: ``--benchmark-disable``).

Files named ``test_bench_*.py`` are collected (pytest.ini's testpaths name only tests/, so the folder is
given on the command line); the ``bench_*.py`` scripts stay scripts and lend their functions. As in
tests/conftest.py, the Triton interpreter is chosen before any kernel module is imported unless a GPU run
asks for the compiler (REPA_FAST_GPU_TESTS=1).

The CPU figures are single-thread (REPA_BENCH_THREADS, default 1): on the shared CI cores a two-thread
pool whose threads spin while another job holds a core made the tiny training step 5-30x slower and
its time noise.
"""

import os

if os.environ.get("REPA_FAST_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("REPA_BENCH_THREADS", "1")))
