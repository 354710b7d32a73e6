"""repa-fast-sample (schedulers, conditioning, rank slices, resume, two CPU ranks) and repa-fast-report."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_sd import (
    assert_one_line,
    make_tiny_run,
    one_thread,  # noqa: F401 (autouse fixture)
    sd15_scheduler,
    write_sd_folder,
    write_standin_inception,
)
from PIL import Image

from repa_fast import sample
from repa_fast.losses import sd15_noise_schedule


def _sd15_config() -> dict:
    return dict(sd15_scheduler().config)


# --- the sampler follows the training path -----------------------------------------------------------------

def _sample_with_oracle(scheduler, x0: torch.Tensor, path_type: str, prediction: str, steps: int) -> torch.Tensor:
    """Run ``scheduler`` with the exact prediction for data that is the single point x0."""
    g = torch.Generator().manual_seed(1)
    scheduler.set_timesteps(steps)
    x = torch.randn(x0.shape, generator=g) * scheduler.init_noise_sigma
    trained = sd15_noise_schedule()
    abar, t_max = trained.alphas_cumprod.double(), trained.config.num_train_timesteps - 1  # as SD15Loss
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        if path_type == "linear":  # x_t = (1 - s) x0 + s eps with s = t / (T-1): v = eps - x0 = (x_t - x0) / s
            out = (x_in - x0) / (float(t) / t_max)
        else:
            a, s = abar[int(t)].sqrt().float(), (1 - abar[int(t)]).sqrt().float()
            eps = (x_in - a * x0) / s
            out = a * eps - s * x0 if prediction == "v" else eps
        x = scheduler.step(out, t, x).prev_sample
    return x


def test_schedulers_follow_the_training_path():
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    flow = sample.build_scheduler("auto", "linear", "v", _sd15_config())
    assert isinstance(flow, sample.FlowEulerScheduler)
    assert (_sample_with_oracle(flow, x0, "linear", "v", 3) - x0).abs().max() < 1e-5  # straight paths: exact
    for name in ("dpm", "euler", "unipc", "ddim"):
        for prediction in ("v", "epsilon"):
            scheduler = sample.build_scheduler(name, "ddpm", prediction, _sd15_config())
            err = (_sample_with_oracle(scheduler, x0, "ddpm", prediction, 10) - x0).abs().max()
            # ddim stops at SD-1.5's alpha_bar[0] (set_alpha_to_one false): a little noise stays
            assert err < (0.2 if name == "ddim" else 1e-3), (name, prediction, float(err))
    # a v-prediction run sampled as epsilon would be far off: prediction_type comes from the run
    wrong = sample.build_scheduler("dpm", "ddpm", "epsilon", _sd15_config())
    g = torch.Generator().manual_seed(1)
    wrong.set_timesteps(10)
    x = torch.randn(x0.shape, generator=g) * wrong.init_noise_sigma
    abar = sd15_noise_schedule().alphas_cumprod.double()
    for t in wrong.timesteps:
        a, s = abar[int(t)].sqrt().float(), (1 - abar[int(t)]).sqrt().float()
        x = wrong.step(a * (x - a * x0) / s - s * x0, t, x).prev_sample
    assert (x - x0).abs().max() > 1.0

    from diffusers import DDPMScheduler

    with pytest.raises(ValueError, match="not SD-1.5's schedule"):
        sample.build_scheduler("ddim", "ddpm", "v", dict(DDPMScheduler().config))  # linear 1e-4 -> 0.02 betas
    with pytest.raises(ValueError, match="path_type 'cosine'"):
        sample.build_scheduler("auto", "cosine", "v", _sd15_config())
    with pytest.raises(ValueError, match="linear' with prediction 'epsilon'"):
        sample.build_scheduler("auto", "linear", "epsilon", _sd15_config())
    with pytest.raises(ValueError, match="flow_euler"):
        sample.build_scheduler("ddim", "linear", "v", _sd15_config())


def test_classes_and_rank_slices_cover_every_image_once():
    assert sample.parse_classes("all", 5) == [0, 1, 2, 3, 4]
    assert sample.parse_classes("3,0-1, 7", 10) == [3, 0, 1, 7]
    for bad, match in (("0-3,2", "twice"), ("9", r"\[0, 5\)"), ("a", "not a class id")):
        with pytest.raises(ValueError, match=match):
            sample.parse_classes(bad, 5)
    classes = [4, 0, 2]
    every = [(c, j) for c in classes for j in range(5)]
    for world in (1, 2, 3, 4, 16):
        slices = [sample.rank_jobs(classes, 5, r, world) for r in range(world)]
        flat = [job for s in slices for job in s]
        assert sorted(flat) == sorted(every) and len(flat) == len(set(flat))  # no gaps, no duplicates
        assert max(map(len, slices)) - min(map(len, slices)) <= 1  # balanced
    seeds = {sample.image_seed(s, c, j) for s in range(3) for c in range(50) for j in range(50)}
    assert len(seeds) == 3 * 50 * 50


class _RecordingPipe:
    """Stands in for StableDiffusionPipeline: records the conditioning it is given, returns flat images."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt_embeds, negative_prompt_embeds, generator, **kwargs):
        self.calls.append({"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds,
                           "noise": [torch.randn(3, generator=g) for g in generator], **kwargs})
        images = [Image.new("RGB", (kwargs["width"], kwargs["height"]), (len(self.calls), 0, 0))
                  for _ in range(prompt_embeds.shape[0])]
        return type("Out", (), {"images": images})


