"""Alignment metrics, t-SNE plots and sample grids for a trained run.

    repa-fast-evaluate RUN_DIR [--weights live|ema|both] [--num-samples 64] [--csv held_out.csv] \
        [--timesteps 0.25,0.5,0.75] [--sd SD15_DIR --classes tench,goldfish --seeds 0,1,2,3] [key=value ...]

A run folder is what ``repa-fast-train`` writes: ``config.json``, ``lora/`` and ``lora_ema/`` (each a
diffusers LoRA ``pytorch_lora_weights.safetensors`` plus ``align_heads.safetensors``). The base U-Net is
``config.model`` (a random-init ``sd15``/``tiny`` base is rebuilt from ``config.seed``, as the launcher
built it) unless ``model=...`` overrides it. Results go to ``RUN_DIR/eval`` (``--out``): ``metrics.json``,
one t-SNE PNG per (weights, layer, timestep) (scikit-learn's t-SNE drawn with matplotlib, coloured by source and
by class: the ``eval`` extra) and, with ``--sd``, ``grid.png``.

Metrics per align layer, between predicted tokens x and DINO tokens y ([B, N, D] each), at fixed
timesteps with fixed noise (``--seed``):

- ``cosine``    mean over b, n of cos(x_bn, y_bn)  (= 1 - L_token)
- ``gram_loss`` ``repa_fast.losses.manifold_gram_loss`` over all evaluated samples (one [n, n] Gram)
- ``cknna``     CKNNA (Huh et al. 2024, "The Platonic Representation Hypothesis": HSIC of the two
                linear kernels restricted to mutual k-nearest neighbours, normalised) on per-sample
                features p_b = normalize(mean_n normalize(x_bn)), the manifold loss's pooling; k = ``--k``
- ``cca``       mean canonical correlation (SVCCA: each side's top ``--cca-dims`` principal components,
                ridge-regularised whitening, then the singular values of the cross-covariance) on unit
                tokens, ``--tokens-per-sample`` fixed token positions of every sample

Identical features give cosine 1, Gram loss 0, CKNNA and CCA ~1. For unrelated features cosine is ~0,
but CKNNA and CCA keep a positive level from finite samples (measured on Gaussian features: CKNNA ~ k/n,
0.13 at n = 64, k = 10 and 0.03 at n = 256; CCA 0.08 for 1024 tokens and 8 dims, 0.04 for 4096), so
each is also reported against mismatched pairs (``cknna_chance``, ``cca_chance``: every sample paired
with the next sample's DINO tokens). Compare runs at equal settings. The denoising MSE at each
timestep is ``loss_diff``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from repa_fast.config import Config, config_from_dict, parse_overrides
from repa_fast.errors import InputError, MissingFileError, RunError, read_json, run_main
from repa_fast.export import HEADS_WEIGHT_NAME, LORA_WEIGHT_NAME
from repa_fast.losses import NORM_EPS, SD15Loss, manifold_gram_loss, noise_schedule, token_loss
from repa_fast.optional import MissingDependency
from repa_fast.plots import save_png, tsne_plot

METRICS = ("cosine", "gram_loss", "cknna", "cca")
PROMPT_TEMPLATE = "a photo of a {name}"


# --- metrics (pure functions) ------------------------------------------------------------------------

def pooled_features(tokens: torch.Tensor) -> torch.Tensor:
    """[B, N, D] tokens -> [B, D] unit features normalize(mean_n normalize(t_bn)), as the manifold loss pools."""
    unit = F.normalize(tokens.float(), dim=-1, eps=NORM_EPS)
    return F.normalize(unit.mean(1), dim=-1, eps=NORM_EPS)


def _hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Song et al. (2012) unbiased HSIC of two [m, m] kernel matrices (m >= 4)."""
    m = K.shape[0]
    K = K.clone().fill_diagonal_(0)
    L = L.clone().fill_diagonal_(0)
    value = (K * L.T).sum() + K.sum() * L.sum() / ((m - 1) * (m - 2)) - 2 * (K @ L).sum() / (m - 2)
    return value / (m * (m - 3))


