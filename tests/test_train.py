"""The DeepSpeed launcher: two CPU ranks (gloo), ZeRO-2 and ZeRO-3, exact resume, LoRA export."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from repa_fast.config import ConfigError, load_config
from repa_fast.data.synthetic import write_synthetic_caches
from repa_fast.train import build_ds_config, check_switches, resolve_ds_config_path

TINY = "configs/tiny.yaml"


def test_yaml_and_ds_config_cannot_disagree(tmp_path):
    cfg = load_config(TINY, ["batch_size=6", "learning_rate=1e-3", "gradient_clip=0.5"])
    ds = build_ds_config(cfg, "zero2", world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 6 and ds["train_batch_size"] == 24
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert build_ds_config(load_config(TINY, ["mixed_precision=bf16"]), "zero3", 1)["bf16"]["enabled"] is True

    def write(**extra):
        base = json.loads(resolve_ds_config_path("zero2").read_text())
        base.update(extra)
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(base))
        return str(path)

    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu' is 16 but the YAML config gives 6"):
        build_ds_config(cfg, write(train_micro_batch_size_per_gpu=16), 1)
    with pytest.raises(ConfigError, match="train_batch_size"):
        build_ds_config(cfg, write(train_batch_size=12), 4)
    with pytest.raises(ConfigError, match=r"'lr' is 0.01 but the YAML config gives 0.001"):
        build_ds_config(cfg, write(optimizer={"type": "AdamW", "params": {"lr": 0.01}}), 1)
    with pytest.raises(ConfigError, match="total_num_steps"):
        build_ds_config(cfg, write(scheduler={"type": "WarmupCosineLR", "params": {"total_num_steps": 5}}), 1)
    agreeing = build_ds_config(cfg, write(optimizer={"type": "AdamW", "params": {"lr": 1e-3}}), 1)
    assert "optimizer" not in agreeing  # the launcher builds AdamW from the YAML
    with pytest.raises(ConfigError, match="DeepCompile"):
        build_ds_config(cfg, "zero2_deepcompile", 1)
    with pytest.raises(ConfigError, match="not found"):
        build_ds_config(cfg, "zero9", 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_deepcompile_without_cuda_is_a_clear_error():
    with pytest.raises(ConfigError, match="deepcompile needs CUDA"):
        check_switches(load_config(TINY, ["compile=deepcompile"]))
    interpret = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with pytest.raises(ConfigError, match="kernels=triton needs CUDA"):
            check_switches(load_config(TINY, ["kernels=triton"]))
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    check_switches(load_config(TINY, ["kernels=auto", "compile=inductor"]))
    r = subprocess.run([sys.executable, "-m", "repa_fast.train", "--config", TINY, "compile=deepcompile"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "deepcompile needs CUDA" in r.stderr and "Traceback" not in r.stderr


def test_unknown_key_on_the_command_line_stops_before_training():
    r = subprocess.run([sys.executable, "-m", "repa_fast.train", "--config", TINY, "lerning_rate=1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "lerning_rate" in r.stderr and "learning_rate" in r.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    paths = write_synthetic_caches(root, num_samples=96, num_classes=4, latent_shape=(4, 16, 16), num_tokens=64,
                                   dino_D=64, clip_shape=(77, 32))
    return [f"{k}={v}" for k, v in paths.items()]


_PORT = [29650]


FAULT_LAUNCH = os.path.join(os.path.dirname(__file__), "fault_launch.py")


def launch(out, data, *overrides, ds="zero2", env=None, resume=None, check=True, report_to="none", fault=None):
    _PORT[0] += 1
    entry = ["--module", "repa_fast.train"] if fault is None else [FAULT_LAUNCH, "--fault", fault]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_PORT[0]),
           *entry, "--config", TINY, "--ds-config", ds, "--output-dir", str(out),
           "--report-to", report_to, *(["--resume", resume] if resume else []), *data,
           "batch_size=4", "learning_rate=3e-3", "log_interval=1", *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})
    if check and r.returncode != 0:
        raise AssertionError(f"launcher failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def read_log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def assert_loss_falls(rows):
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first, (first, last)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("straight")
    launch(out, data, "max_steps=16", "save_interval=8", "eval_interval=8", report_to="tensorboard")
    return out


@pytest.mark.slow
def test_non_finite_losses_skip_then_stop_naming_the_step(tmp_path, data):
    # one process: losses are NaN from step 3 on; read (and checkpointed) every 2 steps
    cmd = [sys.executable, FAULT_LAUNCH, "--fault", "nan_loss:3", "--config", TINY, "--output-dir", str(tmp_path),
           "--report-to", "none", *data, "batch_size=4", "max_steps=20", "log_interval=2", "save_interval=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "non-finite loss at step 3: step skipped (1 in a row)" in r.stderr
    assert "5 non-finite losses in a row, the last at step 7" in r.stderr and "Traceback" not in r.stderr
    assert [row["step"] for row in read_log(tmp_path)] == [1, 2]
    skipped = [json.loads(line) for line in (tmp_path / "nonfinite_samples.jsonl").read_text().splitlines()]
    assert [row["step"] for row in skipped] == [3, 4, 5, 6, 7, 8]  # found at the read of steps 7-8
    assert all(len(row["ids"]["0"]) == 4 for row in skipped)  # the batch's sample ids, by rank
    # a skipped step changes no weight: checkpoints 2, 4 and 6 hold the same model
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000006"
    states = [torch.load(ckpt / f"step_{s:08d}" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
              for s in (2, 4, 6)]
    trainable = [k for k in states[0] if "lora_" in k or k.startswith("align_heads.")]
    assert trainable and all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in trainable)


@pytest.mark.slow
def test_a_prediction_type_the_local_model_was_not_trained_for_warns_once(tmp_path, data):
    from repa_fast.models import build_unet

    torch.manual_seed(0)
    build_unet("tiny").save_pretrained(tmp_path / "sd" / "unet")
    (tmp_path / "sd" / "scheduler").mkdir()
    schedule = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                "prediction_type": "v_prediction"}
    (tmp_path / "sd" / "scheduler" / "scheduler_config.json").write_text(json.dumps(schedule))
    cmd = [sys.executable, "-m", "repa_fast.train", "--config", TINY, "--output-dir", str(tmp_path / "run"),
           "--report-to", "none", *data, "batch_size=4", "max_steps=1", f"model={tmp_path / 'sd'}",
           "prediction=epsilon"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("prediction='epsilon' trains epsilon but") == 1
    assert "The LoRA (lora_targets='attn+conv', rank 4) adapts only 25 modules" in r.stderr


@pytest.mark.slow
def test_two_rank_zero2_trains_and_exports(straight_run):
    rows = read_log(straight_run)
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert_loss_falls(rows)
    assert rows[12]["epoch"] == 1  # 96 samples / 2 ranks / batch 4: 12 steps an epoch
    ckpt = straight_run / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000016" and (ckpt / "step_00000008").is_dir()
    for sub in ("lora", "lora_ema"):
        assert (straight_run / sub / "pytorch_lora_weights.safetensors").is_file()
        assert (straight_run / sub / "align_heads.safetensors").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight_run / "tensorboard")).Reload()
    assert {"train/loss", "train/lr", "train/samples_per_s"} <= set(events.Tags()["scalars"])
    for metric in ("cosine", "gram_loss", "cknna", "cca"):  # alignment metrics every eval_interval
        assert [e.step for e in events.Scalars(f"eval/mid/{metric}")] == [8, 16]
    assert "eval/mid/tsne" in events.Tags()["images"]


@pytest.mark.slow
def test_two_rank_zero3_trains_the_zero2_model(tmp_path, data, straight_run):
    launch(tmp_path, data, "max_steps=16", "save_interval=16", ds="zero3")
    rows = read_log(tmp_path)
    assert_loss_falls(rows)
    # partitioning changes memory, not the maths: same batches, same losses up to reduction order
    for a, b in zip(read_log(straight_run), rows, strict=True):
        assert a["ids"] == b["ids"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]
    from safetensors.torch import load_file

    live = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    ema = load_file(str(tmp_path / "lora_ema" / "pytorch_lora_weights.safetensors"))
    assert live.keys() == ema.keys() and len(live) == 2 * 25  # gathered, not ZeRO-3 placeholders
    assert all(v.numel() > 0 and torch.isfinite(v).all() for v in live.values())
    assert any(not torch.equal(live[k], ema[k]) for k in live)


@pytest.mark.slow
def test_kill_and_resume_gives_the_uninterrupted_run(tmp_path, data, straight_run):
    # Saves every 4 steps; dies while writing the step-12 checkpoint, after the DeepSpeed files are out.
    r = launch(tmp_path, data, "max_steps=16", "save_interval=4", fault="save:12", check=False)
    assert r.returncode != 0 and "dying at save step 12" in r.stderr
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "step_00000012").is_dir()  # written in part...
    assert (ckpt / "latest").read_text() == "step_00000008"  # ...but never marked latest
    launch(tmp_path, data, "max_steps=16", "save_interval=4", resume="latest")
    straight, resumed = read_log(straight_run), read_log(tmp_path)
    assert [r["step"] for r in resumed] == list(range(1, 17))
    for a, b in zip(straight, resumed, strict=True):
        assert a["ids"] == b["ids"], a["step"]
        for key in ("loss", "loss_diff", "loss_token", "loss_manifold"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (a["step"], key)
    from safetensors.torch import load_file

    for sub in ("lora", "lora_ema"):
        x = load_file(str(straight_run / sub / "pytorch_lora_weights.safetensors"))
        y = load_file(str(tmp_path / sub / "pytorch_lora_weights.safetensors"))
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_two_rank_run_with_the_dali_loader_is_the_torch_run(tmp_path, data, straight_run):
    pytest.importorskip("nvidia.dali")
    launch(tmp_path, data, "max_steps=16", "save_interval=16", "loader=dali", "num_workers=1")
    for a, b in zip(read_log(straight_run), read_log(tmp_path), strict=True):
        assert a["ids"] == b["ids"], a["step"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), a["step"]


@pytest.mark.slow
def test_exported_lora_loads_into_a_diffusers_pipeline(straight_run):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from repa_fast.models import build_unet

    torch.manual_seed(0)
    unet = build_unet("tiny")
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=2, vocab_size=1000, max_position_embeddings=77))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet,
                                   scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    x, t, ehs = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    live = load_file(str(straight_run / "lora" / "pytorch_lora_weights.safetensors"))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # peft warns (only) when modules are left out
        before = pipe.unet(x, t, ehs).sample
        pipe.load_lora_weights(str(straight_run / "lora"))
        after = pipe.unet(x, t, ehs).sample
    assert (after - before).abs().max() > 1e-4
    # every exported tensor landed in the pipeline's U-Net: 25 modules x (A, B)
    loaded = {n: p for n, p in pipe.unet.named_parameters() if "lora_" in n}
    assert len(loaded) == len(live) == 50
    for key, value in live.items():
        name = key.removeprefix("unet.").replace("lora_A.weight", "lora_A.default_0.weight")
        name = name.replace("lora_B.weight", "lora_B.default_0.weight")
        assert torch.equal(loaded[name], value), key
    ema = load_file(str(straight_run / "lora_ema" / "pytorch_lora_weights.safetensors"))
    assert live.keys() == ema.keys() and any(not torch.equal(live[k], ema[k]) for k in live)
    heads = load_file(str(straight_run / "lora" / "align_heads.safetensors"))
    assert set(heads) == {"mid.proj.0.weight", "mid.proj.1.weight", "mid.proj.1.bias"}


COUNT_TRANSFERS = r"""
import collections, json, os, sys
import torch
import repa_fast.export, repa_fast.train as T

