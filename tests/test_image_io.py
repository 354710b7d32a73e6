"""ADM-style npz files written and read one image at a time; PNG folders."""

import zipfile

import numpy as np
import pytest
from PIL import Image

from repa_fast.errors import InputError, MissingFileError
from repa_fast.image_io import image_files, iter_npz_images, npz_keys, read_rgb, save_png_atomic, write_npz


def test_npz_round_trip_plain_and_compressed(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    path = write_npz(tmp_path / "s.npz", iter(images), 7, (5, 4, 3), labels=np.arange(7) % 3)
    with np.load(path) as data:  # numpy reads what was streamed
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["arr_1"], np.arange(7) % 3)
    count, batches = iter_npz_images(path, 3)
    assert count == 7
    got = list(batches)
    assert [len(b) for b in got] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(got), images)
    np.savez_compressed(tmp_path / "c.npz", arr_0=images)
    np.testing.assert_array_equal(np.concatenate(list(iter_npz_images(tmp_path / "c.npz", 4)[1])), images)


def test_bad_npz_input_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"image 1 has shape \[5, 5, 3\], expected \[5, 4, 3\]"):
        write_npz(tmp_path / "s.npz", [np.zeros((5, 4, 3), np.uint8), np.zeros((5, 5, 3), np.uint8)], 2, (5, 4, 3))
    with pytest.raises(ValueError, match="1 images written, 2 announced"):
        write_npz(tmp_path / "s.npz", [np.zeros((5, 4, 3), np.uint8)], 2, (5, 4, 3))
    assert not list(tmp_path.iterdir())  # no partial file left
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32), other=np.zeros(2))
    with pytest.raises(ValueError, match=r"arr_0 is float32 \[2, 4, 4, 3\]; expected uint8"):
        iter_npz_images(tmp_path / "f.npz", 2)
    with pytest.raises(InputError, match=r"no array 'arr_9' \(holds \['arr_0', 'other'\]\)"):
        iter_npz_images(tmp_path / "f.npz", 2, key="arr_9")
    (tmp_path / "text.npz").write_text("not a zip")
    for read in (npz_keys, lambda path: iter_npz_images(path, 2)):
        with pytest.raises(InputError, match="text.npz: not a readable .npz"):
            read(tmp_path / "text.npz")
        with pytest.raises(MissingFileError, match="'.*none.npz' does not exist"):
            read(tmp_path / "none.npz")
    np.savez(tmp_path / "short.npz", arr_0=np.zeros((3, 4, 4, 3), np.uint8))
    with zipfile.ZipFile(tmp_path / "short.npz") as zf:
        raw = zf.read("arr_0.npy")
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as zf:  # the header announces 3 images, the data holds 1.5
        zf.writestr("arr_0.npy", raw[:len(raw) - 72])
    count, batches = iter_npz_images(tmp_path / "short.npz", 1)
    with pytest.raises(InputError, match="short.npz: arr_0 ends after 1 of 3 images"):
        list(batches)


def test_png_folder(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"")
    save_png_atomic(Image.new("RGB", (3, 2)), tmp_path / "b.png")
    assert [p.name for p in image_files(tmp_path)] == ["a.jpg", "b.png"]
    assert not list(tmp_path.glob(".b.png.tmp"))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        image_files(tmp_path / "nowhere")
    with pytest.raises(InputError, match="a.jpg: not a readable image"):
        read_rgb(tmp_path / "a.jpg")  # the empty file
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    save_png_atomic(Image.fromarray(noise), tmp_path / "n.png")
    (tmp_path / "n.png").write_bytes((tmp_path / "n.png").read_bytes()[:1000])  # truncated
    with pytest.raises(InputError, match="n.png: not a readable image"):
        read_rgb(tmp_path / "n.png")
    with pytest.raises(MissingFileError, match="c.png' does not exist"):
        read_rgb(tmp_path / "c.png")
