"""Training callbacks: the step log lines and progress bar, and the one owner of each epoch's record.

`TrainMonitor` watches steps. `EpochEnd` is the only callback that acts at the end of an epoch: it asks the
monitor for the epoch's loss and time, runs evaluation when due, adds the record to the `History` (which
decides "best") and then hands it to the run's outputs in the order the run lists them.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from mindspore.train import Callback

from src.engine.checkpoint import first_non_finite, periodic_checkpoints, save_checkpoint
from src.engine.history import EpochRecord, History, plot_curves, write_metrics
from src.engine.per_class import log_worst, write_per_class
from src.engine.sinking import Sinking
from src.engine.train_step import STATS_PREFIX
from src.errors import UserError, stop_if_signalled

log = logging.getLogger("train")
EpochOutput = Callable[[EpochRecord, History], None]


class TrainMonitor(Callback):
    """The Paddle speed line every print_freq steps (or once per sink) and a tqdm bar; `finish_epoch` logs the
    MindSpore loss line (with sinking, it comes once per sink).

    Top-1/top-5 and the loss in the Paddle line are the means over the batches since the previous line, summed on
    the device by the train step (`stats`, a RunningStats): no logits come to the host. The per-step host work is
    one scalar loss read (to stop at a nan at once), unless fingerprint_data hashes every batch.

    With gradient accumulation (`accumulation` batches per optimizer step, and a shorter last group per epoch),
    the lines count optimizer steps: `iter`, print_freq, the LR, the step time and the epoch record's step; the
    loss and accuracies stay means over the batches.
    """

    def __init__(self, lr: np.ndarray, batch_size: int, sinking: Sinking, print_freq: int, total_epochs: int,
                 stats, progress_bar: bool | None = None, fingerprint_data: bool = False, accumulation: int = 1):
        super().__init__()
        self.accumulation = accumulation
        self.updates_per_epoch = -(-sinking.steps_per_epoch // accumulation)
        self.fingerprint_data = fingerprint_data
        self.data_digest = hashlib.sha256()  # what this rank trained on (distributed runs log it)
        self.lr, self.batch_size, self.sinking, self.stats = lr, batch_size, sinking, stats
        self.steps_per_epoch, self.print_freq, self.total_epochs = sinking.steps_per_epoch, print_freq, total_epochs
        self.progress_bar = sys.stdout.isatty() if progress_bar is None else progress_bar
        self.bar = None
        self.epoch, self.iter = 0, 0  # where training is (for the interruption message)
        self.diverged: tuple[int, int, float] | None = None  # (epoch, step in epoch, loss) of a non-finite loss
        self.reader_note_said = False
        self.first_ms_epoch: int | None = None  # MindSpore's send info counts the epochs of this run's iterator

    def on_train_epoch_begin(self, run_context):
        ms_epoch = run_context.original_args().cur_epoch_num
        if self.first_ms_epoch is None:
            self.first_ms_epoch = ms_epoch
        now = time.perf_counter()
        self.window_start = self.last_end = now
        self.reader_cost, self.window_steps = 0.0, 0
        if not self.sinking.begins_epoch(ms_epoch):  # the next sink of the same data epoch
            return
        self.epoch = self.sinking.data_epoch(ms_epoch)
        self.epoch_start = now
        self.iter, self.loss_sum = 0, 0.0
        self.stats.read()  # the device sums start at this epoch's first step
        if self.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {self.epoch}/{self.total_epochs}",
                            leave=False, dynamic_ncols=True)

    def on_train_step_begin(self, run_context):
        stop_if_signalled()  # a Ctrl-C or SIGTERM held during the last step (or sink), compile or epoch end stops here
        now = time.perf_counter()
        self.reader_cost += now - self.last_end

    def on_train_step_end(self, run_context):
        cb = run_context.original_args()
        steps = self.sinking.steps_per_call
        loss_value = float(np.asarray(cb.net_outputs.asnumpy()).reshape(-1)[0])  # the last step's loss
        if self.fingerprint_data:
            for tensor in cb.train_dataset_element:
                self.data_digest.update(tensor.asnumpy().tobytes())
        window = self.stats.read() if self.sinking.sink else None  # every step of the sink, summed on the device
        if window is not None and not np.isfinite(window["loss"]):
            loss_value = window["loss"]  # a nan in any step of the sink
        if not np.isfinite(loss_value):  # stop at once: the run ends with an error and writes nothing more
            self.diverged = (self.epoch, self.iter + steps, loss_value)
            self.close_bar()
            run_context.request_stop()
            return
        self.loss_sum += window["loss"] * steps if window else loss_value
        self.last_loss = loss_value
        self.window_steps += steps
        now = time.perf_counter()
        self.last_end = now
        if window or self.logs_after(self.iter):
            self.log_line(window or self.stats.read(), now, run_context)
        self.iter += steps
        if window:
            log.info("epoch: %d step: %d, loss is %s", self.epoch, self.updates_done(self.iter - 1), loss_value)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            self.bar.update(steps)

    def updates_done(self, batch: int) -> int:
        """Optimizer steps of the epoch done after its (0-based) batch `batch`."""
        done = (batch + 1) // self.accumulation
        return done + 1 if batch + 1 == self.steps_per_epoch and self.steps_per_epoch % self.accumulation else done

    def logs_after(self, batch: int) -> bool:
        """Whether the line comes after this batch: it ends an optimizer step whose index is a print_freq multiple."""
        if self.accumulation == 1:
            return batch % self.print_freq == 0
        done = self.updates_done(batch)
        return done > self.updates_done(batch - 1) and (done - 1) % self.print_freq == 0

    def log_line(self, window: dict, now: float, run_context) -> None:
        last = self.iter + self.sinking.steps_per_call - 1  # 0-based index of the last batch the line covers
        first = last - self.window_steps + 1
        updates = max(self.updates_done(last) - self.updates_done(first - 1), 1)  # optimizer steps the line covers
        batch_cost = (now - self.window_start) / updates
        reader_cost = self.sink_reader_cost(run_context) if self.sinking.sink else self.reader_cost / self.window_steps
        update = max(self.updates_done(last) - 1, 0)  # 0-based optimizer step of the epoch
        step = (self.epoch - 1) * self.updates_per_epoch + update
        lr = float(self.lr[min(step, len(self.lr) - 1)])
        samples = window["images"] / updates if window["images"] else float(self.batch_size * self.accumulation)
        log.info("[Epoch %d, iter: %d] top1: %.5f, top5: %.5f, lr: %.5f, loss: %.5f, avg_reader_cost: %.5f sec, "
                 "avg_batch_cost: %.5f sec, avg_samples: %.1f, avg_ips: %.5f images/sec.",
                 self.epoch, update, window["top1"], window["top5"], lr, window["loss"], reader_cost, batch_cost,
                 samples, samples / batch_cost)
        self.window_start, self.reader_cost, self.window_steps = now, 0.0, 0

    def sink_reader_cost(self, run_context) -> float:
        """Seconds per batch the host pipeline took to fetch this sink's data (MindSpore's send info, as its
        TimeMonitor(data_time=True) reports it); 0 when MindSpore does not give it."""
        cb = run_context.original_args()
        try:
            info = cb.dataset_helper.get_send_info(run_context).epoch(cb.cur_epoch_num - self.first_ms_epoch + 1)
            return float(info["fetch_data_time"]) / 1000.0
        except Exception:  # noqa: BLE001 - a MindSpore internal that varies by version and device
            if not self.reader_note_said:
                log.info("avg_reader_cost: MindSpore gives no data-fetch times for this sink; logged as 0")
                self.reader_note_said = True
            return 0.0

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finish_epoch(self, epoch: int) -> EpochRecord:
        """Close the bar, log the loss and time lines, and return the epoch's record (without evaluation)."""
        self.close_bar()
        elapsed = time.perf_counter() - self.epoch_start
        steps = max(self.iter, 1)
        updates = max(self.updates_done(self.iter - 1), 1)
        if not self.sinking.sink:  # sinking logs it at the end of every sink
            log.info("epoch: %d step: %d, loss is %s", epoch, updates, self.last_loss)
        log.info("epoch time: %.3f ms, per step time: %.3f ms", elapsed * 1000, elapsed * 1000 / updates)
        global_step = epoch * self.updates_per_epoch
        return EpochRecord(epoch=epoch, step=global_step, lr=float(self.lr[min(global_step, len(self.lr)) - 1]),
                           loss=self.loss_sum / steps, epoch_time_s=elapsed)


