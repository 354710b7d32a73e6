"""``make demo``: learnable synthetic caches -> the tiny U-Net trained by DeepSpeed ZeRO-2 on two CPU
ranks (every GPU where there are GPUs) -> each loss term (denoising, token cosine, Gram) first -> last,
samples/s, a checkpoint and the weights export. It fails unless every term improves.

    python -m repa_fast.demo [--out demo_out] [--steps 120] [--ranks 2] [--verbose] [key=value ...]

The terminal shows the demo's lines, the progress bar and the run's own lines. The deepspeed launcher's
log (it prints on stdout) and what the libraries say in the ranks go to ``<out>/run/console.log``;
``--verbose`` shows everything.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from repa_fast.data.synthetic import write_synthetic_caches

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
# The tiny U-Net is random-init: a LoRA on it, the rest frozen, cannot learn to denoise (measured on the
# demo data, 120 steps, one process: loss_diff 1.470 -> 1.445 with v, 1.093 -> 1.093 with epsilon), so
# the demo fine-tunes the whole U-Net (loss_diff 1.115 -> 0.632). Later key=value arguments override it.
DEMO_OVERRIDES = ("use_lora=false",)


# (label, log key, how to read it, better when): the terms the demo must show improving
TERMS = (("denoising", "loss_diff", lambda v: v, "lower"),
         ("token cosine", "loss_token", lambda v: 1.0 - v, "higher"),  # mean cos = 1 - L_token
         ("Gram", "loss_manifold", lambda v: v, "lower"),
         ("total", "loss", lambda v: v, "lower"))


def summarize(log_path: Path, window: int = 20) -> dict:
    """Each term of ``TERMS`` averaged over the first and the last ``window`` steps of train_log.jsonl."""
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    if not rows:
        raise RuntimeError(f"{log_path}: no logged steps")
    window = max(1, min(window, len(rows) // 2))
    first, last = rows[:window], rows[-window:]
    terms = {}
    for label, key, read, better in TERMS:
        a = sum(read(r[key]) for r in first) / window
        b = sum(read(r[key]) for r in last) / window
        terms[label] = {"first": a, "last": b, "better": better, "improved": b < a if better == "lower" else b > a}
    return {"steps": len(rows), "window": window, "terms": terms,
            "samples_per_s": sum(r["samples_per_s"] for r in last) / window}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--ranks", type=int, default=None, help="processes (default: all GPUs, or 2 on CPU)")
    p.add_argument("--verbose", action="store_true", help="show the launcher's and the libraries' logs")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    out = Path(a.out)
    run_dir = out / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    import torch

    ranks = a.ranks or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    print(f"[demo] writing synthetic caches to {out / 'data'}")
    paths = write_synthetic_caches(out / "data", num_samples=512, num_classes=8, align_layers=["mid"],
                                   latent_shape=(4, 16, 16), num_tokens=64, dino_D=64, clip_shape=(77, 32))
    overrides = [f"{k}={v}" for k, v in paths.items()] + [f"max_steps={a.steps}", f"output_dir={run_dir}",
                                                          *DEMO_OVERRIDES, *a.overrides]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
           os.environ.get("MASTER_PORT", "29611"), "--module", "repa_fast.train", "--config", str(CONFIG),
           "--ds-config", "zero2", *(["--verbose"] if a.verbose else []), *overrides]
    print(f"[demo] {ranks} ranks, ZeRO-2: {' '.join(cmd[2:])}", flush=True)
    run_dir.mkdir(parents=True)
    log = run_dir / "console.log"
    with open(log, "a", encoding="utf-8") as launcher_out:
        # the launcher logs on stdout; the ranks' bar, own lines and errors are on stderr
        code = subprocess.run(cmd, stdout=None if a.verbose else launcher_out).returncode
    if code != 0:
        sys.exit(f"[demo] training failed (exit status {code}); the launcher's log is in {log}")
    s = summarize(run_dir / "train_log.jsonl")
    print(f"[demo] {s['steps']} steps; each term averaged over the first and the last {s['window']} steps:")
    for label, term in s["terms"].items():
        verdict = "improved" if term["improved"] else "DID NOT IMPROVE"
        print(f"[demo]   {label:<13} {term['first']:.4f} -> {term['last']:.4f}  "
              f"({term['better']} is better: {verdict})")
    print(f"[demo] {s['samples_per_s']:.1f} samples/s over the last steps")
    print(f"[demo] checkpoint: {run_dir / 'checkpoints'} (latest: {(run_dir / 'checkpoints' / 'latest').read_text()})")
    kind = "LoRA" if (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file() else "full U-Net"
    print(f"[demo] {kind} + align heads export: {run_dir / 'lora'} and {run_dir / 'lora_ema'}")
    failed = [label for label, term in s["terms"].items() if not term["improved"]]
    if failed:
        sys.exit(f"[demo] did not improve: {', '.join(failed)}")


if __name__ == "__main__":
    main()