def cknna(feats_a: torch.Tensor, feats_b: torch.Tensor, k: int = 10) -> float:
    """Centered kernel nearest-neighbour alignment of two feature sets [n, Da], [n, Db] (rows paired).

    Linear kernels of the unit rows; each kernel keeps, per row, only the entries of the k nearest
    neighbours (self excluded) that are neighbours in both spaces; CKNNA = HSIC(K', L') /
    sqrt(HSIC(K'', K'') HSIC(L'', L'')) with the unbiased HSIC, as in the platonic-rep reference.
    1 for identical neighbourhood structure, ~0 for independent features; NaN when undefined.
    """
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[0] != feats_b.shape[0]:
        raise ValueError(f"cknna: expected paired features [n, Da], [n, Db], got {list(feats_a.shape)} and "
                         f"{list(feats_b.shape)}")
    n = feats_a.shape[0]
    if n < 4 or not 1 <= k <= n - 2:
        raise ValueError(f"cknna: needs n >= 4 samples and 1 <= k <= n - 2, got n={n}, k={k}")
    a = F.normalize(feats_a.double(), dim=-1, eps=NORM_EPS)
    b = F.normalize(feats_b.double(), dim=-1, eps=NORM_EPS)
    K, L = a @ a.T, b @ b.T

    def knn_mask(G: torch.Tensor) -> torch.Tensor:
        idx = G.clone().fill_diagonal_(float("-inf")).topk(k, dim=1).indices
        return torch.zeros_like(G).scatter_(1, idx, 1.0)

    mask_k, mask_l = knn_mask(K), knn_mask(L)

    def sim(X, Y, mask_x, mask_y):
        mask = mask_x * mask_y
        return _hsic_unbiased(mask * X, mask * Y)

    kl, kk, ll = sim(K, L, mask_k, mask_l), sim(K, K, mask_k, mask_k), sim(L, L, mask_l, mask_l)
    norm = float(kk * ll)
    return float(kl) / (math.sqrt(norm) + 1e-6) if norm > 0 else float("nan")


def cca_score(feats_a: torch.Tensor, feats_b: torch.Tensor, dims: int = 16, ridge: float = 1e-4) -> float:
    """Mean canonical correlation of paired rows [n, Da], [n, Db] (SVCCA with a ridge).

    Each side is centred and reduced to its top ``dims`` principal components x U S; the components are
    whitened with the ridge (S^2 + ridge mean(S^2))^(-1/2) (ridge = 0: plain SVCCA); the canonical
    correlations are the singular values of the whitened cross product. Returns their mean in [0, 1].
    """
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[0] != feats_b.shape[0]:
        raise ValueError(f"cca_score: expected paired features [n, Da], [n, Db], got {list(feats_a.shape)} and "
                         f"{list(feats_b.shape)}")
    n = feats_a.shape[0]
    if n <= dims:
        raise ValueError(f"cca_score: {n} rows cannot support {dims} canonical dimensions (need more rows than dims)")

    def whitened_components(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        x = x - x.mean(0)
        u, sv, _ = torch.linalg.svd(x, full_matrices=False)
        keep = min(dims, int((sv > sv[0] * 1e-6).sum())) if sv[0] > 0 else 0
        if keep == 0:
            raise ValueError("cca_score: a feature set is constant (no variance to correlate)")
        u, sv = u[:, :keep], sv[:keep]
        return u * (sv / torch.sqrt(sv.square() + ridge * sv.square().mean()))

    wa, wb = whitened_components(feats_a), whitened_components(feats_b)
    return float(torch.linalg.svdvals(wa.T @ wb).clamp(0, 1).mean())


class _LayerStats:
    """What the metrics of one (layer, timestep) need, gathered batch by batch: the sum of token
    cosines, the pooled features of every sample and the unit tokens at fixed positions."""

    def __init__(self, token_positions: torch.Tensor):
        self.positions = token_positions
        self.cos_sum, self.count = 0.0, 0
        self.pooled_x, self.pooled_y, self.sub_x, self.sub_y = [], [], [], []

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape != y.shape or x.ndim != 3:
            raise ValueError(f"alignment metrics: predicted tokens {list(x.shape)} and DINO tokens {list(y.shape)} "
                             f"must both be [B, N, D]")
        B, N = x.shape[:2]
        self.cos_sum += (1.0 - float(token_loss(x, y))) * B * N
        self.count += B * N
        self.pooled_x.append(pooled_features(x).cpu())
        self.pooled_y.append(pooled_features(y).cpu())
        pos = self.positions.to(x.device)
        self.sub_x.append(F.normalize(x[:, pos].float(), dim=-1, eps=NORM_EPS).flatten(0, 1).cpu())
        self.sub_y.append(F.normalize(y[:, pos].float(), dim=-1, eps=NORM_EPS).flatten(0, 1).cpu())

    def tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.sub_x), torch.cat(self.sub_y)

    def result(self, k: int, cca_dims: int, cca_ridge: float) -> dict[str, float]:
        px, py = torch.cat(self.pooled_x), torch.cat(self.pooled_y)
        tx, ty = self.tokens()
        per_sample = len(self.positions)
        return {
            "cosine": self.cos_sum / self.count,
            # pooled features are unit rows: as [n, 1, D] tokens the manifold loss pools them to themselves
            "gram_loss": float(manifold_gram_loss(px[:, None], py[:, None])),
            "cknna": cknna(px, py, k),
            "cca": cca_score(tx, ty, cca_dims, cca_ridge),
            # the same scores with every sample paired with the next one's DINO tokens: the level of
            # unrelated features at these sizes
            "cknna_chance": cknna(px, py.roll(1, 0), k),
            "cca_chance": cca_score(tx, ty.roll(per_sample, 0), cca_dims, cca_ridge),
        }