class Evaluator:
    """Top-1/top-5 on the val set every `interval` epochs and at the last one."""

    def __init__(self, model, dataset, interval: int, total_epochs: int, counter=None,
                 expected: tuple[int, object] | None = None, weights=contextlib.nullcontext,
                 per_class_folder: Path | None = None):
        self.model, self.dataset, self.interval, self.total_epochs = model, dataset, interval, total_epochs
        self.counter, self.expected = counter, expected  # the metric that counts images; (images checked, where)
        self.weights = weights  # a context in which the net holds the weights to evaluate (the EMA, if kept)
        self.per_class_folder = per_class_folder  # per_class.csv etc. of the last evaluation go there
        self.per_class = None  # the last epoch's per-class counts, for `write_per_class`

    def due(self, epoch: int) -> bool:
        return epoch % self.interval == 0 or epoch == self.total_epochs

    def __call__(self, final: bool = False) -> tuple[float, float]:
        with self.weights():
            result = self.model.eval(self.dataset, dataset_sink_mode=False)
        if self.counter is not None and self.expected and self.counter.total != self.expected[0]:
            # MindSpore's reader lists the folder when it starts: files removed since the check are silently skipped
            raise UserError(f"evaluated {self.counter.total} images but {self.expected[1]} held {self.expected[0]} "
                            "when it was checked before training (were files removed or added? keep the data set "
                            "unchanged while a run reads it, and train again)")
        if final and "per_class" in result:
            self.per_class = result["per_class"]
            log_worst(self.per_class)
        return float(result["acc"]), float(result["top_5_accuracy"])

    def write_per_class(self, record: EpochRecord, history: History) -> None:
        """An epoch output: per_class.csv and confusion_matrix.png after the last epoch's evaluation."""
        if self.per_class is not None and self.per_class_folder is not None and record.epoch == self.total_epochs:
            write_per_class(self.per_class, self.per_class_folder)


