"""The DeepSpeed training launcher.

    deepspeed --num_gpus N --module repa_fast.train --config configs/sd15_repa_A.yaml [key=value ...]
    repa-fast-train --config configs/tiny.yaml            # one process
    python -m repa_fast.train --config ... --resume latest

The source design's loop (AdamW 0.9/0.999, cosine schedule with 10 % warm-up, clipping, EMA, hooks
cleared every step) under DeepSpeed ZeRO. Every piece of randomness is a function of (seed, rank,
step) or (seed, epoch, index), and a checkpoint carries step, epoch and position in the epoch, so a
resumed run sees the same batches and noise as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from repa_fast.config import Config, ConfigError, load_config

logger = logging.getLogger("repa_fast.train")

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
MAX_NONFINITE_IN_A_ROW = 5
LOSS_KEYS = ("loss", "loss_diff", "loss_token", "loss_manifold", "loss_align")


# --- DeepSpeed config ----------------------------------------------------------------------------------

def resolve_ds_config_path(name: str | None) -> Path:
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


def build_ds_config(config: Config, path: str | None, world_size: int) -> dict:
    """The DeepSpeed config dict: the JSON with batch, clipping and precision filled from the YAML.

    The launcher builds the optimizer and schedule from the YAML; a JSON ``optimizer`` or
    ``scheduler`` block must agree with it (lr, weight decay, steps) and is then left to the launcher.
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


def _fault(point: str, step: int) -> None:
    """Test hook: REPA_FAST_FAULT=point:step kills the process there, as a crash or a kill would."""
    if os.environ.get("REPA_FAST_FAULT", "") == f"{point}:{step}":
        sys.stderr.write(f"REPA_FAST_FAULT: dying at {point} step {step}\n")
        sys.stderr.flush()
        os._exit(17)


def _fault_nan_loss(step: int) -> bool:
    """Test hook: REPA_FAST_FAULT=nan_loss:K makes the loss of every step from K on non-finite."""
    spec = os.environ.get("REPA_FAST_FAULT", "")
    return spec.startswith("nan_loss:") and step >= int(spec.split(":")[1])


def save_checkpoint(engine, ckpt_dir: Path, step: int, state: dict, ema, rank: int) -> str:
    """Save with DeepSpeed, then mark it ``latest`` only once every rank has finished writing.

    ``latest`` is replaced atomically, so a process dying mid-save leaves the previous one in place.
    """
    import torch.distributed as dist

    tag = f"step_{step:08d}"
    client_state = {"trainer": state, "ema": ema.state_dict(), "config": state.get("config")}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{rank:05d}.pt")
    _fault("save", step)
    dist.barrier()
    if rank == 0:
        tmp = ckpt_dir / ".latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / "latest")
    dist.barrier()
    return tag


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
    """Rank 0: a tqdm bar, TensorBoard (default) or wandb scalars, and ``train_log.jsonl``."""

    def __init__(self, config: Config, out: Path, report_to: str, rank: int, start_step: int):
        self.rank, self.tb, self.wandb, self.bar = rank, None, None, None
        if rank != 0:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=config.max_steps, initial=start_step, desc=config.experiment_name, dynamic_ncols=True)
        self.jsonl_path = out / "train_log.jsonl"
        if self.jsonl_path.exists():  # drop lines past the resumed step (written after the last checkpoint)
            kept = [ln for ln in self.jsonl_path.read_text().splitlines() if json.loads(ln)["step"] <= start_step]
            self.jsonl_path.write_text("".join(ln + "\n" for ln in kept))
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

    def step(self, step: int, record: dict, scalars: dict, log_now: bool) -> None:
        if self.rank != 0:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}",
                             samples_s=f"{scalars['samples_per_s']:.1f}")
        if log_now:
            self.jsonl.flush()
            if self.tb is not None:
                for key, value in scalars.items():
                    self.tb.add_scalar(f"train/{key}", value, step)
            if self.wandb is not None:
                self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.rank != 0:
            return
        self.bar.close()
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


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


