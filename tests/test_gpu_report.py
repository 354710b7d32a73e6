"""benchmarks/gpu_report.py --tiny (every row's code path, on CPU) and benchmarks/update_readme.py."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "gpu_report.py"
UPDATE = ROOT / "benchmarks" / "update_readme.py"
START, END = "<!-- performance:start -->", "<!-- performance:end -->"

OPS = {("op", op, impl, p) for op in ("align_head", "align_loss", "token_gram", "align_branch")
       for impl in ("eager", "compiled", "fused") for p in ("forward", "backward", "full")}
OVERHEAD = {("overhead", "REPA overhead", impl, "step") for impl in ("no alignment", "kernels=torch", "kernels=triton")}
STEPS = {("step", "whole step", impl, "step") for impl in ("reference", "fast")}


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_report") / "tiny"
    r = subprocess.run([sys.executable, str(REPORT), "--tiny", "--out", str(out)], capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return out, r.stdout


def test_tiny_report_has_every_row_with_finite_times(tiny_report):
    out, _ = tiny_report
    rows = json.loads((out / "gpu_report.json").read_text())
    assert not [r for r in rows if "error" in r]
    keys = [(r["part"], r["item"], r["impl"], r["pass"]) for r in rows]
    assert sorted(keys) == sorted(OPS | OVERHEAD | STEPS)
    for r in rows:
        where = f"{r['part']}/{r['item']}/{r['impl']}/{r['pass']}"
        for key in ("median_ms", "p20_ms", "p80_ms"):
            assert math.isfinite(r[key]) and r[key] > 0, (where, key, r[key])
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], where
        assert r["mode"] == "tiny" and r["gpu"] and r["date"] and "gpu_report.py --tiny" in r["command"], where
        assert r["shape"], where
        if r["part"] == "op":
            assert r["floor_ms"] > 0, where
            if r["impl"] != "eager":  # the timed implementations compute what eager computes
                assert math.isfinite(r["ratio"]) and r["ratio"] > 0, where
                assert r["max_rel_diff_vs_eager"] < 1e-4, (where, r["max_rel_diff_vs_eager"])
        else:
            assert math.isfinite(r["last_loss"]), where
            assert (r["ratio"] is None) == (r["impl"] in ("no alignment", "reference")), where
            if r["ratio"] is not None:
                assert math.isfinite(r["ratio"]), where
    # the losses' launches per forward+backward: the fused ops' budgets, fewer than eager's; compiled: not counted
    launches = {(r["item"], r["impl"]): r["launches"] for r in rows if r["part"] == "op" and "launches" in r}
    assert launches[("align_loss", "fused")] == 4 and launches[("token_gram", "fused")] == 3
    assert launches[("align_loss", "eager")] > 4 and launches[("token_gram", "eager")] > 3
    assert launches[("align_loss", "compiled")] is None and launches[("token_gram", "compiled")] is None
    # the head: 2 kernels forward, 5 backward; the branch: 4 forward (head projection, tokens + losses, Grams,
    # losses), 5 backward; eager launches more of both
    assert launches[("align_head", "fused")] == 7 and launches[("align_branch", "fused")] == 9
    assert launches[("align_head", "eager")] > 7 and launches[("align_branch", "eager")] > 9
    assert launches[("align_head", "compiled")] is None and launches[("align_branch", "compiled")] is None
    steps = {r["impl"]: r for r in rows if r["part"] == "step"}
    assert steps["reference"]["settings"]["kernels"] == "torch" and steps["reference"]["settings"]["zero_stage"] == 0
    assert steps["fast"]["settings"]["kernels"] == "triton" and steps["fast"]["settings"]["zero_stage"] == 2
    assert all(s["samples_per_s"] > 0 for s in steps.values())
    # the same seeds, data and initial weights: the first step's loss of both paths agrees
    assert steps["fast"]["last_loss"] == pytest.approx(steps["reference"]["last_loss"], rel=1e-4)


def test_tiny_markdown_is_one_table_printed_last(tiny_report):
    out, stdout = tiny_report
    text = (out / "gpu_report.md").read_text()
    rows = json.loads((out / "gpu_report.json").read_text())
    assert text.startswith("# GPU report")
    for key in ("date", "machine", "command", "mode"):
        assert f"\n- {key}: " in text
    assert "NOT figures" in text
    table = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert table[0].startswith("| part | item | impl | pass | median |")
    assert len(table) == 2 + len(rows)  # header, rule, one line a row
    assert "FAILED" not in text
    assert stdout.rstrip().endswith(text.rstrip())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_full_report_without_gpu_says_so(tmp_path):
    r = subprocess.run([sys.executable, str(REPORT), "--out", str(tmp_path / "r")], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr and "--tiny" in r.stderr
    assert not (tmp_path / "r").exists()


# --- update_readme ---------------------------------------------------------------------------------------------

README = f"""# project