def token_positions(num_tokens: int, per_sample: int, seed: int = 0) -> torch.Tensor:
    """The fixed token positions used for CCA and t-SNE: ``per_sample`` of ``num_tokens``, seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_tokens, generator=g)[:min(per_sample, num_tokens)].sort().values


def alignment_metrics(pred: torch.Tensor, dino: torch.Tensor, k: int = 10, cca_dims: int = 16,
                      tokens_per_sample: int = 64, cca_ridge: float = 1e-4, seed: int = 0) -> dict[str, float]:
    """``cosine``, ``gram_loss``, ``cknna``, ``cca`` (and the chance levels ``cknna_chance``, ``cca_chance``)
    of predicted vs DINO tokens [B, N, D]; see the module doc."""
    stats = _LayerStats(token_positions(pred.shape[1], tokens_per_sample, seed))
    stats.add(pred, dino)
    return stats.result(k, cca_dims, cca_ridge)


# --- evaluation on cached samples --------------------------------------------------------------------

def default_timesteps(config: Config) -> list[float] | list[int]:
    """t = 0.25, 0.5, 0.75 for the linear/cosine paths; for ddpm the U-Net steps at those fractions of
    the model's num_train_timesteps (250, 500, 750 for SD-1.5's 1000)."""
    fractions = [0.25, 0.5, 0.75]
    if config.path_type != "ddpm":
        return fractions
    steps = noise_schedule(config).config.num_train_timesteps
    return [int(f * steps) for f in fractions]


def _t_key(t) -> str:
    return f"t={t:g}"


def collate(dataset, indices: Iterable[int], device="cpu", dtype: torch.dtype | None = None,
            clip_table: torch.Tensor | None = None) -> dict:
    """A batch of dataset samples with their real class ids (no CFG dropout): latent [B,...], dino_tokens
    {layer: [B, N, D]}, class_id [B] and, with ``clip_table``, encoder_hidden_states [B, 77, dim]."""
    indices = [int(i) for i in indices]
    samples = [dataset[i] for i in indices]
    latent = torch.stack([s["latent"] for s in samples]).to(device)
    batch = {
        "index": indices,
        "latent": latent if dtype is None else latent.to(dtype),
        "dino_tokens": {layer: torch.stack([s["dino_tokens"][layer] for s in samples]).to(device)
                        for layer in samples[0]["dino_tokens"]},
        "class_id": torch.as_tensor(dataset.class_ids[indices], dtype=torch.long).to(device),
    }
    if clip_table is not None:
        ehs = clip_table.to(device)[batch["class_id"]]
        batch["encoder_hidden_states"] = ehs if dtype is None else ehs.to(dtype)
    return batch


def held_out_batch(dataset, num_samples: int, device="cpu", dtype: torch.dtype | None = None,
                   clip_table: torch.Tensor | None = None) -> dict:
    """The last ``num_samples`` samples of ``dataset`` as one batch on ``device`` (see ``collate``)."""
    n = len(dataset)
    return collate(dataset, range(max(0, n - num_samples), n), device, dtype, clip_table)


def _noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """Fixed noise, drawn on the CPU so that every device and batch split sees the same values."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


