"""The output folder of one training run: one run at a time, and an earlier run kept until this one has proved itself.

A fresh run into a folder that holds an earlier run's files (checkpoints, train.log, config.yaml, metrics.csv,
curves.png) changes none of them until its first epoch has ended: until then it logs to train.new.log. At the end
of the first epoch (before anything else is written) it commits: the earlier run's checkpoints are deleted,
train.new.log becomes train.log and config.yaml is written. A run that fails, diverges or is killed before that
leaves the earlier run exactly as it was (and its own log in train.new.log). A resumed run continues its own
files. A lock (output_path/.lock, holding the PID) refuses a second run into the same folder.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

from src.config import Config, save_config
from src.engine.checkpoint import periodic_checkpoints
from src.engine.history import EpochRecord, History
from src.errors import UserError
from src.logs import attach_log_file

log = logging.getLogger("train")
STAGED_LOG = "train.new.log"


def _writable_folder(path: Path, what: str) -> None:
    """Create `path` (and parents) or raise UserError saying why it cannot be used."""
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{what} {path} cannot be created: {parent} is a file (pass another --output_path)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{what} {path} is not writable ({exc.strerror}; pass a writable --output_path)") from None


class RunFolder:
    """Lock, staged log and the commit of a fresh run over an earlier one."""

    def __init__(self, cfg: Config, resuming: bool):
        self.cfg, self.resuming = cfg, resuming
        self.path = Path(cfg.output_path)
        self.ckpt_dir = self.path / "checkpoint"
        self.committed = resuming
        self._lock_fd: int | None = None

    def open(self) -> None:
        """Take the lock, create the folders and start the log (train.log when resuming, else train.new.log)."""
        _writable_folder(self.path, "output_path")
        self.ckpt_dir.mkdir(exist_ok=True)
        self._lock()
        for stale in [*self.path.glob(".tmp-*"), *self.ckpt_dir.glob(".tmp-*")]:  # left by a killed run
            stale.unlink()
        if self.resuming:
            attach_log_file(self.path / "train.log", append=True)
            save_config(self.cfg, self.path / "config.yaml")
        else:
            attach_log_file(self.path / STAGED_LOG)
            if self.earlier_run():
                log.info("%s holds an earlier run; it is kept until this run has finished its first epoch (this "
                         "run logs to %s until then)", self.path, STAGED_LOG)

    def earlier_run(self) -> list[Path]:
        """The earlier run's checkpoints, which a committed fresh run replaces."""
        best = self.ckpt_dir / "best.ckpt"
        return periodic_checkpoints(self.ckpt_dir, self.cfg.model) + ([best] if best.exists() else [])

    def commit(self, record: EpochRecord, history: History) -> None:
        """Epoch output, first in the list: at the first epoch's end, replace the earlier run by this one."""
        if self.committed:
            return
        stale = self.earlier_run()
        if stale:
            log.warning("replacing the earlier run in %s (%d checkpoints); use --output_path to keep runs apart, "
                        "or --resume_ckpt to continue one", self.path, len(stale))
        for path in stale:
            path.unlink()
        os.replace(self.path / STAGED_LOG, self.path / "train.log")  # the log handler keeps writing to it
        save_config(self.cfg, self.path / "config.yaml")
        self.committed = True

    def _lock(self) -> None:
        path = self.path / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise UserError(f"another training run (PID {holder}) is writing to {self.path} (wait for it to "
                                "finish, or pass another --output_path)") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd  # released by close(), or by the kernel when this process ends in any way

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
