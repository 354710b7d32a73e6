"""Synthetic caches in the real formats, of any size: for tests, the demo and benchmarks.

    python -m repa_fast.data.synthetic OUT_DIR --samples 256 --classes 10 --layers mid \
        --latent-shape 4,16,16 --tokens 64 --dim 64 --clip-dim 32

The DINO tokens are not noise: each class has a fixed random direction field, so a model can learn
to align with them and the alignment loss falls in the demo.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch

from repa_fast.data.cache import CacheWriter, dino_key


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

    class_dirs = rng.standard_normal((len(align_layers), num_classes, num_tokens, dino_D)).astype(np.float32)
    meta = {"created_by": "repa_fast.data.synthetic", "seed": seed}
    with CacheWriter(paths["latent_dir"], latent_shape, "float16", kind="latent", extra_meta=meta) as latents:
        for sample_id in ids:
            latents.put(sample_id, rng.standard_normal(latent_shape).astype(np.float16))
    with CacheWriter(paths["dino_dir"], (num_tokens, dino_D), "float16", kind="dino", layers=list(align_layers),
                     extra_meta=meta) as dino:
        for sample_id, c in zip(ids, classes, strict=True):
            for li, layer in enumerate(align_layers):
                tokens = class_dirs[li, c] + 0.5 * rng.standard_normal((num_tokens, dino_D)).astype(np.float32)
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
