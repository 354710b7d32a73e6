"""The torch Dataset over the caches, and the sampling that every loader shares.

Shuffling and CFG dropout are pure functions of (seed, epoch, sample index): the same with any
number of workers, across the torch and DALI loaders, and after a resume. No RNG object is copied
into workers.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from repa_fast.data.cache import CacheError, CacheReader, dino_key, load_clip_table

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = (z + np.uint64(0x9E3779B97F4A7C15)) & _M64
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
    return z ^ (z >> np.uint64(31))


def uniform_hash(seed: int, epoch: int, indices) -> np.ndarray:
    """A uniform number in [0, 1) per index, a pure function of (seed, epoch, index)."""
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = _splitmix64(np.full(idx.shape, seed, dtype=np.int64).astype(np.uint64))
        z = _splitmix64(z ^ np.uint64(epoch))
        z = _splitmix64(z ^ idx)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def cfg_drop_mask(seed: int, epoch: int, indices, p: float) -> np.ndarray:
    """True where the class label is dropped (replaced by the null class) for classifier-free guidance."""
    return uniform_hash(seed, epoch, indices) < p


def apply_cfg_dropout(class_ids, seed: int, epoch: int, indices, p: float, null_class: int) -> np.ndarray:
    class_ids = np.asarray(class_ids, dtype=np.int64)
    return np.where(cfg_drop_mask(seed, epoch, indices, p), null_class, class_ids)


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def rank_indices(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1, shuffle: bool = True) -> np.ndarray:
    """This rank's slice of the epoch's global permutation.

    The permutation is padded by wrapping to a multiple of ``world`` so that every rank gets the same
    number of samples (hence the same number of steps).
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    perm = epoch_permutation(n, seed, epoch, shuffle)
    per_rank = -(-n // world)
    pad = per_rank * world - n
    if pad:
        perm = np.concatenate([perm, perm[:pad]])
    return perm[rank::world]


def steps_per_epoch(n: int, batch_size: int, world: int = 1, drop_last: bool = False) -> int:
    per_rank = -(-n // world)
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` for this rank, starting ``start`` samples into the epoch (resume)."""

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world: int = 1, shuffle: bool = True,
                 epoch: int = 0, start: int = 0):
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch, self.start = epoch, start

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = rank_indices(self.n, self.seed, self.epoch, self.rank, self.world, self.shuffle)
        for i in indices[self.start:]:
            yield self.epoch, int(i)

    def __len__(self) -> int:
        return max(0, -(-self.n // self.world) - self.start)


def read_csv_rows(path: str | os.PathLike, columns: tuple[str, ...]) -> list[tuple[int, dict]]:
    """``(line number, row)`` of a subset CSV that must have ``columns``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"sample CSV {str(path)!r} does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise CacheError(f"{path}: missing column(s) {missing} (has {reader.fieldnames})")
        rows = list(enumerate(reader, start=2))
    if not rows:
        raise CacheError(f"{path}: no samples")
    return rows


def read_samples_csv(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """(ids, class_ids) from a subset CSV with at least the columns ``id`` and ``class_id``."""
    ids, classes = [], []
    for line, row in read_csv_rows(path, ("id", "class_id")):
        try:
            classes.append(int(row["class_id"]))
        except (TypeError, ValueError):
            raise CacheError(f"{path}:{line}: class_id {row['class_id']!r} is not an integer") from None
        ids.append(row["id"])
    return ids, np.asarray(classes, dtype=np.int64)


class SD15AlignedDataset(Dataset):
    """Samples of the caches: latent [4,64,64] fp16, DINO tokens {layer: [N,D]} fp16, class id after CFG
    dropout, and (only when asked) the CLIP embedding [77, dim]; the training step gathers embeddings
    from the table on the device instead.

    Indexed by ``(epoch, index)`` (what ``EpochSampler`` yields) or by a plain index, which uses
    ``self.epoch``.
    """

    def __init__(self, csv_path, latent_dir, dino_dir, clip_embeddings_path=None, align_layers=("mid",),
                 cfg_dropout: float = 0.1, seed: int = 42, return_encoder_hidden_states: bool = False,
                 num_classes: int = 1000, token_shape: tuple[int, int] | None = None,
                 latent_shape: tuple[int, ...] | None = None):
        self.ids, self.class_ids = read_samples_csv(csv_path)
        self.csv_path = str(csv_path)
        self.null_class = num_classes
        bad = np.flatnonzero((self.class_ids < 0) | (self.class_ids >= num_classes))
        if bad.size:
            raise CacheError(f"{csv_path}: sample {self.ids[bad[0]]!r} has class_id {self.class_ids[bad[0]]}, "
                             f"outside [0, {num_classes})")
        self.align_layers = list(align_layers)
        self.latents = CacheReader(latent_dir, shape=latent_shape)
        self.dino = CacheReader(dino_dir, shape=token_shape, layers=self.align_layers)
        self.cfg_dropout, self.seed, self.epoch = cfg_dropout, seed, 0
        self.clip_table = None
        if return_encoder_hidden_states:
            if clip_embeddings_path is None:
                raise ValueError("return_encoder_hidden_states needs clip_embeddings_path")
            self.clip_table = load_clip_table(clip_embeddings_path, num_rows=num_classes + 1)

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def class_id(self, epoch: int, index: int) -> int:
        return int(apply_cfg_dropout(self.class_ids[index], self.seed, epoch, index, self.cfg_dropout,
                                     self.null_class))

    def __getitem__(self, item) -> dict:
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        if not 0 <= index < len(self.ids):
            raise IndexError(f"sample index {index} out of range [0, {len(self.ids)})")
        sample_id = self.ids[index]
        class_id = self.class_id(epoch, index)
        sample = {
            "id": sample_id,
            "index": index,
            "latent": self.latents.get(sample_id),
            "dino_tokens": {layer: self.dino.get(dino_key(sample_id, layer)) for layer in self.align_layers},
            "class_id": class_id,
        }
        if self.clip_table is not None:
            sample["encoder_hidden_states"] = self.clip_table[class_id]
        return sample


def build_dataset(config, return_encoder_hidden_states: bool = False, csv_path=None) -> SD15AlignedDataset:
    """The dataset a ``Config`` describes (``csv_path`` replaces the config's, e.g. for a held-out list)."""
    return SD15AlignedDataset(csv_path or config.csv_path, config.latent_dir, config.dino_dir,
                              config.clip_embeddings_path,
                              config.align_layers, config.cfg_dropout, config.seed,
                              return_encoder_hidden_states, token_shape=(config.dino_N, config.dino_D))


def build_torch_loader(dataset: SD15AlignedDataset, batch_size: int, rank: int = 0, world: int = 1,
                       epoch: int = 0, start: int = 0, num_workers: int = 0, shuffle: bool = True,
                       drop_last: bool = False, prefetch: int = 2, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over this rank's slice of epoch ``epoch``, from sample ``start`` of that slice."""
    sampler = EpochSampler(len(dataset), dataset.seed, rank, world, shuffle, epoch, start)
    extra = {"prefetch_factor": prefetch, "persistent_workers": False} if num_workers > 0 else {}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last, pin_memory=pin_memory, **extra)
