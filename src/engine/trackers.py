"""Experiment trackers (`--tracker tensorboard,mlflow`): the run's curves where a team watches and compares runs.

Rank 0 only. The run's own files (train.log, metrics.csv, the checkpoints) stay the record: a tracker that cannot
be reached when the run starts ends it with one line before compile; one that fails later warns once and is off for
the rest of the run.

- TensorBoard (tensorboardX, no TensorFlow): event files in output_path/tensorboard/ (a fresh run writes them to
  tensorboard.new/ until its first epoch ends, as its log goes to train.new.log, and an earlier run's stay until
  then). Scalars on one x-axis, the global optimizer step: train loss, top-1, top-5, LR and images/s at print_freq;
  val top-1/top-5, the epoch's mean loss, LR, time and images/s at each epoch's end; the resolved config as text;
  the confusion matrix at the end. A resumed run appends with TensorBoard's purge step: the steps after the
  checkpoint that an interrupted run had logged are dropped, so every step is shown once.
- MLflow: the resolved config as params, metrics.csv's columns per epoch (step = epoch), and config.yaml,
  curves.png, per_class.csv, confusion_matrix.png and best.ckpt as artifacts at the end. An epoch is logged once a
  periodic checkpoint holds it (each epoch with save_checkpoint_epochs 1), so a resumed run, which goes on in the
  same MLflow run (its id is in the checkpoint), logs no epoch twice. The store is mlflow_uri, else
  MLFLOW_TRACKING_URI, else the SQLite database output_path/mlflow.db (artifacts in output_path/mlartifacts), which
  `mlflow ui` opened in output_path shows.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from src.config import Config, config_text, list_items
from src.engine.history import EpochRecord, History
from src.errors import UserError

log = logging.getLogger("train")
TENSORBOARD_DIR = "tensorboard"
STAGED_TENSORBOARD_DIR = "tensorboard.new"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
ARTIFACTS = ("config.yaml", "curves.png", "per_class.csv", "confusion_matrix.png", "checkpoint/best.ckpt")
# one failed request must not hold training for minutes (MLflow's own defaults: 7 retries, 120 s timeout)
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                        "MLFLOW_LOGGING_LEVEL": "WARNING"}


class TensorBoard:
    """Event files written in this thread (tensorboardX's SummaryWriter queues them for a thread of its own, whose
    flush leaves the queued events unwritten: an epoch's scalars were lost to a kill long after the epoch's end)."""

    name = "TensorBoard"
    FLUSH_SECONDS = 20.0

    def __init__(self, logdir: Path, purge_step: int | None, cfg: Config):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self.Event = Event
        logdir.mkdir(parents=True, exist_ok=True)
        self.fresh = not any(logdir.glob("events.out.tfevents.*"))
        # the name holds the start second only: two writers started in one second would share a file, or be read
        # in either order (TensorBoard reads a folder's files in name order, and a purge step applies to the files
        # before its own)
        self.events = EventsWriter(str(logdir / "events"), filename_suffix=f".{time.time_ns()}.{os.getpid()}")
        if purge_step is not None and not self.fresh:  # TensorBoard drops the earlier files' steps from here on
            self.events.write_event(Event(wall_time=time.time(), step=purge_step,
                                          session_log=SessionLog(status=SessionLog.START)))
        if self.fresh:
            from tensorboardX.summary import text

            self._write(text("config", "".join(f"    {line}\n" for line in config_text(cfg).splitlines())), 0)
        self.flush()

    def _write(self, summary, step: int) -> None:
        self.events.write_event(self.Event(wall_time=time.time(), step=int(step), summary=summary))

    def _scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX.summary import scalar

        self._write(scalar(tag, float(value)), step)

    def flush(self) -> None:
        self.events.flush()
        self.flushed = time.monotonic()

    def backfill(self, history: History) -> None:
        """A resumed run whose earlier attempt had no TensorBoard: its epochs from metrics.csv."""
        if self.fresh:
            for record in history.records:
                self.epoch(record, 0)

    def step(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self._scalar(f"train/{key}", value, step)
        if time.monotonic() - self.flushed > self.FLUSH_SECONDS:  # a long epoch's curve, live
            self.flush()

    def epoch(self, record: EpochRecord, images: int) -> None:
        step = record.step
        self._scalar("epoch/loss", record.loss, step)
        self._scalar("epoch/lr", record.lr, step)
        self._scalar("epoch/time_s", record.epoch_time_s, step)
        if record.epoch_time_s > 0 and images:
            self._scalar("epoch/images_per_s", images / record.epoch_time_s, step)
        if record.val_top1 is not None:
            self._scalar("val/top1", record.val_top1, step)
            self._scalar("val/top5", record.val_top5, step)
        self.flush()

    def checkpointed(self, history: History) -> None:
        pass

    def finish(self, out: Path, history: History, files: bool) -> None:
        png = out / "confusion_matrix.png"
        if files and png.is_file() and history.records:
            from PIL import Image
            from tensorboardX.summary import image

            with Image.open(png) as picture:
                pixels = np.asarray(picture.convert("RGB"))
            self._write(image("val/confusion_matrix", pixels, dataformats="HWC"), history.records[-1].step)
        self.close()

    def fail(self, status: str) -> None:
        self.close()

    def close(self) -> None:
        self.events.close()


class MLflow:
    name = "MLflow"

    def __init__(self, cfg: Config, resumed: tuple[str, int] | None):
        """`resumed`: the resumed checkpoint's MLflow run and epoch."""
        out = Path(cfg.output_path).resolve()
        self.uri, default = tracking_uri(cfg)
        if default:
            _relocate(out)
        experiment_name = cfg.mlflow_experiment or cfg.model
        try:
            self.client = client = mlflow_client(self.uri)
            experiment = client.get_experiment_by_name(experiment_name)
            if experiment is None:
                location = (out / MLFLOW_ARTIFACTS).as_uri() if default else None
                experiment_id = client.create_experiment(experiment_name, artifact_location=location)
            else:
                experiment_id = experiment.experiment_id
            self.run_id, self.logged = self._run(cfg, experiment_id, resumed, out)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - MLflow raises its own, requests' and SQLAlchemy's errors
            fix = f"move the damaged {out / MLFLOW_DB} aside, or pass --mlflow_uri" if default else \
                "start the tracking server, fix --mlflow_uri / MLFLOW_TRACKING_URI"
            raise UserError(f"MLflow at {self.uri} cannot be reached or refused the run ({_short(exc)}; {fix}, or "
                            "drop mlflow from --tracker)") from None
        log.info("MLflow: run %s in experiment %r at %s", self.run_id, experiment_name, self.uri)

    def _run(self, cfg: Config, experiment_id: str, resumed: tuple[str, int] | None, out: Path
             ) -> tuple[str, set[int]]:
        """The MLflow run: the resumed checkpoint's (when this store has it and it has no epoch past the
        checkpoint's), else a new one with the config as params; and the epochs it has logged."""
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        client = self.client
        tags = {"output_path": str(out), "model": cfg.model}
        if resumed:
            run_id, epochs_done = resumed
            try:
                run = client.get_run(run_id)
            except MlflowException:
                log.warning("the resumed checkpoint's MLflow run %s is not in %s: this run logs to a new one",
                            run_id, self.uri)
            else:
                logged = {m.step for m in client.get_metric_history(run_id, "loss")}
                if not any(epoch > epochs_done for epoch in logged):
                    client.update_run(run_id, status="RUNNING")
                    return run_id, logged
                # MLflow cannot take back logged values: the epochs after the checkpoint would be there twice
                log.warning("MLflow run %s has epochs up to %d, past the checkpoint resumed (epoch %d, an older one "
                            "than its last): this run logs to a new MLflow run, with the first %d epochs from "
                            "metrics.csv", run_id, max(logged), epochs_done, epochs_done)
                client.set_terminated(run_id, "KILLED")
                tags["mlflow.parentRunId"] = run_id
        run = client.create_run(experiment_id, run_name=cfg.mlflow_run_name or out.name, tags=tags)
        params = [Param(key, str(value)[:6000]) for key, value in cfg.to_dict().items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            client.log_batch(run.info.run_id, params=params[start:start + 100])
        return run.info.run_id, set()

    def step(self, step: int, scalars: dict[str, float]) -> None:
        pass  # per epoch only: a remote store is not asked every print_freq steps

    def epoch(self, record: EpochRecord, images: int) -> None:
        pass  # logged once a checkpoint holds it (`checkpointed`)

    def backfill(self, history: History) -> None:
        self.checkpointed(history)

    def checkpointed(self, history: History) -> None:
        """Log the epochs that a checkpoint now holds and MLflow does not yet."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        for r in history.records:
            if r.epoch in self.logged:
                continue
            values = {"loss": r.loss, "lr": r.lr, "epoch_time_s": r.epoch_time_s, "val_top1": r.val_top1,
                      "val_top5": r.val_top5}
            metrics += [Metric(key, float(v), now, r.epoch) for key, v in values.items() if v is not None]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])
        self.logged.update(r.epoch for r in history.records)

    def finish(self, out: Path, history: History, files: bool) -> None:
        self.checkpointed(history)  # a --max_steps run ends between checkpoints
        for name in ARTIFACTS if files else ():
            path = out / name
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path), artifact_path=str(Path(name).parent)
                                         if "/" in name else None)
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def mlflow_client(uri: str | None):
    """MLflow's client of the store `uri` (None: only check that mlflow is installed)."""
    for key, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise UserError("--tracker mlflow needs the mlflow package (pip install -r requirements-tracking.txt, or "
                        "drop mlflow from --tracker)") from None
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines as a database is created
    return MlflowClient(tracking_uri=uri) if uri is not None else None


def check_reachable(cfg: Config) -> None:
    """Before the output folder is touched: MLflow is installed and a store of its own (not the default one in
    output_path, made with the run) answers."""
    if "mlflow" not in tracker_names(cfg.tracker):
        return
    uri, default = tracking_uri(cfg)
    if default:  # made with the run, in the output folder: not before the folder's own checks
        mlflow_client(None)
        return
    try:
        mlflow_client(uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own, requests' and SQLAlchemy's errors
        raise UserError(f"MLflow at {uri} cannot be reached ({_short(exc)}; start the tracking server, fix "
                        "--mlflow_uri / MLFLOW_TRACKING_URI, or drop mlflow from --tracker)") from None


def tracking_uri(cfg: Config) -> tuple[str, bool]:
    """The MLflow store and whether it is the default one in output_path."""
    if cfg.mlflow_uri:
        return cfg.mlflow_uri, False
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], False
    return f"sqlite:///{Path(cfg.output_path).resolve() / MLFLOW_DB}", True


def _relocate(out: Path) -> None:
    """The default store records its artifact folder by absolute path: a run folder that was moved or copied (a
    restarted ModelArts job's copy of train_url, say) points it at its own again."""
    db, here = out / MLFLOW_DB, (out / MLFLOW_ARTIFACTS).as_uri()
    if not db.is_file():
        return
    try:
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT artifact_location FROM experiments").fetchall()
            for (location,) in rows:
                if location and location.endswith(f"/{MLFLOW_ARTIFACTS}") and location != here:
                    conn.execute("UPDATE experiments SET artifact_location = ? WHERE artifact_location = ?",
                                 (here, location))
                    conn.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                                 "WHERE artifact_uri LIKE ? || '/%'", (here, len(location) + 1, location))
    except sqlite3.Error as exc:
        log.warning("could not point %s at %s (%s): artifacts go where it says", db, here, exc)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class Trackers:
    """The run's trackers; each call goes to every one still on. A failure warns once and turns that tracker off."""

    def __init__(self, backends: list):
        self.backends = backends
        self.images_per_epoch = 0  # of all ranks, for the epoch's images/s
        self.history = History()

    @property
    def on(self) -> bool:
        return bool(self.backends)

    def attach(self, history: History) -> None:
        """The run's history (a resumed run's from metrics.csv): the epochs a resumed run's trackers lack are
        logged now (an MLflow run killed before it logged a checkpointed epoch; a tracker added on resume)."""
        self.history = history
        if history.records:
            self._each(lambda b: b.backfill(history))

    @property
    def mlflow_run_id(self) -> str | None:
        return next((b.run_id for b in self.backends if isinstance(b, MLflow)), None)

    def _each(self, call: Callable[[object], None]) -> None:
        for backend in list(self.backends):
            try:
                call(backend)
            except Exception as exc:  # noqa: BLE001 - a tracker never ends the run
                self.backends.remove(backend)
                log.warning("%s tracking failed (%s): it is off for the rest of this run; train.log, metrics.csv "
                            "and the checkpoints hold everything", backend.name, _short(exc))
                _close_quietly(backend)

    def step(self, step: int, scalars: dict[str, float]) -> None:
        self._each(lambda b: b.step(step, scalars))

    def epoch(self, record: EpochRecord, history: History) -> None:
        """An epoch output."""
        self._each(lambda b: b.epoch(record, self.images_per_epoch))

    def checkpointed(self, history: History) -> None:
        self._each(lambda b: b.checkpointed(history))

    def finish(self, out: Path, files: bool = True) -> None:
        """The run ended well; `files`: the output folder's files are this run's (artifacts to keep)."""
        self._each(lambda b: b.finish(out, self.history, files))
        self.backends = []

    def fail(self, status: str) -> None:
        """The run failed (FAILED) or was interrupted (KILLED)."""
        self._each(lambda b: b.fail(status))
        self.backends = []


def _close_quietly(backend) -> None:
    try:
        if isinstance(backend, TensorBoard):
            backend.close()
    except Exception:  # noqa: BLE001, S110 - already warned about this tracker
        pass


NO_TRACKERS = Trackers([])


def open_trackers(cfg: Config, logdir: Path | None, purge_step: int | None,
                  resumed: tuple[str, int] | None) -> Trackers:
    """The trackers of `cfg.tracker`, connected (UserError when one cannot be); `logdir`: the TensorBoard folder."""
    names = tracker_names(cfg.tracker)
    backends = []
    try:
        if "mlflow" in names:
            backends.append(MLflow(cfg, resumed))
        if "tensorboard" in names and logdir is not None:
            backends.append(TensorBoard(logdir, purge_step, cfg))
    except BaseException:
        Trackers(backends).fail("FAILED")
        raise
    return Trackers(backends)


def tracker_names(text: str) -> list[str]:
    return [name for name in list_items(text) if name != "none"]
