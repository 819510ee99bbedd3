"""Where a training run is, and the per-step jobs that watch it: one `RunState`, one callback that hands each step to
its jobs (divergence watch, data fingerprint, the log lines and their timing, the progress bar).

`RunState` is the one object that knows the epoch and step in progress, whether the run diverged and what it trained
on; the callbacks write it, the run reads it (for the interruption, divergence and digest lines).
"""
from __future__ import annotations

import hashlib
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from mindspore.train import Callback

from src.engine.history import EpochRecord
from src.engine.sinking import Sinking
from src.errors import stop_if_signalled

log = logging.getLogger("train")


class Divergence(NamedTuple):
    epoch: int
    step: int  # batches of the epoch done, the one that diverged included
    what: str  # "loss nan", "parameter X is nan or inf"


@dataclass
class RunState:
    """The epoch in progress (1-based; the next one once an epoch's files are written), the batches done in it,
    the divergence that stopped the run (None while it trains on), and the digest of the batches this rank read."""

    epoch: int = 0
    step: int = 0
    divergence: Divergence | None = None
    data_digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    budget: StepBudget | None = None  # --max_steps
    budget_spent: bool = False  # --max_steps optimizer steps are done: the run stops (without error)

    def diverge(self, step: int, what: str, run_context) -> None:
        self.divergence = Divergence(self.epoch, step, what)
        run_context.request_stop()  # the run ends with an error and writes nothing more

    def epoch_written(self, epoch: int) -> None:
        """Between epochs: an interruption now is "at epoch E+1 step 0", after epoch E's files."""
        self.epoch, self.step = epoch + 1, 0


