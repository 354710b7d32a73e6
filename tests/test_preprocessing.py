"""The preprocessing tools end to end, with tiny random models saved to tmp folders (no downloads)."""

from __future__ import annotations

import csv
import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from repa_fast.data.cache import CacheError, CacheReader, dino_key, load_clip_table
from repa_fast.data.dataset import SD15AlignedDataset, build_torch_loader
from repa_fast.preprocessing import build_dino_cache as dino_tool
from repa_fast.preprocessing import encode_vae_latents as vae_tool
from repa_fast.preprocessing import prepare_clip_embeddings as clip_tool
from repa_fast.preprocessing import sample_subset as subset_tool
from repa_fast.preprocessing.image_cache import UnreadableImageError

# Class 0 of the index sorts after class 1, so index order and sorted order differ.
CLASS_A, CLASS_B = "n02000000", "n01000000"
VAE_SIZE = 64  # the tiny VAE has 4 blocks: latents [4, 8, 8]
LATENT_SHAPE = (4, 8, 8)
TOKEN_SHAPE = (256, 32)  # 224 px / patch 14 = 16x16 tokens, hidden 32
LAYERS = ["mid", "enc_last"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two cores shared with other jobs: OpenMP threads spinning against them make these tiny
    # convolutions ~50x slower than one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _save(array: np.ndarray, path: Path) -> np.ndarray:
    Image.fromarray(array).save(path)
    return array


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Images, a class index and tiny models saved as SD / DINOv2 folders."""
    root = tmp_path_factory.mktemp("prep")
    rng = np.random.default_rng(0)
    train = root / "train"
    (train / CLASS_A).mkdir(parents=True)
    (train / CLASS_B).mkdir(parents=True)
    # Class A: five JPEG/PNG images of varied sizes and modes (3 are sampled) and a file that is not an image.
    for k, (w, h, channels) in enumerate([(80, 60, 3), (60, 90, 1), (120, 100, 4), (70, 70, 3), (100, 64, 3)]):
        arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8).squeeze(-1) if channels == 1 else \
            rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        _save(arr, train / CLASS_A / f"{CLASS_A}_{k}.{'png' if channels == 4 else 'JPEG'}")
    (train / CLASS_A / "notes.txt").write_text("not an image")
    # Class B: lossless images whose encoder input is known exactly.
    pixels = {
        "sq64": _save(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), train / CLASS_B / f"{CLASS_B}_sq64.png"),
        "wide": _save(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), train / CLASS_B / f"{CLASS_B}_wide.png"),
        "sq224": _save(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8), train / CLASS_B / f"{CLASS_B}_sq224.png"),
    }
    index = root / "class_index.json"
    index.write_text(json.dumps({"0": [CLASS_A, "tiger_cat"], "1": [CLASS_B, "tench"]}))

    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    sd = root / "sd"
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                  sample_size=VAE_SIZE).save_pretrained(sd / "vae")
    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({f"{c}</w>": 26 + i for i, c in enumerate(string.ascii_lowercase)})
    vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
    (sd / "tokenizer").mkdir()
    (sd / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (sd / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    CLIPTextModel(CLIPTextConfig(vocab_size=54, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=77, bos_token_id=52,
                                 eos_token_id=53, pad_token_id=53)).save_pretrained(sd / "text_encoder")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                             patch_size=14, image_size=224)).save_pretrained(root / "dino")
    return {"root": root, "train": train, "index": index, "sd": sd, "dino": root / "dino", "pixels": pixels}


def _vae(csv_path, out, *extra, vae=None, data=None, batch=4, workers=0) -> dict:
    argv = ["--csv-path", str(csv_path), "--vae", str(vae or data["sd"]), "--output-dir", str(out),
            "--size", str(VAE_SIZE), "--batch-size", str(batch), "--num-workers", str(workers), "--device", "cpu",
            *extra]
    return vae_tool.encode_vae_latents(vae_tool.build_parser().parse_args(argv))


def _dino(csv_path, out, *extra, dino=None, data=None, batch=4, workers=0, layers="mid,enc_last") -> dict:
    argv = ["--csv-path", str(csv_path), "--dino", str(dino or data["dino"]), "--output-dir", str(out),
            "--layers", layers, "--batch-size", str(batch), "--num-workers", str(workers), "--device", "cpu", *extra]
    return dino_tool.build_dino_cache(dino_tool.build_parser().parse_args(argv))


TOOLS = {"vae": _vae, "dino": _dino}


@pytest.fixture(scope="module")
def built(data):
    """The four tools run through their main(), in pipeline order."""
    root = data["root"]
    out = {"csv": root / "train.csv", "latents": root / "latents", "dino": root / "dino_tokens",
           "clip": root / "clip.pt"}
    subset_tool.main(["--imagenet-dir", str(data["train"]), "--samples-per-class", "3", "--class-index",
                      str(data["index"]), "--output-csv", str(out["csv"]), "--seed", "7"])
    vae_tool.main(["--csv-path", str(out["csv"]), "--vae", str(data["sd"]), "--output-dir", str(out["latents"]),
                   "--size", str(VAE_SIZE), "--batch-size", "4", "--num-workers", "0", "--device", "cpu"])
    dino_tool.main(["--csv-path", str(out["csv"]), "--dino", str(data["dino"]), "--output-dir", str(out["dino"]),
                    "--layers", ",".join(LAYERS), "--batch-size", "4", "--num-workers", "0", "--device", "cpu"])
    clip_tool.main(["--class-names", str(data["index"]), "--clip", str(data["sd"]), "--output-path",
                    str(out["clip"]), "--device", "cpu"])
    return out


def _rows(csv_path) -> list[dict]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _records(path) -> dict[str, bytes]:
    reader = CacheReader(path)
    try:
        keys = reader.keys()
        return {key: reader.get_bytes(key) for key in keys}
    finally:
        reader.close()


def _write_csv(path, rows) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "img_path", "class_id", "synset"])
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


# ---------------------------------------------------------------------------------------------- subset


def test_sample_subset_csv(data, built, tmp_path):
    rows = _rows(built["csv"])
    assert list(rows[0]) == ["id", "img_path", "class_id", "synset"]
    assert len(rows) == 6
    for row in rows:
        path = Path(row["img_path"])
        assert path.is_absolute() and path.is_file()
        assert row["id"] == path.stem and path.parent.name == row["synset"]
        assert int(row["class_id"]) == {CLASS_A: 0, CLASS_B: 1}[row["synset"]]  # index order, not sorted
    class_b = sorted(r["id"] for r in rows if r["synset"] == CLASS_B)
    assert class_b == [f"{CLASS_B}_{k}" for k in ("sq224", "sq64", "wide")]
    assert sum(r["synset"] == CLASS_A for r in rows) == 3
    assert len({r["id"] for r in rows}) == 6

    # Seeded: the same CSV again, also from a list-of-synsets index; without an index, sorted synsets.
    again, as_list, unsorted = tmp_path / "again.csv", tmp_path / "list.csv", tmp_path / "sorted.csv"
    synset_list = tmp_path / "synsets.json"
    synset_list.write_text(json.dumps([CLASS_A, CLASS_B]))
    for out, index in ((again, data["index"]), (as_list, synset_list)):
        subset_tool.sample_subset(data["train"], out, 3, index, seed=7)
        assert out.read_bytes() == built["csv"].read_bytes()
    subset_tool.sample_subset(data["train"], unsorted, 3, None, seed=7)
    assert {r["synset"]: r["class_id"] for r in _rows(unsorted)} == {CLASS_B: "0", CLASS_A: "1"}


def test_sample_subset_short_class_and_relative_paths(data, tmp_path, capsys):
    out = tmp_path / "rel.csv"
    assert subset_tool.sample_subset(data["train"], out, 4, data["index"], seed=7, relative=True) == 7
    assert str(data["train"] / CLASS_B) in capsys.readouterr().err  # only 3 images: named, all taken
    for row in _rows(out):
        assert not Path(row["img_path"]).is_absolute() and (data["train"] / row["img_path"]).is_file()


def test_class_sample_depends_only_on_seed_and_synset():
    files = [Path(f"img_{i:03d}.JPEG") for i in range(100)]
    pick = subset_tool.class_sample(files, 10, 42, "n01440764")
    assert pick == sorted(pick) and len(set(pick)) == 10
    assert subset_tool.class_sample(files[::-1], 10, 42, "n01440764") == pick  # listing order is irrelevant
    assert subset_tool.class_sample(files, 10, 43, "n01440764") != pick
    assert subset_tool.class_sample(files, 10, 42, "n01443537") != pick


def test_sample_subset_errors_name_the_file(data, tmp_path):
    bad_index = tmp_path / "bad.json"
    bad_index.write_text(json.dumps({"0": [CLASS_A, "a"], "2": [CLASS_B, "b"]}))
    with pytest.raises(ValueError, match=re.escape(str(bad_index))):
        subset_tool.sample_subset(data["train"], tmp_path / "x.csv", 3, bad_index)
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([CLASS_A, "n09999999"]))
    with pytest.raises(FileNotFoundError, match="n09999999"):
        subset_tool.sample_subset(data["train"], tmp_path / "x.csv", 3, missing)


def test_console_scripts_installed(data, built, tmp_path):
    bin_dir = Path(sys.executable).parent
    for name in ("repa-fast-sample-subset", "repa-fast-encode-vae", "repa-fast-build-dino", "repa-fast-prepare-clip"):
        assert (bin_dir / name).is_file(), f"{name} is not installed in {bin_dir} (pip install -e .)"
    out = tmp_path / "cli.csv"
    subprocess.run([str(bin_dir / "repa-fast-sample-subset"), "--imagenet_dir", str(data["train"]),
                    "--samples_per_class", "3", "--class_index", str(data["index"]), "--output_csv", str(out),
                    "--seed", "7"], check=True, capture_output=True)
    assert out.read_bytes() == built["csv"].read_bytes()


# ---------------------------------------------------------------------------------------------- caches


def _by_stem(built, stem: str) -> str:
    return next(r["id"] for r in _rows(built["csv"]) if r["id"] == f"{CLASS_B}_{stem}")


def test_latent_cache(data, built):
    from diffusers import AutoencoderKL

    reader = CacheReader(built["latents"], shape=LATENT_SHAPE, dtype="float16", kind="latent")
    vae = AutoencoderKL.from_pretrained(data["sd"] / "vae").eval()
    assert sorted(reader.keys()) == sorted(r["id"] for r in _rows(built["csv"]))
    assert reader.meta["count"] == 6
    assert reader.meta["scaling_factor"] == pytest.approx(vae.config.scaling_factor)
    assert reader.meta["source"] == str((data["sd"] / "vae").resolve())
    assert reader.meta["image_size"] == VAE_SIZE and reader.meta["latent"] == "mean"
    # The exact encoder input of a 64x64 image and of the centre of a 96x64 one: pixels in [-1, 1].
    for stem, crop in (("sq64", np.s_[:, :]), ("wide", np.s_[:, 16:80])):
        x = torch.from_numpy(data["pixels"][stem][crop].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            want = vae.encode(x).latent_dist.mean[0] * vae.config.scaling_factor
        got = reader.get(_by_stem(built, stem))
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)
    reader.close()


def _dino_input(pixels: np.ndarray) -> torch.Tensor:
    """x/255 then ImageNet mean/std, [1, 3, H, W]."""
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    return (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)


def test_dino_cache(data, built):
    from transformers import Dinov2Model

    reader = CacheReader(built["dino"], shape=TOKEN_SHAPE, dtype="float16", kind="dino", layers=LAYERS)
    assert reader.meta["layers"] == LAYERS and reader.meta["count"] == 6 * len(LAYERS)
    assert reader.meta["source"] == str(data["dino"].resolve()) and reader.meta["image_size"] == 224
    ids = [r["id"] for r in _rows(built["csv"])]
    assert sorted(reader.keys()) == sorted(dino_key(i, layer) for i in ids for layer in LAYERS)
    for i in ids:  # the same target for every layer
        assert reader.get_bytes(dino_key(i, "mid")) == reader.get_bytes(dino_key(i, "enc_last"))
    model = Dinov2Model.from_pretrained(data["dino"]).eval()
    x = _dino_input(data["pixels"]["sq224"])
    with torch.no_grad():
        want = model(pixel_values=x).last_hidden_state[0, 1:]
    torch.testing.assert_close(reader.get(dino_key(_by_stem(built, "sq224"), "mid")).float(), want,
                               atol=2e-3, rtol=2e-3)
    reader.close()


def _clip_reference(data, prompts: list[str]) -> torch.Tensor:
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(data["sd"] / "tokenizer")
    model = CLIPTextModel.from_pretrained(data["sd"] / "text_encoder").eval()
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).last_hidden_state


def test_clip_table(data, built, tmp_path, capsys):
    table = load_clip_table(built["clip"], num_rows=3, dim=32)
    assert table.shape == (3, 77, 32) and table.dtype == torch.float16
    want = _clip_reference(data, ["a photo of a tiger cat", "a photo of a tench", ""])
    torch.testing.assert_close(table.float(), want, atol=2e-3, rtol=2e-3)
    side = json.loads(Path(f"{built['clip']}.json").read_text())
    assert side["prompts"] == ["a photo of a tiger cat", "a photo of a tench", ""] and side["null_row"] == 2

    # .safetensors by extension; a list of names; --template.
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["tiger_cat", "tench"]))
    out = tmp_path / "clip.safetensors"
    argv = ["--class-names", str(names), "--clip", str(data["sd"]), "--output-path", str(out), "--device", "cpu",
            "--template", "{name}"]
    clip_tool.main(argv)
    table2 = load_clip_table(out, num_rows=3)
    torch.testing.assert_close(table2.float(), _clip_reference(data, ["tiger cat", "tench", ""]), atol=2e-3,
                               rtol=2e-3)
    assert torch.equal(table2[2], table[2])  # the null row does not depend on the template
    # An existing table is kept without --overwrite, rebuilt with it.
    before = out.read_bytes()
    clip_tool.main(argv[:-1] + ["photo {name}"])
    assert out.read_bytes() == before and "kept" in capsys.readouterr().out
    clip_tool.main(argv[:-1] + ["photo {name}", "--overwrite"])
    assert out.read_bytes() != before
    with pytest.raises(ValueError, match="--template"):
        clip_tool.prepare_clip_embeddings(clip_tool.build_parser().parse_args(
            argv[:-2] + ["--template", "no placeholder", "--overwrite"]))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # the console script: one line, no traceback
        clip_tool.main(argv[:-2] + ["--template", "no placeholder", "--overwrite"])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.startswith("repa-fast-prepare-clip: --template 'no placeholder'")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_torch_loader_reads_the_caches(built):
    dataset = SD15AlignedDataset(built["csv"], built["latents"], built["dino"], built["clip"], align_layers=LAYERS,
                                 cfg_dropout=0.0, return_encoder_hidden_states=True, num_classes=2,
                                 token_shape=TOKEN_SHAPE, latent_shape=LATENT_SHAPE)
    batch = next(iter(build_torch_loader(dataset, batch_size=6, shuffle=False)))
    assert batch["latent"].shape == (6, *LATENT_SHAPE) and batch["latent"].dtype == torch.float16
    assert {k: tuple(v.shape) for k, v in batch["dino_tokens"].items()} == {n: (6, *TOKEN_SHAPE) for n in LAYERS}
    assert batch["encoder_hidden_states"].shape == (6, 77, 32)
    rows = _rows(built["csv"])
    assert batch["class_id"].tolist() == [int(r["class_id"]) for r in rows]
    assert torch.equal(batch["latent"][0], CacheReader(built["latents"]).get(rows[0]["id"]))


# ------------------------------------------------------------------------------- shards, resume, errors


@pytest.mark.parametrize("tool", ["vae", "dino"])
def test_shards_equal_one_run_and_resume_skips_done(tool, data, built, tmp_path):
    run = TOOLS[tool]
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert run(built["csv"], whole, data=data, batch=1)["encoded"] == 6
    # Shards of a CSV with relative paths (resolved against --image-root), one with a decoding worker.
    rel = tmp_path / "rel.csv"
    subset_tool.sample_subset(data["train"], rel, 3, data["index"], seed=7, relative=True)
    root = ["--image-root", str(data["train"])]
    assert run(rel, sharded, "--shard", "1/2", *root, data=data, batch=1, workers=1)["encoded"] == 3
    assert run(rel, sharded, "--shard", "0/2", *root, data=data, batch=1)["encoded"] == 3
    records = _records(sharded)
    assert records == _records(whole)
    reader = CacheReader(sharded)
    assert reader.meta["count"] == len(records)
    reader.close()

    # Done ids are skipped before their image is opened: every path of this CSV is garbage, and --strict.
    garbage = tmp_path / "garbage.JPEG"
    garbage.write_bytes(b"not a jpeg")
    bad = _write_csv(tmp_path / "bad.csv", [{**r, "img_path": str(garbage)} for r in _rows(built["csv"])])
    stats = run(bad, sharded, "--strict", data=data)
    assert (stats["encoded"], stats["already_done"], stats["unreadable"]) == (0, 6, [])
    assert _records(sharded) == records

    # An interrupted run (a record missing) is completed, and only that id is encoded again.
    lost = dino_key(_rows(built["csv"])[2]["id"], "enc_last") if tool == "dino" else _rows(built["csv"])[2]["id"]
    env = lmdb.open(str(sharded), subdir=True)
    with env.begin(write=True) as txn:
        assert txn.delete(lost.encode())
    env.close()
    stats = run(built["csv"], sharded, data=data, batch=1)
    assert (stats["encoded"], stats["already_done"]) == (1, 5)
    assert _records(sharded) == records


@pytest.mark.parametrize("tool", ["vae", "dino"])
def test_unreadable_image_is_reported(tool, data, built, tmp_path, capsys):
    run = TOOLS[tool]
    broken = tmp_path / f"{CLASS_B}_broken.JPEG"
    broken.write_bytes(os.urandom(512))
    good = _rows(built["csv"])[0]
    csv_path = _write_csv(tmp_path / "with_broken.csv", [good, {**good, "id": broken.stem, "img_path": str(broken)}])
    stats = run(csv_path, tmp_path / "skip", data=data)
    assert (stats["encoded"], stats["unreadable"]) == (1, [str(broken)])
    err = capsys.readouterr().err
    assert str(broken) in err and "unreadable" in err
    assert len(_records(tmp_path / "skip")) == (len(LAYERS) if tool == "dino" else 1)
    with pytest.raises(UnreadableImageError, match=re.escape(str(broken))):
        run(csv_path, tmp_path / "strict", "--strict", data=data)


def test_sampled_latents_are_a_function_of_seed_and_id(data, built, tmp_path):
    # The noise follows the id, not the position in the batch: the same latents with the rows swapped.
    rows = _rows(built["csv"])[:2]
    forward, swapped = _write_csv(tmp_path / "two.csv", rows), _write_csv(tmp_path / "swapped.csv", rows[::-1])
    for name, seed, csv_path in (("a", "3", forward), ("b", "3", swapped), ("c", "4", forward)):
        _vae(csv_path, tmp_path / name, "--sample-latents", "--seed", seed, data=data, batch=2)
    a, b, c = (_records(tmp_path / name) for name in "abc")
    mean = _records(built["latents"])
    assert a == b
    for key in a:
        assert a[key] != c[key] and a[key] != mean[key]
    # A cache of means does not take sampled latents.
    with pytest.raises(CacheError, match="latent"):
        _vae(forward, built["latents"], "--sample-latents", data=data)


def test_vae_errors_name_the_folder(data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(empty))):
        _vae(tmp_path / "unused.csv", tmp_path / "out", vae=empty)
    with pytest.raises(ValueError, match="--size 60"):
        vae_tool.encode_vae_latents(vae_tool.build_parser().parse_args(
            ["--csv-path", "x.csv", "--vae", str(data["sd"]), "--output-dir", str(tmp_path / "o"), "--size", "60",
             "--device", "cpu"]))


# ------------------------------------------------------------------------------------- DINO checkpoints


def _original_names(state: dict) -> dict:
    """transformers 5 Dinov2Model names -> facebookresearch/dinov2 names (written out independently)."""
    top = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
           "embeddings.position_embeddings": "pos_embed", "layernorm.weight": "norm.weight",
           "layernorm.bias": "norm.bias", "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias"}
    out = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", key)
        i, rest = m.group(1), m.group(2)
        if rest.startswith("attention.q_proj."):
            p = rest.rsplit(".", 1)[1]
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([state[f"encoder.layer.{i}.attention.{n}_proj.{p}"]
                                                         for n in "qkv"])
        elif rest.startswith(("attention.k_proj.", "attention.v_proj.")):
            continue
        else:
            rest = (rest.replace("attention.o_proj", "attn.proj").replace("layer_scale1.lambda1", "ls1.gamma")
                    .replace("layer_scale2.lambda1", "ls2.gamma"))
            out[f"blocks.{i}.{rest}"] = value
    return out


def test_dino_from_checkpoint_files(data, built, tmp_path):
    from transformers import Dinov2Model

    csv_path = _write_csv(tmp_path / "one.csv", [r for r in _rows(built["csv"]) if r["id"].endswith("sq224")])
    _dino(csv_path, tmp_path / "folder", data=data, batch=1, layers="mid")
    want = _records(tmp_path / "folder")
    state = Dinov2Model.from_pretrained(data["dino"]).state_dict()
    torch.save(state, tmp_path / "hf.pt")
    torch.save({"model": _original_names(state)}, tmp_path / "dinov2_tiny_pretrain.pth")
    config = str(data["dino"] / "config.json")
    for name in ("hf.pt", "dinov2_tiny_pretrain.pth"):
        _dino(csv_path, tmp_path / f"from_{name}", "--dino-config", config, dino=tmp_path / name, data=data,
              batch=1, layers="mid")
        assert _records(tmp_path / f"from_{name}") == want, name
    # A checkpoint that does not fit its config is an error naming the file.
    two_layers = tmp_path / "two_layers.json"
    two_layers.write_text(json.dumps({**json.loads(Path(config).read_text()), "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "hf.pt"))):
        _dino(csv_path, tmp_path / "bad", "--dino-config", str(two_layers), dino=tmp_path / "hf.pt", data=data)


def test_dino_with_registers_drops_cls_and_registers(data, built, tmp_path):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(1)
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=224,
        num_register_tokens=4)).eval()
    model.save_pretrained(tmp_path / "reg")
    csv_path = _write_csv(tmp_path / "one.csv", [r for r in _rows(built["csv"]) if r["id"].endswith("sq224")])
    _dino(csv_path, tmp_path / "out", dino=tmp_path / "reg", data=data, layers="mid")
    x = _dino_input(data["pixels"]["sq224"])
    with torch.no_grad():
        hidden = model(pixel_values=x).last_hidden_state[0]
    assert hidden.shape[0] == 1 + 4 + 256
    got = CacheReader(tmp_path / "out", shape=TOKEN_SHAPE).get(dino_key(_rows(csv_path)[0]["id"], "mid"))
    torch.testing.assert_close(got.float(), hidden[5:], atol=2e-3, rtol=2e-3)


def _poisoned(load, part, value: float):
    """``load`` (load_vae / load_dino) whose model gives ``value`` for every image of one flat colour: the
    output of ``part(model)`` is overwritten for those images, as an fp16 overflow or a NaN would."""
    def loader(*args, **kwargs):
        model, source = load(*args, **kwargs)

        def hook(module, args, kwargs, output):
            pixels = (args[0] if args else kwargs["pixel_values"]).flatten(2)
            flat = (pixels.amax(2) == pixels.amin(2)).all(1)
            output[flat] = value
            return output

        part(model).register_forward_hook(hook, with_kwargs=True)
        return model, source
    return loader


@pytest.mark.parametrize("tool", ["vae", "dino"])
def test_non_finite_record_is_never_written(tool, data, built, tmp_path, monkeypatch, capsys):
    # The VAE's encoder output is made huge (fp16 overflow after scaling), DINO's embeddings NaN.
    if tool == "vae":
        monkeypatch.setattr(vae_tool, "load_vae", _poisoned(vae_tool.load_vae, lambda m: m.encoder, 1e9))
    else:
        monkeypatch.setattr(dino_tool, "load_dino", _poisoned(dino_tool.load_dino, lambda m: m.embeddings,
                                                              float("nan")))
    flat = tmp_path / f"{CLASS_B}_flat.png"
    _save(np.full((64, 64, 3), 200, dtype=np.uint8), flat)
    good = _rows(built["csv"])[:2]
    csv_path = _write_csv(tmp_path / "with_flat.csv", [good[0], {**good[0], "id": flat.stem, "img_path": str(flat)},
                                                       good[1]])
    stats = TOOLS[tool](csv_path, tmp_path / "skip", data=data, batch=3)
    assert (stats["encoded"], stats["non_finite"], stats["unreadable"]) == (2, [str(flat)], [])
    captured = capsys.readouterr()
    assert f"non-finite record for image {flat}" in captured.err and "non-finite 1 (of 3 rows)" in captured.out
    records = _records(tmp_path / "skip")
    assert not any(key.startswith(flat.stem) for key in records)  # the good ones are written, finite
    assert len(records) == 2 * (len(LAYERS) if tool == "dino" else 1)
    for value in records.values():
        assert np.isfinite(np.frombuffer(value, dtype="<f2")).all()
    # --strict stops at it with one line naming the image (no traceback), through the tool's main()
    main = vae_tool.main if tool == "vae" else dino_tool.main
    argv = ["--csv-path", str(csv_path), "--output-dir", str(tmp_path / "strict"), "--batch-size", "3",
            "--num-workers", "0", "--device", "cpu", "--strict"]
    argv += ["--vae", str(data["sd"]), "--size", str(VAE_SIZE)] if tool == "vae" else \
        ["--dino", str(data["dino"]), "--layers", ",".join(LAYERS)]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "Traceback" not in err
    line = [ln for ln in err.splitlines() if "non-finite record" in ln]
    assert len(line) == 1 and line[0].startswith(f"repa-fast-encode-{tool}" if tool == "vae" else
                                                 "repa-fast-build-dino") and str(flat) in line[0]
