"""The GPU report: the fused ops against eager and torch.compile, the REPA overhead of a training step, and
the whole step, reference path against fast path, in one table. On one H200, sized for gpu_run.sh's 450 s
limit; not yet timed with the four-op op part and setup's self-checks (the one run, of older code, took
258 s, its op part failing after 68 s):

    python benchmarks/gpu_report.py --out benchmarks/results/gpu_<date>           (make bench-gpu)
    python benchmarks/gpu_report.py --tiny --out /tmp/gpu_report_tiny             (CPU, seconds)

Writes DIR/gpu_report.json (one row per measurement, each with the machine, the date, the command and the
code: the git commit of the tree, or "unknown" without .git) and DIR/gpu_report.md (the table;
``benchmarks/update_readme.py`` puts it into the README), and prints the table last. Parts (``--parts``):

  op        AlignHead (8x8 map -> 16x16 tokens), the alignment loss, the token-form manifold loss and the
            whole REPA branch (head + alignment loss; fused: one op whose tokens never reach memory) at B=48,
            C=1280, N=256, D=1024, bf16 (y fp16, the DINO cache): eager / torch.compile / fused; forward,
            backward, both; the peak memory of both above the inputs; the floor (bytes at 4.3 TB/s, FLOPs at
            790 TFLOP/s) and each time's ratio to it; the kernel launches per forward+backward
            (kernels/launch_count.py). The functions of bench_align_head.py, bench_align_loss.py,
            bench_token_gram.py and bench_align_branch.py, timed by triton.testing.do_bench.
  overhead  the REPA overhead of one training step of the SD-1.5 U-Net (configs/sd15_repa_A.yaml: random
            init, LoRA r32 attn+conv, B=48, bf16, align layer mid): (step with alignment - step without) /
            step without, with the reference (kernels=torch) and the fused (kernels=triton) alignment path.
            A plain torch step (AdamW on the bf16 trainable parameters, eager U-Net, one fixed batch), so
            that only the alignment differs.
  step      the whole training step as repa_fast.train runs it: its own ``setup`` (DeepSpeed single rank with
            the ds_config that build_ds_config fills from the YAML, the start-up self-checks) and
            ``train_step`` (CLIP table gather, SD15Loss: one forward of U-Net + heads + alignment loss,
            backward, step, EMA), torch loader over synthetic LMDB caches of the real shapes.
            reference: kernels torch, compile none, ds_configs/zero0.json (the baseline of every switch);
            fast: kernels triton, compile = engine.compile(backend="inductor") of the whole forward,
            ds_configs/zero2.json. Both use the torch loader: the DALI wheel cannot travel to the GPU
            machine (its CPU figures are in results/loader_cpu.md).

--tiny runs the same code on CPU in seconds (or on a GPU at tiny shapes): tiny U-Net (configs/tiny.yaml),
B=4, small op shapes, fp32 (the Triton interpreter has no bf16), the kernels in the Triton interpreter
(TRITON_INTERPRET=1, set before any kernel module is imported), torch.compile with the aot_eager backend
(inductor's C++ compile of the U-Net takes minutes on CPU), times by time.perf_counter. Its numbers show
that the code paths run; they are not figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("op", "overhead", "step")
QUANTILES = [0.5, 0.2, 0.8]


@dataclass
class Mode:
    """What one run measures: the op shapes, the step config and how to time."""

    name: str  # full | tiny
    config: str  # the YAML of the training steps
    config_overrides: tuple[str, ...]
    op_batch: int
    in_ch: int
    map_hw: tuple[int, int]
    tokens: int
    dim: int
    groups: int
    dtype: torch.dtype  # op inputs (x of the loss, feat and weights of the head)
    y_dtype: torch.dtype  # the DINO tokens
    compile_backend: str
    warmup: int
    steps: int
    cpu_runs: int  # timed calls of each op pass on the CPU (perf_bench)
    compile_step: bool  # the fast whole step compiles the U-Net (compile_backend)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


FULL = dict(name="full", config="configs/sd15_repa_A.yaml", config_overrides=(), op_batch=48, in_ch=1280,
            map_hw=(8, 8), tokens=256, dim=1024, groups=32, dtype=torch.bfloat16, y_dtype=torch.float16,
            compile_backend="inductor", warmup=3, steps=10, cpu_runs=3, compile_step=True)
# Each step of --tiny runs once: the interpreter makes a kernel step seconds. Its fast whole step does not
# compile the U-Net unless --tiny-compile-step: dynamo's trace of it alone takes about a minute on CPU.
TINY = dict(name="tiny", config="configs/tiny.yaml", config_overrides=("batch_size=2",), op_batch=2, in_ch=24,
            map_hw=(4, 4), tokens=64, dim=64, groups=8, dtype=torch.float32, y_dtype=torch.float16,
            compile_backend="aot_eager", warmup=0, steps=1, cpu_runs=1, compile_step=False)
# The whole-step paths: overrides of the step config (the reference is every switch's baseline).
STEP_PATHS = {
    "reference": ("kernels=torch", "compile=none", "ds_config=zero0", "loader=torch"),
    "fast": ("kernels=triton", "compile=inductor", "ds_config=zero2", "loader=torch"),
}


# --- timing ----------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def perf_bench(fn, grad_to_none=None, quantiles=None, runs: int = 3):
    """triton.testing.do_bench's call and return for the CPU: ``fn``'s time in ms at ``quantiles``, by
    time.perf_counter over ``runs`` calls after one untimed call."""
    fn()
    times = []
    for _ in range(runs):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return torch.tensor(times, dtype=torch.float64).quantile(torch.tensor(quantiles, dtype=torch.float64)).tolist()


def time_steps(step, warmup: int, steps: int, device: torch.device) -> dict:
    """Median and 20/80 % quantiles (ms) of ``steps`` synchronised calls after ``warmup`` untimed ones, the
    peak memory allocated during them (CUDA; None elsewhere) and the last value ``step`` returned."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, value = [], None
    for _ in range(steps):
        t0 = time.perf_counter()
        value = step()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2], "peak_mib": peak,
            "last_loss": None if value is None else float(value)}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- part 1: the fused ops ---------------------------------------------------------------------------------

