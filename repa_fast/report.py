"""One static HTML page for a run: config, training curves, alignment metrics, t-SNE, sample grids and FID.

    repa-fast-report RUN_DIR [--out RUN_DIR/report] [--eval-dir RUN_DIR/eval] [--samples DIR ...] \
        [--grid-classes 8] [--grid-images 8]

It reads what the other tools leave in the run folder, and names any part that is absent with the
command that makes it:

- ``config.json`` (required; ``repa-fast-train``), ``train_log.jsonl`` and ``tensorboard/``: the loss terms,
  lambda, learning rate and samples/s over steps, and the alignment metrics the launcher logged every
  ``eval_interval`` steps;
- ``eval/metrics.json`` and its t-SNE PNGs (``repa-fast-evaluate``), ``eval/grid.png``;
- ``samples/*/samples.json`` with their PNGs (``repa-fast-sample``): a grid of the first classes and images
  of each sample set, and the ``*fid*.json`` beside them (``repa-fast-fid``).

The page is ``OUT/index.html``; every picture it shows is drawn or copied into ``OUT``, so the folder can
be moved, served or attached as it is. A file that is there but cannot be read (a JSON that is not, a
broken log line, an image PIL cannot decode) ends the tool with one line naming it.
"""

from __future__ import annotations

import argparse
import html
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

from repa_fast.errors import InputError, MissingFileError, read_json, run_main
from repa_fast.image_io import read_rgb

