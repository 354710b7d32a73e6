"""The DeepSpeed training launcher.

    deepspeed --num_gpus N --module repa_fast.train --config configs/sd15_repa_A.yaml [key=value ...]
    repa-fast-train --config configs/tiny.yaml            # one process
    python -m repa_fast.train --config ... --resume latest

The source design's loop (AdamW 0.9/0.999, cosine schedule with 10 % warm-up, clipping, EMA) under
DeepSpeed ZeRO, read top to bottom: ``setup`` (model, data, engine, self-checks), ``resume``,
``train_step`` (one forward gives the prediction and the alignment losses; backward; optimizer; EMA),
``StepLog`` (what a step reports, read from the device once per ``log_interval``), ``save``, and
``train``, the loop. Every piece of randomness is a function of (seed, rank, step) or (seed, epoch,
index), and a checkpoint carries step, epoch and position in the epoch, so a resumed run sees the same
batches, noise and alignment weight as an uninterrupted one.

No step copies anything from the device to the host: the losses and the non-finite flags stay on the
device and are read together once per log interval. A step whose loss is non-finite on any rank is
skipped on the device: the flag, all-reduced over the ranks, is AdamW's ``found_inf`` (the mechanism
torch's GradScaler uses), so the fused AdamW leaves the parameters, its moments and its step count
untouched; the learning-rate schedule and the EMA still advance (the EMA towards unchanged weights).
At the next log interval the skipped steps are reported with their sample ids (and left out of
``train_log.jsonl``); ``MAX_NONFINITE_IN_A_ROW`` of them in a row stop the run there.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from repa_fast.config import Config, ConfigError, load_config
from repa_fast.errors import MissingFileError, NonFiniteError, one_line

logger = logging.getLogger("repa_fast.train")

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
MAX_NONFINITE_IN_A_ROW = 5  # skipped steps in a row that stop the run
LOSS_KEYS = ("loss", "loss_diff", "loss_token", "loss_manifold", "loss_align")


# --- DeepSpeed config ----------------------------------------------------------------------------------

def resolve_ds_config_path(name: str | os.PathLike | None) -> Path:
    """A path, or a bare name (``zero3``, ``zero2_deepcompile.json``) looked up in ds_configs/."""
    name = name or "zero2"
    candidates = [Path(name), DS_CONFIG_DIR / name, DS_CONFIG_DIR / f"{name}.json"]
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(f"ds_config {name!r} not found (looked at {', '.join(str(c) for c in candidates)})")


def _fill(section: dict, key: str, want, where: str) -> None:
    """Set ``section[key]`` from the YAML; a concrete value in the JSON must agree with it."""
    have = section.get(key, "auto")
    if have == "auto":
        section[key] = want
    elif have != want and not (isinstance(have, (int, float)) and isinstance(want, (int, float))
                               and math.isclose(have, want, rel_tol=1e-9)):
        raise ConfigError(f"{where}: '{key}' is {have!r} but the YAML config gives {want!r}; "
                          f"set it to \"auto\" or make them agree")


def build_ds_config(config: Config, path: str | os.PathLike | None, world_size: int) -> dict:
    """The DeepSpeed config dict: the JSON with batch, clipping and precision filled from the YAML.

    The launcher builds the optimizer and schedule from the YAML; a JSON ``optimizer`` or
    ``scheduler`` block must agree with it (lr, weight decay, steps) and is then left to the launcher.
    ``path``: a name or path for ``resolve_ds_config_path`` (a path it found is taken as it is).
    """
    ds_path = resolve_ds_config_path(path)
    try:
        ds = json.loads(ds_path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{ds_path}: not valid JSON: {err}") from None
    where = str(ds_path)
    _fill(ds, "train_micro_batch_size_per_gpu", config.batch_size, where)
    accum = ds.get("gradient_accumulation_steps", 1)
    if accum not in ("auto", 1):
        raise ConfigError(f"{where}: 'gradient_accumulation_steps' is {accum!r}; the launcher steps once per batch (1)")
    ds["gradient_accumulation_steps"] = 1
    _fill(ds, "train_batch_size", config.batch_size * world_size, where)
    _fill(ds, "gradient_clipping", config.gradient_clip, where)
    for mode in ("bf16", "fp16"):
        section = ds.setdefault(mode, {})
        _fill(section, "enabled", config.mixed_precision == mode, f"{where} [{mode}]")
    optimizer = ds.pop("optimizer", None)
    if optimizer is not None:
        params = dict(optimizer.get("params", {}))
        _fill(params, "lr", config.learning_rate, f"{where} [optimizer.params]")
        _fill(params, "weight_decay", config.weight_decay, f"{where} [optimizer.params]")
    scheduler = ds.pop("scheduler", None)
    if scheduler is not None:
        params = dict(scheduler.get("params", {}))
        _fill(params, "total_num_steps", config.max_steps, f"{where} [scheduler.params]")
        for key in ("warmup_max_lr", "max_lr"):
            if key in params:
                _fill(params, key, config.learning_rate, f"{where} [scheduler.params]")
    deepcompile = bool(ds.get("compile", {}).get("deepcompile", False))
    if deepcompile and config.compile != "deepcompile":
        raise ConfigError(f"{where} enables DeepCompile but the config has compile={config.compile!r}; "
                          f"set compile=deepcompile or pick a ds_config without it")
    if config.compile == "deepcompile":
        ds.setdefault("compile", {})["deepcompile"] = True
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def check_switches(config: Config) -> None:
    """Switches this machine cannot honour stop the run here, before DeepSpeed starts."""
    if config.compile == "deepcompile" and not torch.cuda.is_available():
        raise ConfigError("compile=deepcompile needs CUDA (DeepCompile's op does not build on CPU); "
                          "use compile=inductor or compile=none here")
    if config.kernels == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("kernels=triton needs CUDA (or TRITON_INTERPRET=1, Triton's slow CPU interpreter); "
                          "use kernels=auto or kernels=torch here")


# --- state, seeds, checkpoints ---------------------------------------------------------------------------

def step_generator(seed: int, rank: int, step: int, device) -> torch.Generator:
    """The generator for step ``step`` on ``rank``: noise and times depend on nothing else."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + rank) * 10_000_019 + step)
    return g


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(engine, ckpt_dir: Path, step: int, state: dict, ema, rank: int) -> str:
    """Every rank writes its part of checkpoint ``step_{step:08d}`` (DeepSpeed's files, trainer state, EMA,
    this rank's RNG state); nothing marks it ``latest`` yet."""
    tag = f"step_{step:08d}"
    client_state = {"trainer": state, "ema": ema.state_dict(), "config": state.get("config")}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{rank:05d}.pt")
    return tag