def op_rows(mode: Mode) -> list[dict]:
    rows = []
    for build in (align_head_rows, align_loss_rows, token_gram_rows, align_branch_rows):
        rows += build(mode)
        free_memory()  # this op's inputs and compiled graphs, before the next one
    return rows


def op_bench(mode: Mode):
    """do_bench on a GPU (None), perf_bench on the CPU."""
    return None if mode.device.type == "cuda" else functools.partial(perf_bench, runs=mode.cpu_runs)


def head_shape(mode: Mode) -> str:
    return (f"feat {[mode.op_batch, mode.in_ch, *mode.map_hw]} -> tokens [{mode.op_batch},{mode.tokens},{mode.dim}], "
            f"{mode.groups} groups, {str(mode.dtype).removeprefix('torch.')}")


def token_shape(mode: Mode) -> str:
    return (f"x {[mode.op_batch, mode.tokens, mode.dim]} {str(mode.dtype).removeprefix('torch.')}, "
            f"y {str(mode.y_dtype).removeprefix('torch.')}")


def timing_rows(op: str, timings: dict, floors: dict, agreement: dict, shape: str,
                launches: dict | None = None) -> list[dict]:
    """The report's rows of one op: per implementation and pass, the times, the floor (``floors`` as
    bench_common.floors_us makes them), the ratio to eager, the peak memory and agreement; with ``launches``,
    each implementation's launches per forward+backward."""
    from bench_common import PASSES  # here: importing bench_common sets a torch.compile option for the op part

    rows = []
    for impl, timing in timings.items():
        for pass_name in PASSES:
            median, p20, p80 = timing[pass_name]
            eager = timings["eager"][pass_name][0]
            rows.append({
                "part": "op", "item": op, "impl": impl, "pass": pass_name, "median_ms": median, "p20_ms": p20,
                "p80_ms": p80, "floor_ms": floors[pass_name]["floor_us"] / 1e3,
                "vs": None if impl == "eager" else "eager",
                "ratio": None if impl == "eager" else eager / median,
                "peak_mib": timing["peak_mib"] if pass_name == "full" else None,
                "max_rel_diff_vs_eager": agreement.get(impl), "shape": shape,
                **({"launches": launches.get(impl)} if launches else {}),
            })
    return rows


def align_head_rows(mode: Mode) -> list[dict]:
    """AlignHead (bench_align_head.py) at the op shapes: eager / compiled / fused."""
    import bench_align_head as bah

    torch.manual_seed(0)
    head, feat, grad = bah.make_inputs(mode.op_batch, mode.in_ch, mode.map_hw, mode.dim, mode.tokens, mode.groups,
                                       mode.device, mode.dtype)
    impls = bah.implementations(head, mode.compile_backend)
    agreement = bah.check_agreement(impls, head, feat, grad)
    timings = {name: bah.measure(fn, head, feat, grad, QUANTILES, bench=op_bench(mode)) for name, fn in impls.items()}
    return timing_rows("align_head", timings, bah.floor_us(head, feat), agreement, head_shape(mode),
                       bah.launches(impls, head, feat, grad))


