"""Fused Triton kernels (installed as ``repa_fast.kernels``).

The ground floor of the package: nothing here imports from the rest of ``repa_fast``. Each op lives
in its own module (kernels + the torch custom op or ``torch.autograd.Function`` that runs them); the
modules in ``repa_fast`` choose between the PyTorch reference and these. ``aot`` compiles kernels for the
H200 without a GPU, ``launch_count`` counts (and records) the launches of any code on a CPU.
"""
