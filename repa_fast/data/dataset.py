"""The torch Dataset over the caches, and the sampling that every loader shares.

Shuffling and CFG dropout are pure functions of (seed, epoch, sample index): the same with any
number of workers, across the torch and DALI loaders, and after a resume. No RNG object is copied
into workers. A sample's index for both is its row in the CSV (0-based, header not counted).

Excluded samples (config key ``exclude_ids_path``: ids that ``repa-fast-check-cache --write-exclude``
found bad) are dropped and the rest keep their sampling: in every epoch the kept samples come in the
same relative order as in the run without exclusions (the permutation of all CSV rows is drawn, then
the excluded rows are taken out of it), and each kept sample's class label is dropped for CFG exactly
when it is dropped in that run (the hash of its CSV row). What changes is only where the order is cut:
the batches, the rank that reads a sample (round-robin over the kept order) and the epoch length.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from repa_fast.data.cache import CacheError, CacheReader, dino_key, load_clip_table
from repa_fast.errors import MissingFileError

NUM_CLASSES = 1000  # class ids 0..999; id 1000 is the null class (CFG dropout), row 1000 of the CLIP table
TOKEN_SHAPE_KEYS = "config keys dino_N x dino_D"  # where a run's DINO token shape comes from
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


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True,
                      keep: np.ndarray | None = None) -> np.ndarray:
    """The order of samples ``0..n-1`` in epoch ``epoch``: a permutation drawn from (seed, epoch).

    With ``keep`` (a bool mask over the CSV's rows with ``n`` rows kept; sample i is the i-th kept row),
    the permutation of all the rows is drawn and the dropped rows are taken out of it: the kept samples
    come in the order they have without exclusions.
    """
    if keep is not None:
        if int(keep.sum()) != n:
            raise ValueError(f"keep mask holds {int(keep.sum())} kept rows, expected {n}")
        order = epoch_permutation(len(keep), seed, epoch, shuffle)
        position = np.cumsum(keep) - 1  # a kept row's sample index
        return position[order[keep[order]]].astype(np.int64)
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def rank_indices(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1, shuffle: bool = True,
                 keep: np.ndarray | None = None) -> np.ndarray:
    """This rank's slice of the epoch's global permutation (``keep``: see ``epoch_permutation``).

    The permutation is padded by wrapping to a multiple of ``world`` so that every rank gets the same
    number of samples (hence the same number of steps).
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    perm = epoch_permutation(n, seed, epoch, shuffle, keep)
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
                 epoch: int = 0, start: int = 0, keep: np.ndarray | None = None):
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch, self.start, self.keep = epoch, start, keep

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = rank_indices(self.n, self.seed, self.epoch, self.rank, self.world, self.shuffle, self.keep)
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