def align_loss_rows(mode: Mode) -> list[dict]:
    """The alignment loss L_token + 3 L_manifold (bench_align_loss.py) at the op shapes: eager / compiled /
    fused."""
    import bench_align_loss as bal

    torch.manual_seed(0)
    x, y = bal.make_inputs((mode.op_batch, mode.tokens, mode.dim), mode.device, mode.dtype, mode.y_dtype)
    impls = bal.implementations(False, False, mode.compile_backend)
    agreement = bal.check_agreement(impls, x, y, 3.0)
    timings = {name: bal.measure(fn, x, y, 3.0, QUANTILES, bench=op_bench(mode)) for name, fn in impls.items()}
    return timing_rows("align_loss", timings, bal.floor_us(x, y), agreement, token_shape(mode),
                       bal.launches(impls, x, y, 3.0))


def token_gram_rows(mode: Mode) -> list[dict]:
    """The token-form manifold loss (bench_token_gram.py) at the op shapes: eager / compiled / fused."""
    import bench_align_loss as bal
    import bench_token_gram as btg

    x, y = bal.make_inputs((mode.op_batch, mode.tokens, mode.dim), mode.device, mode.dtype, mode.y_dtype)
    impls = btg.implementations(mode.compile_backend)
    agreement = btg.check_agreement(impls, x, y)
    timings = {name: btg.measure(fn, x, y, QUANTILES, bench=op_bench(mode)) for name, fn in impls.items()}
    return timing_rows("token_gram", timings, btg.floor_us(x, y), agreement, token_shape(mode),
                       btg.launches(impls, x, y))


def align_branch_rows(mode: Mode) -> list[dict]:
    """The REPA branch (bench_align_branch.py): eager head + reference losses / compiled / the fused op."""
    import bench_align_branch as bab

    torch.manual_seed(0)
    head, feat, y = bab.make_inputs(mode.op_batch, mode.in_ch, mode.map_hw, mode.dim, mode.tokens, mode.groups,
                                    mode.device, mode.dtype, mode.y_dtype)
    impls = bab.implementations(head, compile_backend=mode.compile_backend)
    agreement = bab.check_agreement(impls, head, feat, y)
    timings = {name: bab.measure(fn, head, feat, y, QUANTILES, bench=op_bench(mode)) for name, fn in impls.items()}
    shape = f"{head_shape(mode)}, y {str(mode.y_dtype).removeprefix('torch.')}, L_token + 3 L_manifold"
    return timing_rows("align_branch", timings, bab.floor_us(head, feat, y), agreement, shape,
                       bab.launches(impls, head, feat, y))


# --- part 2: the REPA overhead of a step ---------------------------------------------------------------------

def load_step_config(mode: Mode, *overrides: str):
    from repa_fast.config import load_config

    return load_config(ROOT / mode.config, [*mode.config_overrides, *overrides])


def random_batch(config, model, device: torch.device, dtype: torch.dtype, generator: torch.Generator):
    """latent [B,4,s,s] (s from the U-Net's sample size), DINO tokens fp16 per layer, CLIP states [B,77,dim]."""
    B, side = config.batch_size, model.unet.config.sample_size
    latent = torch.randn(B, 4, side, side, generator=generator, device=device).to(dtype)
    dino = {layer: torch.randn(B, config.dino_N, config.dino_D, generator=generator, device=device).half()
            for layer in config.align_layers}
    ehs = torch.randn(B, 77, model.unet.config.cross_attention_dim, generator=generator, device=device).to(dtype)
    return latent, dino, ehs


