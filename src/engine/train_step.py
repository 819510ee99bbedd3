"""The cells of one training step: loss with logits, running train statistics kept on the device, evaluation
output, AMP, loss scaling and the optimizer step.

mindcv's train_step.py plays the same part. benchmark.py and eval.py build the same cells as train.py.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from src.config import Config
from src.engine.checkpoint import EMA_PREFIX
from src.engine.loss import CrossEntropySmooth
from src.engine.optimizer import create_optimizer
from src.models.kernels import use_fast_kernels

log = logging.getLogger("train")

_grad_scale = ops.MultitypeFuncGraph("grad_scale")
_ema_update = ops.MultitypeFuncGraph("ema_update")
EMA_WARMUP_STEPS = 2000.0  # mindcv's: the decay at step t is ema_decay * (1 - exp(-t / 2000))


@_ema_update.register("Tensor", "Tensor", "Tensor")
def _ema_step(decay, ema, weight):
    return ops.assign(ema, ema * ops.cast(decay, ops.dtype(ema)) + weight * ops.cast(1 - decay, ops.dtype(weight)))


_zero = ops.MultitypeFuncGraph("zero")


@_zero.register("Tensor")
def _zero_tensor(param):
    return ops.assign(param, ops.zeros_like(param))


@_grad_scale.register("Tensor", "Tensor")
def _scale_grad(scale, grad):
    return grad * ops.cast(ops.Reciprocal()(scale), ops.dtype(grad))


STATS_PREFIX = "train_stats."  # parameters of RunningStats: never saved in checkpoints


class LossAndLogits(nn.Cell):
    """Loss in float32 plus the logits, from which the train step counts top-1/top-5 hits."""

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


class RunningStats(nn.Cell):
    """Sums kept on the device since the host last read them: loss, steps, top-1 and top-5 hits, images.

    The train step adds to them inside the graph, so logging needs no logits on the host, and with dataset sink
    mode one read covers every batch of the sink. `read()` (host) returns the means and zeroes the sums.
    With mixup/cutmix targets, top-1/top-5 count the target's largest class: the image's own class when it has
    the larger share (mixup lam >= 0.5), else the class whose pixels cover most of it.
    """

    def __init__(self, num_classes: int):
        super().__init__(auto_prefix=False)
        self.k = min(5, num_classes)
        self.sums = Parameter(Tensor(np.zeros(5, np.float32)), name=f"{STATS_PREFIX}sums", requires_grad=False)

    def construct(self, loss, logits, label):
        if label.ndim == 2:  # soft targets (mixup/cutmix): a hit is the class with the largest share
            label = ops.argmax(label, -1)
        _, top = ops.topk(logits, self.k)
        hits = ops.cast(ops.equal(top, ops.cast(label.reshape((-1, 1)), top.dtype)), ms.float32)
        images = ops.cast(ops.shape(logits)[0], ms.float32)
        one = ops.ones((), ms.float32)
        return ops.assign_add(self.sums, ops.stack([loss, one, hits[:, 0].sum(), hits.sum(), images]))

    def read(self) -> dict[str, float]:
        """{'loss': mean loss per step, 'top1', 'top5': hit rates, 'steps', 'images'} since the last read; resets."""
        loss, steps, top1, top5, images = (float(v) for v in self.sums.asnumpy())
        self.sums.set_data(Tensor(np.zeros(5, np.float32)))
        return {"loss": loss / max(steps, 1), "top1": top1 / max(images, 1), "top5": top5 / max(images, 1),
                "steps": int(steps), "images": int(images)}


class TrainStep(nn.TrainOneStepWithLossScaleCell):
    """One optimizer step with loss scaling that returns the loss and adds to `stats` (RunningStats).

    Gradients are unscaled here, so the optimizer keeps loss_scale=1. Overflow checks (dynamic scale
    or drop_overflow_update) run only on GPU/Ascend, where MindSpore supports them. With `accumulation` > 1 a
    call is one micro-batch and the optimizer steps at the end of each group (`accumulate`).
    """

    def __init__(self, network: nn.Cell, optimizer: nn.Optimizer, scale_sense, check_overflow: bool,
                 num_classes: int, ema_decay: float | None = None, clip_value: float | None = None,
                 accumulation: int = 1, steps_per_epoch: int | None = None):
        super().__init__(network, optimizer, scale_sense)
        if accumulation > 1 and not steps_per_epoch:  # the epoch's last batch ends a group: it must be known
            raise ValueError("gradient accumulation needs the batches per epoch (steps_per_epoch)")
        self.check_overflow = check_overflow
        self.stats = RunningStats(num_classes)
        self.accumulates = accumulation > 1
        if self.accumulates:  # the optimizer steps every `accumulation` micro-batches and at each epoch's last one
            self.accumulation, self.steps_per_epoch = int(accumulation), int(steps_per_epoch)
            self.accum_grads = self.weights.clone(f"{STATS_PREFIX}accum", init="zeros")
            self.accum_count = Parameter(Tensor(0.0, ms.float32), name=f"{STATS_PREFIX}accum_count",
                                         requires_grad=False)  # micro-batches added (an overflowing one is not)
            self.micro_step = Parameter(Tensor(0, ms.int32), name=f"{STATS_PREFIX}micro_step", requires_grad=False)
        self.clip = clip_value is not None
        self.clip_value = float(clip_value or 0.0)
        self.use_ema = ema_decay is not None
        if self.use_ema:  # every parameter of the net (BatchNorm statistics too) after each optimizer step
            self.ema_sources = ms.ParameterTuple(list(network.get_parameters()))
            self.ema_weights = self.ema_sources.clone(EMA_PREFIX.rstrip("."), init="same")
            self.ema_updates = Parameter(Tensor(0.0, ms.float32), name=f"{EMA_PREFIX}updates", requires_grad=False)
            self.ema_decay = float(ema_decay)

    def update_ema(self):
        updates = ops.assign_add(self.ema_updates, ops.ones((), ms.float32))
        decay = self.ema_decay * (1 - ops.exp(-updates / EMA_WARMUP_STEPS))
        return self.hyper_map(ops.partial(_ema_update, decay), self.ema_weights, self.ema_sources)

    def optimizer_step(self, loss, grads):
        """The optimizer step on the (clipped) gradients, then the EMA update."""
        if self.clip:
            grads = ops.clip_by_global_norm(grads, self.clip_value)
        loss = ops.depend(loss, self.optimizer(grads))
        if self.use_ema:
            loss = ops.depend(loss, self.update_ema())
        return loss

    def construct(self, data, label):
        loss, logits = self.network(data, label)
        loss = ops.depend(loss, self.stats(loss, logits, label))
        scaling_sens = self.scale_sense
        status, scaling_sens = self.start_overflow_check(loss, scaling_sens)
        sens = (ops.ones_like(loss) * ops.cast(scaling_sens, ops.dtype(loss)), ops.zeros_like(logits))
        grads = self.grad(self.network, self.weights)(data, label, sens)
        grads = self.hyper_map(ops.partial(_grad_scale, scaling_sens), grads)
        if self.accumulates:
            return self.accumulate(loss, grads, status)
        grads = self.grad_reducer(grads)
        if self.check_overflow:
            overflow = self.process_loss_scale(self.get_overflow_status(status, grads))
            if not overflow:
                loss = self.optimizer_step(loss, grads)
        else:
            loss = self.optimizer_step(loss, grads)
        return loss

    def accumulate(self, loss, grads, status):
        """Adds this micro-batch's gradients (an overflowing one is skipped); on the last micro-batch of a group
        (every `accumulation`, and the epoch's last, so no group spans two epochs) averages them over the micro-batches
        added, averages over ranks (the gradients' one all-reduce per optimizer step), and steps the optimizer; a
        group whose every micro-batch overflowed takes no step, as an overflowing batch without accumulation."""
        if self.check_overflow:
            overflow = self.process_loss_scale(self.get_overflow_status(status, grads))
            if not overflow:
                loss = ops.depend(loss, self.add_to_group(grads))
        else:
            loss = ops.depend(loss, self.add_to_group(grads))
        position = self.micro_step % self.steps_per_epoch  # 0-based micro-batch of the epoch
        due = ops.logical_or((position + 1) % self.accumulation == 0, position + 1 == self.steps_per_epoch)
        loss = ops.depend(loss, ops.assign_add(self.micro_step, ops.ones((), ms.int32)))
        if due:
            count = self.accum_count * 1
            if count > 0:
                mean = self.hyper_map(ops.partial(_grad_scale, count), self.accum_grads)
                loss = self.optimizer_step(loss, self.grad_reducer(mean))
            loss = ops.depend(loss, self.hyper_map(_zero, self.accum_grads))
            loss = ops.depend(loss, ops.assign(self.accum_count, ops.zeros((), ms.float32)))
        return loss

    def add_to_group(self, grads):
        counted = ops.assign_add(self.accum_count, ops.ones((), ms.float32))
        return ops.depend(self.hyper_map(ops.assign_add, self.accum_grads, grads), counted)


def ema_by_name(train_step: nn.Cell) -> dict[str, Parameter]:
    """{net parameter name: its EMA}; empty when the run keeps no EMA."""
    if not getattr(train_step, "use_ema", False):
        return {}
    return {src.name: ema for src, ema in zip(train_step.ema_sources, train_step.ema_weights)}


@contextlib.contextmanager
def ema_in_place(train_step: nn.Cell):
    """Inside the block the net holds its EMA weights (for evaluation); its own weights come back after."""
    pairs = list(zip(train_step.ema_sources, train_step.ema_weights)) if getattr(train_step, "use_ema", False) else []
    saved = [Tensor(p.asnumpy()) for p, _ in pairs]
    for p, ema in pairs:
        p.set_data(Tensor(ema.asnumpy()))
    try:
        yield
    finally:
        for (p, _), value in zip(pairs, saved):
            p.set_data(value)


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


def build_train_step(net: nn.Cell, cfg: Config, lr: np.ndarray, batches_per_epoch: int,
                     class_weights: np.ndarray | None = None) -> tuple[TrainStep, EvalNet]:
    """(train step, eval cell) sharing one AMP net, with loss scaling and the optimizer applied.

    `lr` has one value per optimizer step; `batches_per_epoch` counts the data batches (micro-batches when
    gradient_accumulation_steps > 1: the optimizer also steps after an epoch's last batch); `class_weights`
    weigh the loss per class."""
    amp_net = inference_cell(net, cfg)
    loss_fn = CrossEntropySmooth(cfg.num_classes, cfg.label_smooth, class_weights)
    scale_sense, check_overflow = loss_scale_sense(cfg)
    optimizer = create_optimizer(net.trainable_params(), lr, cfg)
    train_step = TrainStep(LossAndLogits(amp_net, loss_fn), optimizer, scale_sense, check_overflow, cfg.num_classes,
                           ema_decay=cfg.ema_decay if cfg.ema else None,
                           clip_value=cfg.clip_value if cfg.clip_grad else None,
                           accumulation=cfg.gradient_accumulation_steps, steps_per_epoch=batches_per_epoch)
    train_step.set_train()
    return train_step, EvalNet(amp_net)
