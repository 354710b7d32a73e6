"""The ``loader`` switch: one factory that gives the torch (reference) or the DALI loader.

Both loaders yield the same batch dict, batch for batch::

    {"id": list[str], "index": LongTensor[B] (CPU), "latent": [B,4,64,64], "dino_tokens": {layer: [B,N,D]},
     "class_id": LongTensor[B] (after CFG dropout)}

with ``latent``, ``dino_tokens`` and ``class_id`` on ``device`` and the latent in ``dtype`` (``None``
keeps the cache's fp16). DINO tokens stay fp16: they are the fixed target, fp16 holds them more
precisely than bf16, and the alignment loss reads them in fp32. Each loader iterates one epoch of this
rank's slice; ``set_epoch`` chooses the next one (and ``start``, the samples of the slice to skip, for a
mid-epoch resume).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from repa_fast.data.dataset import SD15AlignedDataset, build_torch_loader


def batch_to(batch: dict, device: torch.device | str, dtype: torch.dtype | None = None) -> dict:
    """Move a loader batch to ``device``; cast the latent to ``dtype`` there (DALI has no bf16).

    ``id`` and ``index`` stay on the host: the training step needs only latent, tokens and class_id.
    """
    non_blocking = torch.device(device).type == "cuda"

    out = dict(batch)
    latent = batch["latent"].to(device, non_blocking=non_blocking)
    out["latent"] = latent if dtype is None else latent.to(dtype)
    out["dino_tokens"] = {layer: t.to(device, non_blocking=non_blocking) for layer, t in batch["dino_tokens"].items()}
    out["class_id"] = batch["class_id"].to(device, non_blocking=non_blocking)
    return out


class TorchLoader:
    """``build_torch_loader``'s DataLoader with the loader protocol: batches on ``device`` in ``dtype``,
    ``set_epoch(epoch, start=0)`` and ``len()`` (steps left in the epoch)."""

    def __init__(self, loader: DataLoader, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None):
        self.loader, self.device, self.dtype = loader, torch.device(device), dtype

    @property
    def epoch(self) -> int:
        return self.loader.sampler.epoch

    @property
    def start(self) -> int:
        return self.loader.sampler.start

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.loader.sampler.set_epoch(epoch, start)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            yield batch_to(batch, self.device, self.dtype)

    def close(self) -> None:
        pass


def dali_available() -> bool:
    """Whether the optional DALI package is installed (``pip install -e '.[dali]'``)."""
    import importlib.util

    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no ``nvidia`` namespace at all
        return False


def build_loader(config, dataset: SD15AlignedDataset, batch_size: int | None = None, rank: int = 0,
                 world: int = 1, epoch: int = 0, start: int = 0, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, loader: str | None = None, num_workers: int | None = None,
                 prefetch: int | None = None, shuffle: bool = True, drop_last: bool = False):
    """The loader that ``loader`` (default ``config.loader``: ``torch`` | ``dali`` | ``auto``, DALI when
    installed) names, over this rank's
    slice of epoch ``epoch`` from sample ``start``; ``batch_size``, ``num_workers`` and ``prefetch``
    default to the config's keys."""
    loader = config.loader if loader is None else loader
    if loader == "auto":
        loader = "dali" if dali_available() else "torch"
    batch_size = config.batch_size if batch_size is None else batch_size
    num_workers = config.num_workers if num_workers is None else num_workers
    prefetch = config.prefetch if prefetch is None else prefetch
    if loader == "torch":
        pin = torch.device(device).type == "cuda"
        torch_loader = build_torch_loader(dataset, batch_size, rank, world, epoch, start, num_workers,
                                          shuffle, drop_last, prefetch, pin_memory=pin)
        return TorchLoader(torch_loader, device, dtype)
    if loader == "dali":
        from repa_fast.data.dali import build_dali_loader  # DALI is an optional dependency

        return build_dali_loader(dataset, batch_size, rank, world, epoch, start, num_workers, shuffle,
                                 drop_last, prefetch, device, dtype)
    raise ValueError(f"option 'loader': {loader!r} is not one of ['torch', 'dali', 'auto']")
