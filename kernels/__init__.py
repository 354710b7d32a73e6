"""Fused Triton kernels (installed as ``repa_fast.kernels``).

The ground floor of the package: nothing here imports from the rest of ``repa_fast``. Each op lives
in its own module (kernels + ``torch.autograd.Function``); the modules in ``repa_fast`` choose
between the PyTorch reference and these.
"""
