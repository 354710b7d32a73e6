"""Plots: scikit-learn t-SNE drawn with matplotlib, training curves from train_log.jsonl, the optional extra."""

import json
import sys

import numpy as np
import pytest
import torch
from helpers_sd import one_thread  # noqa: F401 (autouse fixture)
from PIL import Image

from repa_fast import plots
from repa_fast.optional import MissingDependency


def test_tsne_keeps_clusters_apart_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centers = 4.0 * torch.randn(3, 20, generator=g)
    labels = torch.arange(3).repeat_interleave(30)
    x = centers[labels] + torch.randn(90, 20, generator=g)
    y = plots.tsne_embed(x, perplexity=15, n_iter=300)
    assert y.shape == (90, 2) and np.isfinite(y).all()
    np.testing.assert_array_equal(y, plots.tsne_embed(x, perplexity=15, n_iter=300))
    d = torch.cdist(torch.from_numpy(y), torch.from_numpy(y)).fill_diagonal_(float("inf"))
    knn = d.topk(5, largest=False).indices
    assert (labels[knn] == labels[:, None]).float().mean() > 0.95
    with pytest.raises(ValueError, match="n >= 4"):
        plots.tsne_embed(x[:3])


def _colors(image: np.ndarray) -> set:
    return {tuple(c) for c in image.reshape(-1, 3)[::3]}


def test_tsne_plot_colours_by_source_and_by_class(tmp_path):
    g = torch.Generator().manual_seed(0)
    pred, dino = torch.randn(80, 16, generator=g), torch.randn(80, 16, generator=g)
    classes = torch.arange(4).repeat_interleave(20)
    one = plots.tsne_plot(pred, dino, "mid", max_points=60, n_iter=250)
    two = plots.tsne_plot(pred, dino, "mid", max_points=60, n_iter=250, classes=classes,
                          class_names={0: "tench", 1: "goldfish"})
    assert one.dtype == np.uint8 and one.ndim == 3 and one.shape[2] == 3
    assert two.shape[0] == one.shape[0] and two.shape[1] == 2 * one.shape[1]
    left, right = two[:, :two.shape[1] // 2], two[:, two.shape[1] // 2:]
    # matplotlib's tab10 blue (predicted / class 0) and orange (DINO / class 1) are drawn in both panels,
    # green and red (classes 2 and 3) only in the class panel
    tab = {"blue": (31, 119, 180), "orange": (255, 127, 14), "green": (44, 160, 44), "red": (214, 39, 40)}

    def has(image, rgb):
        return bool((np.abs(image.astype(int) - rgb).sum(-1) < 40).any())

    assert has(left, tab["blue"]) and has(left, tab["orange"]) and not has(left, tab["green"])
    assert all(has(right, rgb) for rgb in tab.values())
    path = plots.save_png(two, tmp_path / "tsne.png")
    with Image.open(path) as im:
        assert im.size == (two.shape[1], two.shape[0])
    with pytest.raises(ValueError, match="class ids"):
        plots.tsne_plot(pred, dino, classes=classes[:5])


def _log(path, steps=30, with_eval=True):
    with open(path, "w") as f:
        for step in range(1, steps + 1):
            record = {"step": step, "epoch": 0, "loss": 2.0 / step, "loss_diff": 1.0 / step, "loss_token": 0.5,
                      "loss_manifold": 0.1, "loss_align": 0.8, "lambda": min(1.0, step / 10), "lr": 1e-3,
                      "samples_per_s": 100.0 + step, "ids": ["a", "b"]}
            if with_eval and step % 10 == 0:
                record["eval/mid/cosine"] = step / 100
            f.write(json.dumps(record) + "\n")


def test_training_curves_plot_every_logged_key(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    _log(tmp_path / "train_log.jsonl")
    records = plots.read_train_log(tmp_path / "train_log.jsonl")
    assert len(records) == 30 and "ids" not in records[0]
    writer = SummaryWriter(str(tmp_path / "tb"))
    for step in (10, 20, 30):
        writer.add_scalar("eval/mid/cknna", step / 50, step)
        writer.add_scalar("eval/mid/cknna_t0.5", step / 40, step)
        writer.add_scalar("train/loss", 1.0, step)
    writer.close()
    scalars = plots.read_tensorboard_scalars(tmp_path / "tb")
    assert set(scalars) == {"eval/mid/cknna", "eval/mid/cknna_t0.5"}
    assert scalars["eval/mid/cknna"][1] == (20, pytest.approx(0.4))

    series = plots.curve_series(records, scalars)
    assert "eval/mid/cknna_t0.5" not in series and list(series["eval/mid/cknna"][0]) == [10, 20, 30]
    assert list(series["eval/mid/cosine"][1]) == [0.1, 0.2, 0.3]
    assert plots.curve_groups(series) == {
        "losses": ["loss", "loss_align", "loss_diff", "loss_manifold", "loss_token"],
        "schedule": ["lambda", "lr"], "throughput": ["samples_per_s"],
        "alignment": ["eval/mid/cknna", "eval/mid/cosine"]}
    pngs = plots.training_curves(records, tmp_path / "out", scalars)
    assert set(pngs) == {"losses", "schedule", "throughput", "alignment"}
    for path in pngs.values():
        with Image.open(path) as im:
            assert im.size[0] > 400 and len(_colors(np.asarray(im.convert("RGB")))) > 20

    (tmp_path / "bad.jsonl").write_text('{"step": 1, "loss": 1}\n{"loss": 2\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON record"):
        plots.read_train_log(tmp_path / "bad.jsonl")


def test_missing_plot_packages_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependency, match=r"plotting needs the package 'matplotlib'.*repa-fast\[eval\]"):
        plots.new_figure(2, 2)
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    with pytest.raises(MissingDependency, match=r"'scikit-learn'.*repa-fast\[eval\]"):
        plots.tsne_embed(torch.randn(10, 3))
