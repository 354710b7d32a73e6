"""The cache doctor: a subset CSV scanned against the latent and DINO caches and the CLIP table.

    repa-fast-check-cache --config configs/sd15_repa_A.yaml [key=value ...] [--write-exclude bad_ids.txt]
    python -m repa_fast.data.check --config configs/tiny.yaml csv_path=eval.csv

The run config names what to scan (``csv_path``, ``latent_dir``, ``dino_dir``, ``clip_embeddings_path``)
and what to expect (``align_layers``, ``dino_N`` x ``dino_D``); ``key=value`` overrides as for training.
It reports

- per cache: a ``__meta__`` that is missing or disagrees with the config (its records are then not
  scanned), and the CLIP table's problems (unreadable, not [1001, 77, dim], non-finite values);
- per sample id: a repeated id, a class id that is not an integer in [0, 1000), and for its latent and
  each align layer's DINO record: missing, short (or long), non-finite values, all zeros;
- value statistics (count, mean, std, min, max) of each cache's sound records and of the CLIP table.

It exits with status 0 when nothing is wrong, else 1 after listing the bad ids and why. Ids that the
config's ``exclude_ids_path`` already leaves out are listed as such and do not count. ``--write-exclude
FILE`` writes the bad ids (all of them, excluded already or not) for ``exclude_ids_path: FILE``, which
drops them from training while the other samples keep their sampling (see ``repa_fast.data.dataset``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from repa_fast.config import Config, load_config
from repa_fast.data.cache import CacheError, CacheReader, dino_key, load_clip_table
from repa_fast.data.dataset import (
    NUM_CLASSES,
    TOKEN_SHAPE_KEYS,
    class_id_problem,
    read_csv_rows,
    read_id_list,
    write_id_list,
)
from repa_fast.errors import run_main

PROG = "repa-fast-check-cache"


@dataclass
class ValueStats:
    """Count, mean, std, min and max of the values added, accumulated in float64."""

    records: int = 0
    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    lo: float = float("inf")
    hi: float = float("-inf")

    def add(self, values: np.ndarray) -> None:
        v = values.astype(np.float64, copy=False).ravel()
        self.records += 1
        self.count += v.size
        self.total += float(v.sum())
        self.total_sq += float(v @ v)
        self.lo, self.hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))

    def summary(self) -> dict:
        if not self.count:
            return {"records": 0, "count": 0}
        mean = self.total / self.count
        std = max(self.total_sq / self.count - mean * mean, 0.0) ** 0.5
        return {"records": self.records, "count": self.count, "mean": mean, "std": std, "min": self.lo,
                "max": self.hi}


@dataclass
class Report:
    """What a scan found: cache-level ``problems``, ``bad`` ids with their reasons (in CSV order),
    ``stats`` per cache, the CSV's ``rows`` and the ids that ``exclude_ids_path`` leaves out."""

    csv_path: str
    rows: int = 0
    problems: list[str] = field(default_factory=list)
    bad: dict[str, list[str]] = field(default_factory=dict)
    stats: dict[str, dict] = field(default_factory=dict)
    excluded: set[str] = field(default_factory=set)

    def flag(self, sample_id: str, reason: str) -> None:
        self.bad.setdefault(sample_id, []).append(reason)

    @property
    def failing_ids(self) -> list[str]:
        return [sample_id for sample_id in self.bad if sample_id not in self.excluded]

    @property
    def ok(self) -> bool:
        return not self.problems and not self.failing_ids


def check_record(reader: CacheReader, key: str, buf) -> tuple[str | None, np.ndarray | None]:
    """(why record ``key`` is bad: missing, wrong length (``CacheReader.record_problem``), non-finite, all
    zeros; or None, its values as float32)."""
    problem = reader.record_problem(key, buf)
    if problem is not None:
        return problem, None
    values = np.frombuffer(buf, dtype=reader.dtype).astype(np.float32)
    bad = values.size - int(np.isfinite(values).sum())
    if bad:
        return f"{bad} of {values.size} values are NaN or inf", None
    if not values.any():
        return "all zeros", None
    return None, values


def _open(report: Report, label: str, path: str, **expect) -> CacheReader | None:
    try:
        return CacheReader(path, **expect)
    except CacheError as err:
        report.problems.append(f"{label}: {err}")
        return None