class _Evaluation:
    """Runs the model on batches at each timestep and gathers the statistics of every layer."""

    def __init__(self, model, config: Config, timesteps, num_tokens: int, tokens_per_sample: int, seed: int):
        self.model, self.timesteps, self.seed = model, list(timesteps), seed
        self.path = SD15Loss.from_config(config)
        positions = token_positions(num_tokens, tokens_per_sample, seed)
        self.stats = {t: {layer: _LayerStats(positions) for layer in model.align_layers} for t in self.timesteps}
        self.sq_err = {t: 0.0 for t in self.timesteps}
        self.numel = {t: 0 for t in self.timesteps}
        self.num_samples = 0

    @torch.no_grad()
    def add(self, batch: dict, noise: torch.Tensor) -> None:
        latent, ehs = batch["latent"], batch["encoder_hidden_states"]
        dtype = next(self.model.parameters()).dtype
        noise = noise.to(latent.device)
        B = latent.shape[0]
        self.num_samples += B
        missing = [layer for layer in self.model.align_layers if layer not in batch["dino_tokens"]]
        if missing:
            raise KeyError(f"evaluation batch has no DINO tokens for align layer(s) {missing}")
        for t in self.timesteps:
            t_vec = (torch.full((B,), int(t), dtype=torch.long, device=latent.device)
                     if self.path.path_type == "ddpm" else torch.full((B,), float(t), device=latent.device))
            x_t, target, unet_t = self.path.interpolate(latent, noise, t_vec)
            out = self.model(x_t.to(dtype), unet_t, ehs.to(dtype), return_tokens=True)  # prediction + tokens
            self.sq_err[t] += float(F.mse_loss(out.sample.float(), target, reduction="sum"))
            self.numel[t] += target.numel()
            for layer, pred in out.tokens.items():
                self.stats[t][layer].add(pred, batch["dino_tokens"][layer])

    def result(self, k: int, cca_dims: int, cca_ridge: float) -> dict:
        n = self.num_samples
        k_used = min(k, n - 2)
        layers = {}
        for layer in self.model.align_layers:
            per_t = {_t_key(t): self.stats[t][layer].result(k_used, cca_dims, cca_ridge) for t in self.timesteps}
            names = per_t[_t_key(self.timesteps[0])]
            per_t["mean"] = {m: float(np.mean([per_t[_t_key(t)][m] for t in self.timesteps])) for m in names}
            layers[layer] = per_t
        loss_diff = {_t_key(t): self.sq_err[t] / self.numel[t] for t in self.timesteps}
        loss_diff["mean"] = float(np.mean(list(loss_diff.values())))
        return {"num_samples": n, "timesteps": self.timesteps, "path_type": self.path.path_type, "seed": self.seed,
                "cknna_k": k_used, "cca_dims": cca_dims, "cca_ridge": cca_ridge, "layers": layers,
                "loss_diff": loss_diff}

    def tsne_images(self, t, max_points: int, n_iter: int = 750, class_ids: torch.Tensor | None = None,
                    class_names: Mapping[int, str] | None = None) -> dict[str, np.ndarray]:
        """One t-SNE image per layer at timestep ``t``; ``class_ids`` [num_samples] (in the order the batches
        were added) colour the second panel by class, labelled with ``class_names``."""
        images = {}
        for layer, stats in self.stats[t].items():
            x, y = stats.tokens()
            # tokens are sample-major: len(positions) fixed positions of each sample
            labels = None if class_ids is None else class_ids.cpu().repeat_interleave(len(stats.positions))
            images[layer] = tsne_plot(x, y, f"{layer}, {_t_key(t)}: predicted vs DINO tokens", max_points, self.seed,
                                      n_iter=n_iter, classes=labels, class_names=class_names)
        return images


class _TrainMode:
    """eval() inside, the previous mode restored after (the launcher evaluates mid-training)."""

    def __init__(self, model):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def evaluate(model, dataset, config: Config, timesteps=None, indices: Sequence[int] | None = None,
             num_samples: int = 64, clip_table: torch.Tensor | None = None, batch_size: int = 16, device=None,
             dtype: torch.dtype | None = None, k: int = 10, cca_dims: int = 16, tokens_per_sample: int = 64,
             cca_ridge: float = 1e-4, seed: int = 0, tsne_dir: str | os.PathLike | None = None,
             tsne_points: int = 500, tsne_iter: int = 750, tag: str = "",
             class_names: Mapping[int, str] | None = None) -> dict:
    """Alignment metrics of ``model`` on samples of ``dataset`` (an ``SD15AlignedDataset``).

    ``indices`` default to the last ``num_samples`` samples; class ids are the CSV's (no CFG dropout),
    embedded with ``clip_table`` (default: the dataset's). Noise is fixed by ``seed`` per sample, so the
    numbers do not depend on ``batch_size``. With ``tsne_dir``, one t-SNE PNG per (layer, timestep) is
    written there (``tsne_{tag}{layer}_t{t}.png``; ``class_names`` label its classes). Returns the metrics
    dict (see the module doc); ``indices`` in it is ``[first, last]`` for a contiguous range, else the list.
    """
    if isinstance(dataset, torch.utils.data.Subset):
        indices = [dataset.indices[i] for i in (indices if indices is not None else range(len(dataset)))]
        dataset = dataset.dataset
    if indices is None:
        indices = range(max(0, len(dataset) - num_samples), len(dataset))
    indices = [int(i) for i in indices]
    if len(indices) < 4:
        raise InputError(f"evaluate: needs at least 4 samples, got {len(indices)} (--num-samples, or a longer CSV)")
    if clip_table is None:
        clip_table = getattr(dataset, "clip_table", None)
    if clip_table is None:
        raise ValueError("evaluate: pass clip_table (the CLIP table [classes+1, 77, dim]) or a dataset that holds it")
    param = next(model.parameters())
    device = param.device if device is None else torch.device(device)
    dtype = param.dtype if dtype is None else dtype
    timesteps = default_timesteps(config) if timesteps is None else list(timesteps)
    first = dataset[indices[0]]
    num_tokens = next(iter(first["dino_tokens"].values())).shape[0]
    run = _Evaluation(model, config, timesteps, num_tokens, tokens_per_sample, seed)
    noise = _noise((len(indices), *first["latent"].shape), seed)
    class_ids = []
    with _TrainMode(model):
        for start in range(0, len(indices), batch_size):
            batch = collate(dataset, indices[start:start + batch_size], device, dtype, clip_table)
            run.add(batch, noise[start:start + batch_size])
            class_ids.append(batch["class_id"].cpu())
        result = run.result(k, cca_dims, cca_ridge)
        result["indices"] = [indices[0], indices[-1]] if indices == list(range(indices[0], indices[-1] + 1)) \
            else indices
        if tsne_dir is not None:
            result["tsne"] = {}
            for t in timesteps:
                images = run.tsne_images(t, tsne_points, tsne_iter, torch.cat(class_ids), class_names)
                for layer, image in images.items():
                    path = save_png(image, Path(tsne_dir) / f"tsne_{tag}{layer}_t{t:g}.png")
                    result["tsne"][f"{layer}/{_t_key(t)}"] = str(path)
    return result


