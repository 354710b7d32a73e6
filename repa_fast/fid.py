"""FID, Inception Score and KID of a sample set against a reference, by torchmetrics on a local Inception.

    repa-fast-fid SAMPLES REFERENCE --inception inception-2015-12-05.pt [--batch-size 50] [--device cuda] \
        [--kid-subsets 100] [--kid-subset-size 1000] [--is-splits 10] [--out fid.json] [--save-ref-stats ref.npz]

SAMPLES is a folder of images (png, jpg, webp, bmp; all of one size) or an ADM-style npz (``arr_0`` uint8
[N, H, W, 3], as ``repa-fast-sample`` writes). REFERENCE is the same, or an npz of precomputed statistics
(``mu`` [F], ``sigma`` [F, F]; ``--save-ref-stats`` writes them from a reference of images). An npz that
holds both ``arr_0`` and statistics (guided-diffusion's reference batches) is used as images, so that
samples and reference go through the same network; KID needs reference images.

The network (``--inception``) is a TorchScript Inception-v3 with the interface of
``inception-2015-12-05.pt``, the TensorFlow FID Inception ported to PyTorch that StyleGAN2-ADA, EDM and
clean-fid load: ``net(images_uint8_NCHW, return_features=True)`` gives the 2048 pool features and
``net(images, no_output_bias=True)`` the class probabilities; it resizes to 299 px itself. Nothing is
downloaded: a missing file is an error naming the option.

Bad input (a missing file, a folder without images, an npz without ``arr_0``, a network of another
interface) ends ``repa-fast-fid`` with one line naming it (``repa_fast.errors.run_main``).

- FID: torchmetrics' ``FrechetInceptionDistance`` on the pool features (float64).
- IS: torchmetrics' ``InceptionScore`` of the samples (``--is-splits`` splits, shuffled with ``--seed``).
- KID: torchmetrics' ``KernelInceptionDistance`` (cubic polynomial kernel MMD, ``--kid-subsets`` subsets of
  ``--kid-subset-size``, capped at the smaller set, drawn with ``--seed``).
Each set goes through the network once (samples twice: features and probabilities). The results go to
``--out`` (default: ``SAMPLES/fid.json`` for a folder, ``<npz stem>_fid.json`` beside an npz).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from repa_fast.errors import InputError, MissingFileError, run_main
from repa_fast.image_io import IMAGE_SUFFIXES, image_files, iter_npz_images, npz_keys, read_rgb
from repa_fast.optional import require

STATS_KEYS = ("mu", "sigma")
# the keyword arguments of inception-2015-12-05.pt's forward that inception_outputs calls
INCEPTION_KWARGS = ("return_features", "no_output_bias")


# --- inputs --------------------------------------------------------------------------------------------

def load_inception(path: str | os.PathLike | None, device="cpu") -> torch.jit.ScriptModule:
    """The TorchScript Inception of ``--inception`` on ``device``, in eval mode; never downloaded."""
    if path is None:
        raise MissingFileError("--inception: no Inception file given (the TorchScript 'inception-2015-12-05.pt'; "
                               "nothing is downloaded)")
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"--inception {str(path)!r}: no such file (the TorchScript Inception-v3 "
                               f"'inception-2015-12-05.pt'; nothing is downloaded)")
    try:
        net = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError) as err:
        raise InputError(f"--inception {str(path)!r} is not a TorchScript module: {str(err).splitlines()[0]}") from None
    have = [a.name for a in net.forward.schema.arguments]
    if not all(k in have for k in INCEPTION_KWARGS):
        raise InputError(f"--inception {str(path)!r}: forward{tuple(have[1:])} lacks {list(INCEPTION_KWARGS)}; "
                         f"expected the interface of 'inception-2015-12-05.pt'")
    return net.eval()


def source_kind(path: str | os.PathLike, what: str = "SAMPLES") -> str:
    """``images`` (a folder, or an npz with ``arr_0``) or ``stats`` (an npz with ``mu`` and ``sigma``); ``what``
    (SAMPLES, REFERENCE) names the argument in errors."""
    path = Path(path)
    if path.is_dir():
        return "images"
    if not path.is_file():
        raise MissingFileError(f"{what} {str(path)!r}: no such folder or npz")
    if path.suffix != ".npz":
        raise InputError(f"{what} {str(path)!r}: expected a folder of images or an .npz")
    keys = npz_keys(path)
    if "arr_0" in keys:
        return "images"
    if all(k in keys for k in STATS_KEYS):
        return "stats"
    raise InputError(f"{what} {str(path)!r}: holds {keys}; expected images 'arr_0' or statistics 'mu' and 'sigma'")


def image_batches(path: str | os.PathLike, batch_size: int) -> tuple[int, Iterator[np.ndarray]]:
    """(N, uint8 batches [b, H, W, 3]) of a folder of images or an npz's ``arr_0``."""
    path = Path(path)
    if not path.is_dir():
        return iter_npz_images(path, batch_size)
    files = image_files(path)
    if not files:
        raise MissingFileError(f"{path}: no images ({', '.join(s[1:] for s in IMAGE_SUFFIXES)}) in the folder")

    def batches() -> Iterator[np.ndarray]:
        shape = None
        for start in range(0, len(files), batch_size):
            images = []
            for f in files[start:start + batch_size]:
                image = read_rgb(f)
                shape = shape or image.shape
                if image.shape != shape:
                    raise InputError(f"{f}: {image.shape[1]}x{image.shape[0]} px, but {files[0].name} is "
                                     f"{shape[1]}x{shape[0]}: resize the set to one size first")
                images.append(image)
            yield np.stack(images)

    return len(files), batches()


