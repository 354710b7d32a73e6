"""Class-conditional samples from a trained run, for FID: PNGs and an ADM-style npz, on every GPU.

    repa-fast-sample RUN_DIR --sd SD15_DIR [--weights ema] [--classes all] [--per-class 50] [--cfg 4.0] \
        [--steps 50] [--scheduler auto] [--size 512] [--seed 0] [--batch-size 16] [--out DIR] [key=value ...]
    deepspeed --num_gpus 8 --module repa_fast.sample RUN_DIR --sd SD15_DIR ...
    torchrun --nproc_per_node 8 -m repa_fast.sample RUN_DIR --sd SD15_DIR ...

Images come from diffusers' StableDiffusionPipeline, assembled from the local SD-1.5 folder ``--sd`` (vae,
scheduler config; nothing is downloaded) and the run's U-Net (``config.model`` with the run's ``lora/`` or
``lora_ema/``, as ``repa-fast-evaluate`` loads it). They are conditioned as in training: class c's prompt
embedding is row c of the run's CLIP table (``clip_embeddings_path``); the null row (the last: the empty
prompt, which CFG dropout trained) is the unconditional embedding of classifier-free guidance.

Image j of class c starts from noise drawn by a CPU generator seeded with ``image_seed(seed, c, j)``, so
any image can be regenerated alone, on any device and in any batch (the same pixels up to the rounding of
batched kernels: a level here and there), and is written to
``OUT/c{c:04d}_{j:05d}.png``. A rerun skips the PNGs that exist (an interrupted job resumes); one made with
other settings is refused. With RANK / WORLD_SIZE set (deepspeed, torchrun), the images, ordered by
(class in ``--classes`` order, j), are dealt round-robin: rank r makes positions r, r + W, r + 2W, ...
At the end rank 0 checks that every requested PNG exists and writes ``OUT/samples_{N}x{H}x{W}x3.npz``
(``arr_0`` uint8 images, ``arr_1`` class ids: guided-diffusion's layout) and ``OUT/samples.json``.

The sampler follows the run's noise path:
- ``path_type: ddpm``: a diffusers scheduler (``--scheduler``: ddim (default), dpm, euler, euler_a, pndm,
  ddpm, unipc) from the SD folder's scheduler config, with ``prediction_type`` from the run's
  ``prediction`` (v -> v_prediction). Its noise schedule must be the one the run trained on
  (``losses.noise_schedule``: SD-1.5's for ``sd15``/``tiny``, else the model folder's).
- ``path_type: linear`` with ``prediction: v``: Euler steps on x_t = (1 - t) x0 + t eps from t = 1 to 0,
  the U-Net at timestep (T-1) t as in training (999 t for SD-1.5; ``flow_euler``).
Other combinations (``cosine``; ``linear`` with epsilon) have no sampler here and are refused.

Bad input (a missing run folder or ``--sd`` file, bad ``--classes``, a folder of other settings) ends the
tool with one line naming it, prefixed ``rank R:`` under a launcher (``repa_fast.errors.run_main``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from repa_fast.errors import InputError, MissingFileError, read_json, run_main, world_size
from repa_fast.evaluate import DTYPES
from repa_fast.image_io import read_rgb, save_png_atomic, write_npz

SCHEDULERS = {"ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
              "euler_a": "EulerAncestralDiscreteScheduler", "pndm": "PNDMScheduler", "ddpm": "DDPMScheduler",
              "unipc": "UniPCMultistepScheduler"}
FLOW_EULER = "flow_euler"
META_NAME = "samples.json"
# the settings that change the pixels: a folder holds images of one setting only
PIXEL_SETTINGS = ("run", "weights", "sd", "cfg", "steps", "scheduler", "size", "seed", "dtype", "path_type",
                  "prediction")


class FlowEulerScheduler(FlowMatchEulerDiscreteScheduler):
    """diffusers' flow-matching Euler steps in the interface StableDiffusionPipeline calls (unit initial noise,
    no input scaling). Built with ``num_train_timesteps=T-1`` its timesteps are (T-1) t (999 t for SD-1.5),
    as the launcher feeds the U-Net on the linear path."""

    init_noise_sigma = 1.0

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample


def image_seed(seed: int, class_id: int, j: int) -> int:
    """The noise seed of image j of class ``class_id``: depends on nothing else."""
    return (seed * 1_000_003 + class_id) * 1_000_000_007 + j


def png_name(class_id: int, j: int) -> str:
    return f"c{class_id:04d}_{j:05d}.png"


def parse_classes(text: str, num_classes: int) -> list[int]:
    """``all``, or comma-separated ids and ranges (``0-9,17``), each in [0, num_classes)."""
    if text.strip() == "all":
        return list(range(num_classes))
    classes: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            lo, _, hi = part.partition("-")
            ids = range(int(lo), int(hi) + 1) if hi else [int(lo)]
        except ValueError:
            raise InputError(f"--classes: {part!r} is not a class id or a range like 0-9") from None
        classes.extend(ids)
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise InputError(f"--classes {text!r}: ids must lie in [0, {num_classes}) (the CLIP table's classes), "
                         f"got {bad[:5] if bad else 'none'}")
    if len(set(classes)) != len(classes):
        raise InputError(f"--classes {text!r} names a class twice")
    return classes


def rank_jobs(classes: list[int], per_class: int, rank: int, world: int) -> list[tuple[int, int]]:
    """The (class, j) pairs of ``rank``: positions rank, rank + world, ... of the (class, j) order."""
    jobs = [(c, j) for c in classes for j in range(per_class)]
    return jobs[rank::world]


def scheduler_name(name: str, path_type: str) -> str:
    """``--scheduler`` with ``auto`` resolved: flow_euler on the linear path, ddim on the ddpm path."""
    if name != "auto":
        return name
    return FLOW_EULER if path_type == "linear" else "ddim"


def build_scheduler(name: str, path_type: str, prediction: str, sd_scheduler_config: dict, trained=None):
    """The sampler for a run's noise path (see the module doc); ``sd_scheduler_config`` is the SD folder's and
    ``trained`` the DDPMScheduler the run trained on (``losses.noise_schedule``; default SD-1.5's)."""
    import diffusers

    from repa_fast.losses import PREDICTION_TYPES, sd15_noise_schedule

    trained = sd15_noise_schedule() if trained is None else trained
    T = int(trained.config.num_train_timesteps)
    if path_type == "linear":
        if prediction != "v":
            raise InputError(f"run config: path_type 'linear' with prediction {prediction!r}: no sampler here "
                             f"(only v)")
        if name not in ("auto", FLOW_EULER):
            raise InputError(f"--scheduler {name!r}: a path_type 'linear' run samples with {FLOW_EULER!r} only "
                             f"(the DDPM-family schedulers follow the model's noise schedule, not the linear path)")
        return FlowEulerScheduler(num_train_timesteps=T - 1)  # timesteps (T-1) t, as SD15Loss.interpolate
    if path_type != "ddpm":
        raise InputError(f"run config: path_type {path_type!r}: no sampler here (ddpm and linear are supported)")
    name = scheduler_name(name, path_type)
    if name not in SCHEDULERS:
        raise InputError(f"--scheduler {name!r} is not one of {['auto', FLOW_EULER, *SCHEDULERS]}")
    cls = getattr(diffusers, SCHEDULERS[name])
    settings = {"prediction_type": PREDICTION_TYPES[prediction]}
    if "clip_sample" in inspect.signature(cls.__init__).parameters:
        settings["clip_sample"] = False  # latents are not in [-1, 1]; SD-1.5's config says so, DDIM's default not
    scheduler = cls.from_config(sd_scheduler_config, **settings)
    if not _same_schedule(scheduler, trained):
        c, t = scheduler.config, trained.config
        whose = "SD-1.5's" if _same_schedule(trained, sd15_noise_schedule()) else "the model folder's"
        raise InputError(f"--sd scheduler config: beta_schedule {c.get('beta_schedule')!r}, beta_start "
                         f"{c.get('beta_start')}, beta_end {c.get('beta_end')}, {c.get('num_train_timesteps')} steps "
                         f"is not {whose} schedule ({t.beta_schedule}, {t.beta_start}, {t.beta_end}, "
                         f"{t.num_train_timesteps}), which the run trained on")
    return scheduler


def _same_schedule(a, b) -> bool:
    x, y = a.alphas_cumprod.double(), b.alphas_cumprod.double()
    return x.shape == y.shape and torch.allclose(x, y, rtol=1e-4, atol=1e-7)


def settings_of(args: argparse.Namespace, config, sampler: str) -> dict:
    return {"run": str(Path(args.run_dir).resolve()), "weights": args.weights, "sd": str(Path(args.sd).resolve()),
            "cfg": args.cfg, "steps": args.steps, "scheduler": sampler, "size": args.size, "seed": args.seed,
            "dtype": args.dtype, "path_type": config.path_type, "prediction": config.prediction,
            "overrides": list(args.overrides)}


def check_settings(out: Path, settings: dict) -> None:
    """A folder keeps images of one setting: refuse to add images made otherwise."""
    meta = out / META_NAME
    if not meta.is_file():
        return
    have = read_json(meta, "pass another --out (or delete the file to adopt the folder)").get("settings", {})
    differ = [f"{k} {have.get(k)!r} (now {settings[k]!r})" for k in PIXEL_SETTINGS if have.get(k) != settings[k]]
    if differ:
        raise InputError(f"{out} holds samples made with other settings: {', '.join(differ)}; pass another --out")


def write_meta(out: Path, meta: dict) -> None:
    """``OUT/samples.json`` through a temporary file: another rank's ``check_settings`` never reads half of it."""
    tmp = out / f".{META_NAME}.tmp"
    tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    os.replace(tmp, out / META_NAME)


class Distributed:
    """RANK / WORLD_SIZE / LOCAL_RANK from the launcher (deepspeed, torchrun); a process group only when W > 1."""

    def __init__(self):
        self.rank = int(os.environ.get("RANK", 0))
        self.world = world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if not 0 <= self.rank < self.world:
            raise InputError(f"RANK={self.rank} is not in [0, WORLD_SIZE={self.world})")
        if self.world > 1:
            import torch.distributed as dist

            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise InputError(f"WORLD_SIZE={self.world} but {missing} not set: start with deepspeed or torchrun")
            # ranks wait for each other only at the end; a resumed folder can leave them unevenly loaded
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=12))

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def generate(pipe, table: torch.Tensor, jobs: list[tuple[int, int]], out: Path, seed: int, cfg: float, steps: int,
             size: int, batch_size: int, progress: bool = True, desc: str = "sample") -> int:
    """Make the PNGs of ``jobs`` [(class, j)] not yet in ``out``; returns how many were made."""
    from tqdm.auto import tqdm

    todo = [(c, j) for c, j in jobs if not (out / png_name(c, j)).is_file()]
    null = table[-1:]
    bar = tqdm(total=len(todo), desc=desc, unit="img", dynamic_ncols=True, disable=not progress)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        ids = torch.tensor([c for c, _ in chunk])
        generators = [torch.Generator().manual_seed(image_seed(seed, c, j)) for c, j in chunk]
        images = pipe(prompt_embeds=table[ids], negative_prompt_embeds=null.expand(len(chunk), -1, -1),
                      guidance_scale=cfg, num_inference_steps=steps, height=size, width=size,
                      generator=generators, output_type="pil").images
        for (c, j), image in zip(chunk, images, strict=True):
            save_png_atomic(image.convert("RGB"), out / png_name(c, j))
        bar.update(len(chunk))
    bar.close()
    return len(todo)


