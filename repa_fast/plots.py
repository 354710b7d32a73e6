"""Plots with matplotlib (Agg, no pyplot state): t-SNE of predicted vs DINO tokens, training curves, image grids.

- ``tsne_plot``: scikit-learn's t-SNE of paired tokens, coloured by source (predicted vs DINO) and, given
  class ids, by class; returned as an RGB array (TensorBoard) and saved as PNG by the callers.
- ``training_curves``: from ``train_log.jsonl`` (one record a step), one PNG per group of keys: every
  ``loss*`` key, the schedule (``lr`` and any key holding ``lambda``), throughput (``*_per_s``), any other
  number, and the alignment metrics over steps (``eval/*`` keys of the log or of the run's TensorBoard
  events, where the launcher logs them).
- ``image_grid``: rows of images (e.g. one row per class) with row labels.

matplotlib and scikit-learn come with the ``eval`` extra (``pip install 'repa-fast[eval]'``).
"""

from __future__ import annotations

import json
import math
import os
import re
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from repa_fast.errors import InputError
from repa_fast.optional import require

SOURCE_COLORS = ("tab:blue", "tab:orange")  # predicted, DINO
NOT_PLOTTED = ("step", "epoch", "ids")
PER_TIMESTEP_TAG = re.compile(r"_t[0-9.e+-]+$")  # eval/{layer}/{metric}_t{t}: one curve per timestep


# --- figures -------------------------------------------------------------------------------------------

