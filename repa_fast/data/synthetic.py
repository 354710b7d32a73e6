"""Synthetic caches in the real formats, of any size: for tests, the demo and benchmarks.

    python -m repa_fast.data.synthetic OUT_DIR --samples 256 --classes 10 --layers mid \
        --latent-shape 4,16,16 --tokens 64 --dim 64 --clip-dim 32

The data are learnable, so that the demo shows every loss term improve:

    latent  = a * pattern[class] + 0.25 * noise          a ~ U(0.75, 1.25), noise ~ N(0, 1) per element
    tokens  = pool(latent) @ proj[layer] + class_emb[layer][class]          [N, D]

``pattern[class]`` is a smooth field per class (a few low-frequency plane waves per channel plus a
per-channel offset, unit scale); ``pool`` is adaptive average pooling of the [C, H, W] latent onto
the sqrt(N) x sqrt(N) token grid (torch's ``adaptive_avg_pool2d``), flattened to [N, C];
``proj[layer]`` [C, D] (entries N(0, 1/C)) and ``class_emb[layer]`` [classes, D] (entries N(0, 1))
are fixed by the seed (``token_maps``). So a head that sees the latent and the class can reach the
tokens exactly, and a denoiser conditioned on the class can learn each class's pattern. Latents are
stored in fp16 and the tokens are computed from the stored (fp16) latent.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch

from repa_fast.data.cache import CacheWriter, dino_key

NOISE_STD = 0.25
AMPLITUDE = (0.75, 1.25)
WAVES = 3  # plane waves per channel of a class pattern
MAX_CYCLES = 1.5  # per image side: the patterns are smooth at any resolution


def class_patterns(num_classes: int, latent_shape, seed: int = 0) -> np.ndarray:
    """[classes, C, H, W] smooth fields, one per class (fixed by ``seed``)."""
    rng = np.random.default_rng([seed, 1])
    C, H, W = latent_shape
    y = np.arange(H, dtype=np.float64)[:, None] / H
    x = np.arange(W, dtype=np.float64)[None, :] / W
    freq = rng.uniform(-MAX_CYCLES, MAX_CYCLES, size=(num_classes, C, WAVES, 2))
    phase = rng.uniform(0, 2 * np.pi, size=(num_classes, C, WAVES))
    amp = rng.uniform(0.5, 1.0, size=(num_classes, C, WAVES))
    field = np.zeros((num_classes, C, H, W))
    for k in range(WAVES):  # one wave at a time: [classes, C, H, W] is the largest array
        fy, fx = freq[:, :, k, 0, None, None], freq[:, :, k, 1, None, None]
        field += amp[:, :, k, None, None] * np.cos(2 * np.pi * (fy * y + fx * x) + phase[:, :, k, None, None])
    field /= field.std(axis=(-2, -1), keepdims=True) + 1e-6
    offset = 0.5 * rng.standard_normal((num_classes, C, 1, 1))
    return (field + offset).astype(np.float32)


def token_maps(num_classes: int, channels: int, dino_D: int, layer_index: int, seed: int = 0):
    """(proj [C, D], class_emb [classes, D]) of align layer number ``layer_index`` (fixed by ``seed``)."""
    rng = np.random.default_rng([seed, 2, layer_index])
    proj = rng.standard_normal((channels, dino_D)) / np.sqrt(channels)
    class_emb = rng.standard_normal((num_classes, dino_D))
    return proj.astype(np.float32), class_emb.astype(np.float32)


def _pool_matrix(size: int, side: int) -> np.ndarray:
    """[side, size]: row i averages bin [floor(i size/side), ceil((i+1) size/side)) (adaptive_avg_pool)."""
    m = np.zeros((side, size), dtype=np.float32)
    for i in range(side):
        start, end = (i * size) // side, -((-(i + 1) * size) // side)
        m[i, start:end] = 1.0 / (end - start)
    return m


def pool_to_tokens(latent: np.ndarray, num_tokens: int) -> np.ndarray:
    """[C, H, W] -> [N, C]: adaptive average pooling onto the sqrt(N) x sqrt(N) token grid, row-major."""
    side = int(round(num_tokens**0.5))
    if side * side != num_tokens:
        raise ValueError(f"num_tokens={num_tokens} does not form a square token grid")
    C, H, W = latent.shape
    pooled = np.einsum("ih,chw,jw->ijc", _pool_matrix(H, side), latent.astype(np.float32), _pool_matrix(W, side))
    return pooled.reshape(num_tokens, C)


def synthetic_tokens(latent: np.ndarray, class_id: int, proj: np.ndarray, class_emb: np.ndarray,
                     num_tokens: int) -> np.ndarray:
    """The DINO tokens [N, D] of one sample: pool(latent) @ proj + class_emb[class_id] (see the module doc)."""
    return pool_to_tokens(latent, num_tokens) @ proj + class_emb[class_id]


def write_synthetic_caches(out_dir, num_samples: int = 64, num_classes: int = 10, align_layers=("mid",),
                           latent_shape=(4, 64, 64), num_tokens: int = 256, dino_D: int = 1024,
                           clip_shape=(77, 768), table_classes: int = 1000, seed: int = 0) -> dict[str, str]:
    """Write ``train.csv``, ``latents/``, ``dino/`` and ``clip_embeddings.pt`` under ``out_dir``.

    The CLIP table has ``table_classes + 1`` rows (the last is the null class), as the real one.
    Returns the paths by config key.
    """
    if num_classes > table_classes:
        raise ValueError(f"num_classes={num_classes} exceeds table_classes={table_classes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = [f"s{i:07d}" for i in range(num_samples)]
    classes = rng.integers(0, num_classes, size=num_samples)
    paths = {"csv_path": str(out / "train.csv"), "latent_dir": str(out / "latents"),
             "dino_dir": str(out / "dino"), "clip_embeddings_path": str(out / "clip_embeddings.pt")}
    with open(paths["csv_path"], "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "img_path", "class_id", "synset"])
        for sample_id, c in zip(ids, classes, strict=True):
            writer.writerow([sample_id, f"synthetic/{sample_id}.JPEG", int(c), f"n{int(c):08d}"])

    patterns = class_patterns(num_classes, latent_shape, seed)
    maps = [token_maps(num_classes, latent_shape[0], dino_D, li, seed) for li in range(len(align_layers))]
    meta = {"created_by": "repa_fast.data.synthetic", "seed": seed}
    with CacheWriter(paths["latent_dir"], latent_shape, "float16", kind="latent", extra_meta=meta) as latents, \
            CacheWriter(paths["dino_dir"], (num_tokens, dino_D), "float16", kind="dino", layers=list(align_layers),
                        extra_meta=meta) as dino:
        for sample_id, c in zip(ids, classes, strict=True):
            latent = (rng.uniform(*AMPLITUDE) * patterns[c]
                      + NOISE_STD * rng.standard_normal(latent_shape, dtype=np.float32)).astype(np.float16)
            latents.put(sample_id, latent)
            for layer, (proj, class_emb) in zip(align_layers, maps, strict=True):
                tokens = synthetic_tokens(latent, int(c), proj, class_emb, num_tokens)
                dino.put(dino_key(sample_id, layer), tokens.astype(np.float16))
    table = torch.from_numpy(rng.standard_normal((table_classes + 1, *clip_shape)).astype(np.float32))
    table[-1] = 0.0  # stands in for the empty-prompt embedding
    torch.save(table.to(torch.float16), paths["clip_embeddings_path"])
    return paths


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--table-classes", type=int, default=1000)
    p.add_argument("--layers", default="mid", help="comma-separated align layers")
    p.add_argument("--latent-shape", type=_shape, default=(4, 64, 64))
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--clip-dim", type=int, default=768)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    paths = write_synthetic_caches(a.out_dir, a.samples, a.classes, a.layers.split(","), a.latent_shape,
                                   a.tokens, a.dim, (77, a.clip_dim), a.table_classes, a.seed)
    for key, path in paths.items():
        print(f"{key}: {path}")


if __name__ == "__main__":
    main()
