"""The end of an epoch: one owner of its record (`EpochEnd`), and the evaluation it runs when due.

`EpochEnd` is the only callback that acts at the end of an epoch: it asks the step log for the epoch's loss and
time, runs evaluation when due, adds the record to the `History` (which decides "best") and hands it to the run's
outputs (src/engine/outputs.py), which write their files in the order that structure fixes.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from mindspore.train import Callback

from src.engine.checkpoint import first_non_finite
from src.engine.history import EpochRecord, History
from src.engine.outputs import EpochOutput
from src.engine.per_class import log_worst, write_per_class
from src.engine.progress import ProgressBar, RunState, StepLog
from src.errors import UserError, stop_if_signalled

log = logging.getLogger("train")


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
    """The one owner of the epoch record: the step log's loss and time, evaluation when due, History, then `outputs`.

    Weights that are no longer finite (a loss can stay finite while ReLU6 hides nan activations) end the run
    as a divergence before anything is evaluated or written.
    """

    def __init__(self, state: RunState, steps: StepLog, bar: ProgressBar, history: History,
                 evaluator: Evaluator | None, outputs: EpochOutput, net=None):
        super().__init__()
        self.state, self.steps, self.bar, self.history = state, steps, bar, history
        self.evaluator, self.outputs, self.net = evaluator, outputs, net

    def on_train_epoch_end(self, run_context):
        if self.state.divergence:  # MindSpore still ends the epoch after a stop request: nothing is recorded
            return
        if self.state.budget_spent and self.state.step < self.steps.sinking.steps_per_epoch:
            self.bar.close()  # --max_steps stopped the run inside the epoch: nothing of it is recorded
            return
        ms_epoch = run_context.original_args().cur_epoch_num
        if not self.steps.sinking.ends_epoch(ms_epoch):  # a sink inside the epoch
            return
        epoch = self.steps.sinking.data_epoch(ms_epoch)
        self.bar.close()
        bad = first_non_finite(self.net) if self.net is not None else None
        if bad:
            self.state.diverge(self.state.step, f"parameter {bad} is nan or inf", run_context)
            return
        stop_if_signalled()  # a signal during the epoch: its files are not written (the last ones stay complete)
        record = self.steps.finish_epoch(epoch, self.state.step)
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
        self.outputs(record, self.history)
        self.state.epoch_written(epoch)