def new_figure(width: float, height: float, dpi: int = 100):
    """A matplotlib Figure drawn by the Agg canvas (no pyplot, no global backend switch)."""
    require("matplotlib", "plotting")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def figure_to_array(fig) -> np.ndarray:
    """The rendered figure as an RGB uint8 array [H, W, 3]."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_figure(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an RGB uint8 array [H, W, 3] as PNG."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


# --- t-SNE ---------------------------------------------------------------------------------------------

def tsne_embed(x: torch.Tensor | np.ndarray, perplexity: float = 30.0, seed: int = 0, n_iter: int = 750) -> np.ndarray:
    """scikit-learn's t-SNE of ``x`` [n, D] to [n, 2]: PCA start, seeded, so the same input gives the same map.

    The perplexity is capped at (n - 1) / 3 for small n; ``n_iter`` is at least 250 (scikit-learn's minimum).
    """
    manifold = require("sklearn.manifold", "t-SNE")
    x = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    if x.ndim != 2 or n < 4:
        raise ValueError(f"tsne_embed: needs points [n >= 4, D], got shape {list(x.shape)}")
    tsne = manifold.TSNE(n_components=2, perplexity=min(perplexity, (n - 1) / 3), init="pca",
                         learning_rate="auto", random_state=seed, max_iter=max(int(n_iter), 250))
    return tsne.fit_transform(x)


def _class_colors(num: int):
    cmaps = require("matplotlib", "plotting").colormaps
    cmap = cmaps["tab10"] if num <= 10 else cmaps["tab20"] if num <= 20 else cmaps["turbo"]
    return [cmap(i if num <= 20 else i / max(num - 1, 1)) for i in range(num)]


def tsne_plot(pred: torch.Tensor, dino: torch.Tensor, title: str = "", max_points: int = 500, seed: int = 0,
              perplexity: float = 30.0, n_iter: int = 750, classes: torch.Tensor | Sequence[int] | None = None,
              class_names: Mapping[int, str] | None = None) -> np.ndarray:
    """t-SNE of paired unit tokens ``pred``, ``dino`` [M, D] (at most ``max_points`` pairs, seeded) as RGB [H, W, 3].

    Left panel: coloured by source. Right panel (with ``classes``, the class id of each pair): coloured by
    class, circles for predicted and triangles for DINO tokens. Aligned tokens mix; tokens that the head
    does not align form two separate clouds.
    """
    if pred.shape != dino.shape or pred.ndim != 2:
        raise ValueError(f"tsne_plot: expected paired tokens [M, D], got {list(pred.shape)} and {list(dino.shape)}")
    if classes is not None and len(classes) != pred.shape[0]:
        raise ValueError(f"tsne_plot: {len(classes)} class ids for {pred.shape[0]} token pairs")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(pred.shape[0], generator=g)[:max_points]
    both = torch.cat([F.normalize(pred[pick.to(pred.device)].float(), dim=-1),
                      F.normalize(dino[pick.to(dino.device)].float(), dim=-1)])
    points = tsne_embed(both, perplexity, seed, n_iter)
    m = len(pick)
    panels = 1 if classes is None else 2
    fig = new_figure(6.0 * panels, 6.0)
    ax = fig.add_subplot(1, panels, 1)
    for s, (name, color) in enumerate(zip(("predicted", "DINO"), SOURCE_COLORS, strict=True)):
        xy = points[s * m:(s + 1) * m]
        ax.scatter(xy[:, 0], xy[:, 1], s=9, alpha=0.6, color=color, label=f"{name} ({m})", linewidths=0)
    ax.set_title("by source")
    ax.legend(loc="best", fontsize=8)
    if classes is not None:
        ids = torch.as_tensor(classes).cpu()[pick].numpy()
        unique = sorted(set(ids.tolist()))
        colors = dict(zip(unique, _class_colors(len(unique)), strict=True))
        ax = fig.add_subplot(1, 2, 2)
        for c in unique:
            sel = np.flatnonzero(ids == c)
            label = (class_names or {}).get(c, f"class {c}")
            ax.scatter(points[sel, 0], points[sel, 1], s=9, alpha=0.7, color=colors[c], marker="o", linewidths=0,
                       label=label if len(unique) <= 12 else None)
            ax.scatter(points[m + sel, 0], points[m + sel, 1], s=12, alpha=0.7, color=colors[c], marker="^",
                       linewidths=0)
        ax.set_title(f"by class ({len(unique)}): o predicted, ^ DINO")
        if len(unique) <= 12:
            ax.legend(loc="best", fontsize=7, markerscale=1.5)
    for a in fig.axes:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    return figure_to_array(fig)


# --- training curves -----------------------------------------------------------------------------------

def read_train_log(path: str | os.PathLike) -> list[dict]:
    """The records of ``train_log.jsonl`` (``ids`` dropped); a broken line is an ``InputError`` naming the file
    and line."""
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{number}: not a JSON record ({err}); fix or delete that line") from None
            if not isinstance(record, dict) or "step" not in record:
                raise InputError(f"{path}:{number}: a record needs a 'step' key; fix or delete that line")
            record.pop("ids", None)
            records.append(record)
    return records


def read_tensorboard_scalars(tb_dir: str | os.PathLike, prefix: str = "eval/") -> dict[str, list[tuple[int, float]]]:
    """Scalars tagged ``prefix*`` in the TensorBoard event files of ``tb_dir``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in sorted(acc.Tags().get("scalars", [])) if tag.startswith(prefix)}


def curve_groups(keys: Iterable[str]) -> dict[str, list[str]]:
    """Numeric log keys by plot: ``losses``, ``schedule`` (lr, *lambda*), ``throughput`` (*_per_s), ``alignment``
    (eval/*) and ``other``."""
    groups: dict[str, list[str]] = {"losses": [], "schedule": [], "throughput": [], "alignment": [], "other": []}
    for key in sorted(keys):
        if key in NOT_PLOTTED:
            continue
        if key.startswith("eval/"):
            groups["alignment"].append(key)
        elif key.startswith("loss"):
            groups["losses"].append(key)
        elif key == "lr" or "lambda" in key:
            groups["schedule"].append(key)
        elif key.endswith("_per_s"):
            groups["throughput"].append(key)
        else:
            groups["other"].append(key)
    groups["losses"].sort(key=lambda k: (k != "loss", k))
    return {name: keys for name, keys in groups.items() if keys}


