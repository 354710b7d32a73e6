"""LMDB caches of VAE latents and DINO tokens.

Format (DESIGN.md): a key is the sample id (latents) or ``f"{id}_{layer}"`` (DINO tokens), utf-8; a
value is the raw little-endian array bytes; ``__meta__`` is a JSON record with ``shape``, ``dtype``,
``count``, ``kind``, ``layers`` and what made the cache. Readers check the meta against what they
expect and every record's length against the shape: a missing or short record is an error naming
the file and key, never silent zeros.

Environments open lazily, once per process and path, and are reopened in a process that did not
open them (forked DataLoader or DALI workers), so a reader can be built in the parent and used in
workers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch

from repa_fast.errors import RunError

META_KEY = b"__meta__"
FORMAT = "repa-fast-cache"
VERSION = 1

_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class CacheError(RunError, RuntimeError):
    """A cache file, key or record is missing or does not match its ``__meta__``."""


def dino_key(sample_id: str, layer: str) -> str:
    return f"{sample_id}_{layer}"


# py-lmdb refuses to open one environment twice in a process: readers of the same path share a
# handle, opened lazily in the process that uses it (a forked worker never uses its parent's).
_READ_ENVS: dict[str, lmdb.Environment] = {}
_READ_ENVS_PID = os.getpid()


def _read_env(path: Path) -> lmdb.Environment:
    global _READ_ENVS_PID
    if os.getpid() != _READ_ENVS_PID:
        _READ_ENVS.clear()
        _READ_ENVS_PID = os.getpid()
    key = os.path.realpath(path)
    env = _READ_ENVS.get(key)
    if env is None:
        env = lmdb.open(key, readonly=True, lock=False, readahead=False, meminit=False,
                        subdir=os.path.isdir(key), max_readers=1024)
        _READ_ENVS[key] = env
    return env


def _close_read_env(path: Path) -> None:
    env = _READ_ENVS.pop(os.path.realpath(path), None)
    if env is not None and os.getpid() == _READ_ENVS_PID:
        env.close()


class CacheWriter:
    """Writes records of one shape and dtype, then the ``__meta__`` record on close.

    The map grows (doubling) when full instead of failing. Existing records are kept, so an
    interrupted build can resume (``has`` tells which ids are done).
    """

    def __init__(self, path: str | os.PathLike, shape: Iterable[int], dtype: str = "float16", kind: str = "latent",
                 layers: list[str] | None = None, map_size: int = 1 << 30, extra_meta: dict | None = None,
                 commit_every: int = 256):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        if self.dtype.name not in _TORCH_DTYPES:
            raise CacheError(f"{self.path}: unsupported dtype {dtype!r} (use one of {list(_TORCH_DTYPES)})")
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.kind, self.layers, self.extra = kind, list(layers or []), dict(extra_meta or {})
        _close_read_env(self.path)  # readers in this process reopen after the write
        self.env = lmdb.open(str(self.path), map_size=map_size, subdir=True, readahead=False, meminit=False)
        old = self.read_meta()
        if old is not None and (tuple(old["shape"]) != self.shape or old["dtype"] != self.dtype.name):
            self.env.close()
            raise CacheError(f"{self.path}: existing cache holds {old['dtype']} {old['shape']}, "
                             f"cannot append {self.dtype.name} {list(self.shape)}")
        self._pending: list[tuple[bytes, bytes]] = []
        self.commit_every = commit_every

    def read_meta(self) -> dict | None:
        """The ``__meta__`` record already in the cache (None for a new cache)."""
        with self.env.begin() as txn:
            raw = txn.get(META_KEY)
        return json.loads(raw) if raw is not None else None

    def has(self, key: str) -> bool:
        with self.env.begin() as txn:
            return txn.get(key.encode()) is not None or any(k == key.encode() for k, _ in self._pending)

    def put(self, key: str, array: np.ndarray | torch.Tensor) -> None:
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        if key == META_KEY.decode():
            raise CacheError(f"{self.path}: key {key!r} is reserved")
        if tuple(array.shape) != self.shape:
            raise CacheError(f"{self.path}: record {key!r} has shape {list(array.shape)}, "
                             f"expected {list(self.shape)}")
        data = np.ascontiguousarray(array, dtype=self.dtype.newbyteorder("<")).tobytes()
        self._pending.append((key.encode(), data))
        if len(self._pending) >= self.commit_every:
            self.flush()

    def _commit(self, items: list[tuple[bytes, bytes]]) -> None:
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for k, v in items:
                        txn.put(k, v)
                return
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
            except lmdb.MapResizedError:  # another writer (a shard in another process) grew the map
                self.env.set_mapsize(0)

    def flush(self) -> None:
        if self._pending:
            self._commit(self._pending)
            self._pending = []

    def count(self) -> int:
        with self.env.begin() as txn:
            n = txn.stat()["entries"]
            return n - (txn.get(META_KEY) is not None)

    def close(self) -> None:
        self.flush()
        meta = {"format": FORMAT, "version": VERSION, "kind": self.kind, "shape": list(self.shape),
                "dtype": self.dtype.name, "count": self.count(), "layers": self.layers, **self.extra}
        self._commit([(META_KEY, json.dumps(meta).encode())])
        self.env.sync()
        self.env.close()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CacheReader:
    """Reads records as tensors; checks ``__meta__`` against ``shape`` / ``dtype`` / ``layers`` if given.

    ``shape_from``: where ``shape`` comes from (e.g. ``"config keys dino_N x dino_D"``), added to the
    message of a shape that disagrees.
    """

    def __init__(self, path: str | os.PathLike, shape: Iterable[int] | None = None, dtype: str | None = None,
                 layers: Iterable[str] | None = None, kind: str | None = None, shape_from: str | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise CacheError(f"cache {str(self.path)!r} does not exist")
        try:
            with self.env.begin() as txn:
                raw = txn.get(META_KEY)
        except lmdb.Error as err:
            raise CacheError(f"{self.path}: not an LMDB cache ({type(err).__name__}: {err})") from None
        if raw is None:
            raise CacheError(f"{self.path}: no '__meta__' record (not a repa-fast cache, or an unfinished write)")
        try:
            self.meta: dict[str, Any] = json.loads(bytes(raw))
            self.shape = tuple(int(s) for s in self.meta["shape"])
            self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        except (ValueError, KeyError, TypeError) as err:
            raise CacheError(f"{self.path}: bad '__meta__' record ({err}): {bytes(raw)[:200]!r}") from None
        if self.meta.get("format", FORMAT) != FORMAT:
            raise CacheError(f"{self.path}: '__meta__' format is {self.meta.get('format')!r}, expected {FORMAT!r}")
        if shape is not None and tuple(shape) != self.shape:
            hint = f" ({shape_from})" if shape_from else ""
            raise CacheError(f"{self.path}: '__meta__' shape is {list(self.shape)}, expected {list(shape)}{hint}")
        if dtype is not None and np.dtype(dtype) != np.dtype(self.meta["dtype"]):
            raise CacheError(f"{self.path}: '__meta__' dtype is {self.meta['dtype']}, expected {dtype}")
        if kind is not None and self.meta.get("kind", kind) != kind:
            raise CacheError(f"{self.path}: '__meta__' kind is {self.meta.get('kind')!r}, expected {kind!r}")
        if layers is not None:
            have = set(self.meta.get("layers") or [])
            missing = [name for name in layers if name not in have]
            if missing:
                raise CacheError(f"{self.path}: no tokens for layer(s) {missing} ('__meta__' lists {sorted(have)})")
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.torch_dtype = _TORCH_DTYPES[self.dtype.name]

    @property
    def env(self) -> lmdb.Environment:
        return _read_env(self.path)

    def __len__(self) -> int:
        return int(self.meta.get("count", 0))

    def record_problem(self, key: str, buf) -> str | None:
        """Why ``buf`` (what ``txn.get`` gave for ``key``) is not a record of this cache, or None: missing,
        or not ``nbytes`` long."""
        if buf is None:
            return f"missing record {key!r}"
        if len(buf) != self.nbytes:
            return f"record {key!r} has {len(buf)} bytes, expected {self.nbytes} ({self.dtype.name} {list(self.shape)})"
        return None

    def _check(self, key: str, buf) -> None:
        problem = self.record_problem(key, buf)
        if problem is not None:
            raise CacheError(f"{self.path}: {problem}")

    def view(self, txn: lmdb.Transaction, key: str) -> np.ndarray:
        """Record ``key`` as a checked array view of the memory map, valid while ``txn`` (opened with
        ``buffers=True`` on ``self.env``) is open."""
        buf = txn.get(key.encode())
        self._check(key, buf)
        return np.frombuffer(buf, dtype=self.dtype).reshape(self.shape)

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """Copy record ``key`` straight from the memory map into ``out`` (one copy, no bytes object)."""
        with self.env.begin(buffers=True) as txn:
            out.numpy()[...] = self.view(txn, key)
        return out

    def get(self, key: str) -> torch.Tensor:
        return self.read_into(key, torch.empty(self.shape, dtype=self.torch_dtype))

    def get_bytes(self, key: str) -> bytes:
        with self.env.begin() as txn:
            buf = txn.get(key.encode())
        self._check(key, buf)
        return buf

    def keys(self) -> list[str]:
        with self.env.begin() as txn:
            return [k.decode() for k in txn.cursor().iternext(values=False) if k != META_KEY]

    def close(self) -> None:
        _close_read_env(self.path)


def load_clip_table(path: str | os.PathLike, num_rows: int | None = None, dim: int | None = None,
                    mmap: bool = False) -> torch.Tensor:
    """The CLIP table [num_classes + 1, 77, dim] from .pt or .safetensors; the last row is the null class.

    ``mmap``: map a .pt file instead of reading it (a check of the shape reads almost nothing).
    """
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"CLIP table {str(path)!r} does not exist (config key 'clip_embeddings_path')")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            try:
                table = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError:  # mmap needs the zip format of torch >= 1.6; read older files whole
                if not mmap:
                    raise
                table = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a file that torch or safetensors cannot parse
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise CacheError(f"{path}: cannot read the CLIP table ({type(err).__name__}: {first}); "
                         f"rebuild it with repa-fast-prepare-clip") from None
    if path.suffix == ".safetensors":
        if len(tensors) != 1:
            raise CacheError(f"{path}: expected one tensor, found keys {sorted(tensors)}")
        table = next(iter(tensors.values()))
    if not isinstance(table, torch.Tensor) or table.ndim != 3:
        raise CacheError(f"{path}: expected a tensor [classes+1, 77, dim], got "
                         f"{list(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__}")
    if num_rows is not None and table.shape[0] != num_rows:
        raise CacheError(f"{path}: table has {table.shape[0]} rows, expected {num_rows} "
                         f"({num_rows - 1} classes and the null class last)")
    if dim is not None and table.shape[-1] != dim:
        raise CacheError(f"{path}: embedding dim is {table.shape[-1]}, the U-Net expects {dim} "
                         f"(its cross_attention_dim; config key 'model')")
    return table


def clip_prompts_path(table_path: str | os.PathLike) -> Path:
    """``<table>.json`` beside a CLIP table: its prompts and source (written by prepare_clip_embeddings)."""
    return Path(str(table_path) + ".json")


def load_clip_prompts(path: str | os.PathLike) -> list[str] | None:
    """The prompt of each CLIP table row, from the ``<table>.json`` that prepare_clip_embeddings writes beside
    it (None without one): labels for plots and sample grids."""
    side = clip_prompts_path(path)
    if not side.is_file():
        return None
    try:
        values = json.loads(side.read_text(encoding="utf-8"))
    except ValueError as err:
        raise CacheError(f"{side}: not valid JSON ({err}); rebuild it with repa-fast-prepare-clip or delete it "
                         f"(the prompts only label plots)") from None
    prompts = values.get("prompts") if isinstance(values, dict) else None
    return prompts if isinstance(prompts, list) else None
