"""Logging to the console (through tqdm, so a progress bar stays intact) and to a log file."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

LOGGER = "train"


WARNING_PREFIX = "warning: "


class _Lines(logging.Formatter):
    """The message alone; a warning starts with `warning: ` (as an error line starts with `error: `), so that it
    stands out among the log lines on the console and in the log file."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if record.levelno == logging.WARNING and not line.startswith(WARNING_PREFIX):
            line = WARNING_PREFIX + line
        return line


class _EarlyLines(logging.Handler):
    """Keeps the lines logged before the output folder exists, for the log file."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:  # stdout closed (`python train.py | head`): the run goes on, the console stays silent
            self.setLevel(logging.CRITICAL + 1)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _LogFile(logging.FileHandler):
    """The run's log file. A write that fails (a full disk) is remembered, not printed line by line: the next
    checkpoint or metrics write fails on the same disk with one clear line, and `log_file_error` tells it too."""

    error: OSError | None = None

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            _LogFile.error = _LogFile.error or exc
            return
        super().handleError(record)


def log_file_error() -> OSError | None:
    """The first error writing the run's log file, if any."""
    return _LogFile.error


def quiet_mindspore() -> None:
    """MindSpore's C++ log prints INFO/WARNING noise to stderr; keep only its errors unless the user chose."""
    os.environ.setdefault("GLOG_v", "3")


def setup_console_logging() -> logging.Logger:
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(_Lines("%(message)s"))
        logger.addHandler(handler)
        logger.addHandler(_EarlyLines())
    return logger


def attach_log_file(path: Path, append: bool = False) -> None:
    """Also write every line to `path` (created or, when append is False, started afresh)."""
    logger = logging.getLogger(LOGGER)
    for h in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        logger.removeHandler(h)
        h.close()
    handler = _LogFile(path, mode="a" if append else "w", encoding="utf-8")
    handler.setFormatter(_Lines("%(message)s"))
    for early in [h for h in logger.handlers if isinstance(h, _EarlyLines)]:
        for record in early.records:
            handler.handle(record)
        logger.removeHandler(early)
    logger.addHandler(handler)
