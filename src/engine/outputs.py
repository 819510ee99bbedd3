"""What rank 0 writes after each epoch, in an order the code fixes (`EpochOutputs`): the run folder's commit, the
loss alarm, best.ckpt, metrics.csv + curves.png, per_class.csv + confusion_matrix.png, the periodic checkpoint (an
upload after it, on ModelArts, carries the others), the run folder's settle.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path

from mindspore import nn

from src.cloud import upload_outputs
from src.config import Config
from src.data.checks import DataSource
from src.data.transforms import preprocessing
from src.engine.checkpoint import SCHEDULE_KEYS, arch_meta, periodic_checkpoints, read_checkpoint, save_checkpoint
from src.engine.history import EpochRecord, History, plot_curves, write_metrics
from src.engine.run_folder import RunFolder
from src.engine.trackers import Trackers
from src.engine.train_step import STATS_PREFIX, ema_by_name

log = logging.getLogger("train")
EpochOutput = Callable[[EpochRecord, History], None]


@dataclasses.dataclass(frozen=True)
class EpochOutputs:
    """The epoch outputs by job; `__call__` runs them in field order, which is the order that keeps every file of
    the run folder complete:
    - `commit` first: a fresh run's folder becomes this run's (the earlier run's files move aside) before any write;
    - the trackers' epoch (TensorBoard's scalars) before the periodic checkpoint, whose upload carries them;
    - the periodic checkpoint after every file it must carry (MLflow's epochs, then an upload on ModelArts, follow
      it);
    - `settle` last: the earlier run's files go once this run's first epoch is all written.
    """

    commit: EpochOutput
    alarm: EpochOutput
    best: EpochOutput
    metrics: EpochOutput
    per_class: EpochOutput | None
    track: EpochOutput
    periodic: EpochOutput
    settle: EpochOutput

    def __call__(self, record: EpochRecord, history: History) -> None:
        for job in dataclasses.fields(self):
            if (output := getattr(self, job.name)) is not None:
                output(record, history)


class LossAlarm:
    """Epoch output: warns once when an epoch's mean loss is over FACTOR x chance level (ln of the class count).

    Such a loss is finite, so the run goes on and ends with exit 0, at chance accuracy (measured on the demo's tiny
    net, --lr_max 0.5: losses 30, 53, 14 for 2 classes, val top-1 0.50). A nan or inf ends the run instead.
    """

    FACTOR = 10.0

    def __init__(self, num_classes: int, hint: str):
        self.num_classes, self.chance = num_classes, math.log(num_classes)
        self.hint = hint
        self.warned = False

    def __call__(self, record: EpochRecord, history: History) -> None:
        if self.warned or not record.loss > self.FACTOR * self.chance:
            return
        self.warned = True
        log.warning("epoch %d's mean loss %.4g is over %gx chance level (%.2f, ln of %d classes): training is "
                    "unstable and learns little or nothing (%s)", record.epoch, record.loss, self.FACTOR,
                    self.chance, self.num_classes, self.hint)


class BestCheckpoint:
    """Writes checkpoint/best.ckpt (the net, with its val top-1 in the metadata) when an epoch is the new best.

    `floor`: the val top-1 of the best.ckpt a resumed run found; only a better epoch replaces that file.
    """

    def __init__(self, net, path: Path, meta: dict, floor: float | None = None, ema: dict | None = None):
        self.net, self.path, self.meta, self.floor = net, path, meta, floor
        self.ema = ema or {}  # {net parameter name: its EMA}: saved in its place, as evaluated

    def __call__(self, record: EpochRecord, history: History) -> None:
        if record.val_top1 is not None and history.best is record and (
                self.floor is None or record.val_top1 > self.floor):
            self.floor = None
            params = [{"name": p.name, "data": self.ema.get(p.name, p)} for p in self.net.get_parameters()] \
                if self.ema else self.net
            save_checkpoint(params, self.path, {**self.meta, "epoch_num": record.epoch, "step_num": record.step,
                                                  "lr": record.lr, "val_top1": record.val_top1})


class MetricsFiles:
    """Rewrites metrics.csv and curves.png (temp file + rename) after every epoch."""

    def __init__(self, csv_path: Path, png_path: Path):
        self.csv_path, self.png_path = csv_path, png_path

    def __call__(self, record: EpochRecord, history: History) -> None:
        write_metrics(history.records, self.csv_path)
        plot_curves(history.records, self.png_path)


class PeriodicCheckpoints:
    """Saves `<model>-<epoch>_<step>.ckpt` (net + optimizer state) every N epochs and at the last; keeps `keep`.

    `cells` are saved together (the train step and the full net, which differ when only the head trains).
    `on_saved` run after each save, in order, with the history (MLflow logs the epochs the checkpoint holds, then
    ModelArts uploads the outputs).
    """

    def __init__(self, cells: list, directory: Path, prefix: str, every: int, keep: int, total_epochs: int,
                 meta: dict, on_saved: list[Callable[[History], None]] = ()):
        params = {p.name: p for cell in cells for p in cell.get_parameters() if not p.name.startswith(STATS_PREFIX)}
        self.params = [{"name": name, "data": p} for name, p in params.items()]
        self.directory, self.prefix, self.every, self.keep = directory, prefix, every, keep
        self.total_epochs, self.meta, self.on_saved = total_epochs, meta, on_saved

    def __call__(self, record: EpochRecord, history: History) -> None:
        if record.epoch % self.every and record.epoch != self.total_epochs:
            return
        steps_per_epoch = record.step // record.epoch
        path = self.directory / f"{self.prefix}-{record.epoch}_{steps_per_epoch}.ckpt"
        save_checkpoint(self.params, path, {**self.meta, "epoch_num": record.epoch, "step_num": record.step,
                                            "lr": record.lr})
        for old in periodic_checkpoints(self.directory, self.prefix)[:-self.keep]:
            old.unlink()
        for then in self.on_saved:
            then(history)


def epoch_outputs(cfg: Config, folder: RunFolder, source: DataSource, net: nn.Cell, train_step: nn.Cell,
                   batches_per_epoch: int, resuming: bool, trackers: Trackers, per_class=None) -> EpochOutputs:
    """What rank 0 writes after each epoch (EpochOutputs fixes the order). A resumed run's best.ckpt is
    replaced only by a better epoch than the one it holds."""
    out = Path(cfg.output_path)
    ckpt_dir = out / "checkpoint"
    best = ckpt_dir / "best.ckpt"
    floor = read_checkpoint(best, "best.ckpt")[1].val_top1 if resuming and best.is_file() else None
    meta = {"model": cfg.model, "num_classes": cfg.num_classes, "image_size": cfg.image_size,
            "width": cfg.width, "pact_quant": cfg.pact_quant, "ema": cfg.ema,
            "class_names": source.class_names if source.named else None,  # not the placeholder numbers
            **arch_meta(cfg), "preprocess": preprocessing(cfg, source.kind).to_json(),
            **{key: getattr(cfg, key) for key in SCHEDULE_KEYS if key != "steps_per_epoch"},
            "steps_per_epoch": batches_per_epoch, "opt": cfg.optimizer_kind, "mlflow_run_id": trackers.mlflow_run_id}
    return EpochOutputs(
        commit=folder.commit,
        alarm=LossAlarm(cfg.num_classes, f"lower --lr_max, now {cfg.lr_max:g}, and train again"),
        best=BestCheckpoint(net, best, meta, floor, ema=ema_by_name(train_step)),
        metrics=MetricsFiles(out / "metrics.csv", out / "curves.png"),
        per_class=per_class,
        track=trackers.epoch,
        periodic=PeriodicCheckpoints([train_step, net], ckpt_dir, cfg.model, cfg.save_checkpoint_epochs,
                                     cfg.keep_checkpoint_max, cfg.epoch_size, meta,
                                     on_saved=[trackers.checkpointed] + ([lambda history: upload_outputs(cfg)]
                                                                         if cfg.enable_modelarts else [])),
        settle=folder.settle)
