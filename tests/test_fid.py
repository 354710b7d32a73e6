"""repa-fast-fid: FID / IS / KID through torchmetrics on a local TorchScript Inception (a random-init stand-in)."""

import json
import socket
import sys

import numpy as np
import pytest
import torch
from helpers_sd import (
    assert_one_line,
    one_thread,  # noqa: F401 (autouse fixture)
    write_standin_inception,
)
from PIL import Image

from repa_fast import fid
from repa_fast.errors import InputError
from repa_fast.optional import MissingDependency


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    write_standin_inception(root / "inception.pt")
    rng = np.random.default_rng(0)
    # smooth random images (a coarse grid upsampled) so that a brightness shift moves the features
    base = rng.integers(0, 256, (48, 8, 8, 3), dtype=np.uint8).repeat(4, 1).repeat(4, 2)
    other = rng.integers(0, 256, (48, 8, 8, 3), dtype=np.uint8).repeat(4, 1).repeat(4, 2)
    paths = {"base": root / "base.npz", "other": root / "other.npz"}
    np.savez(paths["base"], arr_0=base)
    np.savez(paths["other"], arr_0=other)
    for shift in (30, 90):
        paths[f"shift{shift}"] = root / f"shift{shift}.npz"
        np.savez(paths[f"shift{shift}"], arr_0=np.clip(base.astype(int) + shift, 0, 255).astype(np.uint8))
    folder = root / "base_png"
    folder.mkdir()
    for i, image in enumerate(base):
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    paths["folder"] = folder
    return {"root": root, "inception": root / "inception.pt", "base": base, **paths}


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("repa-fast-fid opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_identical_sets_score_zero_and_shifts_score_more(sets, monkeypatch):
    _no_network(monkeypatch)
    same = fid.compute_metrics(sets["folder"], sets["base"], sets["inception"], batch_size=20,
                               kid_subset_size=32, save_ref_stats=sets["root"] / "ref_stats.npz")
    assert same["num_samples"] == same["num_reference"] == 48 and same["reference_kind"] == "images"
    assert abs(same["fid"]) < 1e-6 and abs(same["kid_mean"]) < 1e-3  # a folder of PNGs reads as the npz
    near = fid.compute_metrics(sets["base"], sets["shift30"], sets["inception"], kid_subset_size=32)
    far = fid.compute_metrics(sets["base"], sets["shift90"], sets["inception"], kid_subset_size=32)
    assert 1e-4 < near["fid"] < far["fid"] and near["kid_mean"] < far["kid_mean"]
    assert far["kid_subset_size"] == 32 and far["is_splits"] == 10 and far["isc_mean"] >= 1.0

    # reference statistics: the same FID as the reference images they were computed from
    stats = fid.compute_metrics(sets["shift90"], sets["root"] / "ref_stats.npz", sets["inception"])
    assert stats["reference_kind"] == "stats" and "kid_mean" not in stats
    assert stats["fid"] == pytest.approx(far["fid"], rel=1e-6)
    with np.load(sets["root"] / "ref_stats.npz") as data:
        assert data["mu"].shape == (16,) and data["sigma"].shape == (16, 16) and int(data["num_images"]) == 48


def test_fid_is_the_frechet_distance_of_the_features():
    from scipy import linalg

    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 8, generator=g, dtype=torch.float64)
    b = 0.7 * torch.randn(300, 8, generator=g, dtype=torch.float64) + 0.5
    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    s_a, s_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    want = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * linalg.sqrtm(s_a @ s_b).real)
    assert fid.fid_score(a, b) == pytest.approx(want, rel=1e-6)
    assert fid.fid_score(a, (torch.from_numpy(mu_b), torch.from_numpy(s_b))) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="4 features"):
        fid.fid_score(a, (torch.zeros(4), torch.eye(4)))


def test_inception_score_of_known_class_probabilities():
    uniform = torch.full((100, 10), 0.1, dtype=torch.float64)
    assert fid.inception_score(uniform, splits=5)[0] == pytest.approx(1.0, abs=1e-6)
    # confident predictions spread evenly over 4 classes: IS = exp(mean_i KL(p_i || mean p)) ~ 4
    p = torch.eye(10, dtype=torch.float64)[torch.arange(100) % 4] * 0.99 + 0.001
    marginal = p.mean(0)
    want = float(torch.exp((p * (p.log() - marginal.log())).sum(1).mean()))
    assert 3.5 < want < 4
    assert fid.inception_score(p, splits=1)[0] == pytest.approx(want, rel=1e-9)