def mark_latest(ckpt_dir: Path, tag: str, rank: int) -> None:
    """Once every rank has finished writing ``tag``, replace ``latest`` atomically: a process dying
    mid-save leaves the previous checkpoint marked. (DeepSpeed's own ``latest`` is written by rank 0
    without waiting for the others, so it is turned off.)"""
    import torch.distributed as dist

    dist.barrier()
    if rank == 0:
        tmp = ckpt_dir / ".latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / "latest")
    dist.barrier()


def resolve_resume(resume: str, ckpt_dir: Path) -> tuple[Path, str]:
    """``latest`` (this run's checkpoints) or a path to a tag folder -> (checkpoint dir, tag)."""
    if resume == "latest":
        latest = ckpt_dir / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"--resume latest: no {latest} (no finished checkpoint in {ckpt_dir})")
        return ckpt_dir, latest.read_text().strip()
    path = Path(resume)
    if (path / "latest").is_file():
        return path, (path / "latest").read_text().strip()
    if path.is_dir():
        return path.parent, path.name
    raise FileNotFoundError(f"--resume {resume!r}: neither 'latest' nor a checkpoint folder")


# --- the run -----------------------------------------------------------------------------------------

class Logger:
    """Rank 0's outputs: a tqdm bar, TensorBoard (default) or wandb scalars, ``train_log.jsonl`` (one line a
    step) and ``nonfinite_samples.jsonl`` (the skipped steps and the sample ids of every rank)."""

    def __init__(self, config: Config, out: Path, report_to: str, rank: int, start_step: int):
        self.rank, self.tb, self.wandb, self.bar = rank, None, None, None
        if rank != 0:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=config.max_steps, initial=start_step, desc=config.experiment_name, dynamic_ncols=True)
        self.jsonl_path = out / "train_log.jsonl"
        self.nonfinite_path = out / "nonfinite_samples.jsonl"
        for path in (self.jsonl_path, self.nonfinite_path):
            if path.exists():  # drop lines past the resumed step (written after the last checkpoint)
                kept = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= start_step]
                path.write_text("".join(ln + "\n" for ln in kept))
        self.jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 (open for the run)
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        elif report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise ConfigError("--report-to wandb: the wandb package is not installed (pip install wandb)") from None
            self.wandb = wandb.init(project="repa-fast", name=config.experiment_name, config=config.to_dict())

    def step_done(self) -> None:
        if self.rank == 0:
            self.bar.update(1)

    def write(self, records: list[dict], skipped: list[dict]) -> None:
        if self.rank != 0:
            return
        for record in records:
            self.jsonl.write(json.dumps(record) + "\n")
            scalars = {k: v for k, v in record.items() if isinstance(v, float)}
            if self.tb is not None:
                for key, value in scalars.items():
                    self.tb.add_scalar(f"train/{key}", value, record["step"])
            if self.wandb is not None:
                self.wandb.log(scalars, step=record["step"])
        self.jsonl.flush()
        if skipped:
            with open(self.nonfinite_path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in skipped)
        if records:
            last = records[-1]
            self.bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                                 samples_s=f"{last['samples_per_s']:.1f}")

    def close(self) -> None:
        if self.rank != 0:
            return
        self.bar.close()
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class StepLog:
    """What the steps since the last flush reported. The loss terms and each step's non-finite flag stay
    on the device; ``flush`` all-reduces them in one collective and reads them in one copy."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.values: list[torch.Tensor] = []  # per step: [len(LOSS_KEYS) + 1] fp32, the loss terms + flag
        self.meta: list[dict] = []  # per step, host side: step, epoch, lambda, lr, this rank's ids
        self.samples, self.t_last = 0, time.perf_counter()
        self.nonfinite_in_a_row = 0

    def add(self, step: int, epoch: int, losses: dict, nonfinite: torch.Tensor, lr: float, ids: list,
            samples: int) -> None:
        terms = [losses[k].detach().float().reshape(()) for k in LOSS_KEYS]
        self.values.append(torch.stack([*terms, nonfinite.reshape(())]))
        self.meta.append({"step": step, "epoch": epoch, "lambda": float(losses["lambda"]), "lr": lr,
                          "ids": list(ids)})
        self.samples += samples

    def flush(self) -> tuple[list[dict], list[dict]]:
        """(records of the finite steps, records of the skipped ones with every rank's sample ids)."""
        import torch.distributed as dist

        if not self.values:
            return [], []
        values = torch.stack(self.values)
        dist.all_reduce(values)  # sums: loss terms over ranks, flags (already equal on every rank)
        rows = values.tolist()  # the one device -> host copy of the interval
        now = time.perf_counter()
        samples_per_s = self.samples / max(now - self.t_last, 1e-9)
        records, skipped = [], []
        for meta, row in zip(self.meta, rows, strict=True):
            if row[-1] > 0:
                skipped.append(meta)
            else:
                records.append({**{k: v / self.world for k, v in zip(LOSS_KEYS, row[:-1], strict=True)}, **meta,
                                "samples_per_s": samples_per_s})
        if skipped:  # every rank's ids of the skipped batches (a host collective, only when needed)
            gathered = [None] * self.world
            dist.all_gather_object(gathered, [m["ids"] for m in skipped])
            for i, meta in enumerate(skipped):
                meta["ids"] = {str(r): ids[i] for r, ids in enumerate(gathered)}
        self.values, self.meta, self.samples, self.t_last = [], [], 0, now
        return records, skipped

    def check_nonfinite(self, records: list[dict], skipped: list[dict]) -> None:
        """Warn for each skipped step (naming its samples), in step order; stop after too many in a row."""
        skipped_steps = {m["step"]: m for m in skipped}
        for step in sorted([r["step"] for r in records] + list(skipped_steps)):
            if step not in skipped_steps:
                self.nonfinite_in_a_row = 0
                continue
            self.nonfinite_in_a_row += 1
            ids = skipped_steps[step]["ids"]
            if self.rank == 0:
                warnings.warn(f"non-finite loss at step {step}: step skipped ({self.nonfinite_in_a_row} in a row); "
                              f"its samples by rank: {ids}", RuntimeWarning, stacklevel=1)
            if self.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                raise NonFiniteError(
                    f"{self.nonfinite_in_a_row} non-finite losses in a row, the last at step {step}: stopping "
                    f"(their samples are in nonfinite_samples.jsonl; lower learning_rate or check those records "
                    f"with repa-fast-check-cache)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="repa-fast-train", description="Train SD-1.5 with U-REPA alignment.")
    p.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    p.add_argument("--ds-config", "--ds_config", dest="ds_config", default=None,
                   help="DeepSpeed JSON, or a name in ds_configs/ (zero1, zero2, zero3, *_deepcompile)")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None)
    p.add_argument("--resume", "--resume_from_checkpoint", dest="resume", default=None,
                   help="'latest' or a checkpoint folder")
    p.add_argument("--report-to", "--report_to", dest="report_to", default="tensorboard",
                   choices=("tensorboard", "wandb", "none"))
    p.add_argument("--verbose", action="store_true",
                   help="show the libraries' logs and warnings on the terminal (default: OUTPUT_DIR/console.log)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_args(argv)


def init_distributed() -> tuple[int, int, int]:
    import deepspeed
    import torch.distributed as dist

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        # CPU ranks share the cores: spinning thread pools oversubscribed are many times slower
        local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])


