"""The loader benchmarks of bench_loader.py (torch, torch with persistent workers, DALI; 1, 2, 4 workers),
collected into the suite on a small cache: 100 samples at tiny shapes (latent [4,16,16], tokens [64,64]),
three batches of 48 with a partial last one. The real-shape figures come from the script
(``python benchmarks/bench_loader.py --out ...``, results/loader_cpu.md)."""

import pytest
from bench_loader import test_loader_epoch  # noqa: F401 (collected here, with the fixture below)

from repa_fast.data.dataset import SD15AlignedDataset
from repa_fast.data.synthetic import write_synthetic_caches


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> SD15AlignedDataset:
    """Overrides bench_loader's real-shape cache (1.1 GB) for ``test_loader_epoch``."""
    pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed")
    root = tmp_path_factory.mktemp("loader_cache")
    write_synthetic_caches(root, num_samples=100, num_classes=4, latent_shape=(4, 16, 16), num_tokens=64,
                           dino_D=64, clip_shape=(1, 8), table_classes=4)
    return SD15AlignedDataset(root / "train.csv", root / "latents", root / "dino", align_layers=("mid",),
                              cfg_dropout=0.1, seed=0, num_classes=4)
