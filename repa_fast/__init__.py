"""repa-fast: Stable Diffusion 1.5 with U-REPA representation alignment, made fast."""

__version__ = "0.1.0"
