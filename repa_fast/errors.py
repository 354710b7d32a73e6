"""Expected failures, and the one-line exit that every entry point gives them.

A ``RunError`` is a problem with what the user gave: a config key, a ds_config, a cache, a CSV row, the CLIP
table, a checkpoint, an image. Its message names the file, key or record and what to do. The entry points
(``repa-fast-train``, ``repa-fast-evaluate``, ``repa-fast-sample``, ``repa-fast-fid``, ``repa-fast-report``, the
preprocessing tools, ``repa-fast-check-cache``) run through ``run_main``, which prints that message as one line
on stderr and exits with status 1. Any other exception is a bug and keeps its traceback.

Under a launcher (``WORLD_SIZE`` > 1) the line names the rank that hit the problem. A rank whose collective
fails because another rank has left the run (gloo: "Connection closed by peer") stops with one line too,
pointing at the other rank's line; the deepspeed launcher then ends the ranks still running, so a failure on
one rank never leaves the others waiting in a collective.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")

# What gloo raises on the ranks still in a collective when another rank's process has ended.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer")
# The last line of a traceback printed as text: "package.module.ErrorClass: message".
_QUALIFIED_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Warning): ")


class RunError(Exception):
    """An expected failure caused by the run's inputs; the message says which input and what to do."""


class InputError(RunError, ValueError):
    """An option or file given to a tool holds a value that it cannot use."""


class MissingFileError(RunError, FileNotFoundError):
    """A file or folder that the run needs does not exist (or is not what it should be)."""


class NonFiniteError(RunError, FloatingPointError):
    """Values that must be finite are not (a loss, an encoded record)."""


def read_json(path: str | os.PathLike, remedy: str) -> dict:
    """The JSON object in ``path``, a file that a tool reads from the user's folders. A missing file is a
    ``MissingFileError``, a file that is not a JSON object an ``InputError``; both name the file and ``remedy``
    (what makes or fixes it)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{str(path)!r} does not exist; {remedy}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # also a file that is not UTF-8
        raise InputError(f"{path}: not valid JSON ({err}); {remedy}") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: holds a JSON {type(value).__name__}, expected an object; {remedy}")
    return value


def world_size() -> int:
    """The number of processes in the run: the launcher's ``WORLD_SIZE``, 1 when unset or empty."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank_prefix() -> str:
    """``"rank R: "`` in a multi-process run (the launcher's ``RANK`` / ``WORLD_SIZE``), else ``""``."""
    if world_size() > 1:
        return f"rank {os.environ.get('RANK', '?')}: "
    return ""


def one_line(err: BaseException) -> str:
    """The error's message on one line.

    An error re-raised from a worker process carries the worker's traceback as text (the torch DataLoader
    does this: ``Caught CacheError in DataLoader worker process 0. Original Traceback ...``); its message is
    the last line of that text, without the class name.
    """
    text = str(err).strip()
    if "Traceback (most recent call last)" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        return _QUALIFIED_ERROR_LINE.sub("", last) + " (raised in a worker process)"
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(err).__name__


def peer_lost(err: BaseException) -> str | None:
    """For the error of a collective whose peer process has ended, in a multi-process run, the words that
    say so (one of ``_PEER_LOST``); else None."""
    if world_size() <= 1 or not isinstance(err, RuntimeError):
        return None
    return next((s for s in _PEER_LOST if s in str(err)), None)


def fail(prog: str, message: str) -> NoReturn:
    """Print ``prog: [rank R: ]message`` on stderr and exit with status 1."""
    sys.stdout.flush()
    line = f"{prog}: {rank_prefix()}{message}"
    if rank_prefix() and os.environ.get("RANK", "0") != "0":
        line = "\n" + line  # rank 0's progress bar may hold the terminal's line
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        sys.stderr.write(line + "\n")
    else:
        tqdm.write(line, file=sys.stderr)  # clears and redraws this process's bar, if it has one
    sys.stderr.flush()
    raise SystemExit(1)


def run_main(prog: str, fn: Callable[..., T], *args: Any, expected: tuple[type[BaseException], ...] = (),
             **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``; a ``RunError`` (or one of ``expected``) ends the process with one line."""
    try:
        return fn(*args, **kwargs)
    except (RunError, *expected) as err:
        fail(prog, one_line(err))
    except Exception as err:
        reason = peer_lost(err)
        if reason is None:
            raise
        fail(prog, f"stopped: another rank left the run ({reason}); that rank's own line says why")