def train(config: Config, args: argparse.Namespace) -> dict:
    import deepspeed
    import torch.distributed as dist
    from diffusers.optimization import get_cosine_schedule_with_warmup

    from repa_fast.data.cache import load_clip_table
    from repa_fast.data.dataset import build_dataset
    from repa_fast.data.loader import build_loader
    from repa_fast.ema import EMA
    from repa_fast.evaluate import held_out_batch, run_alignment_eval
    from repa_fast.export import export_weights
    from repa_fast.losses import SD15Loss, prediction_type_warning
    from repa_fast.models import build_aligned_unet

    check_switches(config)
    rank, world, local_rank = init_distributed()
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ds_config = build_ds_config(config, args.ds_config or config.ds_config, world)
    out = Path(config.output_dir)
    ckpt_dir = out / "checkpoints"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        (out / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
        logger.info("config: %s", json.dumps(config.to_dict()))
    dtype = DTYPES[config.mixed_precision]

    torch.manual_seed(config.seed)
    model = build_aligned_unet(config)
    dataset = build_dataset(config)
    clip_table = load_clip_table(config.clip_embeddings_path, num_rows=dataset.null_class + 1,
                                 dim=model.unet.config.cross_attention_dim).to(device, dtype)
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        from deepspeed.utils import set_z3_leaf_modules

        from repa_fast.models import AlignHead

        # a head's fused kernel reads its conv and norm weights directly: gather them at the head
        set_z3_leaf_modules(model, [AlignHead])
    trainable = model.trainable_parameters()
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, betas=(0.9, 0.999),
                                  weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(0.1 * config.max_steps), config.max_steps)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    module = engine.module
    ema = EMA(module, config.ema_decay)
    if config.compile != "none":
        engine.compile(backend="inductor")
    criterion = SD15Loss.from_config(config)  # the ddpm path runs on the model's own schedule
    mismatch = prediction_type_warning(config, criterion.scheduler, module)
    if mismatch and rank == 0:
        warnings.warn(mismatch, UserWarning, stacklevel=1)
    eval_set = build_dataset(config, csv_path=config.eval_csv_path) if config.eval_csv_path else dataset
    eval_batch = held_out_batch(eval_set, min(64, len(eval_set)), device, dtype, clip_table)

    state = {"step": 0, "epoch": 0, "position": 0}
    if args.resume:
        load_dir, tag = resolve_resume(args.resume, ckpt_dir)
        _, client = engine.load_checkpoint(str(load_dir), tag=tag)
        if client is None:
            raise FileNotFoundError(f"--resume: could not load checkpoint {load_dir / tag}")
        state.update(client["trainer"])
        ema.load_state_dict(client["ema"])
        rng_file = load_dir / tag / f"rng_rank{rank:05d}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        if rank == 0:
            logger.info("resumed from %s at step %d (epoch %d, sample %d)", load_dir / tag, state["step"],
                        state["epoch"], state["position"])
    log = Logger(config, out, args.report_to, rank, state["step"])

    nonfinite_in_a_row, samples_since, t_last = 0, 0, time.perf_counter()
    first_loss = last_loss = None
    # torch or DALI (the `loader` switch): batches on the device, latents in the training dtype
    loader = build_loader(config, dataset, rank=rank, world=world, epoch=state["epoch"], start=state["position"],
                          device=device, dtype=dtype)
    while state["step"] < config.max_steps:
        for batch in loader:
            step = state["step"] + 1
            B = batch["latent"].shape[0]
            state["position"] += B
            gen = step_generator(config.seed, rank, step, device)
            ehs = clip_table[batch["class_id"]]
            losses = criterion(engine, batch["latent"], batch["dino_tokens"], ehs, generator=gen)
            if _fault_nan_loss(step):
                losses["loss"] = losses["loss"] * float("nan")
            finite = torch.isfinite(losses["loss"].detach()).float()
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            state["step"] = step
            if finite.item() < 1:  # every rank skips together: no backward, no optimizer or EMA step
                module.clear_features()
                nonfinite_in_a_row += 1
                warnings.warn(f"non-finite loss at step {step}: step skipped "
                              f"({nonfinite_in_a_row} in a row)", RuntimeWarning, stacklevel=1)
                if nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                    raise FloatingPointError(f"{nonfinite_in_a_row} non-finite losses in a row, the last at step "
                                             f"{step}: stopping (lower learning_rate or check the data)")
            else:
                nonfinite_in_a_row = 0
                engine.backward(losses["loss"])
                engine.step()
                ema.update(module)
                module.clear_features()

                scalars = torch.stack([losses[k].detach().float() for k in LOSS_KEYS])
                dist.all_reduce(scalars)
                scalars = dict(zip(LOSS_KEYS, (scalars / world).tolist(), strict=True))
                samples_since += B * world
                now = time.perf_counter()
                scalars["lr"] = scheduler.get_last_lr()[0]
                scalars["samples_per_s"] = samples_since / max(now - t_last, 1e-9)
                if step % config.log_interval == 0 or step == 1:
                    samples_since, t_last = 0, now
                first_loss = scalars["loss"] if first_loss is None else first_loss
                last_loss = scalars["loss"]
                record = {"step": step, "epoch": state["epoch"], **scalars, "ids": batch["id"]}
                log.step(step, record, scalars, step % config.log_interval == 0)
                if step % config.eval_interval == 0:  # every rank: ZeRO-3 gathers in the forward
                    run_alignment_eval(module, eval_batch, config, step, writer=log.tb)

            if step % config.save_interval == 0 or step == config.max_steps:
                save_checkpoint(engine, ckpt_dir, step, dict(state, config=config.to_dict()), ema, rank)
            _fault("step", step)
            if step >= config.max_steps:
                break
        else:
            state["epoch"] += 1
            state["position"] = 0
            loader.set_epoch(state["epoch"])
    loader.close()
    log.close()
    export_weights(module, out / "lora", write=rank == 0)
    export_weights(module, out / "lora_ema", weights=ema.shadow, write=rank == 0)
    dist.barrier()
    return {"step": state["step"], "first_loss": first_loss, "last_loss": last_loss}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides)
        if args.output_dir:
            config.output_dir = args.output_dir
    except ConfigError as err:
        sys.exit(f"repa-fast-train: {err}")
    try:
        result = train(config, args)
    except (ConfigError, FileNotFoundError, FloatingPointError) as err:
        sys.exit(f"repa-fast-train: {err}")
    if int(os.environ.get("RANK", 0)) == 0 and result["last_loss"] is not None:
        print(f"done: {result['step']} steps, loss {result['first_loss']:.4f} -> {result['last_loss']:.4f}, "
              f"output in {config.output_dir}")


if __name__ == "__main__":
    main()