def load_stats(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu [F], sigma [F, F]) float64 of a statistics npz; shapes checked."""
    with np.load(path) as data:
        mu, sigma = (torch.from_numpy(np.asarray(data[k], dtype=np.float64)) for k in STATS_KEYS)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise InputError(f"REFERENCE {str(path)!r}: mu {list(mu.shape)} and sigma {list(sigma.shape)} are not "
                         f"[F] and [F, F]")
    return mu, sigma


def save_stats(path: str | os.PathLike, features: torch.Tensor) -> Path:
    """mu and sigma (covariance with n - 1, as FID uses) of ``features`` [N, F] to an npz."""
    f = features.double().numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=f.mean(0), sigma=np.cov(f, rowvar=False), num_images=f.shape[0])
    return path


@torch.no_grad()
def inception_outputs(net, path: str | os.PathLike, batch_size: int, device, probabilities: bool,
                      desc: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(pool features [N, F] float64, class probabilities [N, C] float64 or None) of a set, on the CPU."""
    from tqdm.auto import tqdm

    count, batches = image_batches(path, batch_size)
    if count < 2:  # a covariance needs two
        raise InputError(f"{path}: {count} image(s); FID and KID need at least 2")
    feats, probs = [], []
    with tqdm(total=count, desc=desc, unit="img", dynamic_ncols=True) as bar:
        for batch in batches:
            x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).contiguous()  # uint8 [b, 3, H, W]
            feats.append(net(x, return_features=True).double().cpu())
            if probabilities:
                probs.append(net(x, no_output_bias=True).double().cpu())
            bar.update(len(batch))
    return torch.cat(feats), torch.cat(probs) if probabilities else None


# --- metrics -------------------------------------------------------------------------------------------

class _Given(torch.nn.Module):
    """The feature extractor handed to torchmetrics: the Inception outputs were computed once, here."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _metric(name: tuple[str, str], **kwargs):
    """torchmetrics.image.<module>.<class>(**kwargs), without its warning that it buffers features (we know)."""
    cls = getattr(require(f"torchmetrics.image.{name[0]}", "repa-fast-fid"), name[1])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer")
        return cls(**kwargs)


def fid_score(sample_features: torch.Tensor, reference: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> float:
    """torchmetrics' FID between sample features [N, F] and reference features [M, F] or statistics (mu, sigma)."""
    metric = _metric(("fid", "FrechetInceptionDistance"), feature=_Given(sample_features.shape[1]))
    metric.set_dtype(torch.float64)
    if isinstance(reference, tuple):
        mu, sigma = reference
        if mu.shape[0] != sample_features.shape[1]:
            raise InputError(f"reference statistics have {mu.shape[0]} features, the Inception (--inception) gives "
                             f"{sample_features.shape[1]}: compute them with the same network (--save-ref-stats)")
        # torchmetrics keeps sums: mean = sum / n, cov = (cov_sum - n mean mean^T) / (n - 1); any n >= 2 gives mu, sigma
        n = 2
        metric.real_features_sum = mu * n
        metric.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
        metric.real_features_num_samples = torch.tensor(n)
    else:
        metric.update(reference, real=True)
    metric.update(sample_features, real=False)
    return float(metric.compute())


