"""What the image encoders share: rows of the subset CSV -> images -> records in an LMDB cache.

- Rows: ``id`` and ``img_path`` of the subset CSV; a relative ``img_path`` is resolved against
  ``--image-root`` (default: the CSV's folder).
- Shards: ``--shard i/n`` takes rows ``i::n`` of the CSV (before anything is skipped), so the shards
  partition the rows whatever is already done. Shards may write into one LMDB at once: its map is
  sized for the whole CSV up front, so no process has to grow it under the others.
- Resume: a row whose records are all in the cache is skipped before its image is opened.
- Images: the centre square of the image at full resolution, then one bicubic resize to
  ``size x size`` (RGB, uint8). The VAE and DINO see the same square at their own sizes, so DINO token
  (i, j) and latent patch (i, j) cover the same pixels.
- An unreadable image is reported by its path and skipped (counted at the end), or fatal with ``--strict``.
- A record that is not finite (NaN or inf, e.g. a VAE overflowing fp16: ``--dtype float32`` avoids it) is
  never written: checked after the cast to the cache's fp16, reported by its image path, counted at the
  end, skipped (encoded again by the next run, as it is not in the cache) or fatal with ``--strict``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from repa_fast.data.cache import CacheError, CacheWriter
from repa_fast.data.dataset import read_csv_rows
from repa_fast.errors import InputError, NonFiniteError, RunError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UnreadableImageError(RunError, RuntimeError):
    """An image of the CSV cannot be decoded (``--strict``)."""


def read_image_rows(csv_path: str | os.PathLike, image_root: str | os.PathLike | None = None
                    ) -> list[tuple[str, str]]:
    """``(id, image path)`` per row of the subset CSV, paths resolved against ``image_root``."""
    csv_path = Path(csv_path)
    root = Path(image_root) if image_root is not None else csv_path.parent
    rows, seen = [], {}
    for line, row in read_csv_rows(csv_path, ("id", "img_path")):
        sample_id = row["id"]
        if sample_id in seen:
            raise InputError(f"{csv_path}:{line}: id {sample_id!r} repeats line {seen[sample_id]}")
        seen[sample_id] = line
        rows.append((sample_id, str(root / row["img_path"])))  # an absolute img_path ignores root
    return rows


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must be i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= i < n")
    return index, count


def center_square(image: Image.Image, size: int) -> torch.Tensor:
    """The centre square of ``image`` resized to ``size`` (bicubic): uint8 [3, size, size]."""
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)))


class ImageRows(Dataset):
    """Item i: ``(i, uint8 [3, size, size], None)``, or ``(i, None, error)`` when the image cannot be read."""

    def __init__(self, rows: Sequence[tuple[str, str]], size: int):
        self.rows, self.size = rows, size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        try:
            with Image.open(self.rows[i][1]) as image:
                return i, center_square(image, self.size), None
        except Exception as err:  # any decoder failure (PIL raises OSError, ValueError, SyntaxError, ...)
            return i, None, f"{type(err).__name__}: {err}"


def _collate(items):
    ok = [(i, pixels) for i, pixels, _ in items if pixels is not None]
    failed = [(i, error) for i, _, error in items if error is not None]
    pixels = torch.stack([p for _, p in ok]) if ok else None
    return [i for i, _ in ok], pixels, failed


def add_image_arguments(p: argparse.ArgumentParser, size: int, batch_size: int) -> None:
    """The options both encoders take."""
    p.add_argument("--csv-path", "--csv_path", required=True, help="subset CSV (columns id, img_path)")
    p.add_argument("--output-dir", "--output_dir", required=True, help="the LMDB cache folder")
    p.add_argument("--image-root", "--image_root", default=None,
                   help="folder that relative img_path values start from (default: the CSV's folder)")
    p.add_argument("--size", type=int, default=size, help=f"image side in pixels (default {size})")
    p.add_argument("--batch-size", "--batch_size", type=int, default=batch_size)
    p.add_argument("--num-workers", "--num_workers", type=int, default=4, help="image-decoding processes")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the model's compute dtype")
    p.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="I/N", help="take rows I::N of the CSV")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image")


def resolve_device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def open_writer(output_dir, shape, kind: str, num_records: int, layers: list[str] | None = None,
                meta: dict | None = None, must_match: Sequence[str] = ()) -> CacheWriter:
    """A CacheWriter whose map already fits ``num_records`` records (so that shards writing at once
    need not grow it); an existing cache must agree with ``meta`` on the keys ``must_match``."""
    nbytes = int(np.prod(shape)) * 2  # fp16
    page = 4096
    map_size = max(1 << 30, int(num_records * (-(-(nbytes + 16) // page) * page) * 1.25) + (64 << 20))
    writer = CacheWriter(output_dir, shape, "float16", kind=kind, layers=layers, map_size=map_size,
                         extra_meta=meta)
    old = writer.read_meta()  # the meta of an earlier run, if one closed this cache
    if old is not None:
        for key in must_match:
            if key in old and old[key] != (meta or {}).get(key):
                writer.env.close()
                raise CacheError(f"{writer.path}: the existing cache was made with {key}={old[key]!r}, this run "
                                 f"has {key}={(meta or {}).get(key)!r}; use another --output-dir")
        # Keep the layers an earlier run wrote: the meta must not forget records that exist.
        writer.layers += [name for name in old.get("layers") or [] if name not in writer.layers]
    return writer


def encode_rows(rows: Sequence[tuple[str, str]], writer: CacheWriter, keys_of: Callable[[str], list[str]],
                encode: Callable[[torch.Tensor, list[str]], torch.Tensor], size: int, batch_size: int,
                num_workers: int, strict: bool, desc: str, pin_memory: bool = False) -> dict:
    """Encode the rows not yet in ``writer``: ``encode(uint8 [B,3,size,size], ids) -> [B, *shape]``,
    each output stored under every key of ``keys_of(id)``. Returns the counts."""
    todo = [row for row in rows if not all(writer.has(key) for key in keys_of(row[0]))]
    loader = DataLoader(ImageRows(todo, size), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate, pin_memory=pin_memory)
    encoded, unreadable, non_finite = 0, [], []
    with tqdm(total=len(todo), desc=desc, unit="img") as bar:
        for indices, pixels, failed in loader:
            for i, error in failed:
                sample_id, path = todo[i]
                message = f"unreadable image {path} (id {sample_id!r}): {error}"
                if strict:
                    raise UnreadableImageError(message)
                tqdm.write(f"skipped {message}", file=sys.stderr)
                unreadable.append(path)
            if pixels is not None:
                ids = [todo[i][0] for i in indices]
                with torch.inference_mode():
                    records = encode(pixels, ids).to(torch.float16).cpu()
                bad = (~torch.isfinite(records)).flatten(1).sum(1).tolist()  # after the cast: fp16 overflow too
                for i, sample_id, record, nbad in zip(indices, ids, records, bad, strict=True):
                    if nbad:
                        path = todo[i][1]
                        message = (f"non-finite record for image {path} (id {sample_id!r}): {nbad} of "
                                   f"{record.numel()} values are NaN or inf in fp16")
                        if strict:
                            raise NonFiniteError(f"{message}; not written (--dtype float32 may avoid it)")
                        tqdm.write(f"skipped {message}", file=sys.stderr)
                        non_finite.append(path)
                        continue
                    for key in keys_of(sample_id):
                        writer.put(key, record)
                    encoded += 1
            bar.update(len(indices) + len(failed))
    stats = {"rows": len(rows), "encoded": encoded, "already_done": len(rows) - len(todo), "unreadable": unreadable,
             "non_finite": non_finite}
    print(f"{desc}: encoded {encoded}, already done {stats['already_done']}, unreadable {len(unreadable)}, "
          f"non-finite {len(non_finite)} (of {len(rows)} rows) -> {writer.path}")
    if unreadable:
        print(f"{desc}: the {len(unreadable)} unreadable image(s) have no record; drop their rows from the CSV "
              f"or replace the files and run again", file=sys.stderr)
    if non_finite:
        print(f"{desc}: the {len(non_finite)} image(s) with a non-finite record have no record; run again with "
              f"--dtype float32, or drop their rows from the CSV", file=sys.stderr)
    return stats
