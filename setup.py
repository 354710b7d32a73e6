"""repa-fast: fast U-REPA representation-alignment training for Stable Diffusion 1.5."""

from pathlib import Path

from setuptools import setup

setup(
    name="repa-fast",
    version="0.1.0",
    description="Fast SD-1.5 training with U-REPA representation alignment (Triton, DALI, DeepSpeed)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "repa_fast",
        "repa_fast.models",
        "repa_fast.data",
        "repa_fast.kernels",
        "repa_fast.preprocessing",
    ],
    package_dir={"repa_fast.kernels": "kernels"},
    # Ranges that torch 2.13.0 satisfies: install torch first (the Makefile does) so that pip never
    # pulls a multi-GB CUDA build to satisfy a newer pin.
    install_requires=[
        "torch>=2.4,<2.15",
        "triton>=3.1",
        "diffusers>=0.30",
        "peft>=0.12",
        "deepspeed>=0.16",
        "lmdb>=1.4",
        "numpy>=1.24",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "tensorboard>=2.10",
        "transformers>=4.40",
        "pillow>=9.0",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        # plots, t-SNE, FID/IS/KID. torchmetrics is fed by the TorchScript Inception file the user gives: its own
        # Inception comes from torch-fidelity, which (like clean-fid) imports torchvision (no CPU build for torch here)
        "eval": ["matplotlib>=3.7", "scikit-learn>=1.5", "torchmetrics>=1.4,<2"],
        "dev": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "ruff>=0.5", "scipy>=1.10"],
    },
    entry_points={"console_scripts": [
        "repa-fast-train = repa_fast.train:main",
        "repa-fast-evaluate = repa_fast.evaluate:main",
        "repa-fast-sample = repa_fast.sample:main",
        "repa-fast-fid = repa_fast.fid:main",
        "repa-fast-report = repa_fast.report:main",
        "repa-fast-sample-subset = repa_fast.preprocessing.sample_subset:main",
        "repa-fast-encode-vae = repa_fast.preprocessing.encode_vae_latents:main",
        "repa-fast-build-dino = repa_fast.preprocessing.build_dino_cache:main",
        "repa-fast-prepare-clip = repa_fast.preprocessing.prepare_clip_embeddings:main",
        "repa-fast-check-cache = repa_fast.data.check:main",
    ]},
)