def inception_score(probabilities: torch.Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """torchmetrics' Inception Score of class probabilities [N, C]: (mean, std) over ``splits`` (one: std NaN)."""
    metric = _metric(("inception", "InceptionScore"), feature=_Given(probabilities.shape[1]),
                     splits=min(splits, probabilities.shape[0]))
    metric.update(probabilities.clamp_min(1e-30).log())  # torchmetrics takes logits: softmax(log p) = p
    with torch.random.fork_rng(), warnings.catch_warnings():
        torch.manual_seed(seed)
        warnings.filterwarnings("ignore", message=r"std\(\): degrees of freedom")  # one split: std is NaN
        mean, std = metric.compute()
    return float(mean), float(std)


def kid_score(sample_features: torch.Tensor, reference_features: torch.Tensor, subsets: int = 100,
              subset_size: int = 1000, seed: int = 0) -> tuple[float, float, int]:
    """torchmetrics' KID (mean, std over subsets; the subset size used, capped at the smaller set)."""
    size = min(subset_size, sample_features.shape[0], reference_features.shape[0])
    metric = _metric(("kid", "KernelInceptionDistance"), feature=_Given(sample_features.shape[1]), subsets=subsets,
                     subset_size=size)
    metric.update(reference_features, real=True)
    metric.update(sample_features, real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size


def compute_metrics(samples: str | os.PathLike, reference: str | os.PathLike, inception: str | os.PathLike,
                    batch_size: int = 50, device=None, kid_subsets: int = 100, kid_subset_size: int = 1000,
                    is_splits: int = 10, seed: int = 0, save_ref_stats: str | os.PathLike | None = None) -> dict:
    """FID, IS and (with reference images) KID of ``samples`` against ``reference``; see the module doc."""
    for module in ("torchmetrics.image.fid", "torchmetrics.image.kid", "torchmetrics.image.inception"):
        require(module, "repa-fast-fid")  # before minutes of Inception passes
    # (value, least): KID's unbiased MMD divides by m (m - 1)
    counts = {"--batch-size": (batch_size, 1), "--kid-subsets": (kid_subsets, 1),
              "--kid-subset-size": (kid_subset_size, 2), "--is-splits": (is_splits, 1)}
    for option, (value, least) in counts.items():
        if value < least:
            raise InputError(f"{option} {value}: must be at least {least}")
    if source_kind(samples, "SAMPLES") != "images":
        raise InputError(f"SAMPLES {str(samples)!r}: holds statistics (mu, sigma); need images")
    ref_kind = source_kind(reference, "REFERENCE")
    if save_ref_stats is not None and ref_kind != "images":
        raise InputError(f"--save-ref-stats: REFERENCE {str(reference)!r} is statistics already")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = load_inception(inception, device)
    sample_feats, sample_probs = inception_outputs(net, samples, batch_size, device, True, "inception: samples")
    result = {"samples": str(samples), "reference": str(reference), "reference_kind": ref_kind,
              "inception": str(inception), "num_samples": sample_feats.shape[0]}
    if ref_kind == "images":
        ref_feats, _ = inception_outputs(net, reference, batch_size, device, False, "inception: reference")
        result["num_reference"] = ref_feats.shape[0]
        if save_ref_stats is not None:
            result["reference_stats"] = str(save_stats(save_ref_stats, ref_feats))
        result["fid"] = fid_score(sample_feats, ref_feats)
        result["kid_mean"], result["kid_std"], result["kid_subset_size"] = kid_score(
            sample_feats, ref_feats, kid_subsets, kid_subset_size, seed)
        result["kid_subsets"] = kid_subsets
    else:
        result["fid"] = fid_score(sample_feats, load_stats(reference))
    result["isc_mean"], result["isc_std"] = inception_score(sample_probs, is_splits, seed)
    result["is_splits"] = min(is_splits, sample_probs.shape[0])
    return result


# --- command line --------------------------------------------------------------------------------------

def default_out(samples: str | os.PathLike) -> Path:
    samples = Path(samples)
    return samples / "fid.json" if samples.is_dir() else samples.with_name(f"{samples.stem}_fid.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="repa-fast-fid", description=__doc__.split("\n\n")[0])
    p.add_argument("samples", help="folder of images or npz (arr_0 uint8 [N, H, W, 3])")
    p.add_argument("reference", help="folder of images, npz of images (arr_0) or npz of statistics (mu, sigma)")
    p.add_argument("--inception", required=True,
                   help="local TorchScript Inception-v3 (inception-2015-12-05.pt); nothing is downloaded")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--is-splits", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="KID subsets and IS split shuffling")
    p.add_argument("--save-ref-stats", default=None, help="write the reference's mu and sigma to this npz")
    p.add_argument("--out", default=None, help="results JSON (default: SAMPLES/fid.json or <npz stem>_fid.json)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    result = run_main("repa-fast-fid", compute_metrics, args.samples, args.reference, args.inception,
                      args.batch_size, args.device, args.kid_subsets, args.kid_subset_size, args.is_splits, args.seed,
                      args.save_ref_stats)
    out = Path(args.out) if args.out else default_out(args.samples)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    line = f"FID {result['fid']:.4f}  IS {result['isc_mean']:.3f} +- {result['isc_std']:.3f}"
    if "kid_mean" in result:
        line += f"  KID {result['kid_mean']:.5f} +- {result['kid_std']:.5f}"
    print(f"{line}  ({result['num_samples']} samples; {out})")


if __name__ == "__main__":
    main()