METRIC_COLUMNS = ("cosine", "gram_loss", "cknna", "cknna_chance", "cca", "cca_chance")
FID_COLUMNS = (("fid", "FID"), ("isc_mean", "IS"), ("isc_std", "IS std"), ("kid_mean", "KID"), ("kid_std", "KID std"),
               ("num_samples", "samples"), ("num_reference", "reference images"))

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.1em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
.meta { color: #666; } .absent { color: #8a6d3b; background: #fcf8e3; padding: 0.4em 0.8em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.3em 0; } figure { margin: 0.6em 0; }
figcaption { color: #555; font-size: 0.9em; } code { background: #f5f5f5; padding: 0 0.2em; }
.config { columns: 2; } .config table { width: 100%; }
.row { display: flex; flex-wrap: wrap; gap: 0 1.5em; align-items: flex-start; }
.row figure { flex: 1 1 40%; max-width: 49%; }
"""


def _e(value) -> str:
    return html.escape(str(value))


def _num(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _e(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e5 else f"{value:.3e}"


def _table(header: list[str], rows: list[list], numeric_from: int = 0) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{_num(c)}</td>' if i >= numeric_from else f"<td>{_e(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(src: str, caption: str = "") -> str:
    return f'<figure><img src="{_e(src)}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'


def _absent(what: str, command: str) -> str:
    return f'<p class="absent">No {_e(what)}: <code>{_e(command)}</code> makes it.</p>'


# --- sections ------------------------------------------------------------------------------------------

def config_section(config: dict) -> str:
    rows = [[k, json.dumps(v) if isinstance(v, (list, dict)) else v] for k, v in config.items()]
    return "<h2>Config</h2>" + f'<div class="config">{_table(["key", "value"], rows, numeric_from=2)}</div>'


def curves_section(run: Path, out: Path) -> str:
    from repa_fast.plots import read_tensorboard_scalars, read_train_log, training_curves

    log = run / "train_log.jsonl"
    if not log.is_file():
        return "<h2>Training curves</h2>" + _absent("train_log.jsonl", "repa-fast-train")
    records = read_train_log(log)
    tb = run / "tensorboard"
    scalars = read_tensorboard_scalars(tb) if tb.is_dir() else {}
    pngs = training_curves(records, out, scalars)
    last = records[-1] if records else {}
    summary = (f'<p class="meta">{len(records)} logged steps, the last at step {last.get("step", "-")}'
               + (f', loss {last["loss"]:.4f}' if isinstance(last.get("loss"), (int, float)) else "") + ".</p>")
    wide = [_figure(p.name) for group, p in pngs.items() if group == "losses"]
    narrow = [_figure(p.name) for group, p in pngs.items() if group not in ("losses", "alignment")]
    section = "<h2>Training curves</h2>" + summary + "".join(wide) + f'<div class="row">{"".join(narrow)}</div>'
    section += "<h2>Alignment metrics over training</h2>"
    if "alignment" in pngs:
        section += _figure(pngs["alignment"].name, "the launcher's eval every eval_interval steps (held-out batch)")
    else:
        section += _absent("alignment metrics over steps (eval/* in the log or TensorBoard)",
                           "repa-fast-train with --report-to tensorboard and eval_interval < max_steps")
    return section


def _tsne_png(path_text: str, eval_dir: Path) -> Path | None:
    path = Path(path_text)
    for candidate in (path, eval_dir / path.name):
        if candidate.is_file():
            return candidate
    return None


def eval_section(eval_dir: Path, out: Path) -> str:
    metrics_path = eval_dir / "metrics.json"
    if not metrics_path.is_file():
        return "<h2>Alignment metrics</h2>" + _absent(f"{metrics_path}", "repa-fast-evaluate RUN_DIR")
    report = read_json(metrics_path, "rerun repa-fast-evaluate RUN_DIR to rewrite it")
    rows, figures = [], []
    for weights, result in report.get("weights", {}).items():
        for layer, per_t in result.get("layers", {}).items():
            for t_key in ["mean", *[k for k in per_t if k != "mean"]]:
                values = per_t[t_key]
                rows.append([weights, layer, t_key, *[values.get(m, "") for m in METRIC_COLUMNS],
                             result.get("loss_diff", {}).get(t_key, "")])
        for key, path_text in result.get("tsne", {}).items():
            png = _tsne_png(path_text, eval_dir)
            if png is not None:
                name = f"tsne_{weights}_{png.name.removeprefix('tsne_').removeprefix(f'{weights}_')}"
                shutil.copyfile(png, out / name)
                figures.append(_figure(name, f"{weights} weights, {key}"))
    first = next(iter(report.get("weights", {}).values()), {})
    meta = (f'<p class="meta">{first.get("num_samples", "?")} held-out samples ({_e(report.get("csv", ""))}), '
            f'CKNNA k = {first.get("cknna_k", "?")}, CCA dims = {first.get("cca_dims", "?")}; '
            f"*_chance: each sample paired with the next sample's DINO tokens.</p>")
    section = "<h2>Alignment metrics</h2>" + meta + _table(
        ["weights", "layer", "timestep", *METRIC_COLUMNS, "loss_diff"], rows, numeric_from=3)
    section += "<h2>t-SNE of predicted and DINO tokens</h2>"
    section += (f'<div class="row">{"".join(figures)}</div>' if figures
                else _absent("t-SNE plots", "repa-fast-evaluate RUN_DIR --tsne-points 500"))
    if (eval_dir / "grid.png").is_file():
        shutil.copyfile(eval_dir / "grid.png", out / "eval_grid.png")
        section += "<h2>Evaluation sample grid</h2>" + _figure("eval_grid.png", "repa-fast-evaluate --sd")
    return section


def sample_sets(run: Path, extra: list[Path]) -> list[Path]:
    """Folders holding a ``samples.json``: RUN_DIR/samples/* and the extra ones given."""
    found = sorted(p.parent for p in (run / "samples").glob("*/samples.json"))
    return found + [p for p in extra if p not in found]


def samples_section(sets: list[Path], out: Path, grid_classes: int, grid_images: int) -> str:
    from repa_fast.plots import image_grid
    from repa_fast.sample import png_name

    section = "<h2>Samples</h2>"
    if not sets:
        return section + _absent("sample sets (RUN_DIR/samples/*)", "repa-fast-sample RUN_DIR --sd SD15_DIR")
    fid_rows = []
    for folder in sets:
        meta_path = folder / "samples.json"
        if not meta_path.is_file():
            section += f'<p class="absent">{_e(folder)}: no samples.json (not a repa-fast-sample folder)</p>'
            continue
        meta = read_json(meta_path, "rerun repa-fast-sample with the same --out to rewrite it")
        settings, prompts = meta.get("settings", {}), meta.get("prompts") or []
        rows, labels = [], []
        for c in meta.get("classes", [])[:grid_classes]:
            images = [read_rgb(folder / png_name(c, j)) for j in range(min(grid_images, meta.get("per_class", 0)))
                      if (folder / png_name(c, j)).is_file()]
            if images:
                rows.append(images)
                labels.append(prompts[c] if c < len(prompts) and prompts[c] else f"class {c}")
        described = ", ".join(f"{k} {settings[k]}" for k in ("weights", "cfg", "scheduler", "steps", "size", "seed")
                              if k in settings)
        count = len(meta.get("classes", [])) * meta.get("per_class", 0)
        section += f"<h3>{_e(folder.name)}</h3><p class=\"meta\">{count} images ({_e(described)})</p>"
        if rows:
            name = f"samples_{folder.name}.png"
            image_grid(rows, labels, out / name, title=folder.name)
            section += _figure(name, f"first {len(rows)} classes x {max(len(r) for r in rows)} images")
        for fid_json in sorted(folder.glob("*fid*.json")):
            result = read_json(fid_json, "rerun repa-fast-fid to rewrite it, or remove it")
            fid_rows.append([folder.name, Path(result.get("reference", "")).name,
                             *[result.get(k, "") for k, _ in FID_COLUMNS]])
    section += "<h2>FID</h2>"
    if fid_rows:
        section += _table(["sample set", "reference", *[h for _, h in FID_COLUMNS]], fid_rows, numeric_from=2)
    else:
        section += _absent("FID results", "repa-fast-fid SAMPLE_DIR REFERENCE --inception inception-2015-12-05.pt")
    return section


def build_report(run_dir: str | Path, out: str | Path | None = None, eval_dir: str | Path | None = None,
                 samples: list[str | Path] = (), grid_classes: int = 8, grid_images: int = 8) -> Path:
    """Write ``OUT/index.html`` and its PNGs; returns the page's path."""
    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise MissingFileError(f"{str(run)!r}: no config.json (not a repa-fast run folder)")
    config = read_json(run / "config.json", "repa-fast-train writes it at the start of a run")
    for option, value in (("--grid-classes", grid_classes), ("--grid-images", grid_images)):
        if value < 1:
            raise InputError(f"{option} {value}: must be at least 1")
    given = [("--eval-dir", eval_dir)] if eval_dir else []
    for option, folder in [*given, *(("--samples", s) for s in samples)]:
        if not Path(folder).is_dir():
            raise MissingFileError(f"{option} {str(folder)!r}: no such folder")
    out = Path(out) if out else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    eval_dir = Path(eval_dir) if eval_dir else run / "eval"
    name = config.get("experiment_name", run.name)
    body = [f"<h1>{_e(name)}</h1>",
            f'<p class="meta">run folder <code>{_e(run.resolve())}</code>; report made '
            f'{datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")} by repa-fast-report</p>',
            curves_section(run, out), eval_section(eval_dir, out),
            samples_section(sample_sets(run, [Path(s) for s in samples]), out, grid_classes, grid_images),
            config_section(config)]
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{_e(name)}: repa-fast report</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="repa-fast-report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a repa-fast-train output folder")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    p.add_argument("--eval-dir", default=None, help="repa-fast-evaluate's output (default: RUN_DIR/eval)")
    p.add_argument("--samples", nargs="*", default=[], help="more repa-fast-sample folders (RUN_DIR/samples/* are "
                                                              "found)")
    p.add_argument("--grid-classes", type=int, default=8, help="classes (rows) per sample grid")
    p.add_argument("--grid-images", type=int, default=8, help="images per class in a sample grid")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    index = run_main("repa-fast-report", build_report, args.run_dir, args.out, args.eval_dir, args.samples,
                     args.grid_classes, args.grid_images)
    print(f"report: {index}")


if __name__ == "__main__":
    main()
