"""repa-fast-fid: FID / IS / KID through torchmetrics on a local TorchScript Inception (a random-init stand-in)."""

import json
import socket
import sys

import numpy as np
import pytest
import torch
from helpers_sd import (
    one_thread,  # noqa: F401 (autouse fixture)
    write_standin_inception,
)
from PIL import Image

from repa_fast import fid
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


def test_bad_inputs_are_clear_errors(sets, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "inception.pt"
    with pytest.raises(SystemExit) as exc:
        fid.main([str(sets["base"]), str(sets["other"]), "--inception", str(missing)])
    assert "--inception" in str(exc.value) and "nowhere" in str(exc.value) and "downloaded" in str(exc.value)
    not_script = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(2)}, not_script)
    with pytest.raises(ValueError, match="not a TorchScript module"):
        fid.load_inception(not_script)
    empty = tmp_path / "empty.npz"
    np.savez(empty, images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(KeyError, match="'arr_0' or statistics 'mu' and 'sigma'"):
        fid.source_kind(empty)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (8, 8)).save(mixed / "a.png")
    Image.new("RGB", (8, 6)).save(mixed / "b.png")
    with pytest.raises(ValueError, match="b.png: 8x6 px, but a.png is 8x8"):
        fid.compute_metrics(mixed, sets["base"], sets["inception"])


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