def _smooth(values: np.ndarray) -> np.ndarray:
    """Exponential moving average with a span of ~4 % of the points (NaNs left as gaps)."""
    alpha = 2.0 / (max(len(values) // 25, 1) + 1)
    out, level = np.empty_like(values), math.nan
    for i, v in enumerate(values):
        if math.isfinite(v):
            level = v if math.isnan(level) else alpha * v + (1 - alpha) * level
        out[i] = level
    return out


def _plot_series(series: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str, smooth: bool,
                 path: str | os.PathLike, ncols: int = 3) -> Path:
    n = len(series)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = new_figure(4.2 * ncols, 3.0 * nrows + 0.4)
    for i, (key, (steps, values)) in enumerate(series.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        if smooth and len(values) > 20:
            ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8)
            ax.plot(steps, _smooth(values), color="tab:blue", linewidth=1.4)
        else:
            ax.plot(steps, values, color="tab:blue", linewidth=1.2, marker="." if len(values) <= 50 else None)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def curve_series(records: Sequence[dict], eval_scalars: Mapping[str, Sequence[tuple[int, float]]] | None = None
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key -> (steps, values) of every number in ``records`` (``read_train_log``) and of ``eval_scalars``
    (``read_tensorboard_scalars``) that the log does not hold; per-timestep eval tags (``..._t0.5``) left out."""
    keys = {k for r in records for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    series: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key in sorted(keys - set(NOT_PLOTTED)):
        rows = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
        series[key] = (np.array([s for s, _ in rows]), np.array([v for _, v in rows], dtype=np.float64))
    for tag, points in (eval_scalars or {}).items():
        if tag not in series and points:
            series[tag] = (np.array([s for s, _ in points]), np.array([v for _, v in points], dtype=np.float64))
    return {k: v for k, v in series.items() if not (k.startswith("eval/") and PER_TIMESTEP_TAG.search(k))}


def training_curves(records: Sequence[dict], out_dir: str | os.PathLike,
                    eval_scalars: Mapping[str, Sequence[tuple[int, float]]] | None = None) -> dict[str, Path]:
    """One PNG per non-empty group of ``curve_groups`` in ``out_dir`` (``curves_{group}.png``): group -> path."""
    series = curve_series(records, eval_scalars)
    titles = {"losses": "losses", "schedule": "schedule", "throughput": "throughput",
              "alignment": "alignment metrics (mean over the eval timesteps)", "other": "other logged values"}
    out = {}
    for group, group_keys in curve_groups(series).items():
        out[group] = _plot_series({k: series[k] for k in group_keys}, titles[group], smooth=group != "alignment",
                                  path=Path(out_dir) / f"curves_{group}.png")
    return out


# --- image grids ---------------------------------------------------------------------------------------

def image_grid(rows: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str], path: str | os.PathLike,
               title: str = "", cell_inches: float = 1.2) -> Path:
    """A PNG of images in rows (each [H, W, 3] uint8), a label left of each row."""
    if not rows or len(rows) != len(row_labels):
        raise ValueError(f"image_grid: {len(rows)} rows for {len(row_labels)} labels")
    ncols = max(len(r) for r in rows)
    fig = new_figure(cell_inches * ncols + 1.8, cell_inches * len(rows) + 0.5)
    for i, (images, label) in enumerate(zip(rows, row_labels, strict=True)):
        for j in range(ncols):
            ax = fig.add_subplot(len(rows), ncols, i * ncols + j + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(images):
                ax.imshow(images[j])
            if j == 0:
                ax.set_ylabel(textwrap.fill(label, 22), rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=1.6 / (cell_inches * ncols + 1.8), right=0.99, top=1 - 0.45 / fig.get_figheight(),
                        bottom=0.01, wspace=0.04, hspace=0.04)
    return save_figure(fig, path)
