"""Fused Triton kernels (installed as ``repa_fast.kernels``).

The ground floor of the package: nothing here imports from the rest of ``repa_fast``. Each op lives in
its own module (kernels, host functions and its registered torch custom ops); the modules in
``repa_fast`` choose between the PyTorch reference and these.
"""
