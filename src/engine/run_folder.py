"""The output folder of one training run: one run at a time, and an earlier run kept until this one has proved itself.

A fresh run into a folder that holds an earlier run's files (checkpoints, train.log, config.yaml, metrics.csv,
curves.png) changes none of them until its first epoch has ended: until then it logs to train.new.log. At the end
of the first epoch (before anything else is written) it commits: the earlier run's files are moved aside into
output_path/.earlier-run/ (a manifest first, then one rename per file), train.new.log becomes train.log and
config.yaml is written. When the first epoch's outputs (best.ckpt, metrics, the periodic checkpoint) are all
written, the run settles: the manifest is deleted, then the earlier files. A run that fails, diverges or is
interrupted before it settles puts the earlier run back byte for byte (its own log stays in train.new.log); a run
killed with SIGKILL in that window is put back by the next run into the folder. A resumed run appends to train.log
and rewrites config.yaml at the end of its first epoch. A lock (output_path/.lock, holding the PID) refuses a
second run into the same folder.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import time
from pathlib import Path

from src.config import Config, save_config
from src.engine.checkpoint import periodic_checkpoints
from src.engine.history import EpochRecord, History
from src.errors import UserError, writable_folder
from src.files import write_atomically, write_error
from src.logs import attach_log_file, log_file_error

log = logging.getLogger("train")
STAGED_LOG = "train.new.log"


ASIDE = ".earlier-run"
MANIFEST = "MANIFEST"
RUN_FILES = ("train.log", "config.yaml", "metrics.csv", "curves.png", "per_class.csv", "confusion_matrix.png")
# --tracker tensorboard's event folder (engine/trackers.py): set aside and put back whole, as a run file; a fresh run
# writes to the staged one until it commits, as its log goes to train.new.log
TENSORBOARD, STAGED_TENSORBOARD = "tensorboard", "tensorboard.new"
EXPORTS = (".onnx", ".mindir", ".air")  # export.py's files in the folder: made from its run's best.ckpt
WAIT_FOR_SETTLING = 30.0  # seconds a reader waits for a live run to settle (its commit window lasts seconds)


class RunFolder:
    """Lock, staged log, and the commit of a fresh run over an earlier one (with the way back)."""

    def __init__(self, cfg: Config, resuming: bool):
        self.cfg, self.resuming = cfg, resuming
        self.path = Path(cfg.output_path)
        self.ckpt_dir = self.path / "checkpoint"
        self.aside = self.path / ASIDE
        self.committed = self.settled = resuming
        self._config_written = False
        self._lock_fd: int | None = None

    def open(self) -> None:
        """Take the lock, create the folders and start the log (train.log when resuming, else train.new.log)."""
        writable_folder(self.path, "output_path", "--output_path")
        self.ckpt_dir.mkdir(exist_ok=True)
        self._lock()
        _remove_temp_files(self.path)
        if self.aside.is_dir():  # a run was killed between its commit and settling, or while settling
            restored = self._restore()
            if restored:
                log.warning("%s: put back the earlier run that a killed run had set aside (%d files)", self.path,
                            restored)
        if self.resuming:
            attach_log_file(self.path / "train.log", append=True)
        else:
            shutil.rmtree(self.path / STAGED_TENSORBOARD, ignore_errors=True)  # a failed fresh run's
            attach_log_file(self.path / STAGED_LOG)
            if self.earlier_run():
                log.info("%s holds an earlier run; it is kept until this run has finished its first epoch (this "
                         "run logs to %s until then)", self.path, STAGED_LOG)

    def run_files(self) -> list[Path]:
        """The files a run of this model writes here (but the staged log and the exports)."""
        return _run_files(self.path, self.cfg.model)

    def replaced_files(self) -> list[Path]:
        """What a fresh run replaces: the run files and the models exported from them (a stale export would be
        evaluated as if it were the new run's)."""
        return self.run_files() + _exports(self.path)

    def check_resume_target(self, ckpt: Path) -> None:
        """A resumed run appends to the folder's run: one that holds another run (checkpoints of its own, not the
        one resumed from) is refused, or that run's checkpoints, best.ckpt and metrics would be replaced."""
        own = ckpt.resolve().parent == self.ckpt_dir.resolve()
        others = self.run_files() if not own else []
        if others:
            home = ckpt.resolve().parent.parent
            raise UserError(f"output_path {self.path} holds another run ({len(others)} files, "
                            f"{len(self.earlier_run())} of them checkpoints) and resume_ckpt {ckpt} is not one of "
                            "its checkpoints: resuming would replace that run (resume into the checkpoint's own "
                            f"folder, --output_path {home}, or pass a new --output_path)")

    def earlier_run(self) -> list[Path]:
        """The earlier run's checkpoints."""
        return [p for p in self.run_files() if p.parent == self.ckpt_dir]

    def commit(self, record: EpochRecord, history: History) -> None:
        """Epoch output, first in the list: at the first epoch's end, set the earlier run aside for this one."""
        if log_file_error():  # the log could not be written (a full disk): stop before anything else is replaced
            raise write_error(self.path / ("train.log" if self.committed else STAGED_LOG), log_file_error())
        if self.committed:
            if not self._config_written:  # a resumed run
                save_config(self.cfg, self.path / "config.yaml")
                self._config_written = True
            return
        earlier = self.replaced_files()
        if self.earlier_run():
            log.warning("replacing the earlier run in %s (%d checkpoints); use --output_path to keep runs apart, "
                        "or --resume_ckpt to continue one", self.path, len(self.earlier_run()))
        if earlier:
            names = [str(p.relative_to(self.path)) for p in earlier]
            (self.aside / "checkpoint").mkdir(parents=True, exist_ok=True)
            # from here on, a failure puts these back
            write_atomically(self.aside / MANIFEST, lambda tmp: tmp.write_text("".join(f"{n}\n" for n in names)))
            self.committed = True
            for name in names:
                os.replace(self.path / name, self.aside / name)
        self.committed = True
        os.replace(self.path / STAGED_LOG, self.path / "train.log")  # the log handler keeps writing to it
        if (self.path / STAGED_TENSORBOARD).is_dir():  # and the event writer to its file
            os.replace(self.path / STAGED_TENSORBOARD, self.path / TENSORBOARD)
        save_config(self.cfg, self.path / "config.yaml")
        self._config_written = True

    @property
    def tensorboard_dir(self) -> Path:
        """Where this run's TensorBoard events go: tensorboard/ once it has committed (or resumes), the staged
        folder before (moved into place at the commit, while its writer goes on writing)."""
        return self.path / (TENSORBOARD if self.committed else STAGED_TENSORBOARD)

    @property
    def log_file(self) -> Path:
        """This run's log: train.log once the run has committed (or resumes), train.new.log before."""
        return self.path / ("train.log" if self.committed else STAGED_LOG)

    def settle(self, record: EpochRecord, history: History) -> None:
        """Epoch output, last in the list: the first epoch's files are all written, so the earlier run goes."""
        if self.settled:
            return
        self.settled = True
        if self.aside.is_dir():
            (self.aside / MANIFEST).unlink(missing_ok=True)  # first: without it nothing is ever put back
            shutil.rmtree(self.aside, ignore_errors=True)

    def abort(self) -> None:
        """The run failed or was interrupted: before it settled, put the earlier run back."""
        if self.committed and not self.settled and not self.resuming and self.aside.is_dir():
            try:
                restored = self._restore()
            except OSError as exc:  # the next run into the folder tries again
                log.warning("could not put the earlier run in %s back yet (%s); the next run into it will", self.path,
                            exc)
                return
            log.warning("this run ended in its first epoch: the earlier run in %s was put back (%d files); this "
                        "run's log is %s", self.path, restored, self.path / STAGED_LOG)

    def _restore(self) -> int:
        return _put_back(self.path, self.cfg.model)

    def _lock(self) -> None:
        fd, holder = _try_lock(self.path)
        if fd is None:
            raise UserError(f"another training run (PID {holder}) is writing to {self.path} (wait for it to "
                            "finish, or pass another --output_path)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd  # released by close(), or by the kernel when this process ends in any way

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _try_lock(path: Path) -> tuple[int | None, str]:
    """Take the folder's lock without waiting: (its descriptor, "") or, while another process holds it, (None, the
    PID it wrote there). Closing the descriptor releases the lock."""
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return None, holder
        raise
    return fd, ""


def _remove_temp_files(path: Path) -> None:
    """The temp files a killed run left in the folder and its checkpoint folder."""
    for stale in [*path.glob(".tmp-*"), *(path / "checkpoint").glob(".tmp-*")]:
        stale.unlink()


def _run_files(path: Path, model: str | None) -> list[Path]:
    """The run files in `path`, with the periodic checkpoints of `model` (of no model when None)."""
    best = path / "checkpoint" / "best.ckpt"
    events = [path / TENSORBOARD] if (path / TENSORBOARD).is_dir() else []
    return [p for p in (*(path / name for name in RUN_FILES), best) if p.is_file()] + events + \
        (periodic_checkpoints(path / "checkpoint", model) if model else [])


def _exports(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix.lower() in EXPORTS and p.is_file()
                  and not p.name.startswith("."))  # not an export being written


def _put_back(path: Path, model: str | None) -> int:
    """Undo a commit from the manifest (idempotent, so a run killed while restoring is finished by the next):
    the killed run's files go (its log becomes train.new.log), the earlier run's files come back. The killed run's
    model is read from the config.yaml it wrote at its commit; `model` (the next run's, or None) stands in when
    that is not there."""
    aside = path / ASIDE
    manifest = aside / MANIFEST
    if not manifest.is_file():  # settled: the earlier files were being deleted
        shutil.rmtree(aside, ignore_errors=True)
        return 0
    names = [line for line in manifest.read_text().splitlines() if line]
    if (aside / "train.log").is_file() and (path / "train.log").is_file():
        os.replace(path / "train.log", path / STAGED_LOG)
    killed_model = _model_of(path / "config.yaml") if "config.yaml" not in names or (aside / "config.yaml").is_file() \
        else None
    # the killed run's periodic checkpoints: of its own model (another model's were not set aside, and stay)
    for found in {*_run_files(path, killed_model or model), *_exports(path)}:
        name = str(found.relative_to(path))
        if found.is_dir():  # events: the killed run's (unless the earlier run's were not yet set aside) are staged
            if name not in names or (aside / name).exists():  # again, as its log
                shutil.rmtree(path / STAGED_TENSORBOARD, ignore_errors=True)
                os.replace(found, path / STAGED_TENSORBOARD)
        elif name not in names:
            found.unlink()
    restored = 0
    for name in names:
        if (aside / name).exists():
            restored += sum(1 for p in (aside / name).rglob("*") if p.is_file()) if (aside / name).is_dir() else 1
            os.replace(aside / name, path / name)
    manifest.unlink()
    shutil.rmtree(aside, ignore_errors=True)
    return restored


def _model_of(config: Path) -> str | None:
    import yaml

    try:
        model = yaml.safe_load(config.read_text()).get("model")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return model if isinstance(model, str) and "/" not in model else None


def settled_for_reading(path: str | Path, flag: str) -> None:
    """Before eval.py, export.py, predict.py or eval_onnx.py read a run folder's files: a run killed with SIGKILL
    between its commit and settling leaves its first-epoch files in place and the earlier run set aside (an epoch-1
    best.ckpt would be evaluated, or none found). With no run holding the folder, put the earlier run back, as the
    next training run into it would; while a live run is in that window (seconds), wait for it; refuse if it stays."""
    path = Path(path)
    manifest = path / ASIDE / MANIFEST
    if not manifest.is_file():
        return
    deadline = time.monotonic() + WAIT_FOR_SETTLING
    while True:
        try:
            fd, holder = _try_lock(path)
        except OSError as exc:
            raise _cannot_put_back(path, exc) from None
        if fd is None:
            if not manifest.is_file():
                return  # the live run has settled
            if time.monotonic() >= deadline:
                raise UserError(f"the run folder {path} is being replaced by a training run (PID {holder}) that has "
                                "set the earlier run aside and not finished its first epoch's files (wait for that "
                                f"run's first epoch to end, or pass --{flag} with a file of another folder)") from None
            time.sleep(0.2)
            continue
        try:
            if manifest.is_file():
                _remove_temp_files(path)
                restored = _put_back(path, None)
                log.warning("%s: put back the earlier run that a killed training run had set aside (%d files); "
                            "the killed run's log is %s", path, restored, path / STAGED_LOG)
            return
        except OSError as exc:
            raise _cannot_put_back(path, exc) from None
        finally:
            os.close(fd)  # releases the lock


def _cannot_put_back(path: Path, exc: OSError) -> UserError:
    return UserError(f"the run folder {path} holds an earlier run that a killed training run set aside ({ASIDE}/), "
                     f"and it cannot be put back from here ({exc.strerror or exc}; make the folder writable and run "
                     "again)")