@dataclass
class Run:
    """Everything one rank's loop needs, made by ``setup``."""

    config: Config
    out: Path
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    engine: object  # deepspeed.DeepSpeedEngine
    module: torch.nn.Module  # the SD15UNetAligned inside the engine
    optimizer: torch.optim.Optimizer  # the fused AdamW inside DeepSpeed's wrapper
    scheduler: object
    ema: object
    criterion: object  # repa_fast.losses.SD15Loss
    dataset: object
    clip_table: torch.Tensor  # [num_classes + 1, 77, 768] on the device; the last row is the empty prompt
    eval_batch: dict
    state: dict = field(default_factory=lambda: {"step": 0, "epoch": 0, "position": 0})

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"


def setup(config: Config, args: argparse.Namespace, compile_backend: str = "inductor") -> Run:
    """Ranks, the model with its heads, the data, the DeepSpeed engine, EMA; every fast part selected for
    this run first proves itself against its torch twin (``repa_fast.selfcheck``)."""
    import deepspeed
    from diffusers.optimization import get_cosine_schedule_with_warmup

    from repa_fast.data.cache import load_clip_table
    from repa_fast.data.dataset import build_dataset
    from repa_fast.ema import EMA
    from repa_fast.evaluate import held_out_batch
    from repa_fast.losses import SD15Loss
    from repa_fast.models import AlignHead, build_aligned_unet
    from repa_fast.selfcheck import SelfChecks

    check_switches(config)
    rank, world, local_rank = init_distributed()
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ds_config = build_ds_config(config, args.ds_config or config.ds_config, world)
    out = Path(config.output_dir)
    if rank == 0:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        (out / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
        logger.info("config and ds_config written to %s", out)
    dtype = DTYPES[config.mixed_precision]

    torch.manual_seed(config.seed)
    model = build_aligned_unet(config)
    dataset = build_dataset(config)
    clip_table = load_clip_table(config.clip_embeddings_path, num_rows=dataset.null_class + 1,
                                 dim=model.unet.config.cross_attention_dim).to(device, dtype)
    checks = SelfChecks(config, out if rank == 0 else None)
    checks.kernels(model, device, dtype)  # may turn kernels=auto to torch, with a warning
    checks.loader(dataset, rank, world, device, dtype)  # may turn loader=auto to torch
    criterion = SD15Loss.from_config(config)  # the ddpm path runs on the model's own schedule
    for message in training_warnings(config, model, criterion):
        warnings.warn(message, UserWarning, stacklevel=1)
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        from deepspeed.utils import set_z3_leaf_modules

        # a head's fused kernel reads its conv and norm weights directly: gather them at the head
        set_z3_leaf_modules(model, [AlignHead])
    # fused: one kernel per step, and `found_inf` lets a non-finite step be dropped on the device
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=config.learning_rate, betas=(0.9, 0.999),
                                  weight_decay=config.weight_decay, fused=True)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(0.1 * config.max_steps), config.max_steps)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    module = engine.module
    eval_set = build_dataset(config, csv_path=config.eval_csv_path) if config.eval_csv_path else dataset
    run = Run(config, out, rank, world, device, dtype, engine, module, optimizer, scheduler,
              EMA(module, config.ema_decay), criterion, dataset, clip_table,
              held_out_batch(eval_set, min(64, len(eval_set)), device, dtype, clip_table))
    if config.compile != "none":
        # the losses of one eager forward, engine.compile, then the same forward compiled
        checks.compile(run, lambda engine: compile_engine(engine, compile_backend))
    checks.write()
    return run


