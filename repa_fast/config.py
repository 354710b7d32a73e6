"""One dataclass for a run: YAML file + ``key=value`` overrides, every key checked.

An unknown key or a value of the wrong type is a ``ConfigError`` that names the key (and, for a
typo, the close matches), so a run never starts on a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from repa_fast.errors import RunError

ALIGN_LAYERS = ("mid", "enc_last", "dec_first")
ALIGN_HEADS = ("conv_gn", "mlp")  # repa_fast.models.align_head


class ConfigError(RunError, ValueError):
    """A config key is unknown, or its value has the wrong type, is out of range or is not one of the choices."""


@dataclass
class Config:
    experiment_name: str = "sd15_repa"
    output_dir: str = "runs/sd15_repa"

    # Data
    csv_path: str = "train_200k.csv"
    latent_dir: str = "/data/vae_latents"
    dino_dir: str = "/data/dino_tokens"
    clip_embeddings_path: str = "clip_embeddings_1001.pt"
    eval_csv_path: str | None = None  # held-out samples (in the same caches) for the periodic alignment
    # metrics; None: the last 64 samples of csv_path (which are also trained on)
    exclude_ids_path: str | None = None  # sample ids to leave out (one a line; repa-fast-check-cache
    # --write-exclude writes it); the other samples keep their shuffling and CFG dropout (see data/dataset.py)

    # Model
    model: str = "sd15"  # sd15 | tiny | path to a local diffusers folder (UNet2DConditionModel)
    align_layers: list[str] = field(default_factory=lambda: ["mid"])
    dino_D: int = 1024
    dino_N: int = 256  # tokens per image; the grid is sqrt(N) x sqrt(N) (16x16 for ViT-L/14 at 224 px)
    use_lora: bool = True
    lora_rank: int = 32
    lora_alpha: int | None = None  # None: alpha = rank
    lora_targets: str = "attn+conv"  # attn+conv | attention-only
    detach_features: bool = False  # ablation only: stops REPA from shaping the U-Net
    align_head: str = "conv_gn"  # conv_gn (the source design's head: fused kernels) | mlp (REPA's projector, torch)

    # Loss
    prediction: str = "v"  # v | epsilon
    path_type: str = "linear"  # linear | cosine | ddpm
    weighting: str = "uniform"  # uniform | lognormal
    align_coeff: float = 0.8  # lambda's peak value
    align_warmup_steps: int = 0  # lambda rises linearly over these steps (the SD-1.5 fork: 3000)
    align_schedule: str = "constant"  # constant | cosine (decays to 0 at align_stop_step or max_steps) | stop
    align_stop_step: int | None = None  # alignment off after this step (cosine: where it reaches 0; stop: needed)
    manifold_coeff: float = 3.0
    manifold_form: str = "sample"  # sample ([B,B] Gram of pooled tokens) | token (per-sample [N,N] token Gram)
    manifold_upper_only: bool = False
    manifold_mask_diag: bool = False

    # Training
    batch_size: int = 48
    max_steps: int = 60000
    learning_rate: float = 2.0e-4
    weight_decay: float = 0.01
    ema_decay: float = 0.9995
    cfg_dropout: float = 0.1

    # Logging & saving
    log_interval: int = 100
    eval_interval: int = 5000
    save_interval: int = 10000

    # Misc
    seed: int = 42
    mixed_precision: str = "bf16"  # bf16 | fp16 | no
    gradient_clip: float = 1.0

    # Switches (DESIGN.md): the first value of each is the reference baseline
    kernels: str = "torch"  # torch | triton | auto (triton on CUDA)
    loader: str = "torch"  # torch | dali | auto (dali when installed)
    compile: str = "none"  # none | inductor | deepcompile
    ds_config: str | None = None  # path to a DeepSpeed JSON; None: ds_configs/zero2.json
    num_workers: int = 4
    prefetch: int = 2
    reference: bool = False  # true: the reference path, every switch at its baseline (REFERENCE_SWITCHES)

    def __post_init__(self) -> None:
        if self.reference:
            for key, value in REFERENCE_SWITCHES.items():
                setattr(self, key, value)
        for key, choices in CHOICES.items():
            value = getattr(self, key)
            values = value if isinstance(value, list) else [value]
            for v in values:
                if v not in choices:
                    raise ConfigError(f"config key {key!r}: {v!r} is not one of {list(choices)}")
        if not self.align_layers:
            raise ConfigError("config key 'align_layers': at least one layer is needed")
        if len(set(self.align_layers)) != len(self.align_layers):
            raise ConfigError(f"config key 'align_layers': repeated layer in {self.align_layers}")
        side = round(self.dino_N**0.5)
        if side * side != self.dino_N:
            raise ConfigError(f"config key 'dino_N': {self.dino_N} tokens do not form a square grid")
        for key in ("dino_D", "dino_N", "lora_rank", "batch_size", "max_steps", "log_interval",
                    "eval_interval", "save_interval", "prefetch"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"config key {key!r}: must be positive, got {getattr(self, key)}")
        if self.align_warmup_steps < 0:
            raise ConfigError(f"config key 'align_warmup_steps': must be >= 0, got {self.align_warmup_steps}")
        if self.align_stop_step is not None and self.align_stop_step <= 0:
            raise ConfigError(f"config key 'align_stop_step': must be positive, got {self.align_stop_step}")
        if self.align_schedule == "stop" and self.align_stop_step is None:
            raise ConfigError("config key 'align_schedule': 'stop' needs align_stop_step (the last aligned step)")
        if self.align_schedule == "constant" and self.align_stop_step is not None:
            raise ConfigError("config key 'align_stop_step': the constant schedule never stops; "
                              "set align_schedule: stop (or cosine, which decays to 0 there)")
        if self.align_warmup_steps > self.max_steps:
            raise ConfigError(f"config key 'align_warmup_steps': {self.align_warmup_steps} warm-up steps are more than "
                              f"the run's max_steps={self.max_steps}")
        self._check_ranges()

    def _check_ranges(self) -> None:
        """Numbers outside their range stop here, naming the key, not later as a NaN or a traceback."""
        for key, hint in _HINTS.items():
            if hint is float and not math.isfinite(getattr(self, key)):
                raise ConfigError(f"config key {key!r}: must be a finite number, got {getattr(self, key)}")
        for key in ("num_workers", "seed", "weight_decay", "gradient_clip", "align_coeff", "manifold_coeff"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key {key!r}: must be >= 0, got {getattr(self, key)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"config key 'learning_rate': must be positive, got {self.learning_rate}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ConfigError(f"config key 'lora_alpha': must be positive (or null: alpha = lora_rank), "
                              f"got {self.lora_alpha}")
        if not 0.0 <= self.cfg_dropout <= 1.0:
            raise ConfigError(f"config key 'cfg_dropout': must be in [0, 1], got {self.cfg_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"config key 'ema_decay': must be in [0, 1) (1 would never move the EMA weights), "
                              f"got {self.ema_decay}")

    @property
    def lora_scale_alpha(self) -> int:
        return self.lora_rank if self.lora_alpha is None else self.lora_alpha

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# `reference: true`: the baseline of every benchmark, whatever the config file selects.
REFERENCE_SWITCHES = {"kernels": "torch", "loader": "torch", "compile": "none", "ds_config": "zero0"}

CHOICES: dict[str, tuple[str, ...]] = {
    "align_layers": ALIGN_LAYERS,
    "align_head": ALIGN_HEADS,
    "lora_targets": ("attn+conv", "attention-only"),
    "prediction": ("v", "epsilon"),
    "path_type": ("linear", "cosine", "ddpm"),
    "weighting": ("uniform", "lognormal"),
    "align_schedule": ("constant", "cosine", "stop"),
    "manifold_form": ("sample", "token"),
    "mixed_precision": ("bf16", "fp16", "no"),
    "kernels": ("torch", "triton", "auto"),
    "loader": ("torch", "dali", "auto"),
    "compile": ("none", "inductor", "deepcompile"),
}

_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(_FIELDS), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _coerce(key: str, value: Any, hint: Any, from_text: bool) -> Any:
    """Check ``value`` against the field type; text from the command line is parsed first."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (from_text and str(value).lower() in ("none", "null", "~")):
            return None
        return _coerce(key, value, args[0], from_text)
    if origin is list:
        (item,) = typing.get_args(hint)
        if from_text and isinstance(value, str):
            text = value.strip()
            value = yaml.safe_load(text) if text.startswith("[") else [v.strip() for v in text.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r}: expected a list of {item.__name__}, got {value!r}")
        return [_coerce(key, v, item, from_text) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if from_text and str(value).lower() in ("true", "false", "1", "0", "yes", "no"):
            return str(value).lower() in ("true", "1", "yes")
        raise ConfigError(f"config key {key!r}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text or isinstance(value, str):
            try:
                return int(str(value))
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads `1e-4` (no dot) as text
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if from_text:
            return str(value)
        raise ConfigError(f"config key {key!r}: expected text, got {value!r}")
    raise TypeError(f"unsupported config field type {hint!r} for {key!r}")


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["lr=1", "align_layers=mid,enc_last"]`` -> checked values keyed by config key."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        if key not in _FIELDS:
            raise _unknown_key(key)
        out[key] = _coerce(key, text, _HINTS[key], from_text=True)
    return out


def config_from_dict(values: dict[str, Any], source: str = "config") -> Config:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of key: value, got {type(values).__name__}")
    checked = {}
    for key, value in values.items():
        if key not in _FIELDS:
            err = _unknown_key(str(key))
            raise ConfigError(f"{source}: {err}") from None
        try:
            checked[key] = _coerce(key, value, _HINTS[key], from_text=False)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
    try:
        return Config(**checked)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    values: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        with open(path, encoding="utf-8") as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"{path}: not valid YAML: {err}") from None
        source = str(path)
    merged = dict(values) if isinstance(values, dict) else values
    if isinstance(merged, dict):
        merged.update(parse_overrides(overrides))
    return config_from_dict(merged, source)


def use_triton(kernels: str, device: Any) -> bool:
    """The ``kernels`` switch for one call: ``triton`` always, ``auto`` on CUDA tensors, ``torch`` never."""
    if kernels == "triton":
        return True
    if kernels == "auto":
        return str(device).startswith("cuda")
    if kernels == "torch":
        return False
    raise ConfigError(f"option 'kernels': {kernels!r} is not one of {list(CHOICES['kernels'])}")