def read_id_list(path: str | os.PathLike, key: str = "exclude_ids_path") -> set[str]:
    """The ids of an id-list file (one a line; blank lines and lines starting with ``#`` are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"config key {key!r}: id list {str(path)!r} does not exist")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return {line for line in lines if line and not line.startswith("#")}


def write_id_list(path: str | os.PathLike, reasons: dict[str, str], header: str = "") -> None:
    """Write ``reasons`` (id -> why) as an id list that ``read_id_list`` reads: each id after a comment line."""
    lines = [f"# {line}" for line in header.splitlines()]
    for sample_id, reason in reasons.items():
        lines += [f"# {reason}", sample_id]
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def sample_rows(n: int, keep: np.ndarray | None) -> np.ndarray:
    """Each of the ``n`` samples' CSV row (0-based), its index for shuffling and CFG dropout: the rows that
    ``keep`` keeps, or ``0..n-1`` without exclusions."""
    return np.arange(n) if keep is None else np.flatnonzero(keep)


@dataclass
class Samples:
    """The samples of a subset CSV that a run uses.

    ``ids`` and ``class_ids`` per sample; ``keep``: a bool mask over the CSV's rows, or None when every
    row is a sample; ``excluded``: the ids left out.
    """

    ids: list[str]
    class_ids: np.ndarray
    keep: np.ndarray | None
    excluded: list[str]

    @property
    def rows(self) -> np.ndarray:
        return sample_rows(len(self.ids), self.keep)


def class_id_problem(text: str | None, num_classes: int = NUM_CLASSES, sample_id: str | None = None) -> str | None:
    """Why ``text``, a CSV's class_id cell, is not a class id in [0, num_classes), or None; ``sample_id``
    names the sample in the message of an id out of range."""
    try:
        class_id = int(text)
    except (TypeError, ValueError):
        return f"class_id {text!r} is not an integer"
    if 0 <= class_id < num_classes:
        return None
    if sample_id is None:
        return f"class_id {class_id} is outside [0, {num_classes})"
    return f"sample {sample_id!r} has class_id {class_id}, outside [0, {num_classes})"


def read_samples_csv(path: str | os.PathLike, exclude: Iterable[str] = (),
                     num_classes: int = NUM_CLASSES) -> Samples:
    """The samples of a subset CSV with at least the columns ``id`` and ``class_id``, less the ids in
    ``exclude``. An id repeated or a class id that is not an integer in [0, num_classes) among the kept
    rows is an error naming the line."""
    exclude = set(exclude)
    ids, classes, keep, excluded, seen = [], [], [], [], {}
    for line, row in read_csv_rows(path, ("id", "class_id")):
        sample_id = row["id"]
        keep.append(sample_id not in exclude)
        if not keep[-1]:
            excluded.append(sample_id)
            continue
        if sample_id in seen:
            raise CacheError(f"{path}:{line}: id {sample_id!r} repeats line {seen[sample_id]}; ids must be unique "
                             f"(repa-fast-check-cache --write-exclude lists such ids for exclude_ids_path)")
        seen[sample_id] = line
        problem = class_id_problem(row["class_id"], num_classes, sample_id)
        if problem is not None:
            raise CacheError(f"{path}:{line}: {problem}")
        ids.append(sample_id)
        classes.append(int(row["class_id"]))
    if not ids:
        raise CacheError(f"{path}: no samples left after excluding {len(excluded)} id(s)")
    mask = np.asarray(keep, dtype=bool)
    return Samples(ids, np.asarray(classes, dtype=np.int64), None if mask.all() else mask, excluded)


class SD15AlignedDataset(Dataset):
    """Samples of the caches: latent [4,64,64] fp16, DINO tokens {layer: [N,D]} fp16, class id after CFG
    dropout, and (only when asked) the CLIP embedding [77, dim]; the training step gathers embeddings
    from the table on the device instead.

    Indexed by ``(epoch, index)`` (what ``EpochSampler`` yields) or by a plain index, which uses
    ``self.epoch``; ``index`` counts the kept samples. ``exclude_ids``: ids to leave out (see the module
    docstring for what the others keep). ``token_shape_from``: where ``token_shape`` comes from, for the
    message of a DINO cache whose shape disagrees.
    """

    def __init__(self, csv_path, latent_dir, dino_dir, clip_embeddings_path=None, align_layers=("mid",),
                 cfg_dropout: float = 0.1, seed: int = 42, return_encoder_hidden_states: bool = False,
                 num_classes: int = NUM_CLASSES, token_shape: tuple[int, int] | None = None,
                 latent_shape: tuple[int, ...] | None = None, exclude_ids: Iterable[str] = (),
                 token_shape_from: str | None = None):
        samples = read_samples_csv(csv_path, exclude_ids, num_classes)
        self.ids, self.class_ids, self.keep, self.excluded = (samples.ids, samples.class_ids, samples.keep,
                                                              samples.excluded)
        self.rows = samples.rows
        self.csv_path = str(csv_path)
        self.null_class = num_classes
        self.align_layers = list(align_layers)
        self.latents = CacheReader(latent_dir, shape=latent_shape)
        self.dino = CacheReader(dino_dir, shape=token_shape, layers=self.align_layers, shape_from=token_shape_from)
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
        return int(apply_cfg_dropout(self.class_ids[index], self.seed, epoch, self.rows[index], self.cfg_dropout,
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
    """The dataset a ``Config`` describes (``csv_path`` replaces the config's, e.g. for a held-out list);
    the ids of ``exclude_ids_path`` are left out of either."""
    exclude = read_id_list(config.exclude_ids_path) if config.exclude_ids_path else ()
    return SD15AlignedDataset(csv_path or config.csv_path, config.latent_dir, config.dino_dir,
                              config.clip_embeddings_path, config.align_layers, config.cfg_dropout, config.seed,
                              return_encoder_hidden_states, token_shape=(config.dino_N, config.dino_D),
                              exclude_ids=exclude, token_shape_from=TOKEN_SHAPE_KEYS)


def build_torch_loader(dataset: SD15AlignedDataset, batch_size: int, rank: int = 0, world: int = 1,
                       epoch: int = 0, start: int = 0, num_workers: int = 0, shuffle: bool = True,
                       drop_last: bool = False, prefetch: int = 2, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over this rank's slice of epoch ``epoch``, from sample ``start`` of that slice."""
    sampler = EpochSampler(len(dataset), dataset.seed, rank, world, shuffle, epoch, start, dataset.keep)
    extra = {"prefetch_factor": prefetch, "persistent_workers": False} if num_workers > 0 else {}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last, pin_memory=pin_memory, **extra)
