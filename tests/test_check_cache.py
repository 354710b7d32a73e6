"""The cache doctor (repa-fast-check-cache) and exclude_ids_path: bad samples found, named and left out while
the other samples keep their shuffling order and CFG dropout."""

import csv
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from repa_fast.config import config_from_dict
from repa_fast.data import check
from repa_fast.data.cache import CacheError, CacheReader, dino_key
from repa_fast.data.dataset import (
    SD15AlignedDataset,
    build_dataset,
    build_torch_loader,
    rank_indices,
    read_id_list,
    write_id_list,
)
from repa_fast.data.synthetic import write_synthetic_caches

LAYERS = ["mid", "enc_last"]
SHAPES = dict(latent_shape=(4, 8, 8), num_tokens=16, dino_D=32, clip_shape=(77, 8))
N = 37


def _caches(root) -> dict:
    return write_synthetic_caches(root, num_samples=N, num_classes=5, align_layers=LAYERS, **SHAPES)


def _config(paths, **extra):
    return config_from_dict({**paths, "align_layers": LAYERS, "dino_N": 16, "dino_D": 32, **extra})


def _argv(paths, *extra) -> list[str]:
    return ["--no-progress", "align_layers=mid,enc_last", "dino_N=16", "dino_D=32",
            *[f"{k}={v}" for k, v in paths.items()], *extra]


def _put(path, key: str, value: bytes | None) -> None:
    env = lmdb.open(str(path), subdir=True)
    with env.begin(write=True) as txn:
        if value is None:
            assert txn.delete(key.encode())
        else:
            txn.put(key.encode(), value)
    env.close()


def _edit_csv(path, edit) -> None:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rows = edit(rows)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture()
def broken(tmp_path):
    """Caches with one sample of each kind of problem; returns (paths, {id: words its reason must hold})."""
    paths = _caches(tmp_path / "data")
    ids = [f"s{i:07d}" for i in range(N)]
    latent_bytes = 4 * 8 * 8 * 2
    _put(paths["latent_dir"], ids[0], b"\0" * 10)  # short
    _put(paths["latent_dir"], ids[3], np.full((4, 8, 8), np.nan, np.float16).tobytes())  # NaN
    _put(paths["latent_dir"], ids[5], b"\0" * latent_bytes)  # all zeros
    _put(paths["dino_dir"], dino_key(ids[8], "enc_last"), None)  # missing
    inf = np.zeros((16, 32), np.float16)
    inf[3, 4] = np.inf
    _put(paths["dino_dir"], dino_key(ids[9], "mid"), inf.tobytes())

    def edit(rows):
        rows[12]["class_id"] = "1000"
        rows[13]["class_id"] = "cat"
        return rows + [dict(rows[20])]  # id 20 again

    _edit_csv(paths["csv_path"], edit)
    want = {ids[0]: ["latents", "10 bytes, expected 512"], ids[3]: ["latents", "256 of 256 values are NaN or inf"],
            ids[5]: ["latents", "all zeros"], ids[8]: ["dino[enc_last]", "missing record"],
            ids[9]: ["dino[mid]", "1 of 512 values are NaN or inf"], ids[12]: ["class_id 1000", "outside"],
            ids[13]: ["class_id 'cat'", "not an integer"], ids[20]: ["repeats", "lines 22 and 39"]}
    return paths, want


def test_doctor_names_every_bad_id_and_why(broken, tmp_path, capsys):
    paths, want = broken
    exclude = tmp_path / "bad_ids.txt"
    with pytest.raises(SystemExit) as stop:
        check.main(_argv(paths, "--write-exclude", str(exclude)))
    out = capsys.readouterr().out
    assert stop.value.code == 1
    listed = {line.split(":")[0].strip(): line for line in out.splitlines() if line.startswith("  s")}
    assert set(listed) == set(want)
    for sample_id, words in want.items():
        for word in words:
            assert word in listed[sample_id], (sample_id, word, listed[sample_id])
    assert read_id_list(exclude) == set(want)  # with a comment line per id saying why
    assert "# latents: all zeros" in exclude.read_text()

    # The statistics are those of the sound records only.
    report = check.check_caches(_config(paths), progress=False)
    reader = CacheReader(paths["latent_dir"])
    sound = np.stack([reader.get(f"s{k:07d}").float().numpy() for k in range(N) if k not in (0, 3, 5)])
    sound = sound.astype(np.float64)
    stats = report.stats["latents"]
    assert stats["records"] == len(sound) and stats["count"] == sound.size
    assert stats["mean"] == pytest.approx(sound.mean()) and stats["std"] == pytest.approx(sound.std())
    assert (stats["min"], stats["max"]) == (sound.min(), sound.max())
    assert report.stats["dino[mid]"]["records"] == report.stats["dino[enc_last]"]["records"] == N - 1
    assert report.stats["clip table"]["shape"] == [1001, 77, 8]

    # With the list as exclude_ids_path the doctor passes (listing them as excluded), and training reads the rest.
    check.main(_argv(paths, f"exclude_ids_path={exclude}"))
    out = capsys.readouterr().out
    assert "no problems found" in out and out.count("(excluded)") == len(want)
    dataset = build_dataset(_config(paths, exclude_ids_path=str(exclude)))
    assert len(dataset) == N - len(want) and set(dataset.excluded) == set(want)
    for index in range(len(dataset)):
        sample = dataset[index]
        assert torch.isfinite(sample["latent"]).all() and sample["latent"].any()
    with pytest.raises(CacheError, match=r"train.csv:14: sample 's0000012' has class_id 1000"):
        build_dataset(_config(paths))  # without the list, the first bad row stops it, by line