class EpochEnd(Callback):
    """The one owner of the epoch record: monitor's loss and time, evaluation when due, History, then `outputs`.

    Weights that are no longer finite (a loss can stay finite while ReLU6 hides nan activations) end the run
    as a divergence before anything is evaluated or written.
    """

    def __init__(self, monitor: TrainMonitor, history: History, evaluator: Evaluator | None,
                 outputs: list[EpochOutput], net=None):
        super().__init__()
        self.monitor, self.history, self.evaluator, self.outputs, self.net = monitor, history, evaluator, outputs, net

    def on_train_epoch_end(self, run_context):
        if self.monitor.diverged:  # MindSpore still ends the epoch after a stop request: nothing is recorded
            return
        ms_epoch = run_context.original_args().cur_epoch_num
        if not self.monitor.sinking.ends_epoch(ms_epoch):  # a sink inside the epoch
            return
        epoch = self.monitor.sinking.data_epoch(ms_epoch)
        bad = first_non_finite(self.net) if self.net is not None else None
        if bad:
            self.monitor.diverged = (epoch, self.monitor.iter, f"parameter {bad} is nan or inf")
            self.monitor.close_bar()
            run_context.request_stop()
            return
        stop_if_signalled()  # a signal during the epoch: its files are not written (the last ones stay complete)
        record = self.monitor.finish_epoch(epoch)
        if self.evaluator is not None and self.evaluator.due(epoch):
            start = time.perf_counter()
            record.val_top1, record.val_top5 = self.evaluator(final=epoch == self.evaluator.total_epochs)
            self.history.add(record)
            best = self.history.best
            log.info("[Epoch %d] val top1: %.5f, top5: %.5f, best top1: %.5f (epoch %d), eval time: %.2f sec",
                     epoch, record.val_top1, record.val_top5, best.val_top1, best.epoch, time.perf_counter() - start)
        else:
            self.history.add(record)
        stop_if_signalled()  # ... nor after a signal during the evaluation (held until it ended)
        for output in self.outputs:
            output(record, self.history)
        # between epochs: an interruption now is "at epoch E+1 step 0", after epoch E's files
        self.monitor.epoch, self.monitor.iter = epoch + 1, 0


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
    `on_saved` runs after each save (ModelArts uploads the outputs then).
    """

    def __init__(self, cells: list, directory: Path, prefix: str, every: int, keep: int, total_epochs: int,
                 meta: dict, on_saved: Callable[[], None] | None = None):
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
        if self.on_saved is not None:
            self.on_saved()
