"""Dataset sink mode: the Model.train settings per platform, and the callbacks driven as MindSpore drives them when
it sinks (one step callback per sink, one MindSpore "epoch" per sink). CPU cannot sink, so the sequence is replayed
here the way mindspore/train/model.py's _train_dataset_sink_process calls the callbacks."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest

from src.config import Config
from src.engine.callbacks import EpochEnd, TrainMonitor
from src.engine.history import History
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
    """RunningStats' read(): the sums the device would hold at each read, in order (None: zeros)."""

    def __init__(self, windows):
        self.windows = list(windows)

    def read(self):
        window = self.windows.pop(0)
        return window if window is not None else _window(0.0, 0.0, 0.0, 0)


class _Context:
    def __init__(self):
        self.params = SimpleNamespace(cur_epoch_num=0, net_outputs=None, train_dataset_element=None)
        self.stopped = False

    def original_args(self):
        return self.params

    def request_stop(self):
        self.stopped = True


def _drive(monitor, epoch_end, sinks: int, last_losses: list[float]):
    """The callback order of Model._train_dataset_sink_process: per sink, epoch begin, one step, epoch end."""
    import mindspore as ms

    ctx = _Context()
    for sink in range(1, sinks + 1):
        ctx.params.cur_epoch_num = sink
        monitor.on_train_epoch_begin(ctx)
        monitor.on_train_step_begin(ctx)
        ctx.params.net_outputs = ms.Tensor(np.float32(last_losses[sink - 1]))
        monitor.on_train_step_end(ctx)
        epoch_end.on_train_epoch_end(ctx)
        if ctx.stopped:
            break
    return ctx


def _window(loss, top1, top5, steps=2, batch=4):
    return {"loss": loss, "top1": top1, "top5": top5, "steps": steps, "images": steps * batch}


def test_sunk_epochs_log_once_per_sink_and_record_once_per_epoch(caplog):
    """2 epochs of 4 steps in sinks of 2: a Paddle line and a loss line per sink, with that sink's top-1/top-5 and
    mean loss; evaluation, files and the epoch record once per data epoch, with the epoch's mean loss."""
    sinking = Sinking(True, steps_per_epoch=4, steps_per_sink=2)
    # each data epoch's first sink reads (and zeroes) the sums first, then every sink reads its own
    stats = _Stats([None, _window(1.0, 0.25, 0.75), _window(0.8, 0.5, 1.0),
                    None, _window(0.6, 0.625, 1.0), _window(0.4, 0.75, 1.0)])
    lr = np.linspace(0.1, 0.0, 8, dtype=np.float32)
    monitor = TrainMonitor(lr, 4, sinking, print_freq=1, total_epochs=2, stats=stats,
                           progress_bar=False)
    records = []
    epoch_end = EpochEnd(monitor, History([]), None, [lambda record, history: records.append(record)])
    with caplog.at_level(logging.INFO, logger="train"):
        ctx = _drive(monitor, epoch_end, 4, [0.75, 0.5, 0.25, 0.125])
    assert not ctx.stopped
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
    stats = _Stats([None, _window(1.0, 0.5, 1.0), _window(float("nan"), 0.5, 1.0)])
    monitor = TrainMonitor(np.full(8, 0.1, np.float32), 4, sinking, 1, 2, stats, progress_bar=False)
    records = []
    epoch_end = EpochEnd(monitor, History([]), None, [lambda record, history: records.append(record)])
    ctx = _drive(monitor, epoch_end, 4, [0.9, 0.7, 0.5, 0.3])
    assert ctx.stopped and monitor.diverged[:2] == (1, 4) and np.isnan(monitor.diverged[2])
    assert records == []  # the epoch that diverged records and writes nothing


def test_with_accumulation_the_lines_count_optimizer_steps(caplog):
    """7 batches per epoch, gradient_accumulation_steps 3: optimizer steps after batches 3, 6 and 7 (a short last
    group); with print_freq 2 the lines come after optimizer steps 0 and 2 of the epoch, with those steps' LR, and
    the epoch record counts 3 steps."""
    import mindspore as ms

    sinking = Sinking(False, steps_per_epoch=7, steps_per_sink=7)
    stats = _Stats([None, _window(1.0, 0.5, 1.0, steps=3), _window(0.5, 0.75, 1.0, steps=4)])
    lr = np.array([0.3, 0.2, 0.1, 0.0, 0.0, 0.0], np.float32)
    monitor = TrainMonitor(lr, 4, sinking, print_freq=2, total_epochs=2, stats=stats, progress_bar=False,
                           accumulation=3)
    records = []
    epoch_end = EpochEnd(monitor, History([]), None, [lambda record, history: records.append(record)])
    ctx = _Context()
    ctx.params.cur_epoch_num = 1
    with caplog.at_level(logging.INFO, logger="train"):
        monitor.on_train_epoch_begin(ctx)
        for _ in range(7):
            monitor.on_train_step_begin(ctx)
            ctx.params.net_outputs = ms.Tensor(np.float32(0.5))
            monitor.on_train_step_end(ctx)
        epoch_end.on_train_epoch_end(ctx)
    lines = [r.getMessage() for r in caplog.records]
    paddle = [line for line in lines if line.startswith("[Epoch")]
    assert [line.split(" top1")[0] for line in paddle] == ["[Epoch 1, iter: 0]", "[Epoch 1, iter: 2]"]
    assert "lr: 0.30000" in paddle[0] and "avg_samples: 12.0" in paddle[0]  # 3 batches of 4 in one step
    assert "lr: 0.10000" in paddle[1] and "avg_samples: 8.0" in paddle[1]  # 4 batches in 2 steps
    assert "epoch: 1 step: 3, loss is 0.5" in lines
    assert [(r.epoch, r.step, r.lr) for r in records] == [(1, 3, pytest.approx(0.1))]
