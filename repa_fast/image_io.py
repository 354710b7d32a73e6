"""Image sets on disk: PNG folders and ADM-style ``.npz`` files, written and read without holding a whole set.

An ADM-style npz (guided-diffusion's sample and reference batches) holds ``arr_0``: uint8 [N, H, W, 3]
and, for class-conditional samples, ``arr_1``: int64 [N] labels. ``write_npz`` streams images into the
zip member one at a time and ``iter_npz_images`` reads them back in batches (plain or compressed npz),
so 50,000 images at 512 px (39 GB) never sit in memory at once.

A file that the user gave and that cannot be read (not an image, a truncated npz, no ``arr_0``) is an
``InputError`` or ``MissingFileError`` naming the file; a wrong image handed to ``write_npz`` by the caller
stays a ``ValueError``.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from repa_fast.errors import InputError, MissingFileError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def save_png_atomic(image, path: str | os.PathLike) -> Path:
    """Save a PIL image as PNG through a temporary file, so an interrupted write never leaves a partial PNG."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file as RGB uint8 [H, W, 3]; a file that PIL cannot decode is an ``InputError`` naming it."""
    from PIL import Image

    if not Path(path).is_file():
        raise MissingFileError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as err:  # not an image, or truncated
        raise InputError(f"{path}: not a readable image ({err}); replace or remove it") from None


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files of a folder (not recursive), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"{str(folder)!r} is not a folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def write_npz(path: str | os.PathLike, images: Iterable[np.ndarray], count: int, shape: tuple[int, int, int],
              labels: np.ndarray | None = None) -> Path:
    """Write ``count`` images (each uint8 ``shape`` = (H, W, 3)) as ``arr_0`` [count, H, W, 3] (and ``labels`` as
    ``arr_1``) of an uncompressed npz, one image at a time, through a temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    written = 0
    try:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, {"descr": "|u1", "fortran_order": False,
                                                         "shape": (count, *shape)})
                for image in images:
                    image = np.ascontiguousarray(image, dtype=np.uint8)
                    if image.shape != tuple(shape):
                        raise ValueError(f"{path}: image {written} has shape {list(image.shape)}, "
                                         f"expected {list(shape)}")
                    f.write(image.tobytes())
                    written += 1
            if written != count:
                raise ValueError(f"{path}: {written} images written, {count} announced")
            if labels is not None:
                with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def npz_keys(path: str | os.PathLike) -> list[str]:
    """The array names in an npz; a file that is not one is an ``InputError`` naming it."""
    if not Path(path).is_file():
        raise MissingFileError(f"npz {str(path)!r} does not exist")
    try:
        with np.load(path) as data:
            return list(data.files)
    except (OSError, ValueError, zipfile.BadZipFile) as err:  # numpy reads a non-zip file as a pickle and refuses
        raise InputError(f"{path}: not a readable .npz ({str(err).splitlines()[0][:120]})") from None


def iter_npz_images(path: str | os.PathLike, batch_size: int, key: str = "arr_0") -> tuple[int, Iterator[np.ndarray]]:
    """(N, an iterator of uint8 batches [b, H, W, 3]) over ``key`` of an npz, read sequentially from the zip."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"npz {str(path)!r} does not exist")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise InputError(f"{path}: not a readable .npz ({err})") from None
    member = f"{key}.npy"
    if member not in zf.namelist():
        names = [n.removesuffix(".npy") for n in zf.namelist()]
        zf.close()
        raise InputError(f"{path}: no array {key!r} (holds {names}); expected images in {key!r}")
    f = zf.open(member)
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
    except ValueError as err:  # numpy's own words for a member that is not an .npy array
        f.close()
        zf.close()
        raise InputError(f"{path}: {key} is not a readable array ({err})") from None
    if dtype != np.uint8 or fortran or len(shape) != 4 or shape[-1] != 3:
        f.close()
        zf.close()
        raise InputError(f"{path}: {key} is {dtype} {list(shape)}{' (Fortran order)' if fortran else ''}; "
                         f"expected uint8 images [N, H, W, 3]")
    per_image = int(np.prod(shape[1:]))

    def batches() -> Iterator[np.ndarray]:
        try:
            for start in range(0, shape[0], batch_size):
                b = min(batch_size, shape[0] - start)
                raw = f.read(b * per_image)
                if len(raw) != b * per_image:
                    raise InputError(f"{path}: {key} ends after {start + len(raw) // per_image} of {shape[0]} images")
                yield np.frombuffer(bytearray(raw), dtype=np.uint8).reshape(b, *shape[1:])  # writable
        finally:
            f.close()
            zf.close()

    return shape[0], batches()