ROOT = os.path.dirname(T.__file__) + os.sep  # repa_fast/
DATA = ROOT + "data" + os.sep  # the input pipeline fills host buffers: no device tensor there
counts, active = collections.Counter(), [False]

def counting(name, original):
    def method(self, *args, **kwargs):
        caller = sys._getframe(1).f_code
        if active[0] and caller.co_filename.startswith(ROOT) and not caller.co_filename.startswith(DATA):
            counts[f"{name} in {os.path.relpath(caller.co_filename, ROOT)}:{caller.co_name}"] += 1
        return original(self, *args, **kwargs)
    return method

for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__format__"):
    setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))

def paused(fn):  # checkpoints and the LoRA export copy to the host by nature
    def call(*args, **kwargs):
        active[0] = False
        try:
            return fn(*args, **kwargs)
        finally:
            active[0] = True
    return call

setup = T.setup
def counted_setup(*args, **kwargs):
    run = setup(*args, **kwargs)
    active[0] = True  # from here on: the loop
    return run

T.setup, T.save = counted_setup, paused(T.save)
repa_fast.export.export_weights = paused(repa_fast.export.export_weights)
T.main(sys.argv[1:])
print("TRANSFERS " + json.dumps(counts))
"""


@pytest.mark.slow
def test_steps_copy_nothing_to_the_host_but_once_per_log_interval(tmp_path, data):
    cmd = [sys.executable, "-c", COUNT_TRANSFERS, "--config", TINY, "--output-dir", str(tmp_path),
           "--report-to", "none", *data, "batch_size=4", "max_steps=12", "log_interval=4", "eval_interval=1000",
           "save_interval=1000"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    counts = json.loads(r.stdout.split("TRANSFERS ")[-1])
    # 12 steps, read every 4: three copies, all of them the log interval's one read
    assert counts == {"tolist in train.py:flush": 3}, counts
    assert [row["step"] for row in read_log(tmp_path)] == list(range(1, 13))


@pytest.mark.parametrize("overrides,expected", [
    ([], []),
    (["align_layers=enc_last,mid", "lora_targets=attention-only"], ["align layer 'enc_last': no trainable U-Net"]),
    (["detach_features=true"], ["align layer 'mid'", "detach_features is true"]),
    (["align_coeff=0"], ["align_coeff is 0"]),
])
def test_settings_that_train_nothing_are_warned_about(overrides, expected):
    from repa_fast.models import build_aligned_unet
    from repa_fast.train import training_warnings

    config = load_config(TINY, overrides)
    messages = training_warnings(config, build_aligned_unet(config))
    assert len(messages) == len(expected)
    for message, start in zip(messages, expected, strict=True):
        assert message.startswith(start), message