def overhead_rows(mode: Mode) -> list[dict]:
    from repa_fast.losses import SD15Loss
    from repa_fast.models import build_aligned_unet
    from repa_fast.train import DTYPES, step_generator

    config = load_step_config(mode, "kernels=torch")
    dtype, device = DTYPES[config.mixed_precision], mode.device
    torch.manual_seed(config.seed)
    with device:  # random init on the device: minutes faster for the 860M U-Net than on the CPU
        model = build_aligned_unet(config, dtype)
    latent, dino, ehs = random_batch(config, model, device, dtype, torch.Generator(device).manual_seed(0))
    criterion = SD15Loss.from_config(config)
    # lambda 0: the U-Net alone (the heads do not run), with the same times, noise and denoising loss
    no_alignment = SD15Loss.from_config(dataclasses.replace(config, align_coeff=0.0))
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=config.learning_rate, betas=(0.9, 0.999),
                                  weight_decay=config.weight_decay)
    counter = itertools.count(1)

    def step(loss_fn):
        gen = step_generator(config.seed, 0, next(counter), device)
        loss = loss_fn(model, latent, dino, ehs, generator=gen)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    settings = {"no alignment": (no_alignment, "torch"), "kernels=torch": (criterion, "torch"),
                "kernels=triton": (criterion, "triton")}
    results = {}
    for name, (loss_fn, kernels) in settings.items():
        model.set_kernels(kernels)
        results[name] = time_steps(functools.partial(step, loss_fn), mode.warmup, mode.steps, device)
    base = results["no alignment"]["median_ms"]
    what = (f"{config.model} U-Net, LoRA r{config.lora_rank} {config.lora_targets}, B={config.batch_size}, "
            f"{config.mixed_precision}, align {','.join(config.align_layers)}")
    return [{"part": "overhead", "item": "REPA overhead", "impl": name, "pass": "step", **r,
             "floor_ms": None, "vs": None if name == "no alignment" else "no alignment",
             "ratio": None if name == "no alignment" else (r["median_ms"] - base) / base, "shape": what}
            for name, r in results.items()]


# --- part 3: the whole step, reference vs fast -----------------------------------------------------------------

def run_whole_steps(mode: Mode, config) -> dict:
    """The launcher's own set-up and step (repa_fast.train.setup, self-checks included, and train_step),
    timed over one epoch of the cache."""
    from repa_fast.data.loader import build_loader
    from repa_fast.train import setup, train_step

    run = setup(config, argparse.Namespace(ds_config=None), compile_backend=mode.compile_backend)
    loader = build_loader(config, run.dataset, rank=run.rank, world=run.world, device=run.device, dtype=run.dtype)
    batches, counter = iter(loader), itertools.count(1)

    def step():
        losses, _ = train_step(run, next(batches), next(counter))
        return losses["loss"].detach()

    try:
        result = time_steps(step, mode.warmup, mode.steps, run.device)
    finally:
        loader.close()
        run.engine.destroy()
    result["samples_per_s"] = config.batch_size * 1e3 / result["median_ms"]
    result["world"] = run.world
    result["settings"] = {"kernels": config.kernels, "compile": config.compile,
                          "compile_backend": mode.compile_backend if config.compile != "none" else None,
                          "ds_config": config.ds_config,
                          "zero_stage": run.engine.zero_optimization_stage(),
                          "loader": config.loader, "num_workers": config.num_workers,
                          "mixed_precision": config.mixed_precision}
    return result


def step_rows(mode: Mode) -> list[dict]:
    from repa_fast.data.synthetic import write_synthetic_caches
    from repa_fast.models.unet import SD15_UNET, TINY_UNET

    base = load_step_config(mode)
    unet = {"sd15": SD15_UNET, "tiny": TINY_UNET}[base.model]
    results = {}
    with tempfile.TemporaryDirectory(prefix="gpu_report_cache_") as tmp:
        # one epoch holds every step: the reference loader restarts its workers at each epoch
        paths = write_synthetic_caches(tmp, num_samples=(mode.warmup + mode.steps) * base.batch_size,
                                       num_classes=10, align_layers=base.align_layers,
                                       latent_shape=(4, unet["sample_size"], unet["sample_size"]),
                                       num_tokens=base.dino_N, dino_D=base.dino_D,
                                       clip_shape=(77, unet["cross_attention_dim"]))
        data = [f"{k}={v}" for k, v in paths.items()] + [f"output_dir={tmp}/run"]
        for name, overrides in STEP_PATHS.items():
            if not mode.compile_step:
                overrides = tuple("compile=none" if o.startswith("compile=") else o for o in overrides)
            results[name] = run_whole_steps(mode, load_step_config(mode, *data, *overrides))
            torch._dynamo.reset()
            free_memory()  # the engine, model and loader of this path, before the next one
    ref = results["reference"]["median_ms"]
    what = (f"{base.model} U-Net, LoRA r{base.lora_rank} {base.lora_targets}, B={base.batch_size}, "
            f"{base.mixed_precision}, align {','.join(base.align_layers)}, world {results['reference']['world']}")
    return [{"part": "step", "item": "whole step", "impl": name, "pass": "step", **r, "floor_ms": None,
             "vs": None if name == "reference" else "reference",
             "ratio": None if name == "reference" else ref / r["median_ms"], "shape": what}
            for name, r in results.items()]


