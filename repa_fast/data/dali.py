"""The DALI loader: the torch loader's batches, read by DALI worker processes, on the GPU.

``build_dali_loader`` takes ``build_torch_loader``'s arguments and yields the same batch dicts (see
``repa_fast.data.loader``) in the same order: this rank's slice of the epoch's global permutation
(``rank_indices``), the last partial batch included, CFG dropout from (seed, epoch, index). One parallel
``fn.external_source`` callback (``LMDBBatchSource``) reads a whole batch per call in a worker process;
it opens the LMDB caches lazily in that process. Without a GPU (``device="cpu"``) the pipeline is CPU-only
(``device_id=None``); on ``cuda:N`` the latent, tokens and class ids leave the pipeline with ``.gpu()``.
The float outputs are fp16 (DALI has no bf16): ``dtype`` casts them on the device after the pipeline.

Shared memory (``/dev/shm``). Workers hand batches to the pipeline through shared-memory chunks, one per
queue slot: ``prefetch`` slots that the pipeline keeps alive plus ``num_workers * prefetch`` batches in
flight (the same number a torch DataLoader keeps). Per rank this is about

    (prefetch + num_workers * prefetch) * batch_size * bytes_per_sample,
    bytes_per_sample = 4*64*64*2 (latent) + len(align_layers) * 256*1024*2 (tokens) + 16 = 557,072 B (one layer)

e.g. batch 48, one layer, num_workers 4, prefetch 2: 10 * 48 * 0.557 MB = 267 MB per rank, 2.1 GB for 8
ranks. The chunks are sized from the real record sizes (``bytes_per_sample_hint``), so they are not
regrown during the run. Containers need ``--shm-size`` above that (Docker's default is 64 MB) or
``--ipc=host``. ``num_workers`` and ``prefetch`` are the config keys of the same names.

Workers start with ``fork`` unless CUDA is already initialised in this process, then with ``spawn``
(forking a process that holds a CUDA context is unsupported); the callback is picklable for that.
A missing or short record raises ``CacheError`` in the worker; the loader re-raises it as a ``CacheError``
that names the file and key.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from collections.abc import Iterator

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline

from repa_fast.data.cache import CacheError, CacheReader, dino_key
from repa_fast.data.dataset import EpochSampler, SD15AlignedDataset, apply_cfg_dropout, rank_indices
from repa_fast.data.loader import batch_to

# Pickled metadata and 128-byte alignment of each output array in a worker's shared-memory chunk.
_SHM_SLACK_PER_BATCH = 16 * 1024

_TORCH_OF_DALI = {types.DALIDataType.FLOAT16: torch.float16, types.DALIDataType.FLOAT: torch.float32,
                  types.DALIDataType.INT64: torch.int64}


class LMDBBatchSource:
    """The external-source callback: this rank's batch ``info.iteration`` of epoch ``epoch + info.epoch_idx``.

    Returns ``(index int64 [b], latent fp16 [b, *latent_shape], tokens fp16 [b, N, D] per layer,
    class_id int64 [b])`` with ``b <= batch_size`` (the epoch's last batch may be partial) and raises
    ``StopIteration`` past the end of the epoch. ``start`` samples of the slice are skipped in the first
    epoch only (resume). A pure function of its arguments, so any worker can compute any batch.
    """

    def __init__(self, ids: list[str], class_ids: np.ndarray, latents: CacheReader, dino: CacheReader,
                 align_layers: list[str], seed: int, cfg_dropout: float, null_class: int, batch_size: int,
                 rank: int = 0, world: int = 1, epoch: int = 0, start: int = 0, shuffle: bool = True,
                 drop_last: bool = False):
        self.ids, self.class_ids = ids, np.asarray(class_ids, dtype=np.int64)
        # CacheReaders open their LMDB lazily in the process that reads (a DALI worker) and reopen after a
        # fork; DaliLoader closes them in the parent before the workers start.
        self.latents, self.dino, self.align_layers = latents, dino, list(align_layers)
        self.latent_shape, self.token_shape = tuple(latents.shape), tuple(dino.shape)
        self.seed, self.cfg_dropout, self.null_class = seed, cfg_dropout, null_class
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.epoch, self.start, self.shuffle, self.drop_last = epoch, start, shuffle, drop_last
        self._pid = -1
        self._indices: tuple[int, np.ndarray] | None = None  # (epoch_idx, this rank's indices from start)
        self._free: list[tuple[np.ndarray, ...]] = []
        self._lent: list[tuple[tuple[np.ndarray, ...], list[weakref.ref]]] = []

    @classmethod
    def from_dataset(cls, dataset: SD15AlignedDataset, batch_size: int, **kwargs) -> LMDBBatchSource:
        return cls(dataset.ids, dataset.class_ids, dataset.latents, dataset.dino, dataset.align_layers,
                   dataset.seed, dataset.cfg_dropout, dataset.null_class, batch_size, **kwargs)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_pid=-1, _indices=None, _free=[], _lent=[])
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
                                   self.shuffle)
            self._indices = (epoch_idx, indices[self.start if epoch_idx == 0 else 0:])
        return self._indices[1]

    def _buffers(self) -> tuple[np.ndarray, ...]:
        """Batch arrays to fill. DALI serialises a returned batch in a worker thread after the callback
        returns, so a buffer is reused only once the views handed out from it have been released."""
        still_lent = []
        for bufs, views in self._lent:
            (still_lent if any(view() is not None for view in views) else self._free).append((bufs, views))
        self._lent = still_lent
        if self._free:
            return self._free.pop()[0]
        b = self.batch_size
        return (np.empty((b, *self.latent_shape), np.float16),
                *(np.empty((b, *self.token_shape), np.float16) for _ in self.align_layers))

    def __call__(self, info) -> tuple[np.ndarray, ...]:
        epoch_idx, iteration = (info.epoch_idx, info.iteration) if hasattr(info, "epoch_idx") else (0, int(info))
        indices = self.epoch_indices(epoch_idx)
        lo = iteration * self.batch_size
        hi = min(lo + self.batch_size, len(indices))
        if lo >= hi or (self.drop_last and hi - lo < self.batch_size):
            raise StopIteration
        batch = indices[lo:hi]
        if self._pid != os.getpid():  # buffers are per process
            self._pid, self._free, self._lent = os.getpid(), [], []
        bufs = self._buffers()
        views = tuple(buf[: len(batch)] for buf in bufs)
        latent, tokens = views[0], views[1:]
        for j, index in enumerate(batch):
            sample_id = self.ids[index]
            self.latents.read_into(sample_id, torch.from_numpy(latent[j]))
            for layer, out in zip(self.align_layers, tokens, strict=True):
                self.dino.read_into(dino_key(sample_id, layer), torch.from_numpy(out[j]))
        self._lent.append((bufs, [weakref.ref(view) for view in views]))
        class_id = apply_cfg_dropout(self.class_ids[batch], self.seed, self.epoch + epoch_idx, batch,
                                     self.cfg_dropout, self.null_class)
        return (np.ascontiguousarray(batch, dtype=np.int64), *views, class_id.astype(np.int64))


def _close_parent_envs(dataset: SD15AlignedDataset) -> None:
    """Close the dataset's LMDB handles in this process before workers fork (they reopen lazily here).

    py-lmdb >= 3 refuses to open an environment that is "already open in this process", and a forked
    child inherits the parent's registry of open environments, so a worker could not open the caches.
    """
    dataset.latents.close()
    dataset.dino.close()


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """Copy a dense DALI TensorList (CPU or GPU) into a new torch tensor on ``device``."""
    shape = [len(tensor_list), *tensor_list.shape()[0]] if len(tensor_list) else [0]
    out = torch.empty(shape, dtype=_TORCH_OF_DALI[tensor_list.dtype], device=device)
    pointer = ctypes.c_void_p(out.data_ptr())
    if device.type == "cuda":
        stream = ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)
        tensor_list.copy_to_external(pointer, stream, non_blocking=True)
    else:
        tensor_list.copy_to_external(pointer)
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

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        samples = len(EpochSampler(len(self.dataset), rank=self.rank, world=self.world, start=self.start))
        return samples // self.batch_size if self.drop_last else -(-samples // self.batch_size)

    def _source(self, epoch: int, start: int) -> LMDBBatchSource:
        return LMDBBatchSource.from_dataset(self.dataset, self.batch_size, rank=self.rank, world=self.world,
                                            epoch=epoch, start=start, shuffle=self.shuffle,
                                            drop_last=self.drop_last)

    def _build(self, epoch: int, start: int) -> Pipeline:
        self.close()
        source = self._source(epoch, start)
        parallel = self.num_workers > 0
        on_gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if on_gpu else None
        method = self.start_method or ("spawn" if torch.cuda.is_initialized() else "fork")
        pipe = Pipeline(batch_size=self.batch_size, num_threads=1, device_id=device_id,
                        prefetch_queue_depth=self.prefetch, py_num_workers=max(1, self.num_workers),
                        py_start_method=method)
        layers = self.dataset.align_layers
        extra = {}
        if parallel:
            extra = {"parallel": True, "prefetch_queue_depth": self.num_workers * self.prefetch,
                     "bytes_per_sample_hint": source.bytes_per_sample
                     + -(-_SHM_SLACK_PER_BATCH // self.batch_size)}
        with pipe:
            outputs = fn.external_source(
                source=source, num_outputs=3 + len(layers), batch=True, batch_info=True,
                dtype=[types.INT64, types.FLOAT16, *[types.FLOAT16] * len(layers), types.INT64],
                ndim=[0, len(source.latent_shape), *[len(source.token_shape)] * len(layers), 0],
                **extra)
            if on_gpu:  # the index stays on the host: it becomes the id strings
                outputs = [outputs[0], *(out.gpu() for out in outputs[1:])]
            pipe.set_outputs(*outputs)
        if parallel:
            _close_parent_envs(self.dataset)
        pipe.build()  # forks or spawns the workers now
        self._pipe, self._pipe_at = pipe, (epoch, start)
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
        pipe, self._pipe, self._pipe_at = self._pipe, None, None
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

    The arguments are ``build_torch_loader``'s (``pin_memory`` aside) plus ``device`` (``cpu`` or ``cuda:N``),
    ``dtype`` for latent and tokens on that device, and the workers' ``start_method`` (``fork`` | ``spawn``;
    default: ``spawn`` once CUDA is initialised). ``num_workers=0`` runs the callback in this process.
    """
    return DaliLoader(dataset, batch_size, rank, world, epoch, start, num_workers, shuffle, drop_last, prefetch,
                      device, dtype, start_method)
