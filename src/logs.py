"""Logging to the console (through tqdm, so a progress bar stays intact) and to a log file."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

LOGGER = "train"


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
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def quiet_mindspore() -> None:
    """MindSpore's C++ log prints INFO/WARNING noise to stderr; keep only its errors unless the user chose."""
    os.environ.setdefault("GLOG_v", "3")


def setup_console_logging() -> logging.Logger:
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.addHandler(_EarlyLines())
    return logger


def attach_log_file(path: Path, append: bool = False) -> None:
    """Also write every line to `path` (created or, when append is False, started afresh)."""
    logger = logging.getLogger(LOGGER)
    for h in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        logger.removeHandler(h)
        h.close()
    handler = logging.FileHandler(path, mode="a" if append else "w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    for early in [h for h in logger.handlers if isinstance(h, _EarlyLines)]:
        for record in early.records:
            handler.handle(record)
        logger.removeHandler(early)
    logger.addHandler(handler)
