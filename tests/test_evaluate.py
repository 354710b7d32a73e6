"""Alignment metrics, t-SNE, loading a run folder, evaluate(), the launcher hook and sample grids."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_sd import (
    make_tiny_run,
    one_thread,  # noqa: F401 (autouse fixture)
    write_sd_folder,
)
from PIL import Image

from repa_fast import evaluate as ev
from repa_fast.data.dataset import build_dataset
from repa_fast.losses import manifold_gram_loss

LAYERS = ["mid"]


# --- metrics -----------------------------------------------------------------------------------------

SIZES = dict(k=10, cca_dims=8, tokens_per_sample=16)


def _tokens(seed, B=256, N=16, D=32):
    return torch.randn(B, N, D, generator=torch.Generator().manual_seed(seed))


def test_identical_and_rotated_tokens_align_fully():
    x = _tokens(0)
    same = ev.alignment_metrics(x, x.clone(), **SIZES)
    assert same["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert same["gram_loss"] == pytest.approx(0.0, abs=1e-10)
    assert same["cknna"] > 0.999 and same["cca"] > 0.999
    # an orthogonal map keeps every inner product: cosine is lost, the geometry is not
    Q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1)))
    rotated = ev.alignment_metrics(x, x @ Q, **SIZES)
    assert abs(rotated["cosine"]) < 0.2
    assert rotated["gram_loss"] < 1e-10 and rotated["cknna"] > 0.999 and rotated["cca"] > 0.999


def test_independent_tokens_score_at_chance():
    for seed in range(3):
        m = ev.alignment_metrics(_tokens(10 + seed), _tokens(20 + seed), **SIZES)
        # measured chance levels at these sizes: CKNNA ~0.03 (n = 256 samples), CCA ~0.04 (4096 tokens)
        assert abs(m["cosine"]) < 0.01
        assert abs(m["cknna"]) < 0.1 and m["cca"] < 0.15
        assert abs(m["cknna"] - m["cknna_chance"]) < 0.05 and abs(m["cca"] - m["cca_chance"]) < 0.05
        assert m["gram_loss"] > 0.01


def test_metrics_follow_the_noise_level_and_gram_loss_is_the_losses_one():
    x = _tokens(0)
    noise = _tokens(5)
    runs = [ev.alignment_metrics(x, x + s * noise, **SIZES) for s in (0.3, 1.0, 3.0)]
    for metric in ("cosine", "cknna", "cca"):
        values = [r[metric] for r in runs]
        assert values[0] > values[1] > values[2], (metric, values)
    for metric in ("cknna", "cca"):
        assert runs[0][metric] > runs[0][f"{metric}_chance"] + 0.3
    assert runs[0]["gram_loss"] < runs[1]["gram_loss"] < runs[2]["gram_loss"]
    y = x + noise
    got = ev.alignment_metrics(x, y, **SIZES)["gram_loss"]
    assert got == pytest.approx(float(manifold_gram_loss(x, y)), rel=1e-5)


def test_metric_arguments_are_checked():
    a = torch.randn(8, 4)
    with pytest.raises(ValueError, match="1 <= k <= n - 2"):
        ev.cknna(a, a, k=7)
    with pytest.raises(ValueError, match="n >= 4"):
        ev.cknna(a[:3], a[:3], k=1)
    with pytest.raises(ValueError, match="more rows than dims"):
        ev.cca_score(a, a, dims=8)
    with pytest.raises(ValueError, match="paired"):
        ev.cca_score(a, a[:5], dims=2)


# --- a tiny run folder -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Synthetic caches, and a run folder as the launcher leaves it: config.json, lora/, lora_ema/."""
    return make_tiny_run(tmp_path_factory.mktemp("evaluate"), LAYERS)


def test_load_run_reproduces_the_trained_weights(tiny_run):
    trained = dict(tiny_run["model"].named_parameters())
    for weights in ("live", "ema"):
        model, config = ev.load_run(tiny_run["run"], weights)
        assert config == tiny_run["config"]
        loaded = dict(model.named_parameters())
        assert loaded.keys() == trained.keys()  # every LoRA tensor landed (attention and convs)
        for name, p in loaded.items():
            want = tiny_run["ema"][name] if weights == "ema" and name in tiny_run["ema"] else trained[name]
            torch.testing.assert_close(p, want, rtol=0, atol=0, msg=f"{weights}: {name}")
    x, t, ehs = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 77, 32)
    model, _ = ev.load_run(tiny_run["run"], "live")
    ref = tiny_run["model"].eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, ehs), ref(x, t, ehs), rtol=0, atol=0)
        torch.testing.assert_close(model.get_aligned_tokens()["mid"], ref.get_aligned_tokens()["mid"], rtol=0, atol=0)
    ref.clear_features()
    with pytest.raises(FileNotFoundError, match="config.json"):
        ev.load_run(tiny_run["root"], "live")


