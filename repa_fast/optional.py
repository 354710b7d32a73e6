"""Optional dependencies (the ``eval`` extra: plots, t-SNE, FID) and one clear error when one is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from repa_fast.errors import RunError

# import name -> (PyPI package, setup.py extra that installs it)
EXTRAS = {
    "matplotlib": ("matplotlib", "eval"),
    "sklearn": ("scikit-learn", "eval"),
    "torchmetrics": ("torchmetrics", "eval"),
}


class MissingDependency(RunError, ImportError):
    """An optional package is not installed; the message names it and the extra that brings it."""


def require(module: str, purpose: str) -> ModuleType:
    """``import module``, or a ``MissingDependency`` saying that ``purpose`` needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        package, extra = EXTRAS.get(top, (top, None))
        hint = f"pip install 'repa-fast[{extra}]' (or pip install {package})" if extra else f"pip install {package}"
        raise MissingDependency(f"{purpose} needs the package {package!r}, which is not installed: {hint}") from err