def run_alignment_eval(model, batch_or_dataset, config: Config, step: int, writer=None,
                       clip_table: torch.Tensor | None = None, timesteps=None, k: int = 10, cca_dims: int = 16,
                       tokens_per_sample: int = 64, num_samples: int = 64, tsne_points: int = 300,
                       tsne_iter: int = 500, seed: int | None = None) -> dict:
    """The launcher's periodic evaluation: metrics of ``model`` (the SD15UNetAligned, not the engine) on a
    fixed batch already on the device (from ``held_out_batch``, with ``encoder_hidden_states``) or on the
    last ``num_samples`` samples of a dataset.

    With a TensorBoard ``writer`` (rank 0) it logs ``eval/{layer}/{metric}`` (mean over the timesteps),
    ``eval/{layer}/{metric}_t{t}``, ``eval/loss_diff`` and a t-SNE image ``eval/{layer}/tsne`` at the
    middle timestep. Under ZeRO-3 every rank must call it (the forward gathers parameters).
    """
    seed = config.seed if seed is None else seed
    timesteps = default_timesteps(config) if timesteps is None else list(timesteps)
    param = next(model.parameters())
    if isinstance(batch_or_dataset, dict):
        batch = dict(batch_or_dataset)
    else:
        table = clip_table if clip_table is not None else getattr(batch_or_dataset, "clip_table", None)
        batch = held_out_batch(batch_or_dataset, num_samples, param.device, param.dtype, table)
    if "encoder_hidden_states" not in batch:
        if clip_table is None:
            raise ValueError("run_alignment_eval: the batch has no encoder_hidden_states; pass clip_table")
        batch["encoder_hidden_states"] = clip_table.to(batch["latent"].device, param.dtype)[batch["class_id"]]
    num_tokens = next(iter(batch["dino_tokens"].values())).shape[1]
    run = _Evaluation(model, config, timesteps, num_tokens, tokens_per_sample, seed)
    with _TrainMode(model):
        run.add(batch, _noise(batch["latent"].shape, seed))
    result = run.result(k, cca_dims, cca_ridge=1e-4)
    images = {}
    if writer is not None:
        try:
            images = run.tsne_images(timesteps[len(timesteps) // 2], tsne_points, tsne_iter, batch["class_id"])
        except MissingDependency as err:  # a missing plotting package must not stop a training run
            warnings.warn(f"run_alignment_eval: no t-SNE image: {err}", RuntimeWarning, stacklevel=2)
        for layer, per_t in result["layers"].items():
            for metric in METRICS:
                writer.add_scalar(f"eval/{layer}/{metric}", per_t["mean"][metric], step)
                for t in timesteps:
                    writer.add_scalar(f"eval/{layer}/{metric}_t{t:g}", per_t[_t_key(t)][metric], step)
        writer.add_scalar("eval/loss_diff", result["loss_diff"]["mean"], step)
        for layer, image in images.items():
            writer.add_image(f"eval/{layer}/tsne", image, step, dataformats="HWC")
    return result


# --- loading a run -----------------------------------------------------------------------------------

WEIGHT_DIRS = {"live": "lora", "ema": "lora_ema"}


def read_lora(lora_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The U-Net LoRA of an export folder in peft key format (``unet.<module>.lora_A.weight``) and its
    adapter metadata (rank, alpha, targets), or None for a file without it.

    The export stores attention projections under diffusers' ``lora.down``/``lora.up`` names and convs
    under peft's ``lora_A``/``lora_B``; diffusers' loader decides the format from the first key only and
    would drop the rest, so every key is converted here.
    """
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(lora_dir) / LORA_WEIGHT_NAME
    if not path.is_file():
        raise MissingFileError(f"no LoRA weights {str(path)!r}")
    state = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    others = sorted(k for k in state if not k.startswith("unet."))
    if others:
        raise InputError(f"{path}: holds weights outside the U-Net ({others[:3]}); expected only 'unet.' keys")
    metadata = json.loads(meta["lora_adapter_metadata"]) if "lora_adapter_metadata" in meta else None
    return convert_unet_state_dict_to_peft(state), metadata


def load_lora(unet, lora_dir: str | os.PathLike, adapter_name: str = "default") -> None:
    """Add the LoRA of an export folder to ``unet`` as adapter ``adapter_name``; every tensor must land."""
    state, metadata = read_lora(lora_dir)
    unet.load_lora_adapter(state, prefix="unet", adapter_name=adapter_name, metadata=metadata)
    loaded = [n for n, _ in unet.named_parameters() if "lora_" in n and f".{adapter_name}." in n]
    if len(loaded) != len(state):
        raise InputError(f"{Path(lora_dir) / LORA_WEIGHT_NAME}: {len(state)} LoRA tensors in the file but "
                         f"{len(loaded)} were loaded into the U-Net (config key 'model': another base U-Net?)")


def load_heads(model, weights_dir: str | os.PathLike) -> None:
    """Load ``align_heads.safetensors`` into ``model.align_heads``, checking its layers, D, num_tokens and
    align_head (files written before align_head existed hold conv_gn heads)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(weights_dir) / HEADS_WEIGHT_NAME
    if not path.is_file():
        raise MissingFileError(f"no align heads {str(path)!r}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    want = {"layers": list(model.align_layers), "D": model.D,
            "num_tokens": next(iter(model.align_heads.values())).num_tokens, "align_head": model.head_type}
    have = {"layers": json.loads(meta.get("layers", "null")), "D": int(meta.get("D", -1)),
            "num_tokens": int(meta.get("num_tokens", -1)), "align_head": meta.get("align_head", "conv_gn")}
    if have != want:
        raise InputError(f"{path}: heads are for {have}, the run config gives {want}")
    result = model.align_heads.load_state_dict(load_file(str(path)), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InputError(f"{path}: missing keys {result.missing_keys[:3]}, unexpected keys "
                         f"{result.unexpected_keys[:3]}")


def load_run_config(run_dir: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """``config.json`` of a run folder with ``key=value`` overrides (e.g. moved cache paths, ``model=``)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise MissingFileError(f"{str(run_dir)!r}: no config.json (not a repa-fast run folder)")
    values = read_json(path, "repa-fast-train writes it at the start of a run")
    values.update(parse_overrides(list(overrides)))
    return config_from_dict(values, str(path))


def load_run_unet(run_dir: str | os.PathLike, weights: str = "live", config: Config | None = None):
    """(the run's trained U-Net with the ``live`` or ``ema`` weights, on the CPU in fp32; the weights folder).

    The base U-Net is ``config.model``; a random-init base (``sd15``, ``tiny``) is rebuilt from
    ``config.seed`` exactly as the launcher built it. A full fine-tune export (``<dir>/unet``) is loaded whole.
    """
    from repa_fast.models import build_unet

    if weights not in WEIGHT_DIRS:
        raise InputError(f"weights {weights!r} is not one of {list(WEIGHT_DIRS)}")
    config = load_run_config(run_dir) if config is None else config
    weights_dir = Path(run_dir) / WEIGHT_DIRS[weights]
    if not weights_dir.is_dir():
        raise MissingFileError(f"{str(run_dir)!r}: no {WEIGHT_DIRS[weights]}/ (the launcher writes it at the end)")
    torch.manual_seed(config.seed)  # the launcher seeds before building the U-Net
    if (weights_dir / LORA_WEIGHT_NAME).is_file():
        unet = build_unet(config.model)
        load_lora(unet, weights_dir)
    elif (weights_dir / "unet" / "config.json").is_file():
        unet = build_unet(str(weights_dir))
    else:
        raise MissingFileError(f"{weights_dir}: neither {LORA_WEIGHT_NAME} nor a full U-Net in unet/")
    return unet, weights_dir


def load_run(run_dir: str | os.PathLike, weights: str = "live", config: Config | None = None, device="cpu",
             dtype: torch.dtype = torch.float32):
    """(SD15UNetAligned with the run's ``live`` or ``ema`` LoRA and heads, frozen, in eval mode; its Config).

    The U-Net is ``load_run_unet``'s.
    """
    from repa_fast.models import SD15UNetAligned

    config = load_run_config(run_dir) if config is None else config
    unet, weights_dir = load_run_unet(run_dir, weights, config)
    model = SD15UNetAligned(unet, config.align_layers, config.dino_D, num_tokens=config.dino_N,
                            kernels=config.kernels, align_head=config.align_head)
    load_heads(model, weights_dir)
    return model.requires_grad_(False).eval().to(device=device, dtype=dtype), config


# --- sample grids ------------------------------------------------------------------------------------

def load_sd_pipeline(sd_folder: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32, unet=None):
    """A StableDiffusionPipeline from a local folder (no download, no safety checker): ``model_index.json``
    if present, else the vae, text_encoder, tokenizer, scheduler and unet subfolders. A given ``unet``
    replaces the folder's (which is then not loaded). A component whose files are missing is a
    ``MissingFileError`` naming ``--sd``."""
    root = Path(sd_folder)
    if not root.is_dir():
        raise MissingFileError(f"--sd {str(root)!r} is not a folder")
    try:
        pipe = _sd_pipeline(root, dtype, unet)
    except RunError:
        raise
    except OSError as err:  # diffusers' and transformers' words for a component whose files are missing
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MissingFileError(f"--sd {str(root)!r}: {first} (a local SD-1.5 folder: vae, text_encoder, tokenizer, "
                               f"scheduler, as save_pretrained writes it)") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def sd_scheduler_config(sd_folder: str | os.PathLike) -> dict:
    """The scheduler config of the local SD-1.5 folder ``--sd``."""
    path = Path(sd_folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise MissingFileError(f"--sd {str(sd_folder)!r}: no scheduler/scheduler_config.json (a local SD-1.5 "
                               f"folder: vae, text_encoder, tokenizer, scheduler)")
    return read_json(path, "--sd must be a local SD-1.5 folder")


def _sd_pipeline(root: Path, dtype: torch.dtype, unet):
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if (root / "model_index.json").is_file():
        components = {} if unet is None else {"unet": unet if unet.dtype == dtype else unet.to(dtype)}
        pipe = StableDiffusionPipeline.from_pretrained(root, local_files_only=True, safety_checker=None,
                                                       requires_safety_checker=False, torch_dtype=dtype, **components)
    else:
        needed = ("vae", "text_encoder", "tokenizer", "scheduler") + (("unet",) if unet is None else ())
        missing = [s for s in needed if not (root / s).is_dir()]
        if missing:
            raise MissingFileError(f"--sd {str(root)!r}: no model_index.json and no subfolder(s) {missing}")
        scheduler_config = sd_scheduler_config(root)
        scheduler_cls = getattr(diffusers, scheduler_config.get("_class_name", "PNDMScheduler"))
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL.from_pretrained(root / "vae", local_files_only=True, torch_dtype=dtype),
            text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True,
                                                       torch_dtype=dtype),
            tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True),
            unet=(UNet2DConditionModel.from_pretrained(root / "unet", local_files_only=True, torch_dtype=dtype)
                  if unet is None else unet if unet.dtype == dtype else unet.to(dtype)),
            scheduler=scheduler_cls.from_pretrained(root / "scheduler", local_files_only=True),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe


def sample_grid(sd_folder, lora_dirs, classes: Sequence[str], seeds: Sequence[int], out_png: str | os.PathLike,
                num_inference_steps: int = 25, size: int = 512, guidance_scale: float = 7.5,
                template: str = PROMPT_TEMPLATE, device="cpu", dtype: torch.dtype = torch.float32,
                pipe=None) -> Path:
    """One PNG grid: a row per (weights, class), a column per seed, each cell ``size`` x ``size``.

    ``lora_dirs`` maps a row label to an export folder (``None``: the base model without LoRA); a list of
    folders is labelled by folder name. Prompts are ``template`` with the class name; noise comes from
    CPU generators seeded per column, so every row of a column starts from the same latent. A JSON
    beside the PNG lists the rows and the columns.
    """
    if "{name}" not in template:
        raise InputError(f"template {template!r} has no '{{name}}' placeholder")
    if not classes or not seeds:
        raise InputError("sample_grid: needs at least one class and one seed (--classes, --seeds)")
    from PIL import Image

    rows_spec = list(lora_dirs.items()) if isinstance(lora_dirs, dict) else [(Path(d).name, d) for d in lora_dirs]
    pipe = load_sd_pipeline(sd_folder, device, dtype) if pipe is None else pipe
    grid = Image.new("RGB", (len(seeds) * size, len(rows_spec) * len(classes) * size))
    rows = []
    for label, lora_dir in rows_spec:
        if lora_dir is not None:
            load_lora(pipe.unet, lora_dir, adapter_name=label)
        try:
            for name in classes:
                prompt = template.replace("{name}", name.replace("_", " "))
                generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
                images = pipe([prompt] * len(seeds), height=size, width=size, num_inference_steps=num_inference_steps,
                              guidance_scale=guidance_scale, generator=generators).images
                for col, image in enumerate(images):
                    grid.paste(image.convert("RGB"), (col * size, len(rows) * size))
                rows.append({"weights": label, "lora": None if lora_dir is None else str(lora_dir), "class": name,
                             "prompt": prompt})
        finally:
            if lora_dir is not None:
                pipe.unet.delete_adapters(label)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    out.with_suffix(".json").write_text(json.dumps(
        {"rows": rows, "seeds": [int(s) for s in seeds], "size": size, "num_inference_steps": num_inference_steps,
         "guidance_scale": guidance_scale, "sd": str(sd_folder)}, indent=2))
    return out


# --- command line ------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _list(kind):
    return lambda text: [kind(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="repa-fast-evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a repa-fast-train output folder (config.json, lora/, lora_ema/)")
    p.add_argument("--weights", choices=("live", "ema", "both"), default="both")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/eval)")
    p.add_argument("--csv", default=None, help="held-out sample CSV (default: the run's csv_path)")
    p.add_argument("--num-samples", type=int, default=64, help="evaluate the last N samples of the CSV")
    p.add_argument("--timesteps", type=_list(float), default=None,
                   help="comma-separated (default 0.25,0.5,0.75; ddpm: those fractions of the schedule's steps, "
                        "250,500,750 for SD-1.5)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--k", type=int, default=10, help="CKNNA nearest neighbours")
    p.add_argument("--cca-dims", type=int, default=16, help="principal components per side for CCA")
    p.add_argument("--tokens-per-sample", type=int, default=64, help="token positions per sample for CCA/t-SNE")
    p.add_argument("--seed", type=int, default=0, help="noise and token-position seed")
    p.add_argument("--tsne-points", type=int, default=500, help="token pairs per t-SNE plot (0: no plots)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    g = p.add_argument_group("sample grid (needs --sd)")
    g.add_argument("--sd", default=None, help="local SD-1.5 folder (vae, text_encoder, tokenizer, scheduler, unet)")
    g.add_argument("--classes", type=_list(str), default=["tench", "goldfish", "great white shark", "tiger cat"])
    g.add_argument("--seeds", type=_list(int), default=[0, 1, 2, 3])
    g.add_argument("--steps", type=int, default=25, help="inference steps")
    g.add_argument("--size", type=int, default=512, help="image size in pixels")
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--template", default=PROMPT_TEMPLATE)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the run's config (paths, model=...)")
    return p


def run_cli(args: argparse.Namespace) -> dict:
    from repa_fast.data.cache import load_clip_prompts, load_clip_table
    from repa_fast.data.dataset import build_dataset

    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "eval"
    config = load_run_config(run_dir, args.overrides)
    eval_config = replace(config, csv_path=args.csv or config.csv_path, cfg_dropout=0.0)
    dataset = build_dataset(eval_config)
    weights = ["live", "ema"] if args.weights == "both" else [args.weights]
    timesteps = args.timesteps
    if timesteps is not None and config.path_type == "ddpm":
        timesteps = [int(t) for t in timesteps]
    dtype = DTYPES[args.dtype]
    report = {"run": str(run_dir), "csv": eval_config.csv_path, "weights": {}}
    clip_table = None
    prompts = load_clip_prompts(config.clip_embeddings_path)
    class_names = dict(enumerate(prompts)) if prompts else None
    for w in weights:
        model, _ = load_run(run_dir, w, config, args.device, dtype)
        if clip_table is None:
            clip_table = load_clip_table(config.clip_embeddings_path, num_rows=dataset.null_class + 1,
                                         dim=model.unet.config.cross_attention_dim)
        report["weights"][w] = evaluate(
            model, dataset, config, timesteps, num_samples=args.num_samples, clip_table=clip_table,
            batch_size=args.batch_size, k=args.k, cca_dims=args.cca_dims, tokens_per_sample=args.tokens_per_sample,
            seed=args.seed, tsne_dir=out if args.tsne_points > 0 else None, tsne_points=args.tsne_points,
            tag=f"{w}_", class_names=class_names)
        del model
    if args.sd:
        dirs = {w: run_dir / WEIGHT_DIRS[w] for w in weights}
        report["grid"] = str(sample_grid(args.sd, dirs, args.classes, args.seeds, out / "grid.png", args.steps,
                                         args.size, args.guidance, args.template, args.device, dtype))
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    report["metrics_path"] = str(out / "metrics.json")
    return report


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_intermixed_args(argv)
    report = run_main("repa-fast-evaluate", run_cli, args)
    for w, result in report["weights"].items():
        for layer, per_t in result["layers"].items():
            mean = per_t["mean"]
            print(f"{w:>4} {layer}: " + "  ".join(f"{m} {mean[m]:.4f}" for m in METRICS)
                  + f"  (loss_diff {result['loss_diff']['mean']:.4f}, {result['num_samples']} samples)")
    print(f"metrics: {report['metrics_path']}" + (f"; grid: {report['grid']}" if "grid" in report else ""))


if __name__ == "__main__":
    main()
