"""A quiet console for training runs: the terminal shows the progress bar and the run's own lines; what the
libraries say goes to ``<output_dir>/console.log`` (``Console(log_path)``). ``--verbose`` leaves every
library's output on the terminal (and writes no log file).

Where each kind of output goes in a quiet run, in every process of the run:

- terminal (stderr): tqdm's bar; records of the ``repa_fast`` loggers at INFO and above; warnings issued
  by repa-fast's own code; ERROR records of any logger; tracebacks and the one-line errors.
- ``console.log``: everything above except the bar, plus the libraries' log records (DeepSpeed, diffusers,
  transformers, peft, torch), their warnings (FutureWarning, DeprecationWarning, ...) and whatever is
  printed on stdout: ``sys.stdout`` is the log while the run lasts, so the run's own results are printed
  with ``Console.print``. Ranks append to the same file, each line after ``[rank R]``.

Not caught: output that native code writes to the file descriptors itself (gloo, NCCL and DALI
warnings), and the launcher's own lines: the deepspeed runner logs from its own process (give it
``--log_level warning``, or send its stdout to a file as ``repa_fast.demo`` does).
"""

from __future__ import annotations

import datetime
import importlib.util
import io
import logging
import os
import sys
import warnings
from pathlib import Path

from repa_fast.errors import world_size

FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONSOLE_FORMAT = "%(asctime)s %(name)s: %(message)s"
# Libraries that attach their own stderr handler when first imported; importing their logging module
# early lets the console move that handler to the log.
_HANDLER_LIBRARIES = ("transformers.utils.logging", "diffusers.utils.logging")


def _own_dirs() -> tuple[str, ...]:
    """The folders of repa-fast's code (the package and its kernels): warnings from there are the run's."""
    dirs = [str(Path(__file__).resolve().parent)]
    spec = importlib.util.find_spec("repa_fast.kernels")
    if spec is not None and spec.submodule_search_locations:
        dirs += [str(Path(d).resolve()) for d in spec.submodule_search_locations]
    return tuple(d + os.sep for d in dirs)


def _is_own_logger(name: str) -> bool:
    return name == "repa_fast" or name.startswith("repa_fast.")


class _LogStream(io.TextIOBase):
    """A text stream into the log file that starts every line with ``prefix``."""

    def __init__(self, file, prefix: str):
        self.file, self.prefix, self._at_line_start = file, prefix, True

    def write(self, text: str) -> int:
        if self.prefix:
            lines = text.split("\n")
            out = []
            for i, line in enumerate(lines):
                if line and self._at_line_start:
                    out.append(self.prefix)
                out.append(line)
                if i < len(lines) - 1:
                    out.append("\n")
                    self._at_line_start = True
                elif line:
                    self._at_line_start = False
            self.file.write("".join(out))
        else:
            self.file.write(text)
        return len(text)

    def flush(self) -> None:
        self.file.flush()

    def fileno(self) -> int:  # a subprocess given sys.stdout writes into the log directly
        return self.file.fileno()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:
        return self.file.encoding


class _ConsoleFilter(logging.Filter):
    """The records that the terminal shows: repa-fast's own, and errors from anyone."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _is_own_logger(record.name) or record.levelno >= logging.ERROR


class Console:
    """The process's console set-up (see the module docstring); ``close`` restores what it changed."""

    def __init__(self, log_path: str | os.PathLike | None, verbose: bool = False):
        self.rank_tag = f"[rank {os.environ.get('RANK', '0')}] " if world_size() > 1 else ""
        self.verbose = verbose
        self.stdout, self.stderr = sys.stdout, sys.stderr
        self.log_path = Path(log_path) if log_path is not None else None
        self.log: _LogStream | None = None
        self._file = None
        self._root_state = (logging.root.level, list(logging.root.handlers))
        self._moved: list[tuple[logging.StreamHandler, object]] = []
        self._added: list[tuple[logging.Logger, logging.Handler]] = []
        self._showwarning = warnings.showwarning
        console = logging.StreamHandler(self.stderr)
        console.setFormatter(logging.Formatter(self.rank_tag + CONSOLE_FORMAT))
        logging.root.handlers = [console]
        logging.root.setLevel(logging.INFO)
        if verbose or self.log_path is None:
            return
        console.addFilter(_ConsoleFilter())
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (open for the run)
        self.log = _LogStream(self._file, self.rank_tag)
        self.log.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')} pid {os.getpid()}: "
                       f"{' '.join(sys.argv)}\n")
        to_file = logging.StreamHandler(self.log)
        to_file.setFormatter(logging.Formatter(FILE_FORMAT))
        logging.root.addHandler(to_file)
        sys.stdout = self.log
        self._own_dirs = _own_dirs()
        warnings.showwarning = self._show_warning
        self.capture_libraries(import_known=False)

    def capture_libraries(self, import_known: bool = True) -> None:
        """Move the libraries' terminal handlers to the log. ``import_known`` first imports the logging of
        the libraries that make such a handler on import (transformers, diffusers; some seconds), so that
        theirs exists to be moved; call it once the cheap checks of the inputs have passed."""
        if self.log is None:
            return
        if import_known:
            for module in _HANDLER_LIBRARIES:
                if importlib.util.find_spec(module.split(".")[0]) is not None:
                    importlib.import_module(module).get_logger()  # creates the library's handler
        for name, logger in list(logging.root.manager.loggerDict.items()):
            if not isinstance(logger, logging.Logger) or _is_own_logger(name):
                continue
            added = [h for lg, h in self._added if lg is logger]
            for handler in logger.handlers:
                if handler not in added and isinstance(handler, logging.StreamHandler) and \
                        handler.stream in (self.stdout, self.stderr):
                    self._moved.append((handler, handler.stream))
                    handler.setStream(self.log)
            logs_here = any(getattr(h, "stream", None) is self.log for h in logger.handlers)
            if logs_here and not logger.propagate and not added:  # errors still reach the terminal
                errors = logging.StreamHandler(self.stderr)
                errors.setLevel(logging.ERROR)
                errors.setFormatter(logging.Formatter(self.rank_tag + CONSOLE_FORMAT))
                logger.addHandler(errors)
                self._added.append((logger, errors))

    def _show_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        self.log.write(warnings.formatwarning(message, category, filename, lineno, line))
        if str(Path(filename).resolve()).startswith(self._own_dirs):
            self.stderr.write(f"{self.rank_tag}{category.__name__}: {message}\n")

    def print(self, *args, **kwargs) -> None:
        """``print`` on the terminal (stdout), and into the log."""
        print(*args, **kwargs, file=self.stdout)
        if self.log is not None:
            print(*args, **kwargs, file=self.log)

    def close(self) -> None:
        for handler, stream in self._moved:
            handler.setStream(stream)
        for logger, handler in self._added:
            logger.removeHandler(handler)
        self._moved, self._added = [], []
        if self.log is not None and sys.stdout is self.log:
            sys.stdout = self.stdout
        warnings.showwarning = self._showwarning
        logging.root.setLevel(self._root_state[0])
        logging.root.handlers = self._root_state[1]
        if self._file is not None:
            self._file.close()
            self._file, self.log = None, None

