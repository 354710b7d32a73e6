"""The DALI loader: the torch loader's batches, read by DALI worker processes, on the GPU.

``build_dali_loader`` takes ``build_torch_loader``'s arguments and yields the same batch dicts (see
``repa_fast.data.loader``) in the same order: this rank's slice of the epoch's global permutation
(``rank_indices``), the last partial batch included, CFG dropout from (seed, epoch, index). One parallel
``fn.external_source`` callback (``LMDBBatchSource``) reads a whole batch per call in a worker process,
opening the LMDB caches there (never using a handle from the parent) and handing DALI views of the memory
map, which DALI copies once into shared memory. Without a GPU (``device="cpu"``) the pipeline is CPU-only
(``device_id=None``); on ``cuda:N`` latent, tokens and class ids leave the pipeline with ``.gpu()``. The
float outputs are fp16 (DALI has no bf16): ``dtype`` casts the latent on the device after the pipeline.

Shared memory (``/dev/shm``). Workers hand batches to the pipeline through shared-memory chunks, one per
queue slot: ``prefetch`` batches that the pipeline keeps alive plus ``num_workers * prefetch`` batches in
flight (the number a torch DataLoader keeps in flight too). Per rank this is about

    (prefetch + num_workers * prefetch) * batch_size * bytes_per_sample
    bytes_per_sample = 4*64*64*2 (latent) + len(align_layers) * 256*1024*2 (tokens) + 16 (index, class id)
                     = 557,072 B with one align layer

e.g. batch 48, one layer, num_workers 4, prefetch 2: 10 * 48 * 0.557 MB = 267 MB per rank, 2.1 GB for 8
ranks (num_workers 2: 160 MB per rank). The chunks are sized from the real record sizes
(``bytes_per_sample_hint``) and do not grow during the run. Containers need ``--shm-size`` above the sum
over ranks (Docker's default is 64 MB) or ``--ipc=host``. Besides, the pipeline keeps ``prefetch`` finished
batches in its own buffers: GPU memory on a GPU (53 MB at batch 48, one layer), host memory on the CPU,
where the yielded tensors are those buffers (no copy) and stay valid while held. ``num_workers`` and
``prefetch`` are the config keys of those names.

Workers start with ``fork`` unless CUDA is already initialised in this process, then with ``spawn``
(forking a process that holds a CUDA context is unsupported); the callback is picklable for that. A missing
or short record raises ``CacheError`` in the worker; the loader raises it again as a ``CacheError`` naming
the file and key.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline

from repa_fast.data.cache import CacheError, CacheReader, dino_key
from repa_fast.data.dataset import (
    EpochSampler,
    SD15AlignedDataset,
    apply_cfg_dropout,
    rank_indices,
    sample_rows,
)
from repa_fast.data.loader import batch_to

# Shared-memory chunk room beyond the data: DALI pickles ~32 B of metadata per array of a batch (one per
# sample and output) and a task record per batch.
_SHM_META_PER_ARRAY, _SHM_META_PER_BATCH = 64, 4096

_TORCH_OF_DALI = {types.DALIDataType.FLOAT16: torch.float16, types.DALIDataType.FLOAT: torch.float32,
                  types.DALIDataType.INT64: torch.int64}


class LMDBBatchSource:
    """The external-source callback: this rank's batch ``info.iteration`` of epoch ``epoch + info.epoch_idx``.

    Returns ``(index int64 [b], latents, tokens per layer, class_id int64 [b])`` where latents and tokens
    are lists of ``b`` fp16 arrays ``latent_shape`` / ``[N, D]`` (views of the LMDB map) and ``b <=
    batch_size`` (the epoch's last batch may be partial); raises ``StopIteration`` past the end of the
    epoch. ``start`` samples of the slice are skipped in the first epoch only (resume). A pure function of
    its arguments and ``info``, so any worker can compute any batch.
    """

    def __init__(self, ids: list[str], class_ids: np.ndarray, latents: CacheReader, dino: CacheReader,
                 align_layers: list[str], seed: int, cfg_dropout: float, null_class: int, batch_size: int,
                 rank: int = 0, world: int = 1, epoch: int = 0, start: int = 0, shuffle: bool = True,
                 drop_last: bool = False, keep: np.ndarray | None = None):
        self.ids, self.class_ids = ids, np.asarray(class_ids, dtype=np.int64)
        # excluded CSV rows (the dataset's keep mask): the CFG hash and the permutation go by CSV row
        self.keep = keep
        self.rows = sample_rows(len(ids), keep)
        # CacheReaders open their LMDB lazily in the process that reads (a DALI worker) and reopen after a
        # fork; DaliLoader closes them in the parent before the workers start.
        self.latents, self.dino, self.align_layers = latents, dino, list(align_layers)
        self.latent_shape, self.token_shape = tuple(latents.shape), tuple(dino.shape)
        self.seed, self.cfg_dropout, self.null_class = seed, cfg_dropout, null_class
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.epoch, self.start, self.shuffle, self.drop_last = epoch, start, shuffle, drop_last
        self._pid = -1
        self._txns: tuple | None = None  # ((envs), (transactions)): one read transaction per cache
        self._indices: tuple[int, np.ndarray] | None = None  # (epoch_idx, this rank's indices from start)

    @classmethod
    def from_dataset(cls, dataset: SD15AlignedDataset, batch_size: int, **kwargs) -> LMDBBatchSource:
        return cls(dataset.ids, dataset.class_ids, dataset.latents, dataset.dino, dataset.align_layers,
                   dataset.seed, dataset.cfg_dropout, dataset.null_class, batch_size, keep=dataset.keep, **kwargs)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_pid=-1, _txns=None, _indices=None)
        return state

    @property
    def bytes_per_sample(self) -> int:
        """Bytes of one sample's outputs: index + latent + tokens per layer + class id."""
        latent = int(np.prod(self.latent_shape)) * 2
        tokens = int(np.prod(self.token_shape)) * 2
        return 8 + latent + len(self.align_layers) * tokens + 8

    def epoch_indices(self, epoch_idx: int) -> np.ndarray:
        if self._indices is None or self._indices[0] != epoch_idx:
            indices = rank_indices(len(self.ids), self.seed, self.epoch + epoch_idx, self.rank, self.world,
                                   self.shuffle, self.keep)
            self._indices = (epoch_idx, indices[self.start if epoch_idx == 0 else 0:])
        return self._indices[1]

    def _transactions(self) -> tuple:
        """Read transactions on both caches, opened once per process and kept: the caches do not change
        while training reads them, and a record's memory-mapped bytes stay valid while its transaction is
        open, which lets a worker return views of the map (DALI copies them into shared memory after the
        callback returns, in another thread)."""
        envs = (self.latents.env, self.dino.env)  # the readers reopen them in a new process, after close()
        if self._txns is None or self._pid != os.getpid() or self._txns[0] != envs:
            self._txns = (envs, tuple(env.begin(buffers=True) for env in envs))
            self._pid = os.getpid()
        return self._txns[1]


    def __call__(self, info) -> tuple:
        # BatchInfo (batch_info=True); a plain iteration number otherwise
        epoch_idx, iteration = (info.epoch_idx, info.iteration) if hasattr(info, "epoch_idx") else (0, info)
        indices = self.epoch_indices(epoch_idx)
        lo = iteration * self.batch_size
        hi = min(lo + self.batch_size, len(indices))
        if lo >= hi or (self.drop_last and hi - lo < self.batch_size):
            raise StopIteration
        batch = indices[lo:hi]
        latent_txn, dino_txn = self._transactions()
        ids = [self.ids[i] for i in batch]
        # A batch is a list of per-sample arrays: views of the LMDB map, copied once, into shared memory.
        latent = [self.latents.view(latent_txn, sample_id) for sample_id in ids]
        tokens = [[self.dino.view(dino_txn, dino_key(sample_id, layer)) for sample_id in ids]
                  for layer in self.align_layers]
        class_id = apply_cfg_dropout(self.class_ids[batch], self.seed, self.epoch + epoch_idx, self.rows[batch],
                                     self.cfg_dropout, self.null_class)
        return (np.ascontiguousarray(batch, dtype=np.int64), latent, *tokens, class_id.astype(np.int64))

    def close(self) -> None:
        if self._txns is not None and self._pid == os.getpid():
            for txn in self._txns[1]:
                txn.abort()
        self._txns = None


def _close_parent_handles(dataset: SD15AlignedDataset) -> None:
    """Close this process's LMDB handles on the caches before workers fork (they reopen lazily here).

    A forked worker cannot open an environment whose parent handle it still references (py-lmdb: "already
    open in this process"); the cache module drops its own references in a child, but a transaction kept
    by another loader's in-process source would keep one alive.
    """
    dataset.latents.close()
    dataset.dino.close()


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """A dense DALI TensorList as a torch tensor on ``device``: on the CPU the pipeline's own buffer (dlpack,
    no copy; the tensor keeps it alive), on the GPU a copy on torch's current stream."""
    if device.type == "cpu":
        return torch.from_dlpack(tensor_list.as_tensor())
    shape = [len(tensor_list), *tensor_list.shape()[0]] if len(tensor_list) else [0]
    out = torch.empty(shape, dtype=_TORCH_OF_DALI[tensor_list.dtype], device=device)
    # as DALI's own torch plugin does (feed_ndarray); run() returned host-synchronous outputs
    stream = ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)
    tensor_list.copy_to_external(ctypes.c_void_p(out.data_ptr()), stream, non_blocking=True)
    return out


