"""A quiet console: the terminal shows the run's own lines (and the bar); the libraries' logs, notices and
warnings go to <output_dir>/console.log; --verbose shows them."""

import re
import subprocess
import sys

import pytest

# DeepSpeed's log line format: "[2026-11-30 01:59:27,220] [INFO] [launch.py:152:main] ..."
DEEPSPEED_LINE = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,]+\] \[(DEBUG|INFO|WARNING)\] \[\w+\.py:\d+:")

SCRIPT = r'''
import logging, sys, warnings
from pathlib import Path
import repa_fast
from repa_fast.console import Console

early = logging.getLogger("somelib")  # a library's own terminal handler, made before the set-up
early.addHandler(logging.StreamHandler(sys.stderr))
early.propagate = False
console = Console(sys.argv[1], verbose=sys.argv[2] == "verbose")
late = logging.getLogger("otherlib")  # made after it, on stdout (as DeepSpeed's logger is on import)
late.addHandler(logging.StreamHandler(sys.stdout))
late.propagate = False
console.capture_libraries()  # makes and moves transformers' and diffusers' own handlers
import transformers.utils.logging
transformers.utils.logging.get_logger("transformers.somewhere").warning("transformers notice")
early.warning("early library notice")
late.warning("late library notice")
print("library print")
logging.getLogger("peft.tuners").info("propagated library info")
warnings.warn_explicit("library future", FutureWarning, "/venv/site-packages/lib/mod.py", 3)
warnings.warn_explicit("own warning", RuntimeWarning, str(Path(repa_fast.__file__).parent / "train.py"), 7)
logging.getLogger("repa_fast.train").info("own line")
logging.getLogger("somelib.part").error("library error")
console.print("result line")
console.close()
print("after close")
'''
LIBRARY = ["transformers notice", "early library notice", "late library notice", "library print",
           "propagated library info", "FutureWarning: library future"]
OWN_ERR = ["RuntimeWarning: own warning", "repa_fast.train: own line", "library error"]


def _run(tmp_path, mode):
    log = tmp_path / mode / "console.log"
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(log), mode], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return r, log


def test_quiet_console_sends_library_output_to_the_log(tmp_path):
    r, log = _run(tmp_path, "quiet")
    assert r.stdout.splitlines() == ["result line", "after close"]
    err = r.stderr.splitlines()
    assert len(err) == len(OWN_ERR), err
    for own, line in zip(OWN_ERR, err, strict=True):
        assert own in line
    text = log.read_text()
    for line in LIBRARY + OWN_ERR + ["result line"]:
        assert line in text, line
    assert "after close" not in text


def test_verbose_console_shows_everything(tmp_path):
    r, log = _run(tmp_path, "verbose")
    shown = r.stdout + r.stderr
    for line in LIBRARY + OWN_ERR + ["result line"]:
        assert line in shown, line
    assert not log.exists()


@pytest.mark.slow
def test_demo_terminal_holds_only_the_runs_own_lines(tmp_path):
    # make demo's path: the deepspeed launcher, two ranks, ZeRO-2; 8 steps (too few for the demo's verdict that
    # every loss term improved, which may say no: the run itself must finish)
    r = subprocess.run([sys.executable, "-m", "repa_fast.demo", "--out", str(tmp_path / "demo"), "--steps", "8"],
                       capture_output=True, text=True, timeout=900)
    verdict_only = r.returncode == 1 and r.stderr.rstrip().splitlines()[-1].startswith("[demo] did not improve")
    assert r.returncode == 0 or verdict_only, r.stdout[-2000:] + r.stderr[-3000:]
    assert "[demo] 8 steps;" in r.stdout
    assert all(line.startswith("[demo] ") for line in r.stdout.splitlines()), r.stdout
    terminal = r.stdout + r.stderr
    assert not DEEPSPEED_LINE.search(terminal) and "[INFO]" not in terminal, terminal[-3000:]
    assert "Warning" not in terminal and "[transformers]" not in terminal, terminal[-3000:]
    bar = [part for part in re.split(r"[\r\n]", r.stderr) if part.startswith("tiny: ")]
    assert bar and "8/8" in bar[-1]  # the progress bar is there
    log = (tmp_path / "demo" / "run" / "console.log").read_text()
    assert re.search(r"\[INFO\] \[launch\.py:\d+:main\] dist_world_size=2", log)  # the launcher's lines
    assert "FutureWarning" in log and DEEPSPEED_LINE.search(log)  # the ranks' library output
    assert "[rank 0]" in log and "[rank 1]" in log