# --- report ------------------------------------------------------------------------------------------------

def machine(device: torch.device) -> str:
    from bench_loader import _machine

    try:
        cpu = _machine()
    except OSError:  # no lscpu
        cpu = f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}"
    if device.type != "cuda":
        return f"{cpu}; no GPU"
    props = torch.cuda.get_device_properties(device)
    return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}); {cpu}"


def software() -> str:
    import importlib.metadata as md

    parts = [f"python {platform.python_version()}"]
    for name in ("torch", "triton", "deepspeed", "diffusers", "peft"):
        try:
            parts.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            parts.append(f"{name} absent")
    return ", ".join(parts)


def code_version() -> str:
    """The git commit of the tree this runs from (noting uncommitted changes to tracked files), or "unknown"
    where the tree has no .git (a copy, as on the lent GPU machine)."""
    if not (ROOT / ".git").exists():
        return "unknown"
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" with uncommitted changes" if changed else "")


def fmt_time(ms: float | None, part: str) -> str:
    if ms is None:
        return ""
    return f"{ms * 1e3:.1f} us" if part == "op" else f"{ms:.1f} ms"


def fmt_compared(row: dict) -> str:
    if row.get("ratio") is None:
        return "baseline"
    if row["part"] == "overhead":
        return f"{100 * row['ratio']:+.1f} % vs {row['vs']}"
    text = f"{row['ratio']:.2f}x vs {row['vs']}"
    if row.get("max_rel_diff_vs_eager") is not None:
        text += f" (rel. diff {row['max_rel_diff_vs_eager']:.0e})"
    return text


def fmt_impl(row: dict) -> str:
    settings = row.get("settings")
    if not settings:
        count = row.get("launches")
        return row["impl"] + ("" if count is None else f" ({count} launches)")
    compile_ = settings["compile_backend"] or "none"
    return (f"{row['impl']}: kernels {settings['kernels']}, compile {compile_}, ZeRO-{settings['zero_stage']}, "
            f"{settings['loader']} loader")


def markdown(rows: list[dict], meta: dict) -> str:
    tiny = meta["mode"] == "tiny"
    lines = [
        "# GPU report: fused ops, REPA overhead, whole training step",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}",
        f"- software: {meta['software']}",
        f"- command: `{meta['command']}`",
        f"- code: {meta['code']}",
        f"- mode: {meta['mode']}" + (" (a check that the code paths run, NOT figures)" if tiny else ""),
        f"- timing: {meta['timing']}",
        f"- wall time of the parts: {meta['parts']}",
        *dict.fromkeys(f"- {r['item']}: {r['shape']}" for r in rows if "shape" in r),
        "",
        "| part | item | impl | pass | median | p20 / p80 | floor | median / floor | peak MiB | compared |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['part']} | FAILED | | | | | | | | {r['error'].strip().splitlines()[-1][:120]} |")
            continue
        part, floor, peak = r["part"], r.get("floor_ms"), r.get("peak_mib")
        cells = [part, r["item"], fmt_impl(r), r["pass"], fmt_time(r["median_ms"], part),
                 f"{fmt_time(r['p20_ms'], part)} / {fmt_time(r['p80_ms'], part)}", fmt_time(floor, part),
                 "" if floor is None else f"{r['median_ms'] / floor:.1f}x", "" if peak is None else f"{peak:.0f}",
                 fmt_compared(r)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"- {note}" for note in meta["notes"]] + [""]
    return "\n".join(lines)


