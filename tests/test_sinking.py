"""Dataset sink mode: the Model.train settings per platform, and the callbacks driven as MindSpore drives them when
it sinks (one step callback per sink, one MindSpore "epoch" per sink). CPU cannot sink, so the sequence is replayed
here the way mindspore/train/model.py's _train_dataset_sink_process calls the callbacks."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest

from src.config import Config
from src.engine.callbacks import EpochEnd
from src.engine.history import History
from src.engine.progress import Accumulation, ProgressBar, RunState, StepLog, TrainMonitor
from src.engine.sinking import Sinking, sink_plan
from src.errors import UserError


def test_model_train_gets_the_sink_settings_on_ascend_and_gpu(caplog):
    ascend = Config(platform="Ascend", dataset_sink_mode=True)
    assert sink_plan(ascend, 20).train_kwargs(3, 0) == {"epoch": 3, "dataset_sink_mode": True, "sink_size": -1,
                                                        "initial_epoch": 0}
    gpu = Config(platform="GPU", dataset_sink_mode=True, sink_size=5)
    # 4 sinks per epoch: MindSpore counts 12 "epochs"; a run resumed after epoch 1 starts after sink 4
    assert sink_plan(gpu, 20).train_kwargs(3, 1) == {"epoch": 12, "dataset_sink_mode": True, "sink_size": 5,
                                                     "initial_epoch": 4}
    assert sink_plan(Config(platform="GPU"), 20).train_kwargs(3, 1) == {"epoch": 3, "dataset_sink_mode": False,
                                                                         "initial_epoch": 1}
    with caplog.at_level(logging.INFO, logger="train"):
        cpu = sink_plan(Config(platform="CPU", dataset_sink_mode=True), 20)
    assert cpu.train_kwargs(3, 0)["dataset_sink_mode"] is False
    assert caplog.text.count("CPU: MindSpore does not sink data on CPU") == 1


@pytest.mark.parametrize("kwargs,message", [
    ({"sink_size": 7}, "sink_size 7 does not divide the 20 steps of an epoch (use -1 for one sink per epoch, or "
                       "one of 1, 2, 4, 5, 10, 20)"),
    ({"sink_size": 40}, "sink_size 40 does not divide the 20 steps"),
    ({"sink_size": 5, "gradient_accumulation_steps": 2}, "sink_size 5 is not a multiple of "
     "gradient_accumulation_steps 2 that divides the 20 steps of an epoch (use -1 for one sink per epoch, or one of "
     "2, 4, 10, 20)"),
])
def test_a_sink_size_that_does_not_divide_an_epoch_is_refused(kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sink_plan(Config(platform="Ascend", dataset_sink_mode=True, **kwargs), 20)


def test_an_accumulation_group_larger_than_an_epoch_is_refused():
    with pytest.raises(UserError, match=r"gradient_accumulation_steps 21 is more than the 20 batches of an epoch"):
        sink_plan(Config(gradient_accumulation_steps=21), 20)
    assert sink_plan(Config(gradient_accumulation_steps=20), 20).steps_per_epoch == 20


def test_config_refuses_sink_size_0_and_fingerprints_of_sunk_batches():
    with pytest.raises(UserError, match="--sink_size got 0"):
        Config(sink_size=0)
    with pytest.raises(UserError, match="--fingerprint_data True needs the batches on the host"):
        Config(platform="GPU", dataset_sink_mode=True, fingerprint_data=True)


class _Stats:
    """RunningStats as the device keeps it: every trained batch adds to the sums, read() returns the means since the
    last read and zeroes them. The test says what each batch adds; the callbacks decide when to read."""

    def __init__(self):
        self.batches = []

    def add(self, loss, top1, top5, images=4):
        self.batches.append((loss, top1, top5, images))

    def read(self):
        batches, self.batches = self.batches, []
        images = sum(b[3] for b in batches)
        return {"loss": sum(b[0] for b in batches) / max(len(batches), 1),
                "top1": sum(b[1] * b[3] for b in batches) / max(images, 1),
                "top5": sum(b[2] * b[3] for b in batches) / max(images, 1), "steps": len(batches), "images": images}


class _Context:
    def __init__(self):
        self.params = SimpleNamespace(cur_epoch_num=0, net_outputs=None, train_dataset_element=None)
        self.stopped = False

    def original_args(self):
        return self.params

    def request_stop(self):
        self.stopped = True


def _callbacks(lr, sinking, print_freq, stats, accumulation=1):
    state, records = RunState(), []
    steps = StepLog(lr, 4, sinking, print_freq, stats, accumulation=accumulation)
    bar = ProgressBar(2, sinking.steps_per_epoch, enabled=False)
    monitor = TrainMonitor(state, steps, bar)
    epoch_end = EpochEnd(state, steps, bar, History([]), None, lambda record, history: records.append(record))
    return state, monitor, epoch_end, records


def _drive(monitor, epoch_end, stats, sinks: list[list[tuple]]):
    """The callback order of Model._train_dataset_sink_process: per sink, epoch begin, one step callback for all of
    the sink's batches (each (loss, top1, top5) adds to the device sums), epoch end."""
    import mindspore as ms

    ctx = _Context()
    for number, batches in enumerate(sinks, 1):
        ctx.params.cur_epoch_num = number
        monitor.on_train_epoch_begin(ctx)
        monitor.on_train_step_begin(ctx)
        for batch in batches:
            stats.add(*batch)
        ctx.params.net_outputs = ms.Tensor(np.float32(batches[-1][0]))  # the sink's last loss
        monitor.on_train_step_end(ctx)
        epoch_end.on_train_epoch_end(ctx)
        if ctx.stopped:
            break
    return ctx