intro line, kept as it is

## Performance

{START}
old text that must go
{END}

## Switches

| key | value |
| --- | --- |
"""


def gpu_markdown(date: str, mode: str, median: str) -> str:
    return "\n".join([
        "# GPU report: fused ops, REPA overhead, whole training step", "",
        f"- date: {date}", "- machine: NVIDIA H200 (140 GiB); 16 CPU cores", "- software: torch 2.11",
        "- command: `python benchmarks/gpu_report.py --out x`", f"- mode: {mode}", "",
        "| part | item | impl | pass | median |", "| --- | --- | --- | --- | ---: |",
        f"| op | align_loss | fused | full | {median} |", "", "- op rows: a note", ""])


def run_update(results: Path, readme: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(UPDATE), str(results), "--readme", str(readme)], capture_output=True,
                          text=True, timeout=120)


def outside(text: str) -> tuple[str, str]:
    head, rest = text.split(START)
    return head, rest.split(END)[1]


def test_update_readme_replaces_only_the_marked_section(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(ROOT / "benchmarks" / "results" / "loader_cpu.md", results / "loader_cpu.md")
    (results / "gpu_tiny").mkdir()  # a --tiny report is a check, not figures: never shown
    (results / "gpu_tiny" / "gpu_report.md").write_text(gpu_markdown("2026-12-01T10:00:00+00:00", "tiny", "9.9 us"))
    readme = tmp_path / "README.md"
    readme.write_text(README)

    r = run_update(results, readme)
    assert r.returncode == 0, r.stderr
    text = readme.read_text()
    assert outside(text) == outside(README)
    section = text.split(START)[1].split(END)[0]
    assert "old text" not in section and "GPU figures are not measured yet" in section
    assert "9.9 us" not in section
    loader = (results / "loader_cpu.md").read_text()
    table = [ln for ln in loader.splitlines() if ln.startswith("|")]
    assert "\n".join(table) in section
    for key in ("date", "machine", "command"):
        line = next(ln for ln in loader.splitlines() if ln.startswith(f"- {key}: "))
        assert line in section

    # GPU reports: the latest one is shown and the "not measured" sentence goes
    for name, date, median in (("gpu_a", "2026-12-02T10:00:00+00:00", "11.1 us"),
                               ("gpu_b", "2026-12-03T10:00:00+00:00", "22.2 us")):
        (results / name).mkdir()
        (results / name / "gpu_report.md").write_text(gpu_markdown(date, "full", median))
    assert run_update(results, readme).returncode == 0
    text = readme.read_text()
    section = text.split(START)[1].split(END)[0]
    assert outside(text) == outside(README)
    assert "22.2 us" in section and "11.1 us" not in section and "not measured yet" not in section
    assert section.index("GPU report") < section.index("Loader throughput")
    assert run_update(results, readme).returncode == 0 and readme.read_text() == text  # idempotent


def test_update_readme_refuses_a_readme_without_markers(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(ROOT / "benchmarks" / "results" / "loader_cpu.md", results / "loader_cpu.md")
    readme = tmp_path / "README.md"
    broken = README.replace(END, "")
    readme.write_text(broken)
    r = run_update(results, readme)
    assert r.returncode != 0 and "performance:end" in r.stderr
    assert readme.read_text() == broken


def test_update_readme_names_the_code_and_the_failed_parts(tmp_path):
    results = tmp_path / "results"
    (results / "gpu").mkdir(parents=True)
    report = gpu_markdown("2026-12-02T10:00:00+00:00", "full", "11.1 us")
    (results / "gpu" / "gpu_report.md").write_text(report)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert run_update(results, readme).returncode == 0
    section = readme.read_text().split(START)[1].split(END)[0]
    assert "- code:" not in section and "failed in this run" not in section  # the report says neither

    (results / "gpu" / "gpu_report.md").write_text(
        report.replace("- mode: full", "- code: 0123abc\n- mode: full")
        .replace("| op | align_loss | fused | full | 11.1 us |",
                 "| op | FAILED | | | | RuntimeError: x |\n| step | whole step | fast | step | 9.9 ms |"))
    assert run_update(results, readme).returncode == 0
    section = readme.read_text().split(START)[1].split(END)[0]
    assert "\n- code: 0123abc\n" in section
    assert "\n- failed in this run, no figures: op\n" in section
