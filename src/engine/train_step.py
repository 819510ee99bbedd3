"""The cells of one training step: loss with logits, evaluation output, AMP, loss scaling and the optimizer step.

mindcv's train_step.py plays the same part. benchmark.py and eval.py build the same cells as train.py.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from src.config import Config
from src.engine.loss import CrossEntropySmooth
from src.engine.optimizer import create_optimizer
from src.models.kernels import use_fast_kernels

log = logging.getLogger("train")

_grad_scale = ops.MultitypeFuncGraph("grad_scale")


@_grad_scale.register("Tensor", "Tensor")
def _scale_grad(scale, grad):
    return grad * ops.cast(ops.Reciprocal()(scale), ops.dtype(grad))


class LossAndLogits(nn.Cell):
    """Loss in float32 plus the logits, so the logger can report the batch's top-1/top-5 for free."""

    def __init__(self, net: nn.Cell, loss_fn: nn.Cell):
        super().__init__(auto_prefix=False)
        self.net, self.loss_fn = net, loss_fn

    def construct(self, data, label):
        logits = ops.cast(self.net(data), ms.float32)
        return self.loss_fn(logits, label), logits


class EvalNet(nn.Cell):
    """(float32 logits, label) for the Accuracy/Top5 metrics."""

    def __init__(self, net: nn.Cell):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, data, label):
        return ops.cast(self.net(data), ms.float32), label


class TrainStep(nn.TrainOneStepWithLossScaleCell):
    """One optimizer step with loss scaling that returns (loss, logits).

    Gradients are unscaled here, so the optimizer keeps loss_scale=1. Overflow checks (dynamic scale
    or drop_overflow_update) run only on GPU/Ascend, where MindSpore supports them.
    """

    def __init__(self, network: nn.Cell, optimizer: nn.Optimizer, scale_sense, check_overflow: bool):
        super().__init__(network, optimizer, scale_sense)
        self.check_overflow = check_overflow

    def construct(self, data, label):
        loss, logits = self.network(data, label)
        scaling_sens = self.scale_sense
        status, scaling_sens = self.start_overflow_check(loss, scaling_sens)
        sens = (ops.ones_like(loss) * ops.cast(scaling_sens, ops.dtype(loss)), ops.zeros_like(logits))
        grads = self.grad(self.network, self.weights)(data, label, sens)
        grads = self.hyper_map(ops.partial(_grad_scale, scaling_sens), grads)
        grads = self.grad_reducer(grads)
        if self.check_overflow:
            overflow = self.process_loss_scale(self.get_overflow_status(status, grads))
            if not overflow:
                loss = ops.depend(loss, self.optimizer(grads))
        else:
            loss = ops.depend(loss, self.optimizer(grads))
        return loss, logits


def apply_amp(net: nn.Cell, amp_level: str, keep_batchnorm_fp32: bool, workdir: Path) -> nn.Cell:
    """O1: white-list ops in float16; O2: all but BatchNorm (and other black-list ops); O3: everything.

    MindSpore's O1 rewrites the net's source into ./rewritten_network/ and compiles from there; running it
    inside `workdir` (the output folder) keeps those files out of the user's current folder. The parameters
    keep their names, so a checkpoint saved at any level loads into the plain net.
    """
    if amp_level == "O0":
        return net
    if amp_level in ("O2", "O3"):
        amp_level = "O2" if keep_batchnorm_fp32 else "O3"
    workdir.mkdir(parents=True, exist_ok=True)
    names = {id(p): p.name for p in net.get_parameters()}
    with _working_directory(workdir):
        amp_net = ms.amp.auto_mixed_precision(net, amp_level)
    # O1's rewrite prefixes the shared parameters' names ("backbone.features..."): checkpoints must keep the net's
    for param in amp_net.get_parameters():
        param.name = names.get(id(param), param.name)
    return amp_net


@contextlib.contextmanager
def _working_directory(path: Path):
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def loss_scale_sense(cfg: Config):
    """The scale_sense for TrainStep and whether overflow checks run. CPU gets a fixed scale without checks."""
    dynamic = cfg.loss_scale_type == "dynamic"
    if cfg.platform == "CPU" and (dynamic or cfg.drop_overflow_update):
        log.warning("CPU: MindSpore supports only a fixed loss scale without overflow checks on CPU; using "
                    "loss_scale_type=fixed, loss_scale=%g, drop_overflow_update=False", cfg.loss_scale)
    elif dynamic:
        manager = ms.amp.DynamicLossScaleManager(init_loss_scale=cfg.loss_scale, scale_factor=2, scale_window=2000)
        return manager.get_update_cell(), True
    elif cfg.drop_overflow_update:
        manager = ms.amp.FixedLossScaleManager(cfg.loss_scale, drop_overflow_update=True)
        return manager.get_update_cell(), True
    return Tensor(cfg.loss_scale, ms.float32), False


def inference_cell(net: nn.Cell, cfg: Config) -> nn.Cell:
    """The net with the configured CPU kernels and AMP level, as training, evaluation and benchmarks run it."""
    use_fast_kernels(net, cfg.platform, cfg.amp_level)
    return apply_amp(net, cfg.amp_level, cfg.keep_batchnorm_fp32, Path(cfg.output_path))


def eval_cell(net: nn.Cell, cfg: Config) -> EvalNet:
    """(logits, label) of the net as evaluation runs it."""
    return EvalNet(inference_cell(net, cfg))


def build_train_step(net: nn.Cell, cfg: Config, lr: np.ndarray) -> tuple[TrainStep, EvalNet]:
    """(train step, eval cell) sharing one AMP net, with loss scaling and the optimizer applied."""
    amp_net = inference_cell(net, cfg)
    loss_fn = CrossEntropySmooth(cfg.num_classes, cfg.label_smooth)
    scale_sense, check_overflow = loss_scale_sense(cfg)
    optimizer = create_optimizer(net.trainable_params(), lr, cfg.momentum, cfg.weight_decay)
    train_step = TrainStep(LossAndLogits(amp_net, loss_fn), optimizer, scale_sense, check_overflow)
    train_step.set_train()
    return train_step, EvalNet(amp_net)