def check_caches(config: Config, progress: bool = True) -> Report:
    """Scan ``config``'s CSV against its caches and CLIP table (see the module docstring)."""
    report = Report(config.csv_path)
    rows = read_csv_rows(config.csv_path, ("id", "class_id"))  # a missing CSV or column stops here
    report.rows = len(rows)
    if config.exclude_ids_path:
        report.excluded = read_id_list(config.exclude_ids_path)

    try:
        table = load_clip_table(config.clip_embeddings_path, num_rows=NUM_CLASSES + 1)
    except CacheError as err:
        report.problems.append(f"CLIP table: {err}")
    else:
        values = table.float().numpy()
        finite = np.isfinite(values)
        if not finite.all():
            rows_bad = np.flatnonzero(~finite.reshape(len(values), -1).all(1)).tolist()
            report.problems.append(f"CLIP table: {config.clip_embeddings_path}: {int((~finite).sum())} non-finite "
                                   f"values in row(s) {rows_bad[:10]}; rebuild it with repa-fast-prepare-clip")
        else:
            stats = ValueStats()
            stats.add(values)
            report.stats["clip table"] = {**stats.summary(), "shape": list(table.shape)}

    latents = _open(report, "latents", config.latent_dir)
    dino = _open(report, "dino", config.dino_dir, shape=(config.dino_N, config.dino_D), layers=config.align_layers,
                 shape_from=TOKEN_SHAPE_KEYS)
    caches = []  # (label, reader, key of an id)
    if latents is not None:
        caches.append(("latents", latents, lambda sample_id: sample_id))
    if dino is not None:
        caches += [(f"dino[{layer}]", dino, lambda sample_id, layer=layer: dino_key(sample_id, layer))
                   for layer in config.align_layers]
    stats = {label: ValueStats() for label, _, _ in caches}
    txns = {id(reader): reader.env.begin(buffers=True) for _, reader, _ in caches}
    seen: dict[str, int] = {}
    try:
        for line, row in tqdm(rows, desc=PROG, unit="sample", disable=not progress, file=sys.stderr):
            sample_id = row["id"]
            if sample_id in seen:
                report.flag(sample_id, f"id repeats: CSV lines {seen[sample_id]} and {line}")
                continue
            seen[sample_id] = line
            problem = class_id_problem(row["class_id"], NUM_CLASSES)
            if problem is not None:
                report.flag(sample_id, f"{problem} (CSV line {line})")
            for label, reader, key_of in caches:
                key = key_of(sample_id)
                problem, values = check_record(reader, key, txns[id(reader)].get(key.encode()))
                if problem is None:
                    stats[label].add(values)
                else:
                    report.flag(sample_id, f"{label}: {problem}")
    finally:
        for txn in txns.values():
            txn.abort()
    for label, reader, _ in caches:
        report.stats[label] = {**stats[label].summary(), "path": str(reader.path)}
    return report


def _format_stats(name: str, s: dict) -> str:
    if not s.get("count"):
        return f"  {name:<16} no sound records"
    what = str(s["shape"]) if "shape" in s else f"{s['records']} records"
    return (f"  {name:<16} {what:>16} {s['count']:>12} values  mean {s['mean']:+.4f}  "
            f"std {s['std']:.4f}  min {s['min']:+.4f}  max {s['max']:+.4f}")


def print_report(report: Report, out=None) -> None:
    out = out or sys.stdout
    print(f"{report.csv_path}: {report.rows} rows", file=out)
    for name, s in report.stats.items():
        print(_format_stats(name, s), file=out)
    for problem in report.problems:
        print(f"problem: {problem}", file=out)
    if report.bad:
        failing = len(report.failing_ids)
        print(f"bad ids: {len(report.bad)} ({len(report.bad) - failing} left out by exclude_ids_path already)",
              file=out)
        for sample_id, reasons in report.bad.items():
            note = " (excluded)" if sample_id in report.excluded else ""
            print(f"  {sample_id}{note}: {'; '.join(reasons)}", file=out)
    if report.ok:
        print("no problems found" + (" outside exclude_ids_path" if report.bad else ""), file=out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML run config (default: the built-in defaults)")
    p.add_argument("--write-exclude", "--write_exclude", dest="write_exclude", default=None, metavar="FILE",
                   help="write the bad ids to FILE, for the config key exclude_ids_path")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (paths, align_layers, ...)")
    return p


def run(args: argparse.Namespace) -> Report:
    report = check_caches(load_config(args.config, args.overrides), progress=args.progress)
    print_report(report)
    if args.write_exclude:
        reasons = {sample_id: "; ".join(why) for sample_id, why in report.bad.items()}
        write_id_list(args.write_exclude, reasons, header=f"{PROG}: {len(reasons)} bad sample(s) of "
                      f"{report.csv_path}\nset the config key exclude_ids_path to this file to leave them out")
        print(f"wrote {len(reasons)} id(s) to {args.write_exclude}")
    return report


def main(argv: list[str] | None = None) -> None:
    report = run_main(PROG, run, build_parser().parse_args(argv))
    if not report.ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
