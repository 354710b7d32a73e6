"""Sample N images per class from an ImageNet-style train folder into the subset CSV.

    python -m repa_fast.preprocessing.sample_subset --imagenet-dir /data/ILSVRC/Data/CLS-LOC/train \
        --samples-per-class 200 --class-index imagenet_class_index.json --output-csv train_200k.csv --seed 42

The folder holds one subfolder per synset. Class ids follow the class-index file (see
``repa_fast.preprocessing.class_index``) or, without one, the sorted synsets. Each class's sample is
a function of (seed, synset) only, so adding or reordering classes does not change it. A sample id
is the image's file stem (``n01440764_10026``), unique across ImageNet; a repeated stem is an error.
Columns: id, img_path (absolute, or relative to --imagenet-dir with --relative), class_id, synset.
"""

from __future__ import annotations

import argparse
import csv
import sys
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from repa_fast.errors import InputError, MissingFileError, run_main
from repa_fast.preprocessing.class_index import load_class_index

IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def class_sample(files: list[Path], n: int | None, seed: int, synset: str) -> list[Path]:
    """``n`` of ``files`` (all if fewer or ``n`` is None), chosen by (seed, synset), in name order."""
    files = sorted(files)
    if n is None or n >= len(files):
        return files
    rng = np.random.default_rng([seed, zlib.crc32(synset.encode())])
    return [files[i] for i in sorted(rng.choice(len(files), size=n, replace=False))]


def sample_subset(imagenet_dir, output_csv, samples_per_class: int | None, class_index=None, seed: int = 42,
                  relative: bool = False) -> int:
    """Write the subset CSV; returns the number of rows."""
    if samples_per_class is not None and samples_per_class <= 0:
        raise InputError(f"--samples-per-class must be positive, got {samples_per_class}")
    root = Path(imagenet_dir)
    if not root.is_dir():
        raise MissingFileError(f"image folder {str(root)!r} does not exist")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir())
    folder_set = set(folders)
    if class_index is not None:
        synsets = [synset for synset, _ in load_class_index(class_index)]
        if len(set(synsets)) != len(synsets):
            dup = next(s for i, s in enumerate(synsets) if s in synsets[:i])
            raise InputError(f"{class_index}: synset {dup!r} appears more than once")
        missing = [s for s in synsets if s not in folder_set]
        if missing:
            raise MissingFileError(f"{root}: no folder for {len(missing)} synset(s) of {class_index}, "
                                   f"e.g. {str(root / missing[0])!r}")
        ignored = len(folder_set - set(synsets))
        if ignored:
            print(f"note: {ignored} folder(s) of {root} are not in {class_index} and are ignored", file=sys.stderr)
    else:
        synsets = folders
    if not synsets:
        raise MissingFileError(f"{root}: no class folders")

    rows, owner, short = [], {}, []
    for class_id, synset in enumerate(tqdm(synsets, desc="sample_subset", unit="class")):
        folder = root / synset
        files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        chosen = class_sample(files, samples_per_class, seed, synset)
        if samples_per_class is not None and len(chosen) < samples_per_class:
            short.append(f"{folder} ({len(chosen)})")
        for path in chosen:
            sample_id = path.stem
            if sample_id in owner:
                raise InputError(f"sample id {sample_id!r} is the stem of both {str(owner[sample_id])!r} and "
                                 f"{str(path)!r}: ids must be unique")
            owner[sample_id] = path
            img_path = path.relative_to(root) if relative else path.resolve()
            rows.append((sample_id, img_path.as_posix(), class_id, synset))
    if short:
        print(f"warning: {len(short)} class(es) have fewer than {samples_per_class} images, all taken: "
              f"{', '.join(short[:5])}{' ...' if len(short) > 5 else ''}", file=sys.stderr)

    out = Path(output_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "img_path", "class_id", "synset"])
        writer.writerows(rows)
    print(f"sample_subset: wrote {len(rows)} rows ({len(synsets)} classes) to {out}")
    return len(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--imagenet-dir", "--imagenet_dir", required=True, help="folder of synset subfolders")
    p.add_argument("--output-csv", "--output_csv", required=True)
    p.add_argument("--samples-per-class", "--samples_per_class", type=int, default=None,
                   help="images per class (default: all)")
    p.add_argument("--class-index", "--class_index", default=None,
                   help="class-index JSON giving the class order (default: sorted synsets)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--relative", action="store_true",
                   help="write img_path relative to --imagenet-dir (then pass it as --image-root to the encoders)")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    run_main("repa-fast-sample-subset", sample_subset, a.imagenet_dir, a.output_csv, a.samples_per_class,
             a.class_index, a.seed, a.relative)


if __name__ == "__main__":
    main()
