from repa_fast.models.align_head import AlignHead, MLPAlignHead, build_align_head, token_grid
from repa_fast.models.hooks import HookManager
from repa_fast.models.unet import (
    SD15UNetAligned,
    build_aligned_unet,
    build_unet,
    lora_config,
    lora_target_modules,
)

__all__ = ["AlignHead", "HookManager", "MLPAlignHead", "SD15UNetAligned", "build_align_head", "build_aligned_unet",
           "build_unet", "lora_config", "lora_target_modules", "token_grid"]