def test_evaluate_is_batch_independent_and_the_cli_writes_json_and_plots(tiny_run):
    config = tiny_run["config"]
    dataset = build_dataset(config)
    model, _ = ev.load_run(tiny_run["run"], "ema")
    from repa_fast.data.cache import load_clip_table

    table = load_clip_table(config.clip_embeddings_path)
    a = ev.evaluate(model, dataset, config, num_samples=12, clip_table=table, batch_size=5, k=4, cca_dims=8,
                    tokens_per_sample=16)
    b = ev.evaluate(model, dataset, config, num_samples=12, clip_table=table, batch_size=12, k=4, cca_dims=8,
                    tokens_per_sample=16)
    assert a["num_samples"] == 12 and a["indices"] == [8, 19] and a["timesteps"] == [0.25, 0.5, 0.75]
    assert set(a["layers"]["mid"]) == {"t=0.25", "t=0.5", "t=0.75", "mean"}
    for key in ("t=0.25", "t=0.5", "t=0.75", "mean"):
        for metric, value in a["layers"]["mid"][key].items():
            assert np.isfinite(value) and value == pytest.approx(b["layers"]["mid"][key][metric], rel=1e-4, abs=1e-6)
        assert a["loss_diff"][key] == pytest.approx(b["loss_diff"][key], rel=1e-5)
    assert a["loss_diff"]["t=0.25"] != a["loss_diff"]["t=0.75"]

    out = tiny_run["root"] / "eval"
    ev.main([str(tiny_run["run"]), "--out", str(out), "--num-samples", "12", "--k", "4", "--cca-dims", "8",
             "--tokens-per-sample", "16", "--tsne-points", "30", "--batch-size", "6", "--device", "cpu"])
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["weights"]) == {"live", "ema"}
    for metric, value in report["weights"]["ema"]["layers"]["mid"]["mean"].items():
        assert value == pytest.approx(a["layers"]["mid"]["mean"][metric], rel=1e-4, abs=1e-6)
    assert report["weights"]["live"]["layers"]["mid"]["mean"]["cosine"] != \
        report["weights"]["ema"]["layers"]["mid"]["mean"]["cosine"]
    for w in ("live", "ema"):
        for t in ("0.25", "0.5", "0.75"):
            with Image.open(out / f"tsne_{w}_mid_t{t}.png") as im:
                assert im.size[0] == 2 * im.size[1]  # two panels: by source and by class