def _bad_inputs(sets, tmp) -> dict:
    """name -> (argv of repa-fast-fid, words its one line must hold)."""
    base, inception = str(sets["base"]), str(sets["inception"])
    torch.save({"w": torch.zeros(2)}, tmp / "weights.pth")
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp / "linear.pt"))
    np.savez(tmp / "images.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    np.savez(tmp / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    np.savez(tmp / "one.npz", arr_0=np.zeros((1, 4, 4, 3), np.uint8))
    np.savez(tmp / "stats4.npz", mu=np.zeros(4), sigma=np.eye(4))
    np.savez(tmp / "stats_bad.npz", mu=np.zeros(4), sigma=np.eye(3))
    (tmp / "junk.npz").write_text("not a zip")
    (tmp / "list.txt").write_text("a.png\n")
    for name, sizes in (("empty", []), ("mixed", [(8, 8), (8, 6)]), ("broken", [(8, 8), None])):
        (tmp / name).mkdir()
        (tmp / name / "notes.txt").write_text("no image")
        for i, size in enumerate(sizes):
            path = tmp / name / f"{'ab'[i]}.png"
            Image.new("RGB", size).save(path) if size else path.write_bytes(b"not a png")

    def argv(samples=base, reference=base, net=inception, extra=()):
        return [str(samples), str(reference), "--inception", str(net), *extra]

    return {
        "missing --inception": (argv(net=tmp / "nowhere" / "inception.pt"), ["--inception", "nowhere", "downloaded"]),
        "--inception not TorchScript": (argv(net=tmp / "weights.pth"), ["weights.pth", "not a TorchScript module"]),
        "--inception of another interface": (argv(net=tmp / "linear.pt"),
                                             ["linear.pt", "lacks", "return_features", "inception-2015-12-05.pt"]),
        "missing samples": (argv(samples=tmp / "no_samples"), ["SAMPLES", "no_samples", "no such folder or npz"]),
        "missing reference": (argv(reference=tmp / "no_ref.npz"), ["REFERENCE", "no_ref.npz"]),
        "folder without images": (argv(samples=tmp / "empty"), ["empty", "no images (png, jpg"]),
        "npz without arr_0": (argv(reference=tmp / "images.npz"), ["REFERENCE", "images.npz", "'arr_0'", "'mu'"]),
        "not an npz": (argv(samples=tmp / "junk.npz"), ["junk.npz", "not a readable .npz"]),
        "neither folder nor npz": (argv(reference=tmp / "list.txt"), ["REFERENCE", "list.txt", "folder of images"]),
        "arr_0 not uint8": (argv(samples=tmp / "float.npz"), ["float.npz", "arr_0 is float32", "expected uint8"]),
        "one image": (argv(samples=tmp / "one.npz"), ["one.npz", "1 image(s)", "at least 2"]),
        "images of two sizes": (argv(samples=tmp / "mixed"), ["b.png: 8x6 px, but a.png is 8x8"]),
        "unreadable image": (argv(samples=tmp / "broken"), ["b.png", "not a readable image"]),
        "statistics as samples": (argv(samples=tmp / "stats4.npz"), ["SAMPLES", "stats4.npz", "statistics"]),
        "statistics of another network": (argv(reference=tmp / "stats4.npz"),
                                          ["statistics have 4 features", "gives 16", "--inception"]),
        "statistics of bad shape": (argv(reference=tmp / "stats_bad.npz"), ["stats_bad.npz", "sigma [3, 3]"]),
        "--save-ref-stats of statistics": (argv(reference=tmp / "stats4.npz", extra=["--save-ref-stats", "x.npz"]),
                                           ["--save-ref-stats", "stats4.npz", "statistics already"]),
        "--batch-size 0": (argv(extra=["--batch-size", "0"]), ["--batch-size 0", "at least 1"]),
        "--kid-subset-size 1": (argv(extra=["--kid-subset-size", "1"]),
                                ["--kid-subset-size 1", "at least 2"]),
    }


def test_bad_inputs_end_with_one_line_naming_them(sets, tmp_path, capsys):
    for name, (argv, words) in _bad_inputs(sets, tmp_path).items():
        line = assert_one_line(fid.main, argv, capsys, "repa-fast-fid", words)
        assert "Traceback" not in line, name
    assert not list(tmp_path.glob("*fid*.json"))  # nothing written
    with pytest.raises(InputError, match="not a TorchScript module"):  # the library raises, the CLI prints
        fid.load_inception(tmp_path / "weights.pth")


def test_missing_torchmetrics_names_the_extra(sets, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics.image.fid", None)
    with pytest.raises(MissingDependency, match=r"'torchmetrics'.*repa-fast\[eval\]"):
        fid.compute_metrics(sets["base"], sets["other"], sets["inception"])


def test_cli_writes_json_beside_the_samples(sets, capsys):
    fid.main([str(sets["base"]), str(sets["other"]), "--inception", str(sets["inception"]), "--kid-subsets", "10",
              "--kid-subset-size", "16", "--is-splits", "4"])
    result = json.loads((sets["root"] / "base_fid.json").read_text())
    assert result["kid_subsets"] == 10 and result["kid_subset_size"] == 16 and result["is_splits"] == 4
    assert result["fid"] > 0 and "FID" in capsys.readouterr().out