def test_sunk_epochs_log_once_per_sink_and_record_once_per_epoch(caplog):
    """2 epochs of 4 steps in sinks of 2: a Paddle line and a loss line per sink, with that sink's top-1/top-5 and
    mean loss; evaluation, files and the epoch record once per data epoch, with the epoch's mean loss."""
    sinking = Sinking(True, steps_per_epoch=4, steps_per_sink=2)
    stats = _Stats()
    lr = np.linspace(0.1, 0.0, 8, dtype=np.float32)
    state, monitor, epoch_end, records = _callbacks(lr, sinking, 1, stats)
    sinks = [[(1.25, 0.25, 0.5), (0.75, 0.25, 1.0)], [(1.1, 0.5, 1.0), (0.5, 0.5, 1.0)],
             [(0.95, 0.5, 1.0), (0.25, 0.75, 1.0)], [(0.675, 0.75, 1.0), (0.125, 0.75, 1.0)]]
    with caplog.at_level(logging.INFO, logger="train"):
        ctx = _drive(monitor, epoch_end, stats, sinks)
    assert not ctx.stopped and state.divergence is None and (state.epoch, state.step) == (3, 0)
    lines = [r.getMessage() for r in caplog.records]
    paddle = [line for line in lines if line.startswith("[Epoch")]
    assert [line.split(" top1")[0] for line in paddle] == ["[Epoch 1, iter: 1]", "[Epoch 1, iter: 3]",
                                                          "[Epoch 2, iter: 1]", "[Epoch 2, iter: 3]"]
    assert "top1: 0.25000, top5: 0.75000, lr: 0.08571, loss: 1.00000" in paddle[0]
    assert "top1: 0.75000, top5: 1.00000, lr: 0.00000, loss: 0.40000" in paddle[3]
    assert [line for line in lines if line.startswith("epoch: ")] == [
        "epoch: 1 step: 2, loss is 0.75", "epoch: 1 step: 4, loss is 0.5", "epoch: 2 step: 2, loss is 0.25",
        "epoch: 2 step: 4, loss is 0.125"]
    assert [(r.epoch, r.step) for r in records] == [(1, 4), (2, 8)]
    assert [r.loss for r in records] == pytest.approx([0.9, 0.5])  # the means of the sinks' mean losses