def training_warnings(config: Config, model, criterion=None) -> list[str]:
    """Settings that silently train nothing (or not what the model was trained for), said once at start-up."""
    from repa_fast.losses import prediction_type_warning

    messages = [f"align layer {layer!r}: no trainable U-Net parameter runs before its hook "
                f"(lora_targets={config.lora_targets!r}, detach_features={config.detach_features}): its alignment "
                f"loss trains only its head" for layer in model.untrained_align_layers()]
    if config.detach_features:
        messages.append("detach_features is true (an ablation): the alignment loss does not reach the U-Net")
    if config.align_coeff == 0:
        messages.append("align_coeff is 0: the alignment loss trains nothing (plain LoRA fine-tuning)")
    if criterion is not None:
        mismatch = prediction_type_warning(config, criterion.scheduler, model)
        if mismatch:
            messages.append(mismatch)
    return messages


def compile_engine(engine, backend: str = "inductor") -> None:
    """``engine.compile``: the engine's forward (U-Net, hooks, heads and the alignment loss) as one graph;
    with ``compile: deepcompile`` DeepSpeed's own passes (ZeRO-3 gathers inside the graph) are added."""
    engine.compile(backend=backend)


def resume(run: Run, target: str) -> None:
    """Load checkpoint ``target`` ('latest' or a folder): engine, optimizer, schedule, EMA, step/epoch/position
    and this rank's RNG state."""
    load_dir, tag = resolve_resume(target, run.ckpt_dir)
    _, client = run.engine.load_checkpoint(str(load_dir), tag=tag)
    if client is None:
        raise MissingFileError(f"--resume: could not load checkpoint {load_dir / tag}")
    run.state.update(client["trainer"])
    run.ema.load_state_dict(client["ema"])
    rng_file = load_dir / tag / f"rng_rank{run.rank:05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    if run.rank == 0:
        logger.info("resumed from %s at step %d (epoch %d, sample %d)", load_dir / tag, run.state["step"],
                    run.state["epoch"], run.state["position"])