def test_doctor_cache_level_problems(tmp_path, capsys):
    paths = _caches(tmp_path / "data")
    table = torch.load(paths["clip_embeddings_path"])
    table[7, 3, 1] = float("nan")
    torch.save(table, tmp_path / "nan.pt")
    torch.save(table[:11], tmp_path / "short.pt")
    cases = {
        "dino_N=64": ["dino:", "'__meta__' shape is [16, 32], expected [64, 32]"],
        "align_layers=mid,dec_first": ["dino:", "layer(s) ['dec_first']"],
        f"clip_embeddings_path={tmp_path / 'nan.pt'}": ["CLIP table:", "1 non-finite values in row(s) [7]"],
        f"clip_embeddings_path={tmp_path / 'short.pt'}": ["CLIP table:", "11 rows, expected 1001"],
        f"latent_dir={tmp_path / 'nowhere'}": ["latents:", "does not exist"],
    }
    for override, words in cases.items():
        with pytest.raises(SystemExit) as stop:
            check.main(_argv(paths, override))
        problems = [line for line in capsys.readouterr().out.splitlines() if line.startswith("problem:")]
        assert stop.value.code == 1 and len(problems) == 1, (override, problems)
        for word in words:
            assert word in problems[0], (override, problems[0])


def test_doctor_command_line(tmp_path):
    paths = _caches(tmp_path / "data")
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "repa-fast-check-cache").is_file(), "not installed (pip install -e .)"
    r = subprocess.run([str(bin_dir / "repa-fast-check-cache"), *_argv(paths)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "no problems found" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "repa_fast.data.check", "--config", "configs/tiny.yaml",
                        f"csv_path={tmp_path / 'none.csv'}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"repa-fast-check-cache: sample CSV '{tmp_path / 'none.csv'}' " \
                                                "does not exist"


# ------------------------------------------------------------------------ exclusion keeps the sampling


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    return _caches(tmp_path_factory.mktemp("caches"))


EXCLUDED = {"s0000000", "s0000004", "s0000017", "s0000018", "s0000036"}  # the first and last rows among them


def _dataset(paths, exclude=()):
    return SD15AlignedDataset(paths["csv_path"], paths["latent_dir"], paths["dino_dir"], align_layers=LAYERS,
                              cfg_dropout=0.3, seed=11, exclude_ids=exclude)


def test_excluded_samples_leave_the_others_their_order_and_cfg_dropout(caches):
    full, kept = _dataset(caches), _dataset(caches, EXCLUDED)
    assert len(kept) == N - len(EXCLUDED) and set(kept.excluded) == EXCLUDED
    assert kept.ids == [i for i in full.ids if i not in EXCLUDED]
    position = {sample_id: index for index, sample_id in enumerate(full.ids)}
    for epoch in range(3):
        order_full = [full.ids[i] for i in rank_indices(len(full), full.seed, epoch)]
        order_kept = [kept.ids[i] for i in rank_indices(len(kept), kept.seed, epoch, keep=kept.keep)]
        assert order_kept == [i for i in order_full if i not in EXCLUDED]  # same relative order
        loaded = [i for batch in build_torch_loader(kept, batch_size=5, epoch=epoch) for i in batch["id"]]
        assert loaded == order_kept
        for index, sample_id in enumerate(kept.ids):  # same CFG decision as without exclusions
            assert kept.class_id(epoch, index) == full.class_id(epoch, position[sample_id])
    dropped = [kept.class_id(0, i) == kept.null_class for i in range(len(kept))]
    assert any(dropped) and not all(dropped)

    # Through the loader, on two ranks: every kept sample once an epoch (32: no repeat to even the ranks
    # out), never an excluded one, each with the class id it has in the run without exclusions.
    for epoch in range(2):
        seen = []
        for rank in range(2):
            for batch in build_torch_loader(kept, batch_size=4, rank=rank, world=2, epoch=epoch):
                for sample_id, class_id in zip(batch["id"], batch["class_id"].tolist(), strict=True):
                    assert class_id == full.class_id(epoch, position[sample_id])
                    seen.append(sample_id)
        assert sorted(seen) == sorted(kept.ids)


def test_dali_loader_honours_the_exclusions(caches):
    pytest.importorskip("nvidia.dali")
    from repa_fast.data.dali import build_dali_loader

    kept = _dataset(caches, EXCLUDED)
    for rank in range(2):
        loader = build_dali_loader(kept, 4, rank, 2, epoch=1, num_workers=0)
        try:
            got = list(loader)
        finally:
            loader.close()
        want = list(build_torch_loader(kept, 4, rank, 2, epoch=1))
        assert [b["id"] for b in got] == [b["id"] for b in want]
        assert [b["class_id"].tolist() for b in got] == [b["class_id"].tolist() for b in want]


def test_exclude_ids_path_is_read_by_build_dataset(caches, tmp_path):
    path = tmp_path / "ids.txt"
    write_id_list(path, {sample_id: "some reason" for sample_id in sorted(EXCLUDED)}, header="made by a test")
    assert path.read_text().startswith("# made by a test\n# some reason\ns0000000\n")
    dataset = build_dataset(_config(caches, exclude_ids_path=str(path)))
    assert set(dataset.excluded) == EXCLUDED and not EXCLUDED & set(dataset.ids)
    with pytest.raises(FileNotFoundError, match=r"exclude_ids_path.*nothing.txt"):
        build_dataset(_config(caches, exclude_ids_path=str(tmp_path / "nothing.txt")))
    everything = tmp_path / "all.txt"
    write_id_list(everything, {f"s{i:07d}": "" for i in range(N)})
    with pytest.raises(CacheError, match=f"no samples left after excluding {N} id"):
        build_dataset(_config(caches, exclude_ids_path=str(everything)))