def notes(mode: Mode) -> list[str]:
    out = [
        "op rows: median / floor is how far each time is from the floor (bytes at 4.3 TB/s or FLOPs at "
        "790 TFLOP/s, whichever is larger); (n launches): the kernels one forward+backward launches, Triton and "
        "torch ops counted alike (not counted for compiled); peak MiB is the memory of forward+backward above the "
        "inputs; "
        "compared is the eager time over this time (above 1: faster than eager) and the largest relative "
        "difference of the output and gradients from eager's.",
        "overhead rows: a plain torch step (eager U-Net, AdamW on the trainable parameters in the training "
        "dtype, one fixed batch); compared is (step - step without alignment) / step without alignment.",
        "step rows: repa_fast.train.train_step on one rank through DeepSpeed (its one all-reduce, of the "
        "non-finite flag, included; logging, eval and checkpoints left out), batches from synthetic LMDB "
        "caches of the step config's shapes holding one epoch for all the steps; peak MiB is the process's peak "
        "allocation during the timed steps; compared is the reference time over this time.",
        "both paths use the torch loader: the DALI wheel (~200 MB) cannot travel to the GPU machine; DALI's CPU "
        "figures are in benchmarks/results/loader_cpu.md.",
    ]
    if mode.name == "tiny":
        out.append("--tiny: tiny U-Net and shapes, fp32, Triton kernels in the interpreter, torch.compile with "
                   "aot_eager, perf_counter timing: these numbers only show that every row's code ran.")
    if not mode.compile_step:
        out.append("the fast whole step ran without compiling the U-Net (--tiny; --tiny-compile-step compiles it).")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The GPU report: fused ops, REPA overhead, whole training step "
                                                 "(see the module docstring).")
    parser.add_argument("--out", required=True, help="folder for gpu_report.json and gpu_report.md")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (or GPU): checks the code paths")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--tiny-compile-step", action="store_true",
                        help="--tiny: compile the fast whole step's U-Net too (aot_eager; about a minute more on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 10; --tiny 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed training steps first (default 3; --tiny 0)")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        parser.error(f"--parts: {args.parts!r} names no part or unknown ones; choose from {list(PARTS)}")
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("gpu_report: needs a CUDA GPU (none found); --tiny runs the code paths on the CPU.", file=sys.stderr)
        return 2
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        # one thread: on shared cores an oversubscribed (spinning) pool made a tiny step 5-30x slower here;
        # OMP_NUM_THREADS also stops repa_fast.train.init_distributed from raising it again
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    elif os.environ.get("TRITON_INTERPRET") == "1":
        print("gpu_report: TRITON_INTERPRET=1 is set; unset it to time the compiled kernels.", file=sys.stderr)
        return 2
    mode = Mode(**(TINY if args.tiny else FULL), device=torch.device("cuda", 0) if cuda else torch.device("cpu"))
    if cuda:
        torch.cuda.set_device(mode.device)
    mode.steps = mode.steps if args.steps is None else args.steps
    mode.warmup = mode.warmup if args.warmup is None else args.warmup
    mode.compile_step = mode.compile_step or args.tiny_compile_step
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    command = " ".join(["python", *sys.argv]) if argv is None else " ".join(["python", __file__, *argv])
    timing = ("ops: triton.testing.do_bench (median, 20/80 % quantiles)" if cuda else
              f"ops: time.perf_counter, {mode.cpu_runs} call(s) after one untimed") + \
             f"; steps: {mode.warmup} untimed + {mode.steps} timed steps, each synchronised (median, 20/80 %)"
    meta = {"date": stamp, "machine": machine(mode.device), "software": software(), "command": command,
            "code": code_version(), "mode": mode.name, "timing": timing, "notes": notes(mode)}
    common = {"gpu": meta["machine"], "date": stamp, "command": command, "code": meta["code"], "mode": mode.name,
              "software": meta["software"]}
    builders = {"op": op_rows, "overhead": overhead_rows, "step": step_rows}
    rows, failed, seconds = [], [], {}
    for part in parts:
        t0 = time.perf_counter()
        print(f"gpu_report: part {part} ...", flush=True)
        try:
            new = builders[part](mode)
        except Exception:  # a failed part is reported; the other parts still run
            error = traceback.format_exc()
            print(error, file=sys.stderr, flush=True)
            new, failed = [{"part": part, "error": error}], failed + [part]
        torch._dynamo.reset()
        free_memory()
        seconds[part] = time.perf_counter() - t0
        print(f"gpu_report: part {part} took {seconds[part]:.1f} s", flush=True)
        rows += [{**row, **common} for row in new]
        meta["parts"] = ", ".join(f"{name} {t:.0f} s" for name, t in seconds.items())
        # written after every part: a run stopped by a time limit keeps the parts it finished
        (out / "gpu_report.json").write_text(json.dumps(rows, indent=1))
        text = markdown(rows, meta)
        (out / "gpu_report.md").write_text(text)
    print(f"gpu_report: wrote {out / 'gpu_report.json'} and {out / 'gpu_report.md'}\n")
    print(text)
    if failed:
        print(f"gpu_report: part(s) {failed} FAILED (see the traceback above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