def test_generate_conditions_on_the_clip_table_rows(tmp_path):
    table = torch.randn(6, 77, 8)  # 5 classes + the null row
    pipe = _RecordingPipe()
    jobs = [(3, 0), (3, 1), (0, 0)]
    Image.new("RGB", (16, 16)).save(tmp_path / sample.png_name(3, 1))  # made before: skipped
    made = sample.generate(pipe, table, jobs, tmp_path, seed=7, cfg=4.0, steps=3, size=16, batch_size=8,
                           progress=False)
    assert made == 2 and len(pipe.calls) == 1
    call = pipe.calls[0]
    torch.testing.assert_close(call["prompt_embeds"], table[[3, 0]])
    torch.testing.assert_close(call["negative_prompt_embeds"], table[[5, 5]])  # the null row is CFG's negative
    assert call["guidance_scale"] == 4.0 and call["num_inference_steps"] == 3 and call["height"] == 16
    for (c, j), noise in zip([(3, 0), (0, 0)], call["noise"], strict=True):
        torch.testing.assert_close(noise, torch.randn(3, generator=torch.Generator().manual_seed(
            sample.image_seed(7, c, j))))
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["c0000_00000.png", "c0003_00000.png",
                                                              "c0003_00001.png"]


# --- the tool on a tiny run --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from repa_fast.models import build_unet

    root = tmp_path_factory.mktemp("sample")
    run = make_tiny_run(root)
    torch.manual_seed(run["config"].seed)
    write_sd_folder(root / "sd", build_unet("tiny"), sd15_scheduler())  # the base the run's LoRA was trained on
    return {**run, "sd": root / "sd"}


