"""Regenerate the README's Performance section from a results folder: figures are measured, never typed.

    python benchmarks/update_readme.py benchmarks/results [--readme README.md]

Reads every ``*.md`` under RESULTS_DIR (subfolders too) written in the form of the benchmark scripts
(bench_loader.py, gpu_report.py): a ``# title``, ``- date:``, ``- machine:`` and ``- command:`` lines and a
table. Keeps the latest (by date) of each title and writes it, with its date, machine, software, command and
(where the file names it: gpu_report.py's ``- code:``) the code it measured, between
``<!-- performance:start -->`` and ``<!-- performance:end -->`` in the README; nothing else in the README
changes. A table with FAILED rows (a part of gpu_report.py that failed) gets a line naming those parts.
Reports written by ``gpu_report.py --tiny`` are skipped (they check code paths, they are not figures);
while no GPU report is found, the section says that the GPU figures are not measured yet.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

START, END = "<!-- performance:start -->", "<!-- performance:end -->"
GPU_REPORT = "gpu_report.md"  # the file name gpu_report.py writes
HEADER_KEYS = ("date", "machine", "software", "command", "code")
WIDTH = 100  # the README's line width


@dataclass
class Result:
    path: Path
    title: str
    date: datetime.datetime
    fields: dict[str, str]
    table: list[str]
    summary: list[str] = field(default_factory=list)  # the bullet lines right after the table

    @property
    def is_gpu(self) -> bool:
        return self.path.name == GPU_REPORT

    @property
    def failed_parts(self) -> list[str]:
        """The parts whose table row says FAILED (gpu_report.py: ``| part | FAILED | ...``), in table order."""
        cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in self.table]
        return list(dict.fromkeys(c[0] for c in cells if len(c) > 1 and c[1] == "FAILED"))


def parse_date(text: str) -> datetime.datetime:
    """ISO 8601 (gpu_report.py) or `date`'s default form (``Sun Nov 29 00:30:46 UTC 2026``); naive = UTC."""
    text = text.strip()
    try:
        value = datetime.datetime.fromisoformat(text)
    except ValueError:
        value = datetime.datetime.strptime(text, "%a %b %d %H:%M:%S %Z %Y")
    return value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)


def parse_result(path: Path) -> Result | None:
    """The result a markdown file holds, or None if it is not in the benchmark form (or is a --tiny check)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    title = next((ln[2:].strip() for ln in lines if ln.startswith("# ")), None)
    start = next((i for i, ln in enumerate(lines) if ln.startswith("|")), None)
    fields = {}
    for ln in lines[:start]:  # the header: the bullet lines above the table
        if ln.startswith("- ") and ":" in ln:
            key, value = ln[2:].split(":", 1)
            fields.setdefault(key.strip(), value.strip())
    if title is None or start is None or any(k not in fields for k in ("date", "machine", "command")):
        return None
    if fields.get("mode", "").startswith("tiny"):
        return None
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    summary = []
    for ln in lines[end + 1:] if end < len(lines) and not lines[end].strip() else lines[end:]:
        if not ln.startswith("- "):
            break
        summary.append(ln)
    try:
        date = parse_date(fields["date"])
    except ValueError:
        raise SystemExit(f"update_readme: {path}: cannot read the date {fields['date']!r}") from None
    return Result(path, title, date, fields, lines[start:end], summary)


def latest_results(results_dir: Path) -> list[Result]:
    """The latest result of each title under ``results_dir``: GPU reports first, then by title."""
    found: dict[str, Result] = {}
    for path in sorted(results_dir.rglob("*.md")):
        result = parse_result(path)
        if result is not None and (result.title not in found or result.date > found[result.title].date):
            found[result.title] = result
    return sorted(found.values(), key=lambda r: (not r.is_gpu, r.title))


def render(results: list[Result], readme_dir: Path) -> str:
    lines = []
    if not any(r.is_gpu for r in results):
        lines += [textwrap.fill(
            "GPU figures are not measured yet: no GPU report (`make bench-gpu`, benchmarks/gpu_report.py) has been "
            "run on a GPU, so the fused kernels and the training step have only run on CPU (correctness under the "
            "Triton interpreter, sm_90 compile checks). Each table below names the machine it was measured on.",
            WIDTH), ""]
    for r in results:
        link = Path(os.path.relpath(r.path, readme_dir)).as_posix()
        lines += [f"### {r.title}", ""]
        lines += [f"- {key}: {r.fields[key]}" for key in HEADER_KEYS if key in r.fields]
        if r.failed_parts:
            lines.append(f"- failed in this run, no figures: {', '.join(r.failed_parts)}")
        lines += [f"- source: [{link}]({link})", "", *r.table, ""]
        if r.summary:
            lines += [*r.summary, ""]
    lines.append(textwrap.fill("This section is written by `python benchmarks/update_readme.py benchmarks/results` "
                               "from the results' own files: regenerate it, do not edit it by hand.", WIDTH))
    return "\n".join(lines)


def replace_section(text: str, body: str, where: str = "README") -> str:
    """``text`` with the part between the markers replaced by ``body``; everything else unchanged."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"update_readme: {where} must hold one {START} followed by one {END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{body}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path, help="folder of result markdown files (benchmarks/results)")
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[1] / "README.md")
    args = parser.parse_args(argv)
    if not args.results_dir.is_dir():
        raise SystemExit(f"update_readme: {args.results_dir} is not a folder")
    results = latest_results(args.results_dir)
    if not results:
        raise SystemExit(f"update_readme: no result markdown (title, date, machine, command, table) under "
                         f"{args.results_dir}")
    readme = args.readme.read_text(encoding="utf-8")
    new = replace_section(readme, render(results, args.readme.resolve().parent), str(args.readme))
    args.readme.write_text(new, encoding="utf-8")
    for r in results:
        print(f"update_readme: {r.title} ({r.fields['date']}) from {r.path}")
    print(f"update_readme: {args.readme} {'updated' if new != readme else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