def train_step(run: Run, batch: dict, step: int) -> tuple[dict, torch.Tensor]:
    """One optimizer step on this rank's batch. Returns the loss dict (device tensors, lambda a float) and
    the step's non-finite flag; copies nothing to the host."""
    import torch.distributed as dist

    # noise and timesteps depend on (seed, rank, step) only: a resumed run draws the same ones
    gen = step_generator(run.config.seed, run.rank, step, run.device)
    # the prompt embedding of each class (rows of CFG-dropped samples are the empty prompt's)
    ehs = run.clip_table[batch["class_id"]]
    # one forward of the engine: U-Net prediction + the heads + the alignment losses
    losses = run.criterion(run.engine, batch["latent"], batch["dino_tokens"], ehs, step=step, generator=gen)
    # a non-finite loss on any rank drops this update on every rank, on the device (AdamW's found_inf)
    nonfinite = (~torch.isfinite(losses["loss"].detach())).float()
    dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)
    run.optimizer.found_inf = nonfinite
    run.engine.backward(losses["loss"])
    run.engine.step()  # clipping, AdamW, the learning-rate schedule
    run.ema.update(run.module)
    return losses, nonfinite


def save(run: Run, step: int) -> None:
    """Checkpoint ``step`` on every rank, then mark it ``latest``."""
    state = dict(run.state, config=run.config.to_dict())
    tag = write_checkpoint(run.engine, run.ckpt_dir, step, state, run.ema, run.rank)
    mark_latest(run.ckpt_dir, tag, run.rank)


