from repa_fast.data.cache import CacheError, CacheReader, CacheWriter, dino_key, load_clip_table
from repa_fast.data.dataset import SD15AlignedDataset, build_dataset, build_torch_loader

__all__ = ["CacheError", "CacheReader", "CacheWriter", "SD15AlignedDataset", "build_dataset",
           "build_torch_loader", "dino_key", "load_clip_table"]