class _Recorder:
    def __init__(self):
        self.scalars, self.images = {}, {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = (value, step)

    def add_image(self, tag, image, step, dataformats="CHW"):
        self.images[tag] = (image, step, dataformats)


def test_run_alignment_eval_logs_scalars_and_tsne(tiny_run):
    from repa_fast.data.cache import load_clip_table

    config = tiny_run["config"]
    dataset = build_dataset(config)
    table = load_clip_table(config.clip_embeddings_path)
    model, _ = ev.load_run(tiny_run["run"], "live")
    model.train()
    batch = ev.held_out_batch(dataset, 12, clip_table=table, dtype=torch.float32)
    writer = _Recorder()
    result = ev.run_alignment_eval(model, batch, config, step=7, writer=writer, k=4, cca_dims=8,
                                   tokens_per_sample=16, tsne_points=30, tsne_iter=250)
    assert model.training and not model.hook_manager.features  # mode restored, features dropped
    want = {f"eval/mid/{m}" for m in ev.METRICS} | {f"eval/mid/{m}_t{t}" for m in ev.METRICS
                                                     for t in ("0.25", "0.5", "0.75")} | {"eval/loss_diff"}
    assert set(writer.scalars) == want and all(step == 7 for _, step in writer.scalars.values())
    image, step, fmt = writer.images["eval/mid/tsne"]
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8 and fmt == "HWC" and step == 7
    assert image.shape[1] == 2 * image.shape[0]  # by source and by class
    # the same numbers as evaluate() on the same samples with the same seed
    ref = ev.evaluate(model, dataset, config, num_samples=12, clip_table=table, k=4, cca_dims=8,
                      tokens_per_sample=16, seed=config.seed)
    for metric in ev.METRICS:
        assert writer.scalars[f"eval/mid/{metric}"][0] == pytest.approx(ref["layers"]["mid"]["mean"][metric],
                                                                        rel=1e-4, abs=1e-6)
    assert result["loss_diff"]["mean"] == pytest.approx(ref["loss_diff"]["mean"], rel=1e-5)
    with pytest.raises(ValueError, match="clip_table"):
        ev.run_alignment_eval(model, {k: v for k, v in batch.items() if k != "encoder_hidden_states"}, config, 1)


def test_without_the_plot_packages_the_hook_warns_and_the_cli_names_the_extra(tiny_run, monkeypatch, tmp_path,
                                                                             capsys):
    from repa_fast.data.cache import load_clip_table

    config = tiny_run["config"]
    table = load_clip_table(config.clip_embeddings_path)
    model, _ = ev.load_run(tiny_run["run"], "live")
    batch = ev.held_out_batch(build_dataset(config), 8, clip_table=table, dtype=torch.float32)
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    writer = _Recorder()
    with pytest.warns(RuntimeWarning, match=r"no t-SNE image.*'scikit-learn'.*repa-fast\[eval\]"):
        ev.run_alignment_eval(model, batch, config, step=3, writer=writer, timesteps=[0.5], k=4, cca_dims=4,
                              tokens_per_sample=8)
    assert "eval/mid/cosine" in writer.scalars and not writer.images  # the metrics are logged all the same
    with pytest.raises(SystemExit) as stop:
        ev.main([str(tiny_run["run"]), "--weights", "ema", "--num-samples", "8", "--k", "4", "--cca-dims", "4",
                 "--tokens-per-sample", "8", "--timesteps", "0.5", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 1 and len(err.splitlines()) == 1  # one line, no traceback
    assert re.search(r"repa-fast-evaluate: .*'scikit-learn'.*repa-fast\[eval\]", err), err


def test_mlp_heads_export_round_trip_and_evaluate(tiny_run):
    import dataclasses

    from repa_fast.data.cache import load_clip_table
    from repa_fast.export import export_weights
    from repa_fast.models import build_aligned_unet

    config = dataclasses.replace(tiny_run["config"], align_head="mlp", path_type="ddpm",
                                 output_dir=str(tiny_run["root"] / "mlp_run"))
    run = Path(config.output_dir)
    torch.manual_seed(config.seed)
    model = build_aligned_unet(config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # trained heads: away from their init
        for p in model.align_heads.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    export_weights(model, run / "lora")
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    loaded, _ = ev.load_run(run, "live")
    assert loaded.head_type == "mlp"
    want = dict(model.align_heads.named_parameters())
    have = dict(loaded.align_heads.named_parameters())
    assert have.keys() == want.keys() and any(".mlp.2." in k for k in have)
    for name, value in have.items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0, msg=name)
    x, t, ehs = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 77, 32)
    with torch.no_grad():
        model.eval()(x, t, ehs)
        loaded(x, t, ehs)
        # the same weights and features; BLAS may sum the 2048-wide GEMMs in another order (alignment)
        torch.testing.assert_close(loaded.get_aligned_tokens()["mid"], model.get_aligned_tokens()["mid"],
                                   rtol=1e-5, atol=1e-6)
    # heads of the other kind are refused by name, not loaded half
    from repa_fast.models import SD15UNetAligned, build_unet

    conv_gn = SD15UNetAligned(build_unet("tiny"), LAYERS, 64, num_tokens=64)
    with pytest.raises(ValueError, match="'align_head': 'mlp'.*'align_head': 'conv_gn'"):
        ev.load_heads(conv_gn, run / "lora")
    # evaluation runs with the mlp heads (ddpm: U-Net steps 250, 500, 750 of SD-1.5's 1000)
    result = ev.evaluate(loaded, build_dataset(config), config, num_samples=8,
                         clip_table=load_clip_table(config.clip_embeddings_path), k=4, cca_dims=4,
                         tokens_per_sample=8)
    assert result["timesteps"] == [250, 500, 750] and result["path_type"] == "ddpm"
    assert all(np.isfinite(v) for v in result["layers"]["mid"]["mean"].values())


# --- sample grids ------------------------------------------------------------------------------------

def test_sample_grid_rows_and_size(tiny_run):
    from repa_fast.models import build_unet

    config = tiny_run["config"]
    torch.manual_seed(config.seed)
    sd = tiny_run["root"] / "sd"
    write_sd_folder(sd, build_unet("tiny"))  # the base the run's LoRA was trained on
    run = tiny_run["run"]
    dirs = {"base": None, "live": run / "lora", "ema": run / "lora_ema"}
    classes, seeds, size = ["tench", "goldfish"], [0, 1], 64
    out = ev.sample_grid(sd, dirs, classes, seeds, tiny_run["root"] / "grid.png", num_inference_steps=2, size=size)
    with Image.open(out) as im:
        assert im.size == (len(seeds) * size, len(dirs) * len(classes) * size)
        grid = np.asarray(im.convert("RGB")).astype(np.int16)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert [(r["weights"], r["class"]) for r in meta["rows"]] == [(w, c) for w in dirs for c in classes]
    assert meta["rows"][0]["prompt"] == "a photo of a tench"

    def cell(row, col):
        return grid[row * size:(row + 1) * size, col * size:(col + 1) * size]

    assert np.abs(cell(0, 0) - cell(0, 1)).max() > 0  # seeds differ
    assert np.abs(cell(0, 0) - cell(2, 0)).max() > 0  # the live LoRA changes the image
    assert np.abs(cell(2, 0) - cell(4, 0)).max() > 0  # live and EMA differ
    # without model_index.json the pipeline is assembled from the subfolders: the same grid
    (sd / "model_index.json").unlink()
    again = ev.sample_grid(sd, dirs, classes, seeds, tiny_run["root"] / "grid2.png", num_inference_steps=2,
                           size=size)
    with Image.open(again) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")).astype(np.int16), grid)