def test_a_nan_inside_a_sink_stops_the_run_at_that_sink():
    """A nan in any step of a sink makes the device sum nan, even when the sink's last loss is finite."""
    sinking = Sinking(True, steps_per_epoch=4, steps_per_sink=2)
    stats = _Stats()
    state, monitor, epoch_end, records = _callbacks(np.full(8, 0.1, np.float32), sinking, 1, stats)
    sinks = [[(1.0, 0.5, 1.0), (0.9, 0.5, 1.0)], [(float("nan"), 0.5, 1.0), (0.7, 0.5, 1.0)],
             [(0.5, 0.5, 1.0), (0.5, 0.5, 1.0)], [(0.3, 0.5, 1.0), (0.3, 0.5, 1.0)]]
    ctx = _drive(monitor, epoch_end, stats, sinks)
    assert ctx.stopped and state.divergence == (1, 4, "loss nan")
    assert records == []  # the epoch that diverged records and writes nothing


def test_a_non_finite_parameter_at_the_end_of_an_epoch_is_a_divergence():
    """A loss can stay finite while ReLU6 hides nan activations: the epoch end checks the weights first."""
    import mindspore as ms
    from mindspore import nn

    sinking = Sinking(False, steps_per_epoch=2, steps_per_sink=2)
    stats = _Stats()
    state, monitor, epoch_end, records = _callbacks(np.full(4, 0.1, np.float32), sinking, 1, stats)
    epoch_end.net = nn.Dense(2, 2)
    epoch_end.net.weight.set_data(ms.Tensor(np.full((2, 2), np.inf, np.float32)))
    ctx = _Context()
    ctx.params.cur_epoch_num = 1
    monitor.on_train_epoch_begin(ctx)
    for _ in range(2):
        monitor.on_train_step_begin(ctx)
        stats.add(0.5, 1.0, 1.0)
        ctx.params.net_outputs = ms.Tensor(np.float32(0.5))
        monitor.on_train_step_end(ctx)
    epoch_end.on_train_epoch_end(ctx)
    assert ctx.stopped and records == []
    assert state.divergence == (1, 2, f"parameter {epoch_end.net.weight.name} is nan or inf")


def test_with_accumulation_the_lines_count_optimizer_steps(caplog):
    """7 batches per epoch, gradient_accumulation_steps 3: optimizer steps after batches 3, 6 and 7 (a short last
    group); with print_freq 2 the lines come after optimizer steps 0 and 2 of the epoch, with those steps' LR, and
    the epoch record counts 3 steps."""
    import mindspore as ms

    sinking = Sinking(False, steps_per_epoch=7, steps_per_sink=7)
    stats = _Stats()
    lr = np.array([0.3, 0.2, 0.1, 0.0, 0.0, 0.0], np.float32)
    state, monitor, epoch_end, records = _callbacks(lr, sinking, 2, stats, accumulation=3)
    ctx = _Context()
    ctx.params.cur_epoch_num = 1
    with caplog.at_level(logging.INFO, logger="train"):
        monitor.on_train_epoch_begin(ctx)
        for batch in range(7):
            monitor.on_train_step_begin(ctx)
            stats.add(1.0 if batch < 3 else 0.5, 0.5 if batch < 3 else 0.75, 1.0)
            ctx.params.net_outputs = ms.Tensor(np.float32(0.5))
            monitor.on_train_step_end(ctx)
        epoch_end.on_train_epoch_end(ctx)
    lines = [r.getMessage() for r in caplog.records]
    paddle = [line for line in lines if line.startswith("[Epoch")]
    assert [line.split(" top1")[0] for line in paddle] == ["[Epoch 1, iter: 0]", "[Epoch 1, iter: 2]"]
    assert "top1: 0.50000" in paddle[0] and "lr: 0.30000" in paddle[0] and "avg_samples: 12.0" in paddle[0]
    assert "top1: 0.75000" in paddle[1] and "lr: 0.10000" in paddle[1] and "avg_samples: 8.0" in paddle[1]
    assert "epoch: 1 step: 3, loss is 0.5" in lines
    assert [(r.epoch, r.step, r.lr) for r in records] == [(1, 3, pytest.approx(0.1))]


@pytest.mark.parametrize("batches,every,done", [
    (7, 3, [0, 0, 1, 1, 1, 2, 3]), (6, 3, [0, 0, 1, 1, 1, 2]), (4, 1, [1, 2, 3, 4])])
def test_optimizer_steps_after_each_batch(batches, every, done):
    groups = Accumulation(batches, every)
    assert [groups.updates_done(b) for b in range(batches)] == done
    assert groups.updates_per_epoch == done[-1]
