"""Encode the subset's images into the latent cache with SD's VAE.

    python -m repa_fast.preprocessing.encode_vae_latents --csv-path train_200k.csv --vae SD15_DIR \
        --output-dir /data/vae_latents --batch-size 32 --num-workers 8 [--shard 0/4]

``--vae`` is a local diffusers folder: an AutoencoderKL folder (config.json) or a pipeline folder with a
``vae/`` subfolder; nothing is downloaded. Images: centre square, bicubic resize to ``--size`` (512),
pixels in [-1, 1]. A record is ``latent_dist.mean`` (or, with ``--sample-latents``, a sample whose
noise is a function of (--seed, id)), shifted and scaled as SD does (``(z - shift_factor) *
scaling_factor``; SD-1.5 has no shift), stored as fp16 [4, size/8, size/8] under the sample id.
``__meta__`` records the scaling factor and the VAE folder. Sharding, resume and unreadable images:
see ``repa_fast.preprocessing.image_cache``.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch

from repa_fast.errors import InputError, MissingFileError, run_main
from repa_fast.preprocessing.image_cache import (
    DTYPES,
    add_image_arguments,
    encode_rows,
    open_writer,
    read_image_rows,
    resolve_device,
)


def load_vae(path, device: torch.device, dtype: torch.dtype):
    """(AutoencoderKL in eval mode on ``device``, the folder it came from)."""
    from diffusers import AutoencoderKL

    root = Path(path)
    if (root / "config.json").is_file():
        folder, subfolder = root, None
    elif (root / "vae" / "config.json").is_file():
        folder, subfolder = root / "vae", "vae"
    else:
        raise MissingFileError(f"--vae {str(root)!r}: expected a diffusers AutoencoderKL folder (config.json) "
                               f"or a pipeline folder with vae/config.json")
    vae = AutoencoderKL.from_pretrained(str(root), subfolder=subfolder, local_files_only=True, torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False), str(folder.resolve())


def latent_shape(vae, size: int) -> tuple[int, int, int]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if size % factor:
        raise InputError(f"--size {size} is not a multiple of the VAE's downscale factor {factor}")
    return vae.config.latent_channels, size // factor, size // factor


def noise_seed(seed: int, sample_id: str) -> int:
    """The seed of ``sample_id``'s latent noise: the same in any shard, batch or resume."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()[:8], "little") >> 1


def encode_vae_latents(args: argparse.Namespace) -> dict:
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    vae, source = load_vae(args.vae, device, dtype)
    shape = latent_shape(vae, args.size)
    scaling = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None)
    rows = read_image_rows(args.csv_path, args.image_root)
    index, count = args.shard
    meta = {"created_by": "repa_fast.preprocessing.encode_vae_latents", "source": source, "scaling_factor": scaling,
            "shift_factor": shift, "image_size": args.size, "latent": "sample" if args.sample_latents else "mean",
            "seed": args.seed if args.sample_latents else None, "csv": str(Path(args.csv_path).resolve())}

    def encode(pixels: torch.Tensor, ids: list[str]) -> torch.Tensor:
        x = (pixels.to(device, non_blocking=True).float() / 127.5 - 1.0).to(dtype)
        dist = vae.encode(x).latent_dist
        if args.sample_latents:
            z = dist.sample(generator=[torch.Generator().manual_seed(noise_seed(args.seed, i)) for i in ids])
        else:
            z = dist.mean
        if shift is not None:
            z = z - shift
        return z * scaling

    with open_writer(args.output_dir, shape, "latent", len(rows), meta=meta,
                     must_match=("source", "scaling_factor", "shift_factor", "image_size", "latent", "seed")) as writer:
        return encode_rows(rows[index::count], writer, lambda sample_id: [sample_id], encode, args.size,
                           args.batch_size, args.num_workers, args.strict, "encode_vae_latents",
                           pin_memory=device.type == "cuda")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", required=True, help="local diffusers folder: AutoencoderKL, or a pipeline with vae/")
    add_image_arguments(p, size=512, batch_size=32)
    p.add_argument("--sample-latents", action="store_true", help="store a sample of latent_dist, not its mean")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample-latents noise")
    return p


def main(argv: list[str] | None = None) -> None:
    run_main("repa-fast-encode-vae", encode_vae_latents, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