def train(config: Config, args: argparse.Namespace) -> dict:
    import torch.distributed as dist

    from repa_fast.data.loader import build_loader
    from repa_fast.evaluate import run_alignment_eval
    from repa_fast.export import export_weights

    run = setup(config, args)
    if args.resume:
        resume(run, args.resume)
    state = run.state
    log = Logger(config, run.out, args.report_to, run.rank, state["step"])
    steps = StepLog(run.rank, run.world)
    first_loss = last_loss = None
    # torch or DALI (the `loader` switch): this rank's batches on the device, latents in the training dtype,
    # from where the checkpoint left the epoch
    loader = build_loader(config, run.dataset, rank=run.rank, world=run.world, epoch=state["epoch"],
                          start=state["position"], device=run.device, dtype=run.dtype)
    while state["step"] < config.max_steps:
        for batch in loader:
            step = state["step"] + 1
            B = batch["latent"].shape[0]
            losses, nonfinite = train_step(run, batch, step)
            state.update(step=step, position=state["position"] + B)
            steps.add(step, state["epoch"], losses, nonfinite, run.scheduler.get_last_lr()[0], batch["id"],
                      B * run.world)
            log.step_done()

            # once per log interval (and before a checkpoint): the one device -> host copy
            if step % config.log_interval == 0 or step % config.save_interval == 0 or step == config.max_steps:
                records, skipped = steps.flush()
                log.write(records, skipped)
                if records:
                    first_loss = records[0]["loss"] if first_loss is None else first_loss
                    last_loss = records[-1]["loss"]
                steps.check_nonfinite(records, skipped)
            if step % config.eval_interval == 0:  # every rank: ZeRO-3 gathers in the forward
                run_alignment_eval(run.module, run.eval_batch, config, step, writer=log.tb)
            if step % config.save_interval == 0 or step == config.max_steps:
                save(run, step)
            if step >= config.max_steps:
                break
        else:  # the epoch ran out: the next one, reshuffled
            state["epoch"] += 1
            state["position"] = 0
            loader.set_epoch(state["epoch"])
    loader.close()
    log.close()
    export_weights(run.module, run.out / "lora", write=run.rank == 0)
    export_weights(run.module, run.out / "lora_ema", weights=run.ema.shadow, write=run.rank == 0)
    dist.barrier()
    return {"step": state["step"], "first_loss": first_loss, "last_loss": last_loss}


# --- entry point: inputs checked before DeepSpeed starts, one line for an expected failure -----------------

PROG = "repa-fast-train"