def assemble(out: Path, classes: list[int], per_class: int, size: int) -> Path:
    """``samples_{N}x{H}x{W}x3.npz`` of every requested image in (class, j) order; a missing PNG is an error."""
    jobs = rank_jobs(classes, per_class, 0, 1)
    missing = [png_name(c, j) for c, j in jobs if not (out / png_name(c, j)).is_file()]
    if missing:
        raise MissingFileError(f"{out}: {len(missing)} of {len(jobs)} images missing ({missing[:3]} ...): "
                               f"a rank failed; rerun the same command to make them")

    def images():
        for c, j in jobs:
            image = read_rgb(out / png_name(c, j))
            if image.shape != (size, size, 3):
                raise InputError(f"{out / png_name(c, j)}: {image.shape[1]}x{image.shape[0]} px, expected "
                                 f"{size}x{size} (--size); delete it and rerun the same command to remake it")
            yield image

    path = out / f"samples_{len(jobs)}x{size}x{size}x3.npz"
    return write_npz(path, images(), len(jobs), (size, size, 3), labels=np.array([c for c, _ in jobs]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="repa-fast-sample", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a repa-fast-train output folder (config.json, lora/, lora_ema/)")
    p.add_argument("--sd", required=True, help="local SD-1.5 folder (vae, scheduler, ...; nothing is downloaded)")
    p.add_argument("--weights", choices=("live", "ema"), default="ema", help="the run's lora/ or lora_ema/")
    p.add_argument("--classes", default="all", help="'all' or class ids and ranges: 0-9,17")
    p.add_argument("--per-class", type=int, default=50, help="images per class (50 x 1000 classes: FID-50k)")
    p.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (<= 1: none)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--scheduler", default="auto", choices=("auto", FLOW_EULER, *SCHEDULERS),
                   help="auto: ddim for path_type ddpm, flow_euler for linear")
    p.add_argument("--size", type=int, default=512, help="image height and width in pixels (a multiple of 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="images per pipeline call on each rank")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/samples/<settings>)")
    p.add_argument("--no-npz", action="store_true", help="PNGs only")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on the CPU")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's
    p.add_argument("overrides", nargs="*", help="key=value overrides of the run's config (moved paths, model=...)")
    return p


def default_out(args: argparse.Namespace, sampler: str) -> Path:
    return (Path(args.run_dir) / "samples"
            / f"{args.weights}_cfg{args.cfg:g}_{sampler}{args.steps}_{args.size}px_seed{args.seed}")


def run(args: argparse.Namespace) -> dict:
    from repa_fast.data.cache import load_clip_prompts, load_clip_table
    from repa_fast.evaluate import load_run_config, load_run_unet, load_sd_pipeline, sd_scheduler_config
    from repa_fast.losses import noise_schedule

    for option, value in (("--per-class", args.per_class), ("--steps", args.steps), ("--batch-size", args.batch_size),
                          ("--size", args.size)):
        if value < 1:
            raise InputError(f"{option} {value}: must be at least 1")
    if args.size % 8:
        raise InputError(f"--size {args.size} is not a multiple of 8 (the VAE's downsampling)")
    dist = Distributed()
    try:
        cuda = torch.cuda.is_available()
        device = torch.device(args.device or (f"cuda:{dist.local_rank}" if cuda else "cpu"))
        args.dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
        dtype = DTYPES[args.dtype]
        config = load_run_config(args.run_dir, args.overrides)
        sd_config = sd_scheduler_config(args.sd)
        scheduler = build_scheduler(args.scheduler, config.path_type, config.prediction, sd_config,
                                    trained=noise_schedule(config))
        name = scheduler_name(args.scheduler, config.path_type)
        settings = settings_of(args, config, name)
        out = Path(args.out) if args.out else default_out(args, name)
        check_settings(out, settings)
        table = load_clip_table(config.clip_embeddings_path)
        prompts = load_clip_prompts(config.clip_embeddings_path)  # read now: a bad file stops before sampling
        classes = parse_classes(args.classes, table.shape[0] - 1)
        jobs = rank_jobs(classes, args.per_class, dist.rank, dist.world)
        out.mkdir(parents=True, exist_ok=True)
        if dist.rank == 0 and not (out / META_NAME).is_file():  # an interrupted job is resumed only as it was
            write_meta(out, {"settings": settings})

        unet, _ = load_run_unet(args.run_dir, args.weights, config)
        load_clip_table(config.clip_embeddings_path, dim=unet.config.cross_attention_dim, mmap=True)  # its width
        pipe = load_sd_pipeline(args.sd, device, dtype, unet=unet.requires_grad_(False).eval())
        pipe.scheduler = scheduler
        t0 = time.perf_counter()
        made = generate(pipe, table.to(device, dtype), jobs, out, args.seed, args.cfg, args.steps, args.size,
                        args.batch_size, progress=dist.rank == 0, desc=f"sample (rank 0 of {dist.world})")
        seconds = time.perf_counter() - t0
        dist.barrier()
        result = {"out": str(out), "made": made, "rank_images": len(jobs), "seconds": seconds,
                  "num_images": len(classes) * args.per_class}
        if dist.rank == 0:
            meta = {"settings": settings, "classes": classes, "per_class": args.per_class,
                    "png": "c{class:04d}_{j:05d}.png", "prompts": prompts}
            if not args.no_npz:
                result["npz"] = str(assemble(out, classes, args.per_class, args.size))
                meta["npz"] = Path(result["npz"]).name
            write_meta(out, meta)
        return result
    finally:
        dist.close()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_intermixed_args(argv)
    result = run_main("repa-fast-sample", run, args)
    if int(os.environ.get("RANK", 0)) == 0:
        rate = result["made"] / result["seconds"] if result["seconds"] > 0 else float("nan")
        print(f"rank 0 made {result['made']} of its {result['rank_images']} images ({rate:.2f} images/s); "
              f"{result['num_images']} images in {result['out']}" + (f"; npz: {result['npz']}" if "npz" in result
                                                                      else ""))


if __name__ == "__main__":
    main()
