"""``make demo``: synthetic caches -> the tiny U-Net trained by DeepSpeed ZeRO-2 on two CPU ranks
(every GPU where there are GPUs) -> the loss falling, samples/s, a checkpoint and a LoRA export.

    python -m repa_fast.demo [--out demo_out] [--steps 200] [--ranks 2] [--verbose] [key=value ...]

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


def summarize(log_path: Path, window: int = 20) -> dict:
    """Means over the first and the last ``window`` steps (a quarter of a shorter run)."""
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    window = max(1, min(window, len(rows) // 4))
    first, last = rows[:window], rows[-window:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
    return {"steps": len(rows), "loss_first": mean(first, "loss"), "loss_last": mean(last, "loss"),
            "align_first": mean(first, "loss_align"), "align_last": mean(last, "loss_align"),
            "samples_per_s": mean(last, "samples_per_s")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out")
    p.add_argument("--steps", type=int, default=200)
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
                                                          *a.overrides]
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
    print(f"[demo] {s['steps']} steps: loss {s['loss_first']:.4f} -> {s['loss_last']:.4f} "
          f"(alignment {s['align_first']:.4f} -> {s['align_last']:.4f}), "
          f"{s['samples_per_s']:.1f} samples/s over the last steps")
    print(f"[demo] checkpoint: {run_dir / 'checkpoints'} (latest: {(run_dir / 'checkpoints' / 'latest').read_text()})")
    print(f"[demo] LoRA export: {run_dir / 'lora'} and {run_dir / 'lora_ema'}")
    if s["loss_last"] >= s["loss_first"]:
        sys.exit("[demo] the loss did not fall")


if __name__ == "__main__":
    main()