def check_resume(resume: str, ckpt_dir: Path) -> None:
    """``--resume`` must name a DeepSpeed checkpoint (see ``resolve_resume``)."""
    try:
        load_dir, tag = resolve_resume(resume, ckpt_dir)
    except FileNotFoundError as err:
        raise MissingFileError(f"{err}; start without --resume, or give a checkpoints/step_* folder") from None
    folder = load_dir / tag
    if not any(folder.glob("*model_states.pt")):
        raise MissingFileError(f"--resume {resume!r}: {folder} holds no DeepSpeed checkpoint (no *model_states.pt); "
                               f"give a checkpoints/step_* folder, or the run folder's checkpoints/ with 'latest'")


def check_deepspeed_config(ds_config: dict, where: str) -> None:
    """DeepSpeed's own validation of the filled-in config, run here so that its complaint is one line."""
    from deepspeed.runtime.config import DeepSpeedConfig

    # one process validates: the batch of all ranks was checked against the YAML by build_ds_config
    probe = dict(ds_config, train_batch_size=ds_config["train_micro_batch_size_per_gpu"])
    try:
        DeepSpeedConfig(probe)
    except Exception as err:  # pydantic's ValidationError, DeepSpeed's asserts: all about the JSON's values
        if callable(getattr(err, "errors", None)):  # pydantic: "<section model>: <field>: <problem> (got <value>)"
            detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})"
                               for e in err.errors())
            detail = f"{getattr(err, 'title', '')}: {detail}"
        else:
            detail = one_line(err)
        raise ConfigError(f"{where}: DeepSpeed rejects it: {detail}") from None


def check_inputs(config: Config, args: argparse.Namespace) -> None:
    """What a run reads, checked on every rank before DeepSpeed starts, cheap checks first: the ds_config,
    the CSV and the caches' ``__meta__`` (not every record: ``repa-fast-check-cache`` scans those), the batch
    against the samples, the CLIP table, the checkpoint to resume. A problem is a ``RunError`` naming it."""
    from repa_fast.data.cache import load_clip_table
    from repa_fast.data.dataset import build_dataset
    from repa_fast.errors import world_size  # a module-level name would clash with build_ds_config's argument

    world = world_size()
    check_switches(config)
    ds_path = resolve_ds_config_path(args.ds_config or config.ds_config)
    ds_config = build_ds_config(config, ds_path, world)
    dataset = build_dataset(config)
    per_rank = -(-len(dataset) // world)
    if config.batch_size > per_rank:
        raise ConfigError(f"config key 'batch_size': {config.batch_size} is more than the {per_rank} sample(s) "
                          f"each of {world} rank(s) gets from {config.csv_path} ({len(dataset)} samples); "
                          f"lower batch_size")
    if config.eval_csv_path:
        build_dataset(config, csv_path=config.eval_csv_path)
    num_rows = dataset.null_class + 1
    load_clip_table(config.clip_embeddings_path, num_rows=num_rows, mmap=True)
    if args.resume:
        check_resume(args.resume, Path(config.output_dir) / "checkpoints")
    check_deepspeed_config(ds_config, str(ds_path))
    from repa_fast.models.unet import unet_config

    dim = unet_config(config.model)["cross_attention_dim"]
    load_clip_table(config.clip_embeddings_path, num_rows=num_rows, dim=dim, mmap=True)


def load_run_config(args: argparse.Namespace) -> Config:
    config = load_config(args.config, args.overrides)
    if args.output_dir:
        config.output_dir = args.output_dir
    return config


def main(argv: list[str] | None = None) -> None:
    from repa_fast.console import Console
    from repa_fast.errors import run_main

    args = parse_args(argv)
    config = run_main(PROG, load_run_config, args)
    console = Console(Path(config.output_dir) / "console.log", verbose=args.verbose)
    try:
        run_main(PROG, check_inputs, config, args)
        console.capture_libraries()
        result = run_main(PROG, train, config, args)
        if int(os.environ.get("RANK", 0)) == 0 and result["last_loss"] is not None:
            console.print(f"done: {result['step']} steps, loss {result['first_loss']:.4f} -> "
                          f"{result['last_loss']:.4f}, output in {config.output_dir}")
    finally:
        console.close()


if __name__ == "__main__":
    main()
