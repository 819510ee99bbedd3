"""Files written whole or not at all: a temp file beside the target, renamed over it (no MindSpore here)."""
from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from src.errors import UserError


def periodic_checkpoints(directory: Path, prefix: str) -> list[Path]:
    """This model's periodic checkpoints `<prefix>-<epoch>_<step>.ckpt` in `directory`, oldest epoch first (here, not
    in engine/checkpoint.py, so that the launcher finds them without loading MindSpore)."""
    pattern = re.compile(rf"{re.escape(prefix)}-(\d+)_(\d+)\.ckpt")
    found = [(int(m.group(1)), p) for p in directory.glob(f"{prefix}-*.ckpt") if (m := pattern.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def write_atomically(path: Path, write: Callable[[Path], Any], errors: tuple = (OSError,)) -> None:
    """`write(tmp)` a temp file beside `path`, then rename it over `path`: a reader sees the old file or the
    whole new one. A failure (`errors`, e.g. a full disk) removes the temp file and is one UserError; `path` is
    unchanged."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:  # an interruption too: no temp file outlives a failed write
        tmp.unlink(missing_ok=True)
        if isinstance(exc, errors):
            raise write_error(path, exc) from None
        raise


def write_error(path: Path, exc: Exception) -> UserError:
    """One line for a file that could not be written (disk full, read-only, permissions); nothing was replaced."""
    text = str(exc)
    if getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in text:
        why = "no space left on the device (free some space or pass another --output_path)"
    elif getattr(exc, "errno", None) in (errno.EROFS, errno.EACCES, errno.EPERM) or "ermission" in text:
        why = f"{getattr(exc, 'strerror', None) or 'not writable'} (pass a writable --output_path)"
    else:
        why = f"{(text.strip().splitlines() or [type(exc).__name__])[0][:200]} (check the disk and the path)"
    return UserError(f"cannot write {path}: {why}; the earlier file, if any, is unchanged")
