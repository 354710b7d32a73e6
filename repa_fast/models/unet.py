"""SD-1.5 U-Net with feature hooks, AlignHeads and LoRA on whitelisted modules."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from repa_fast.models.align_head import build_align_head
from repa_fast.models.hooks import HookManager

LORA_PREFIXES = ("mid_block", "down_blocks.3", "up_blocks.0")
ATTN_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0")
CONV_SUFFIXES = ("conv1", "conv2", "conv_shortcut")

# The module whose output each align layer captures.
LAYER_PATHS = {
    "mid": "mid_block.resnets.-1",
    "enc_last": "down_blocks.-1.resnets.-1",
    "dec_first": "up_blocks.0.resnets.-1",
}

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
# SD-1.5's topology at toy width: the stand-in for the 860M model in tests and the demo.
TINY_UNET = dict(SD15_UNET, sample_size=16, block_out_channels=(32, 64, 128, 128), norm_num_groups=8,
                 cross_attention_dim=32)


def build_unet(model: str = "sd15", dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """``sd15`` (SD-1.5 config, random init), ``tiny``, or a local diffusers folder (no download)."""
    if model == "sd15":
        unet = UNet2DConditionModel(**SD15_UNET)
    elif model == "tiny":
        unet = UNet2DConditionModel(**TINY_UNET)
    else:
        path = Path(model)
        if not path.is_dir():
            raise FileNotFoundError(f"option 'model': {model!r} is neither 'sd15', 'tiny' nor a local folder")
        sub = "unet" if (path / "unet" / "config.json").is_file() else None
        if sub is None and not (path / "config.json").is_file():
            raise FileNotFoundError(f"option 'model': {model!r} holds no diffusers U-Net (no config.json or unet/)")
        unet = UNet2DConditionModel.from_pretrained(path, subfolder=sub, local_files_only=True, torch_dtype=dtype)
    return unet if unet.dtype == dtype else unet.to(dtype)


def resolve_module(root: nn.Module, dotted: str) -> nn.Module:
    """``"down_blocks.-1.resnets.-1"`` -> the module (negative indices into ModuleLists)."""
    module = root
    for part in dotted.split("."):
        module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
    return module


def lora_target_modules(unet: nn.Module, lora_targets: str = "attn+conv",
                        prefixes: tuple[str, ...] = LORA_PREFIXES) -> list[str]:
    """Full names of the Linear/Conv2d modules LoRA wraps: attention projections (and resnet convs for
    ``attn+conv``) under the whitelisted prefixes. Full names, never bare suffixes, so nothing outside
    the prefixes matches."""
    if lora_targets not in ("attn+conv", "attention-only"):
        raise ValueError(f"option 'lora_targets': {lora_targets!r} is not 'attn+conv' or 'attention-only'")
    suffixes = ATTN_SUFFIXES + (CONV_SUFFIXES if lora_targets == "attn+conv" else ())
    names = []
    for name, module in unet.named_modules():
        if not any(name == p or name.startswith(p + ".") for p in prefixes):
            continue
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if any(name == s or name.endswith("." + s) for s in suffixes):
            names.append(name)
    if not names:
        raise ValueError(f"no LoRA target found under {prefixes} for lora_targets={lora_targets!r}")
    return names


def lora_config(unet: nn.Module, rank: int = 32, alpha: int | None = None, lora_targets: str = "attn+conv"):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=0.0, bias="none",
                      init_lora_weights="gaussian", target_modules=lora_target_modules(unet, lora_targets))


class SD15UNetAligned(nn.Module):
    """The SD-1.5 U-Net plus one align head per align layer (``align_head``: ``conv_gn`` AlignHead or
    ``mlp`` MLPAlignHead, see repa_fast.models.align_head).

    ``forward`` returns the U-Net output and captures the hooked feature maps (graph kept);
    ``get_aligned_tokens()`` runs the heads on them; ``clear_features()`` drops them (every step).
    With ``lora_config`` the U-Net is frozen and LoRA is added through peft (module names unchanged);
    only LoRA and head parameters train.
    """

    def __init__(self, unet: UNet2DConditionModel, align_layers: list[str] | tuple[str, ...] = ("mid",),
                 D: int = 1024, lora_config=None, num_tokens: int = 256, kernels: str = "torch",
                 detach_features: bool = False, align_head: str = "conv_gn"):
        super().__init__()
        unknown = [name for name in align_layers if name not in LAYER_PATHS]
        if unknown:
            raise ValueError(f"unknown align layer(s) {unknown}; choose from {list(LAYER_PATHS)}")
        self.unet = unet
        self.align_layers = list(align_layers)
        self.D = D
        self.head_type = align_head
        if lora_config is not None:
            unet.requires_grad_(False)
            unet.add_adapter(lora_config)
        self.align_heads = nn.ModuleDict()
        self.hook_manager = HookManager(detach=detach_features)
        for name in self.align_layers:
            module = resolve_module(unet, LAYER_PATHS[name])
            channels = module.out_channels  # read from the U-Net, not assumed to be 1280
            self.align_heads[name] = build_align_head(align_head, channels, D, num_tokens, kernels)
            self.hook_manager.register_hook(module, name)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = False):
        output = self.unet(latents, timesteps, encoder_hidden_states=encoder_hidden_states, return_dict=return_dict)
        if return_dict:
            return output
        return output[0] if isinstance(output, tuple) else output

    def get_aligned_tokens(self) -> dict[str, torch.Tensor]:
        return {name: self.align_heads[name](self.hook_manager.get_feature(name)) for name in self.align_layers}

    def clear_features(self) -> None:
        self.hook_manager.clear()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def build_aligned_unet(config, dtype: torch.dtype = torch.float32) -> SD15UNetAligned:
    """The model a ``Config`` describes."""
    unet = build_unet(config.model, dtype)
    lora = lora_config(unet, config.lora_rank, config.lora_alpha, config.lora_targets) if config.use_lora else None
    model = SD15UNetAligned(unet, config.align_layers, config.dino_D, lora, num_tokens=config.dino_N,
                            kernels=config.kernels, detach_features=config.detach_features,
                            align_head=config.align_head)
    return model if dtype == torch.float32 else model.to(dtype)
