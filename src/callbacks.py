"""Training callbacks: log lines, progress bar, eval during training, checkpoints, metrics.csv, curves.png.

They share one `History` so each epoch's record (loss, lr, time, val accuracy) is written once.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from mindspore.train import Callback

from src.checkpoint import save_checkpoint
from src.metrics import topk_hits

log = logging.getLogger("train")
METRICS_COLUMNS = ("epoch", "step", "lr", "loss", "val_top1", "val_top5", "epoch_time_s")


@dataclass
class EpochRecord:
    epoch: int
    step: int
    lr: float
    loss: float
    val_top1: float | None = None
    val_top5: float | None = None
    epoch_time_s: float = 0.0


@dataclass
class History:
    """Per-epoch records plus the best validation result so far."""

    records: list[EpochRecord] = field(default_factory=list)
    best_top1: float = -1.0
    best_epoch: int = 0

    @property
    def last(self) -> EpochRecord:
        return self.records[-1]


class TrainMonitor(Callback):
    """The MindSpore loss line, the epoch time line, the Paddle speed line every print_freq steps, a tqdm bar."""

    def __init__(self, history: History, lr: np.ndarray, batch_size: int, steps_per_epoch: int,
                 print_freq: int, total_epochs: int, progress_bar: bool | None = None, fingerprint_data: bool = False):
        super().__init__()
        self.fingerprint_data = fingerprint_data
        self.data_digest = hashlib.sha256()  # what this rank trained on (distributed runs log it)
        self.history, self.lr, self.batch_size = history, lr, batch_size
        self.steps_per_epoch, self.print_freq, self.total_epochs = steps_per_epoch, print_freq, total_epochs
        self.progress_bar = sys.stdout.isatty() if progress_bar is None else progress_bar
        self.bar = None

    def on_train_epoch_begin(self, run_context):
        self.epoch_start = self.window_start = self.last_end = time.perf_counter()
        self.iter, self.loss_sum, self.reader_cost, self.window_steps = 0, 0.0, 0.0, 0
        if self.progress_bar:
            from tqdm import tqdm

            epoch = run_context.original_args().cur_epoch_num
            self.bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch}/{self.total_epochs}",
                            leave=False, dynamic_ncols=True)

    def on_train_step_begin(self, run_context):
        now = time.perf_counter()
        self.reader_cost += now - self.last_end

    def on_train_step_end(self, run_context):
        cb = run_context.original_args()
        loss, logits = cb.net_outputs
        loss_value = float(loss.asnumpy())
        if self.fingerprint_data:
            for tensor in cb.train_dataset_element:
                self.data_digest.update(tensor.asnumpy().tobytes())
        if not np.isfinite(loss_value):
            log.error("loss is %s at epoch %d step %d; stopping (lower --lr_max or --loss_scale)",
                      loss_value, cb.cur_epoch_num, self.iter + 1)
            run_context.request_stop()
        self.loss_sum += loss_value
        self.last_loss = loss_value
        self.window_steps += 1
        now = time.perf_counter()
        self.last_end = now
        if self.iter % self.print_freq == 0:
            labels = cb.train_dataset_element[1].asnumpy()
            logits = logits.asnumpy()
            batch_cost = (now - self.window_start) / self.window_steps
            reader_cost = self.reader_cost / self.window_steps
            step = (cb.cur_epoch_num - 1) * self.steps_per_epoch + self.iter
            lr = float(self.lr[min(step, len(self.lr) - 1)])
            log.info("[Epoch %d, iter: %d] top1: %.5f, top5: %.5f, lr: %.5f, loss: %.5f, avg_reader_cost: %.5f sec, "
                     "avg_batch_cost: %.5f sec, avg_samples: %.1f, avg_ips: %.5f images/sec.",
                     cb.cur_epoch_num, self.iter, topk_hits(logits, labels, 1), topk_hits(logits, labels, 5), lr,
                     loss_value, reader_cost, batch_cost, float(self.batch_size), self.batch_size / batch_cost)
            self.window_start, self.reader_cost, self.window_steps = now, 0.0, 0
        self.iter += 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            self.bar.update(1)

    def on_train_epoch_end(self, run_context):
        cb = run_context.original_args()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elapsed = time.perf_counter() - self.epoch_start
        steps = max(self.iter, 1)
        log.info("epoch: %d step: %d, loss is %s", cb.cur_epoch_num, self.iter, self.last_loss)
        log.info("epoch time: %.3f ms, per step time: %.3f ms", elapsed * 1000, elapsed * 1000 / steps)
        global_step = cb.cur_epoch_num * self.steps_per_epoch
        self.history.records.append(EpochRecord(
            epoch=cb.cur_epoch_num, step=global_step, lr=float(self.lr[min(global_step, len(self.lr)) - 1]),
            loss=self.loss_sum / steps, epoch_time_s=elapsed))


class EvalCallback(Callback):
    """Evaluate every `interval` epochs (and at the last) and keep checkpoint/best.ckpt."""

    def __init__(self, model, dataset, history: History, interval: int, total_epochs: int, net, best_path: Path,
                 meta: dict):
        super().__init__()
        self.model, self.dataset, self.history, self.interval = model, dataset, history, interval
        self.total_epochs, self.net, self.best_path, self.meta = total_epochs, net, best_path, meta

    def on_train_epoch_end(self, run_context):
        epoch = run_context.original_args().cur_epoch_num
        if epoch % self.interval and epoch != self.total_epochs:
            return
        start = time.perf_counter()
        result = self.model.eval(self.dataset, dataset_sink_mode=False)
        record = self.history.last
        record.val_top1, record.val_top5 = float(result["acc"]), float(result["top_5_accuracy"])
        if record.val_top1 > self.history.best_top1:
            self.history.best_top1, self.history.best_epoch = record.val_top1, epoch
            save_checkpoint(self.net, self.best_path, {**self.meta, "epoch_num": epoch, "step_num": record.step,
                                                       "val_top1": record.val_top1})
        log.info("[Epoch %d] val top1: %.5f, top5: %.5f, best top1: %.5f (epoch %d), eval time: %.2f sec", epoch,
                 record.val_top1, record.val_top5, self.history.best_top1, self.history.best_epoch,
                 time.perf_counter() - start)


class CheckpointCallback(Callback):
    """Save `<model>-<epoch>_<step>.ckpt` (net + optimizer state) every N epochs; keep the newest `keep`.

    `cells` are saved together (the train step and the full net, which differ when only the head trains).
    `on_saved` runs after each save (ModelArts uploads the outputs then).
    """

    def __init__(self, cells: list, directory: Path, prefix: str, every: int, keep: int, total_epochs: int,
                 steps_per_epoch: int, meta: dict, on_saved=None):
        super().__init__()
        self.on_saved = on_saved
        params = {p.name: p for cell in cells for p in cell.get_parameters()}
        self.params = [{"name": name, "data": p} for name, p in params.items()]
        self.directory, self.prefix, self.every, self.keep = directory, prefix, every, keep
        self.total_epochs, self.steps_per_epoch, self.meta = total_epochs, steps_per_epoch, meta

    def on_train_epoch_end(self, run_context):
        epoch = run_context.original_args().cur_epoch_num
        if epoch % self.every and epoch != self.total_epochs:
            return
        path = self.directory / f"{self.prefix}-{epoch}_{self.steps_per_epoch}.ckpt"
        save_checkpoint(self.params, path, {**self.meta, "epoch_num": epoch,
                                               "step_num": epoch * self.steps_per_epoch})
        for old in periodic_checkpoints(self.directory, self.prefix)[:-self.keep]:
            old.unlink()
        if self.on_saved is not None:
            self.on_saved()


def periodic_checkpoints(directory: Path, prefix: str) -> list[Path]:
    """This model's periodic checkpoints in `directory`, oldest epoch first."""
    pattern = re.compile(rf"{re.escape(prefix)}-(\d+)_(\d+)\.ckpt")
    found = [(int(m.group(1)), p) for p in directory.glob(f"{prefix}-*.ckpt") if (m := pattern.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


class MetricsCallback(Callback):
    """Rewrite metrics.csv and curves.png after every epoch (temp file + rename)."""

    def __init__(self, history: History, csv_path: Path, png_path: Path):
        super().__init__()
        self.history, self.csv_path, self.png_path = history, csv_path, png_path

    def on_train_epoch_end(self, run_context):
        write_metrics(self.history.records, self.csv_path)
        plot_curves(self.history.records, self.png_path)


def write_metrics(records: list[EpochRecord], path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=METRICS_COLUMNS)
        writer.writeheader()
        for r in records:
            row = asdict(r)
            writer.writerow({k: ("" if row[k] is None else (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]))
                             for k in METRICS_COLUMNS})
    os.replace(tmp, path)


def read_metrics(path: Path, up_to_epoch: int) -> list[EpochRecord]:
    """Records of an earlier run (for resume), keeping epochs <= up_to_epoch."""
    if not path.is_file():
        return []
    out = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            if int(row["epoch"]) > up_to_epoch:
                continue
            num = {k: (float(v) if v not in ("", None) else None) for k, v in row.items() if k in METRICS_COLUMNS}
            out.append(EpochRecord(epoch=int(num["epoch"]), step=int(num["step"]), lr=num["lr"], loss=num["loss"],
                                   val_top1=num["val_top1"], val_top5=num["val_top5"],
                                   epoch_time_s=num["epoch_time_s"] or 0.0))
    return out


def plot_curves(records: list[EpochRecord], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r.epoch for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [r.loss for r in records], marker="o")
    axes[0].set_title("train loss")
    axes[1].plot(epochs, [r.lr for r in records], marker="o", color="tab:orange")
    axes[1].set_title("learning rate (end of epoch)")
    val = [(r.epoch, r.val_top1) for r in records if r.val_top1 is not None]
    if val:
        axes[2].plot(*zip(*val), marker="o", color="tab:green")
    axes[2].set_title("val top-1")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