@dataclass(frozen=True)
class Accumulation:
    """Batches and optimizer steps of an epoch: the optimizer steps every `every` batches, and after the last batch
    of the epoch (a shorter last group)."""

    batches: int  # per epoch
    every: int = 1

    @property
    def updates_per_epoch(self) -> int:
        return -(-self.batches // self.every)

    def updates_done(self, batch: int) -> int:
        """Optimizer steps of the epoch done after its (0-based) batch `batch`."""
        done = (batch + 1) // self.every
        return done + 1 if batch + 1 == self.batches and self.batches % self.every else done

    def logs_after(self, batch: int, print_freq: int) -> bool:
        """Whether the speed line comes after this batch: it ends an optimizer step whose index is a multiple of
        print_freq."""
        if self.every == 1:
            return batch % print_freq == 0
        done = self.updates_done(batch)
        return done > self.updates_done(batch - 1) and (done - 1) % print_freq == 0


class ProgressBar:
    """A tqdm bar per epoch on a terminal (none when stdout is a file)."""

    def __init__(self, total_epochs: int, steps_per_epoch: int, enabled: bool | None = None):
        self.total_epochs, self.steps_per_epoch = total_epochs, steps_per_epoch
        self.enabled = sys.stdout.isatty() if enabled is None else enabled
        self.bar = None

    def open(self, epoch: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch}/{self.total_epochs}", leave=False,
                            dynamic_ncols=True)

    def update(self, steps: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StepLog:
    """The Paddle speed line every print_freq optimizer steps (or once per sink), the MindSpore loss line, and the
    epoch's record (mean loss, time, LR) at its end.

    Top-1/top-5 and the loss in the Paddle line are the means over the batches since the previous line, summed on
    the device by the train step (`stats`, a RunningStats): no logits come to the host. With gradient accumulation
    the lines count optimizer steps (`iter`, print_freq, the LR, the step time and the record's step); the loss and
    accuracies stay means over the batches.
    """

    def __init__(self, lr: np.ndarray, batch_size: int, sinking: Sinking, print_freq: int, stats,
                 accumulation: int = 1, on_line: Callable[[int, dict[str, float]], None] | None = None):
        self.lr, self.batch_size, self.sinking, self.print_freq, self.stats = lr, batch_size, sinking, print_freq, stats
        self.on_line = on_line  # (global optimizer step, the line's numbers): the trackers' per-step scalars
        self.groups = Accumulation(sinking.steps_per_epoch, accumulation)
        self.reader_note_said = False
        self.first_ms_epoch: int | None = None  # MindSpore's send info counts the epochs of this run's iterator

    def begin_window(self, now: float) -> None:
        self.window_start = self.last_end = now
        self.reader_cost, self.window_steps = 0.0, 0

    def begin_epoch(self, now: float) -> None:
        self.epoch_start = now
        self.loss_sum = 0.0
        self.stats.read()  # the device sums start at this epoch's first step

    def step_begins(self, now: float) -> None:
        self.reader_cost += now - self.last_end

    def step_ends(self, state: RunState, loss: float, window: dict | None, run_context) -> None:
        """After `sinking.steps_per_call` batches whose last loss is `loss` (`window`: the sink's sums, when sunk)."""
        steps = self.sinking.steps_per_call
        self.loss_sum += window["loss"] * steps if window else loss
        self.last_loss = loss
        self.window_steps += steps
        now = self.last_end = time.perf_counter()
        if window or self.groups.logs_after(state.step, self.print_freq):
            self._speed_line(state, window or self.stats.read(), now, run_context)
        if window:
            log.info("epoch: %d step: %d, loss is %s", state.epoch,
                     self.groups.updates_done(state.step + steps - 1), loss)

    def _speed_line(self, state: RunState, window: dict, now: float, run_context) -> None:
        last = state.step + self.sinking.steps_per_call - 1  # 0-based index of the last batch the line covers
        first = last - self.window_steps + 1
        done = self.groups.updates_done
        updates = max(done(last) - done(first - 1), 1)  # optimizer steps the line covers
        batch_cost = (now - self.window_start) / updates
        reader_cost = self._sink_reader_cost(run_context) if self.sinking.sink else \
            self.reader_cost / self.window_steps
        update = max(done(last) - 1, 0)  # 0-based optimizer step of the epoch
        global_update = (state.epoch - 1) * self.groups.updates_per_epoch + update
        lr = self.lr_at(global_update)
        samples = window["images"] / updates if window["images"] else float(self.batch_size * self.groups.every)
        log.info("[Epoch %d, iter: %d] top1: %.5f, top5: %.5f, lr: %.5f, loss: %.5f, avg_reader_cost: %.5f sec, "
                 "avg_batch_cost: %.5f sec, avg_samples: %.1f, avg_ips: %.5f images/sec.",
                 state.epoch, update, window["top1"], window["top5"], lr, window["loss"], reader_cost, batch_cost,
                 samples, samples / batch_cost)
        if self.on_line is not None:
            self.on_line(global_update + 1, {"loss": window["loss"], "top1": window["top1"], "top5": window["top5"],
                                             "lr": lr, "images_per_s": samples / batch_cost})
        self.begin_window(now)

    def lr_at(self, step: int) -> float:
        """The LR of a 0-based global optimizer step (the last one's past the end of the schedule)."""
        return float(self.lr[min(step, len(self.lr) - 1)])

    def _sink_reader_cost(self, run_context) -> float:
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

    def finish_epoch(self, epoch: int, batches: int) -> EpochRecord:
        """Log the loss and time lines, and return the epoch's record (without evaluation)."""
        elapsed = time.perf_counter() - self.epoch_start
        updates = max(self.groups.updates_done(batches - 1), 1)
        if not self.sinking.sink:  # sinking logs it at the end of every sink
            log.info("epoch: %d step: %d, loss is %s", epoch, updates, self.last_loss)
        log.info("epoch time: %.3f ms, per step time: %.3f ms", elapsed * 1000, elapsed * 1000 / updates)
        global_step = epoch * self.groups.updates_per_epoch
        return EpochRecord(epoch=epoch, step=global_step, lr=self.lr_at(global_step - 1),
                           loss=self.loss_sum / max(batches, 1), epoch_time_s=elapsed)


class StepBudget:
    """--max_steps, the PyTorch seed's performance mode: stop after N optimizer steps of this run and say the
    throughput of the steps after the first few (compile and warm-up). The time between epochs (evaluation,
    checkpoints, the data set's restart) is not counted. With data sinking the stop comes at the end of the sink
    that reaches N."""

    def __init__(self, max_steps: int, groups: Accumulation, images_per_update: int, devices: int):
        self.max_steps, self.groups = max_steps, groups
        self.images_per_update, self.devices = images_per_update, devices
        self.warmup = max(1, min(5, max_steps // 4))  # steps left out of the timing
        self.done, self.timed_steps, self.seconds = 0, 0, 0.0  # optimizer steps so far; those timed and their time
        self.mark = time.perf_counter()

    def begin(self, now: float) -> None:
        """An epoch (or sink) begins: its first step is timed from here."""
        self.mark = now

    def after(self, state: RunState, steps: int, run_context) -> None:
        """After `steps` batches that began at batch `state.step` of the epoch."""
        groups, now = self.groups, time.perf_counter()
        updates = groups.updates_done(state.step + steps - 1) - groups.updates_done(state.step - 1)
        if self.done >= self.warmup:
            self.timed_steps += updates
            self.seconds += now - self.mark
        self.done += updates
        self.mark = now
        if self.done >= self.max_steps:
            state.budget_spent = True
            run_context.request_stop()

    def summary(self, state: RunState) -> str:
        head = f"max_steps {self.max_steps} reached at epoch {state.epoch} step {state.step}"
        if not self.timed_steps or self.seconds <= 0:
            return f"{head}: too few steps to time (raise --max_steps above {self.warmup})"
        images = self.timed_steps * self.images_per_update * self.devices
        where = f"on {self.devices} devices" if self.devices > 1 else "on 1 device"
        return (f"{head}: {self.timed_steps} optimizer steps after the first {self.done - self.timed_steps} took "
                f"{self.seconds:.2f} s, {self.seconds / self.timed_steps:.4f} s/step, FPS {images / self.seconds:.2f} "
                f"images/s {where}")


class TrainMonitor(Callback):
    """Hands each step to its jobs: a held signal stops the run at the step's start; after it, the loss is read
    once (the one per-step host read) and a nan or inf (in any step of a sink) ends the run at once; the batch is
    hashed into the state's digest when `fingerprint_data`; then the log lines and the bar."""

    def __init__(self, state: RunState, steps: StepLog, bar: ProgressBar, fingerprint_data: bool = False,
                 budget: StepBudget | None = None):
        super().__init__()
        self.state, self.steps, self.bar, self.fingerprint_data = state, steps, bar, fingerprint_data
        self.sinking, self.budget = steps.sinking, budget

    def on_train_epoch_begin(self, run_context):
        ms_epoch = run_context.original_args().cur_epoch_num
        if self.steps.first_ms_epoch is None:
            self.steps.first_ms_epoch = ms_epoch
        now = time.perf_counter()
        self.steps.begin_window(now)
        if self.budget is not None:
            self.budget.begin(now)
        if not self.sinking.begins_epoch(ms_epoch):  # the next sink of the same data epoch
            return
        self.state.epoch, self.state.step = self.sinking.data_epoch(ms_epoch), 0
        self.steps.begin_epoch(now)
        self.bar.open(self.state.epoch)

    def on_train_step_begin(self, run_context):
        stop_if_signalled()  # a Ctrl-C or SIGTERM held during the last step (or sink), compile or epoch end stops here
        self.steps.step_begins(time.perf_counter())

    def on_train_step_end(self, run_context):
        cb = run_context.original_args()
        steps = self.sinking.steps_per_call
        loss = float(np.asarray(cb.net_outputs.asnumpy()).reshape(-1)[0])  # the last step's loss
        if self.fingerprint_data:
            for tensor in cb.train_dataset_element:
                self.state.data_digest.update(tensor.asnumpy().tobytes())
        window = self.steps.stats.read() if self.sinking.sink else None  # every step of the sink, on the device
        if window is not None and not np.isfinite(window["loss"]):
            loss = window["loss"]  # a nan in any step of the sink
        if not np.isfinite(loss):
            self.bar.close()
            self.state.diverge(self.state.step + steps, f"loss {loss}", run_context)
            return
        self.steps.step_ends(self.state, loss, window, run_context)
        if self.budget is not None and self.budget.max_steps:
            self.budget.after(self.state, steps, run_context)
        self.state.step += steps
        self.bar.update(steps, loss)
