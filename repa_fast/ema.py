"""Exponential moving average of the trainable parameters, fp32, correct under ZeRO-3."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def gathered(params: list[nn.Parameter]):
    """Full values of ZeRO-3 partitioned parameters inside the context (a no-op for other params)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters([p for p in params if hasattr(p, "ds_id")], modifier_rank=None)
    return contextlib.nullcontext()


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after every optimizer step, in fp32.

    Every rank keeps the full shadow (the trainable set is LoRA + heads: small), so that saving and
    exporting need no extra communication.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = self._params(model)
        with gathered(params), torch.no_grad():
            self.shadow = {n: p.detach().float().clone() for n, p in zip(self.names, params, strict=True)}

    def _params(self, model: nn.Module) -> list[nn.Parameter]:
        named = dict(model.named_parameters())
        missing = [n for n in self.names if n not in named]
        if missing:
            raise KeyError(f"EMA: model has no parameter(s) {missing[:3]}")
        return [named[n] for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = self._params(model)
        with gathered(params):
            for name, p in zip(self.names, params, strict=True):
                self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": {n: t.detach().cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if set(shadow) != set(self.names):
            diff = sorted(set(shadow) ^ set(self.names))[:3]
            raise KeyError(f"EMA state does not match the trainable parameters (first differences: {diff})")
        device = next(iter(self.shadow.values())).device
        self.decay = state["decay"]
        self.shadow = {n: shadow[n].to(device=device, dtype=torch.float32) for n in self.names}