ARGS = ["--classes", "2,0", "--per-class", "3", "--steps", "2", "--size", "64", "--cfg", "3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("c*.png"))}


def _assert_same_image(a: np.ndarray, b: np.ndarray, name: str) -> None:
    """The same image up to rounding: batches of other sizes sum in another order (a level here and there)."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.05, (name, diff.max(), (diff > 0).mean())


def test_two_ranks_resume_and_npz(tiny, capsys):
    run, sd = tiny["run"], tiny["sd"]
    two = tiny["root"] / "two_ranks"
    port = _free_port()
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "repa_fast.sample", str(run), "--sd", str(sd), *ARGS, "--batch-size", "2",
           "--out", str(two)]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "rank 0 made 3 of its 3 images" in outs[0][0] and "img/s" in outs[0][1]
    from_two = _pngs(two)
    assert sorted(from_two) == [f"c{c:04d}_{j:05d}.png" for c in (0, 2) for j in range(3)]

    # one process, other batches: the same images (one seed per image), the npz in (class, j) order
    one = tiny["root"] / "one_rank"
    sample.main([str(run), "--sd", str(sd), *ARGS, "--batch-size", "4", "--out", str(one)])
    from_one = _pngs(one)
    assert from_one.keys() == from_two.keys()
    for name in from_one:
        _assert_same_image(from_one[name], from_two[name], name)
    assert len({a.tobytes() for a in from_one.values()}) == 6  # every image differs
    with np.load(one / "samples_6x64x64x3.npz") as npz:
        order = [(c, j) for c in (2, 0) for j in range(3)]
        np.testing.assert_array_equal(npz["arr_1"], [c for c, _ in order])
        np.testing.assert_array_equal(npz["arr_0"], np.stack([from_one[sample.png_name(c, j)] for c, j in order]))
    meta = json.loads((one / "samples.json").read_text())
    assert meta["classes"] == [2, 0] and meta["per_class"] == 3 and meta["settings"]["scheduler"] == "flow_euler"

    # resume: only the missing images are made, identical to before
    (one / "c0002_00001.png").unlink()
    (one / "c0000_00002.png").unlink()
    capsys.readouterr()
    sample.main([str(run), "--sd", str(sd), *ARGS, "--out", str(one)])
    assert "rank 0 made 2 of its 6 images" in capsys.readouterr().out
    for name, image in _pngs(one).items():
        _assert_same_image(image, from_one[name], name)
    assert_one_line(sample.main, [str(run), "--sd", str(sd), *ARGS, "--cfg", "1.5", "--out", str(one)], capsys,
                    "repa-fast-sample", ["other settings: cfg 3.0 (now 1.5)"])

    # live weights differ from EMA; the ddpm path samples with a DDIM scheduler in v_prediction
    live = tiny["root"] / "live_ddpm"
    sample.main([str(run), "--sd", str(sd), "--weights", "live", "--classes", "2", "--per-class", "1", "--steps",
                 "2", "--size", "64", "--out", str(live), "path_type=ddpm"])
    meta = json.loads((live / "samples.json").read_text())
    assert meta["settings"]["scheduler"] == "ddim" and meta["settings"]["path_type"] == "ddpm"
    assert not np.array_equal(_pngs(live)["c0002_00000.png"], from_one["c0002_00000.png"])


def _bad_sample_inputs(run: Path, sd: Path, tmp: Path) -> dict:
    """name -> (arguments after RUN_DIR, run folder or None for the tiny run, words the one line must hold)."""
    from diffusers import DDPMScheduler

    (tmp / "sd_json" / "scheduler").mkdir(parents=True)
    (tmp / "sd_json" / "scheduler" / "scheduler_config.json").write_text("{oops")
    DDPMScheduler().save_config(tmp / "sd_ddpm" / "scheduler")  # linear betas 1e-4 -> 0.02: not SD-1.5's
    for name, text in (("other_settings", json.dumps({"settings": {"cfg": 9.0}})), ("broken_meta", "{")):
        (tmp / name).mkdir()
        (tmp / name / sample.META_NAME).write_text(text)
    shutil.copytree(sd, tmp / "sd_no_vae")
    for weights in (tmp / "sd_no_vae" / "vae").glob("diffusion_pytorch_model.*"):
        weights.unlink()
    (tmp / "no_weights").mkdir()
    (tmp / "no_weights" / "config.json").write_text((run / "config.json").read_text())
    return {
        "missing run folder": ([], tmp / "nothing", ["nothing", "no config.json", "not a repa-fast run folder"]),
        "run without lora_ema": ([], tmp / "no_weights", ["no_weights", "no lora_ema/"]),
        "--sd without a scheduler": (["--sd", str(tmp)], None, ["--sd", "no scheduler/scheduler_config.json"]),
        "--sd scheduler not JSON": (["--sd", str(tmp / "sd_json")], None, ["scheduler_config.json", "not valid JSON"]),
        "--sd without VAE weights": (["--sd", str(tmp / "sd_no_vae")], None,
                                     ["--sd", "sd_no_vae", "no file named diffusion_pytorch_model", "SD-1.5 folder"]),
        "--sd of another schedule": (["--sd", str(tmp / "sd_ddpm"), "path_type=ddpm"], None,
                                     ["--sd scheduler config", "not SD-1.5's schedule"]),
        "--size 60": (["--size", "60"], None, ["--size 60 is not a multiple of 8"]),
        "--per-class 0": (["--per-class", "0"], None, ["--per-class 0", "at least 1"]),
        "--classes out of range": (["--classes", "3,1000"], None, ["--classes '3,1000'", "[0, 1000)", "[1000]"]),
        "--classes not ids": (["--classes", "0-2,cat"], None, ["--classes", "'cat' is not a class id"]),
        "--classes twice": (["--classes", "0-3,2"], None, ["--classes '0-3,2' names a class twice"]),
        "--classes empty": (["--classes", ","], None, ["--classes ','", "got none"]),
        "--scheduler on the linear path": (["--scheduler", "dpm"], None, ["--scheduler 'dpm'", "'flow_euler' only"]),
        "cosine path": (["path_type=cosine"], None, ["path_type 'cosine'", "no sampler"]),
        "linear path with epsilon": (["prediction=epsilon"], None, ["'linear' with prediction 'epsilon'"]),
        "unknown config key": (["lerning_rate=1"], None, ["'lerning_rate'", "'learning_rate'"]),
        "missing CLIP table": ([f"clip_embeddings_path={tmp / 'none.pt'}"], None, ["none.pt", "clip_embeddings_path"]),
        "folder of other settings": (["--out", str(tmp / "other_settings")], None,
                                     ["other_settings", "made with other settings", "cfg 9.0 (now 4.0)",
                                      "another --out"]),
        "broken samples.json": (["--out", str(tmp / "broken_meta")], None, ["broken_meta", "samples.json",
                                                                             "not valid JSON"]),
    }


def test_bad_sample_inputs_end_with_one_line_naming_them(tiny, tmp_path, capsys):
    run, sd = tiny["run"], tiny["sd"]
    for name, (extra, run_dir, words) in _bad_sample_inputs(run, sd, tmp_path).items():
        argv = [str(run_dir or run), "--sd", str(sd), "--out", str(tmp_path / "out" / name.replace(" ", "_")),
                "--per-class", "1", "--steps", "1", "--size", "64", *extra]
        assert_one_line(sample.main, argv, capsys, "repa-fast-sample", words)
    assert not list(tmp_path.glob("out/*/*.png"))


def test_sample_errors_under_a_launcher_name_the_rank(tiny, tmp_path, capsys, monkeypatch):
    run, sd = tiny["run"], tiny["sd"]
    argv = [str(run), "--sd", str(sd), "--out", str(tmp_path / "x"), "--per-class", "1"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    line = assert_one_line(sample.main, [*argv, "--size", "60"], capsys, "repa-fast-sample", [])
    assert line == "repa-fast-sample: rank 1: --size 60 is not a multiple of 8 (the VAE's downsampling)"
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert_one_line(sample.main, argv, capsys, "repa-fast-sample",
                    ["repa-fast-sample: rank 1: WORLD_SIZE=2 but ['MASTER_ADDR', 'MASTER_PORT'] not set"])
    monkeypatch.setenv("RANK", "2")
    assert_one_line(sample.main, argv, capsys, "repa-fast-sample",
                    ["repa-fast-sample: rank 2: RANK=2 is not in [0, WORLD_SIZE=2)"])


@pytest.mark.slow
def test_two_ranks_refusing_bad_classes_print_one_line_each(tiny, tmp_path):
    # in a process group (gloo), both ranks refuse the same bad --classes: one line each, named, and no hang
    argv = [str(tiny["run"]), "--sd", str(tiny["sd"]), "--out", str(tmp_path / "x"), "--per-class", "1"]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "repa_fast.sample", *argv, "--classes", "1000"]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    for rank, proc in enumerate(procs):
        _, err = proc.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 1 and "Traceback" not in err and len(lines) == 1, err[-3000:]
        assert lines[0].startswith(f"repa-fast-sample: rank {rank}: --classes '1000': ids must lie in"), lines


@pytest.mark.parametrize("module", ["repa_fast.sample", "repa_fast.fid", "repa_fast.report"])
def test_cli_help(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "usage: repa-fast-" in r.stdout, r.stderr[-2000:]


# --- the report ------------------------------------------------------------------------------------------

def test_report_shows_every_part_it_finds(tiny, tmp_path):
    from repa_fast import evaluate, fid, report

    run = tiny["run"]
    # a bare run folder: the page names what is absent and how to make it
    bare = report.build_report(run, out=tmp_path / "bare")
    text = bare.read_text()
    assert "No train_log.jsonl" in text and "repa-fast-evaluate RUN_DIR" in text and "repa-fast-sample" in text

    # what the tools leave: a training log, evaluate's metrics and t-SNE, a sample set with its FID
    with open(run / "train_log.jsonl", "w") as f:
        for step in range(1, 41):
            f.write(json.dumps({"step": step, "epoch": 0, "loss": 1 / step, "loss_diff": 0.5 / step, "lr": 1e-3,
                                "samples_per_s": 50.0, "eval/mid/cosine": 0.01 * step, "ids": ["x"]}) + "\n")
    evaluate.main([str(run), "--weights", "ema", "--num-samples", "8", "--k", "4", "--cca-dims", "4",
                   "--tokens-per-sample", "8", "--tsne-points", "30", "--timesteps", "0.5", "--device", "cpu"])
    samples = run / "samples" / "set_a"
    sample.main([str(run), "--sd", str(tiny["sd"]), "--classes", "1,3", "--per-class", "2", "--steps", "2",
                 "--size", "64", "--out", str(samples)])
    write_standin_inception(tmp_path / "inception.pt")
    fid.main([str(samples / "samples_4x64x64x3.npz"), str(samples / "samples_4x64x64x3.npz"), "--inception",
              str(tmp_path / "inception.pt"), "--is-splits", "2", "--kid-subsets", "5"])
    fid_value = json.loads((samples / "samples_4x64x64x3_fid.json").read_text())["fid"]

    index = report.build_report(run)
    text = index.read_text()
    for section in ("Training curves", "Alignment metrics over training", "Alignment metrics", "t-SNE", "Samples",
                    "FID", "Config"):
        assert f"<h2>{section}" in text
    assert 'class="absent"' not in text  # every part found
    sources = re.findall(r'<img src="([^"]+)"', text)
    assert {"curves_losses.png", "curves_alignment.png", "tsne_ema_mid_t0.5.png", "samples_set_a.png"} <= set(sources)
    for src in sources:  # every picture lies in the report folder
        with Image.open(index.parent / src) as im:
            assert im.size[0] > 100
    assert f'<td class="num">{report._num(fid_value)}</td>' in text  # the FID cell itself
    assert "<td>clip_embeddings_path</td>" in text and "<td>ema</td>" in text


def test_bad_report_inputs_end_with_one_line_naming_them(tmp_path, capsys):
    from repa_fast import report

    def run_folder(name: str, config: str = "{}") -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(config)
        return folder

    log = run_folder("bad_log")
    (log / "train_log.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": \n')
    no_step = run_folder("no_step")
    (no_step / "train_log.jsonl").write_text('{"loss": 0.5}\n')
    metrics = run_folder("bad_metrics")
    (metrics / "eval").mkdir()
    (metrics / "eval" / "metrics.json").write_text("[1, 2]")
    samples = run_folder("bad_samples")
    (samples / "samples" / "a").mkdir(parents=True)
    (samples / "samples" / "a" / "samples.json").write_text(json.dumps({"classes": [0], "per_class": 1}))
    (samples / "samples" / "a" / sample.png_name(0, 0)).write_bytes(b"not a png")
    fid_json = run_folder("bad_fid")
    (fid_json / "samples" / "a").mkdir(parents=True)
    (fid_json / "samples" / "a" / "samples.json").write_text(json.dumps({"classes": [], "per_class": 0}))
    (fid_json / "samples" / "a" / "fid.json").write_text("{nope")
    cases = {
        "missing run folder": ([str(tmp_path / "nothing")], ["nothing", "no config.json"]),
        "config not JSON": ([str(run_folder("bad_config", "{oops"))], ["config.json", "not valid JSON"]),
        "broken log line": ([str(log)], ["train_log.jsonl:2", "not a JSON record", "fix or delete that line"]),
        "log record without step": ([str(no_step)], ["train_log.jsonl:1", "'step'"]),
        "metrics.json not an object": ([str(metrics)], ["metrics.json", "JSON list", "repa-fast-evaluate"]),
        "unreadable sample image": ([str(samples)], [sample.png_name(0, 0), "not a readable image"]),
        "fid JSON broken": ([str(fid_json)], ["fid.json", "not valid JSON", "repa-fast-fid"]),
        "missing --eval-dir": ([str(run_folder("ok")), "--eval-dir", str(tmp_path / "no_eval")],
                               ["--eval-dir", "no_eval", "no such folder"]),
        "missing --samples": ([str(tmp_path / "ok"), "--samples", str(tmp_path / "no_set")],
                              ["--samples", "no_set", "no such folder"]),
        "--grid-images 0": ([str(tmp_path / "ok"), "--grid-images", "0"], ["--grid-images 0", "at least 1"]),
    }
    for name, (argv, words) in cases.items():
        assert_one_line(report.main, [*argv, "--out", str(tmp_path / "report" / name.replace(" ", "_"))], capsys,
                        "repa-fast-report", words)
