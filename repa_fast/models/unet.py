"""SD-1.5 U-Net with feature hooks, AlignHeads and LoRA on whitelisted modules.

One forward gives the prediction and the REPA branch. ``model(x_t, t, ehs, return_tokens=True)`` returns
``.sample`` and ``.tokens[layer]``; ``model(x_t, t, ehs, target_tokens=dino)`` also returns the alignment
losses ``.loss_token`` / ``.loss_manifold`` (averaged over the align layers). The heads (and, with
targets, the alignment loss) run inside ``forward``: the hooked features are consumed there and nothing
is kept between calls. Why: ``torch.compile`` (``engine.compile()``) and DeepSpeed see only what runs
inside the engine's forward. Heads called afterwards on features a hook stashed escaped the compiled
graph, and under ZeRO-3 with DeepCompile (which gathers partitioned parameters only inside the engine's
forward) they would have read empty weights. With the source design's head, ``kernels`` on triton and
the sample-form manifold loss, the targets go to the fused REPA branch, whose [B, N, D] tokens never
reach memory.

The source design's interface still holds: ``model(x_t, t, ehs)`` returns the prediction and keeps the
hooked features for ``get_aligned_tokens()`` (its unit test 7.3), which ``clear_features()`` drops.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.utils import BaseOutput
from torch import nn

from repa_fast.errors import MissingFileError
from repa_fast.losses import AlignmentLoss
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
# The U-Net's modules that run before each hooked output (SD-1.5's order: conv_in, time embedding,
# down_blocks, mid_block, up_blocks; up_blocks.0's upsampler runs after its resnets): a trainable
# parameter under none of them cannot be moved by that layer's alignment loss.
UPSTREAM_PREFIXES = {
    "enc_last": ("conv_in", "time_embedding", "down_blocks"),
    "mid": ("conv_in", "time_embedding", "down_blocks", "mid_block"),
    "dec_first": ("conv_in", "time_embedding", "down_blocks", "mid_block", "up_blocks.0.resnets"),
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


def _unet_folder(model: str) -> tuple[Path, str | None]:
    """(folder, subfolder) of the local diffusers U-Net that option 'model' names."""
    path = Path(model)
    if not path.is_dir():
        raise MissingFileError(f"config key 'model': {model!r} is neither 'sd15', 'tiny' nor a local folder")
    sub = "unet" if (path / "unet" / "config.json").is_file() else None
    if sub is None and not (path / "config.json").is_file():
        raise MissingFileError(f"config key 'model': {model!r} holds no diffusers U-Net (no config.json or unet/)")
    return path, sub


def unet_config(model: str) -> dict:
    """The U-Net's config (``cross_attention_dim``, ...) without building it: a preset or the folder's JSON."""
    presets = {"sd15": SD15_UNET, "tiny": TINY_UNET}
    if model in presets:
        return dict(presets[model])
    path, sub = _unet_folder(model)
    return json.loads((path / (sub or "") / "config.json").read_text(encoding="utf-8"))


def build_unet(model: str = "sd15", dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """``sd15`` (SD-1.5 config, random init), ``tiny``, or a local diffusers folder (no download)."""
    if model == "sd15":
        unet = UNet2DConditionModel(**SD15_UNET)
    elif model == "tiny":
        unet = UNet2DConditionModel(**TINY_UNET)
    else:
        path, sub = _unet_folder(model)
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


@dataclass
class AlignedUNetOutput(BaseOutput):
    """What one forward gives: the U-Net's prediction and the REPA branch.

    ``tokens``: {layer: unit tokens [B, N, D]} (empty when only losses were asked for and the fused
    branch made them without tokens); ``loss_token`` / ``loss_manifold``: fp32 scalars averaged over the
    align layers, present when ``target_tokens`` were given.
    """

    sample: torch.Tensor
    tokens: dict[str, torch.Tensor] | None = None
    loss_token: torch.Tensor | None = None
    loss_manifold: torch.Tensor | None = None


class SD15UNetAligned(nn.Module):
    """The SD-1.5 U-Net plus one align head per align layer (``align_head``: ``conv_gn`` AlignHead or
    ``mlp`` MLPAlignHead, see repa_fast.models.align_head; the module doc says what the forward gives).

    With ``lora_config`` the U-Net is frozen and LoRA is added through peft (module names unchanged);
    only LoRA and head parameters train. ``alignment_loss`` (a ``repa_fast.losses.AlignmentLoss``;
    default: the sample-form loss on the ``kernels`` path) is what ``target_tokens`` are scored with.
    """

    def __init__(self, unet: UNet2DConditionModel, align_layers: list[str] | tuple[str, ...] = ("mid",),
                 D: int = 1024, lora_config=None, num_tokens: int = 256, kernels: str = "torch",
                 detach_features: bool = False, alignment_loss=None, align_head: str = "conv_gn"):
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
        self.alignment_loss = alignment_loss or AlignmentLoss(kernels=kernels)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = False, return_tokens: bool = False,
                target_tokens: dict[str, torch.Tensor] | None = None, keep_features: bool = True):
        """The U-Net's prediction [B, 4, H, W]; with ``return_tokens`` and/or ``target_tokens`` (the DINO
        tokens {layer: [B, N, D]}) an ``AlignedUNetOutput`` from this one call. Without either, the hooked
        features are kept for ``get_aligned_tokens()`` unless ``keep_features=False`` (the U-Net alone,
        e.g. while the alignment weight is 0)."""
        sample = self.unet(latents, timesteps, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        if not return_tokens and target_tokens is None:  # the source design's call
            if not keep_features:
                self.hook_manager.clear()
            return AlignedUNetOutput(sample=sample) if return_dict else sample
        # the hooked features are consumed here: nothing outlives the call
        feats = {name: self.hook_manager.pop_feature(name) for name in self.align_layers}
        tokens, token_terms, manifold_terms = {}, [], []
        for name, feat in feats.items():
            head = self.align_heads[name]
            if target_tokens is None:
                tokens[name] = head(feat)
                continue
            if name not in target_tokens:
                raise KeyError(f"SD15UNetAligned: no DINO tokens for align layer {name!r} "
                               f"(targets hold {sorted(target_tokens)})")
            if not return_tokens and self.alignment_loss.fuses_with(head, feat):
                loss_token, loss_manifold = self.alignment_loss.fused(head, feat, target_tokens[name])
            else:
                tokens[name] = head(feat)
                loss_token, loss_manifold = self.alignment_loss(tokens[name], target_tokens[name])
            token_terms.append(loss_token)
            manifold_terms.append(loss_manifold)
        out = AlignedUNetOutput(sample=sample, tokens=tokens)
        if target_tokens is not None:
            out.loss_token = torch.stack(token_terms).mean()
            out.loss_manifold = torch.stack(manifold_terms).mean()
        return out

    def set_kernels(self, kernels: str) -> None:
        """Switch the heads and the alignment loss to ``kernels`` (e.g. back to ``torch`` after a failed
        start-up self-check)."""
        for head in self.align_heads.values():
            head.kernels = kernels
        self.alignment_loss.kernels = kernels

    def untrained_align_layers(self) -> list[str]:
        """Align layers with no trainable U-Net parameter upstream of their hook: their alignment loss
        trains only their head (e.g. ``enc_last`` with ``attention-only`` LoRA: down_blocks.3 holds no
        attention)."""
        trainable = [n.removeprefix("unet.") for n, p in self.named_parameters()
                     if p.requires_grad and n.startswith("unet.")]
        if self.hook_manager.detach:
            return list(self.align_layers)
        return [layer for layer in self.align_layers
                if not any(n == p or n.startswith(p + ".") for n in trainable for p in UPSTREAM_PREFIXES[layer])]

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
                            alignment_loss=AlignmentLoss.from_config(config), align_head=config.align_head)
    return model if dtype == torch.float32 else model.to(dtype)
