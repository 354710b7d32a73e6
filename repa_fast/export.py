"""LoRA export in the diffusers format, plus the align heads, from live or EMA weights.

``pytorch_lora_weights.safetensors`` is what ``StableDiffusionPipeline.load_lora_weights(dir)`` reads;
``align_heads.safetensors`` holds the heads (keys ``{layer}.proj.0.weight`` ... for ``conv_gn``,
``{layer}.mlp.0.weight`` ... for ``mlp``; the metadata names the layers, D, num_tokens and align_head).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from repa_fast.ema import gathered

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
HEADS_WEIGHT_NAME = "align_heads.safetensors"


def _peft_key(param_name: str) -> str:
    """``unet.mid_block...to_q.lora_A.default.weight`` -> peft's ``mid_block...to_q.lora_A.weight``."""
    return param_name.removeprefix("unet.").replace(".default.", ".")


def export_weights(model: nn.Module, out_dir: str | Path, weights: dict[str, torch.Tensor] | None = None,
                   write: bool = True) -> Path:
    """Write the LoRA (diffusers format) and the heads of ``model`` to ``out_dir``.

    ``weights`` (name -> tensor, e.g. an EMA shadow) replaces the live values of those parameters.
    Under ZeRO-3 every rank must call it (the parameters are gathered); ``write`` only on rank 0.
    """
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(out_dir)
    named = dict(model.named_parameters())
    trainable = [p for p in named.values() if p.requires_grad]
    weights = weights or {}
    with gathered(trainable):
        if not write:
            return out
        out.mkdir(parents=True, exist_ok=True)

        def value(name: str) -> torch.Tensor:
            return (weights[name] if name in weights else named[name]).detach().float().cpu().contiguous()

        heads = {name.removeprefix("align_heads."): value(name) for name in named if name.startswith("align_heads.")}
        save_file(heads, str(out / HEADS_WEIGHT_NAME), metadata={
            "layers": json.dumps(list(model.align_layers)), "D": str(model.D),
            "num_tokens": str(next(iter(model.align_heads.values())).num_tokens), "align_head": model.head_type})
        if getattr(model.unet, "peft_config", None):
            lora_names = [n for n in named if "lora_" in n]
            peft_state = get_peft_model_state_dict(model.unet)
            state = {_peft_key(n): value(n) for n in lora_names}
            if set(state) != set(peft_state):
                raise RuntimeError(f"LoRA export: parameter names do not map onto peft's state dict "
                                   f"({sorted(set(state) ^ set(peft_state))[:3]})")
            metadata = model.unet.peft_config["default"].to_dict()
            metadata["target_modules"] = sorted(metadata["target_modules"])
            # peft key format as is: diffusers' old-format conversion renames only attention keys, and a
            # file mixing the two formats loads without its attention LoRA (a warning, not an error)
            StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=state, safe_serialization=True,
                                                      unet_lora_adapter_metadata=metadata)
        else:  # full fine-tuning: the whole U-Net, as a diffusers folder
            unet_state = {n.removeprefix("unet."): value(n) for n in named if n.startswith("unet.")}
            model.unet.save_pretrained(out / "unet", state_dict=unet_state)
    return out