_CACHE_ERROR_LINE = f"{CacheError.__module__}.{CacheError.__qualname__}: "


def _loader_error(err: Exception) -> Exception:
    """The error to raise for a failure inside the pipeline.

    A ``CacheError`` from the callback in this process arrives as itself. From a worker, DALI re-raises
    ``Exception(traceback text)`` (its unpickler admits no user classes), so the ``CacheError`` line of
    that text, which names the file and key, is raised as a ``CacheError`` again.
    """
    seen, cause = set(), err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, CacheError):
            return cause
        seen.add(id(cause))
        for line in reversed(str(cause).splitlines()):
            if line.startswith(_CACHE_ERROR_LINE):
                return CacheError(f"{line[len(_CACHE_ERROR_LINE):]} (raised in a DALI worker)")
        cause = cause.__cause__ or cause.__context__
    return err


class DaliLoader:
    """Iterates one epoch of this rank's slice per ``for`` loop, like the torch loader; ``set_epoch``.

    The pipeline (and its worker processes) lives across epochs: after a complete epoch it is already
    positioned at the next one, so ``set_epoch(epoch + 1)`` costs nothing. Any other position (another
    epoch, a ``start``, an epoch left unfinished) rebuilds it.
    """

    def __init__(self, dataset: SD15AlignedDataset, batch_size: int, rank: int = 0, world: int = 1,
                 epoch: int = 0, start: int = 0, num_workers: int = 2, shuffle: bool = True,
                 drop_last: bool = False, prefetch: int = 2, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, start_method: str | None = None):
        if batch_size <= 0 or prefetch <= 0 or num_workers < 0:
            raise ValueError(f"batch_size ({batch_size}) and prefetch ({prefetch}) must be positive and "
                             f"num_workers ({num_workers}) >= 0")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.dataset, self.batch_size, self.rank, self.world = dataset, batch_size, rank, world
        self.epoch, self.start, self.shuffle, self.drop_last = epoch, start, shuffle, drop_last
        self.num_workers, self.prefetch = num_workers, prefetch
        self.device, self.dtype = torch.device(device), dtype
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device {device!r}: the DALI loader runs on 'cpu' or 'cuda[:N]'")
        self.start_method = start_method
        self._pipe: Pipeline | None = None
        self._pipe_at: tuple[int, int] | None = None  # (epoch, start) that the pipeline yields next
        self._source: LMDBBatchSource | None = None

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        samples = len(EpochSampler(len(self.dataset), rank=self.rank, world=self.world, start=self.start))
        return samples // self.batch_size if self.drop_last else -(-samples // self.batch_size)

    def _make_source(self, epoch: int, start: int) -> LMDBBatchSource:
        return LMDBBatchSource.from_dataset(self.dataset, self.batch_size, rank=self.rank, world=self.world,
                                            epoch=epoch, start=start, shuffle=self.shuffle,
                                            drop_last=self.drop_last)

    def _build(self, epoch: int, start: int) -> Pipeline:
        self.close()
        source = self._make_source(epoch, start)
        parallel = self.num_workers > 0
        on_gpu = self.device.type == "cuda"
        device_id = None
        if on_gpu:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        method = self.start_method or ("spawn" if torch.cuda.is_initialized() else "fork")
        pipe = Pipeline(batch_size=self.batch_size, num_threads=1, device_id=device_id,
                        prefetch_queue_depth=self.prefetch, py_num_workers=max(1, self.num_workers),
                        py_start_method=method, exec_dynamic=True)  # outputs stay valid while held
        layers = self.dataset.align_layers
        extra = {}
        if parallel:
            meta = _SHM_META_PER_ARRAY * (3 + len(layers)) + -(-_SHM_META_PER_BATCH // self.batch_size)
            extra = {"parallel": True, "prefetch_queue_depth": self.num_workers * self.prefetch,
                     "bytes_per_sample_hint": source.bytes_per_sample + meta}
        with pipe:
            outputs = fn.external_source(
                source=source, num_outputs=3 + len(layers), batch=True, batch_info=True,
                dtype=[types.INT64, types.FLOAT16, *[types.FLOAT16] * len(layers), types.INT64],
                ndim=[0, len(source.latent_shape), *[len(source.token_shape)] * len(layers), 0],
                **extra)
            # A parallel source's outputs may alias the workers' shared-memory chunks (no_copy), which are
            # reused after `prefetch` batches. A copy into DALI's own reference-counted buffers (host, or
            # .gpu()), made by the pipeline ahead of the consumer, lets torch take the host ones without a
            # copy (dlpack) and keep them. The index stays on the host: it becomes the id strings.
            index, *rest = outputs
            move = (lambda out: out.gpu()) if on_gpu else fn.copy
            pipe.set_outputs(fn.copy(index), *(move(out) for out in rest))
        if parallel:
            _close_parent_handles(self.dataset)  # workers fork in build()
        pipe.build()  # forks or spawns the workers now
        self._pipe, self._pipe_at, self._source = pipe, (epoch, start), source
        return pipe

    def _batch(self, outputs) -> dict:
        index = _to_torch(outputs[0], torch.device("cpu"))
        layers = self.dataset.align_layers
        batch = {
            "id": [self.dataset.ids[i] for i in index.tolist()],
            "index": index,
            "latent": _to_torch(outputs[1], self.device),
            "dino_tokens": {layer: _to_torch(out, self.device)
                            for layer, out in zip(layers, outputs[2:-1], strict=True)},
            "class_id": _to_torch(outputs[-1], self.device),
        }
        return batch if self.dtype is None else batch_to(batch, self.device, self.dtype)

    def __iter__(self) -> Iterator[dict]:
        epoch, start = self.epoch, self.start
        pipe = self._pipe if self._pipe_at == (epoch, start) else self._build(epoch, start)
        self._pipe_at = None  # mid-epoch until the loop below finishes
        while True:
            try:
                outputs = pipe.run()
            except StopIteration:
                break
            except Exception as err:
                self.close()
                error = _loader_error(err)
                if error is err:
                    raise
                raise error from err
            yield self._batch(outputs)
        pipe.reset()
        self._pipe_at = (epoch + 1, 0)

    def shm_statistics(self) -> dict:
        """DALI's ``external_source_shm_statistics`` of the running pipeline (shared-memory chunk sizes)."""
        return self._pipe.external_source_shm_statistics() if self._pipe is not None else {}

    def close(self) -> None:
        """Stop the worker processes and free the shared memory."""
        pipe, self._pipe, self._pipe_at = getattr(self, "_pipe", None), None, None
        if getattr(self, "_source", None) is not None:  # its transactions, if it ran here (num_workers=0)
            self._source.close()
            self._source = None
        if pipe is not None:
            pipe._shutdown()  # stop the executor before the workers and their shared memory go
            if pipe._py_pool is not None:
                pipe._py_pool.close()  # now, not when the pipeline is garbage-collected

    def __del__(self) -> None:
        self.close()


def build_dali_loader(dataset: SD15AlignedDataset, batch_size: int, rank: int = 0, world: int = 1,
                      epoch: int = 0, start: int = 0, num_workers: int = 2, shuffle: bool = True,
                      drop_last: bool = False, prefetch: int = 2, device: torch.device | str = "cpu",
                      dtype: torch.dtype | None = None, start_method: str | None = None) -> DaliLoader:
    """A DALI loader over this rank's slice of epoch ``epoch``, from sample ``start`` of that slice.

    The arguments are ``build_torch_loader``'s (``pin_memory`` aside) plus ``device`` (``cpu`` or
    ``cuda:N``), ``dtype`` for the latent on that device, and the workers' ``start_method``
    (``fork`` | ``spawn``; default: ``spawn`` once CUDA is initialised). ``num_workers=0`` runs the
    callback in this process.
    """
    return DaliLoader(dataset, batch_size, rank, world, epoch, start, num_workers, shuffle, drop_last,
                      prefetch, device, dtype, start_method)
