"""Forward hooks that capture U-Net feature maps by name, graph kept."""

from __future__ import annotations

import torch
from torch import nn


class HookManager:
    """Captures the output of hooked modules under a name.

    Features keep their autograd graph so that the alignment loss reaches the U-Net; ``detach=True``
    exists only as an ablation. The hook uses nothing but its output tensor, so it traces cleanly
    under torch.compile and works with ZeRO-3 partitioned parameters.
    """

    def __init__(self, detach: bool = False):
        self.detach = detach
        self.features: dict[str, torch.Tensor] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.names: list[str] = []

    def register_hook(self, module: nn.Module, name: str) -> None:
        if name in self.names:
            raise ValueError(f"HookManager: a hook named {name!r} is already registered")

        def hook_fn(_module, _inputs, output):
            if isinstance(output, (tuple, list)):
                output = output[0]
            self.features[name] = output.detach() if self.detach else output

        self.handles.append(module.register_forward_hook(hook_fn))
        self.names.append(name)

    def get_feature(self, name: str) -> torch.Tensor:
        try:
            return self.features[name]
        except KeyError:
            raise KeyError(self._missing(name)) from None

    def pop_feature(self, name: str) -> torch.Tensor:
        try:
            return self.features.pop(name)
        except KeyError:
            raise KeyError(self._missing(name)) from None

    def _missing(self, name: str) -> str:
        if name not in self.names:
            return f"no hook registered for layer {name!r} (registered: {self.names})"
        return (f"no feature captured for layer {name!r}: run the U-Net forward first "
                f"(or the features were cleared); captured: {sorted(self.features)}")

    def clear(self) -> None:
        self.features.clear()

    def remove_all_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.names.clear()
        self.features.clear()
