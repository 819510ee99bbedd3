"""Build and run training: data -> net -> AMP -> loss scaling -> optimizer -> ms.Model with callbacks.

All checks that can fail (data layout, checkpoints, batch size) run before the output folder is
touched and before the first graph compiles.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops
from mindspore.train import Model

from src.callbacks import (
    CheckpointCallback,
    EvalCallback,
    History,
    MetricsCallback,
    TrainMonitor,
    periodic_checkpoints,
    read_metrics,
)
from src.checkpoint import (
    NOT_RESTORED,
    CheckpointMeta,
    check_compatible,
    has_optimizer_state,
    load_into,
    read_checkpoint,
)
from src.cloud import upload_outputs
from src.config import Config, save_config
from src.dataset import DataSource, check_dataset, create_dataset
from src.device import RankInfo, amp_speed_warning, setup_device
from src.errors import UserError
from src.finetune import cached_features, check_pretrained, feature_datasets, load_pretrained
from src.kernels import use_fast_kernels
from src.logs import attach_log_file
from src.loss import CrossEntropySmooth
from src.lr_schedule import build_lr_schedule
from src.metrics import accuracy_metrics
from src.models import net_from_config
from src.models.common import HeadOnFeatures

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
    inside `workdir` (the output folder) keeps those files out of the user's current folder.
    """
    if amp_level == "O0":
        return net
    if amp_level in ("O2", "O3"):
        amp_level = "O2" if keep_batchnorm_fp32 else "O3"
    workdir.mkdir(parents=True, exist_ok=True)
    with _working_directory(workdir):
        return ms.amp.auto_mixed_precision(net, amp_level)


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
        dynamic = False
    elif dynamic:
        manager = ms.amp.DynamicLossScaleManager(init_loss_scale=cfg.loss_scale, scale_factor=2, scale_window=2000)
        return manager.get_update_cell(), True
    elif cfg.drop_overflow_update:
        manager = ms.amp.FixedLossScaleManager(cfg.loss_scale, drop_overflow_update=True)
        return manager.get_update_cell(), True
    return Tensor(cfg.loss_scale, ms.float32), False


def build_optimizer(net: nn.Cell, cfg: Config, lr: np.ndarray) -> nn.Optimizer:
    """Momentum SGD; weight decay on conv/dense weights only (not on BatchNorm gamma/beta or biases)."""
    params = net.trainable_params()
    decay = [p for p in params if not p.name.endswith(("gamma", "beta", "bias"))]
    no_decay = [p for p in params if p.name.endswith(("gamma", "beta", "bias"))]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"order_params": params}]
    return nn.Momentum(groups, learning_rate=Tensor(lr), momentum=cfg.momentum)


def build_training(net: nn.Cell, cfg: Config, lr: np.ndarray):
    """(train_step_cell, eval_cell) with AMP, loss scaling and the optimizer applied."""
    use_fast_kernels(net, cfg.platform, cfg.amp_level)
    amp_net = apply_amp(net, cfg.amp_level, cfg.keep_batchnorm_fp32, Path(cfg.output_path))
    loss_fn = CrossEntropySmooth(cfg.num_classes, cfg.label_smooth)
    scale_sense, check_overflow = loss_scale_sense(cfg)
    train_step = TrainStep(LossAndLogits(amp_net, loss_fn), build_optimizer(net, cfg, lr), scale_sense,
                           check_overflow)
    train_step.set_train()
    return train_step, EvalNet(amp_net)


def weights_digest(net: nn.Cell) -> str:
    """sha256 of every parameter: equal on all ranks after synchronous data-parallel training."""
    digest = hashlib.sha256()
    for p in net.trainable_params():
        digest.update(p.asnumpy().tobytes())
    return digest.hexdigest()


def checkpoint_meta(cfg: Config, source: DataSource) -> dict:
    return {"model": cfg.model, "num_classes": cfg.num_classes, "image_size": cfg.image_size,
            "width": cfg.width, "class_names": source.class_names, "pact_quant": cfg.pact_quant}


@dataclass
class TrainResult:
    output_path: Path
    best_ckpt: Path | None
    best_top1: float | None
    last_ckpt: Path | None
    elapsed_s: float


def _check_resume(cfg: Config) -> tuple[dict, CheckpointMeta] | None:
    if not cfg.resume_ckpt:
        return None
    path = Path(cfg.resume_ckpt)
    params, meta = read_checkpoint(path, "resume_ckpt")
    check_compatible(meta, path, cfg.model, cfg.num_classes, cfg.width, cfg.pact_quant)
    if not has_optimizer_state(params) or meta.epoch_num is None:
        raise UserError(f"resume_ckpt {path} has no optimizer state or epoch (resume from a periodic checkpoint "
                        f"checkpoint/{cfg.model}-<epoch>_<step>.ckpt; to start from weights use --pretrain_ckpt)")
    if meta.epoch_num >= cfg.epoch_size:
        raise UserError(f"resume_ckpt {path} already finished epoch {meta.epoch_num} of epoch_size "
                        f"{cfg.epoch_size} (raise --epoch_size to train further)")
    return params, meta


def _prepare_output(cfg: Config, resuming: bool) -> tuple[Path, Path]:
    """Create output folders; a fresh run replaces the outputs of an earlier run in the same folder."""
    out = Path(cfg.output_path)
    ckpt_dir = out / "checkpoint"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if not resuming:
        stale = periodic_checkpoints(ckpt_dir, cfg.model) + [p for p in (ckpt_dir / "best.ckpt",) if p.exists()]
        if stale:
            log.warning("%s holds checkpoints of an earlier run; replacing them (%d files). Use --output_path to "
                        "keep runs apart, or --resume_ckpt to continue one.", ckpt_dir, len(stale))
            for p in stale:
                p.unlink()
    return out, ckpt_dir


def _build_data_and_net(cfg: Config, source: DataSource, resume, pretrain, ranks: RankInfo):
    """(train_ds, val_ds, net, trainable): `trainable` is the net itself, or only its head on cached features."""
    net = net_from_config(cfg)
    if resume:
        load_into(net, resume[0], Path(cfg.resume_ckpt))
    elif pretrain:
        load_pretrained(net, pretrain[0], pretrain[1], Path(cfg.pretrain_ckpt), cfg)
    if cfg.freeze_layer == "backbone":
        feats = cached_features(cfg, source, net)
        train_ds, val_ds = feature_datasets(cfg, feats, **ranks.shard)
        return train_ds, val_ds if cfg.run_eval and ranks.is_main else None, net, HeadOnFeatures(net)
    train_ds = create_dataset(cfg, source, training=True, **ranks.shard)
    # eval during training runs on rank 0 over the whole val set; the other ranks wait at the next step
    val_ds = create_dataset(cfg, source, training=False) if cfg.run_eval and ranks.is_main else None
    return train_ds, val_ds, net, net


def train(cfg: Config) -> TrainResult:
    start = time.perf_counter()
    source = check_dataset(cfg, need_train=True, need_val=cfg.run_eval)
    resume = _check_resume(cfg)
    pretrain = None
    if cfg.pretrain_ckpt and not resume:
        pretrain = read_checkpoint(cfg.pretrain_ckpt, "pretrain_ckpt")
        check_pretrained(pretrain[1], Path(cfg.pretrain_ckpt), cfg)
    ranks = setup_device(cfg, distributed=cfg.run_distribute)
    per_rank = source.train.num_images // ranks.group_size
    if per_rank < cfg.batch_size:
        where = f"each of the {ranks.group_size} ranks gets {per_rank}" if ranks.group_size > 1 else \
            f"there are {per_rank}"
        raise UserError(f"batch_size {cfg.batch_size} is larger than the training set: {where} training images "
                        f"(lower --batch_size to at most {per_rank})")
    warning = amp_speed_warning(cfg)
    if warning and ranks.is_main:
        log.warning("UserWarning: %s", warning)

    train_ds, val_ds, net, trainable = _build_data_and_net(cfg, source, resume, pretrain, ranks)
    steps = train_ds.get_dataset_size()
    lr = build_lr_schedule(cfg.lr_decay_mode, cfg.lr_init, cfg.lr_max, cfg.lr_end, cfg.warmup_epochs,
                           cfg.epoch_size, steps)
    train_step, eval_net = build_training(trainable, cfg, lr)
    initial_epoch = 0
    if resume:
        params, meta = resume
        load_into(train_step, params, Path(cfg.resume_ckpt), skip=NOT_RESTORED)
        initial_epoch = meta.epoch_num
        log.info("resuming %s from epoch %d (global step %d)", cfg.resume_ckpt, initial_epoch,
                 int(train_step.optimizer.global_step.asnumpy().reshape(-1)[0]))

    out, ckpt_dir = Path(cfg.output_path), Path(cfg.output_path) / "checkpoint"
    if ranks.is_main:  # only rank 0 writes outputs
        out, ckpt_dir = _prepare_output(cfg, resuming=bool(resume))
        attach_log_file(out / "train.log", append=bool(resume))
        save_config(cfg, out / "config.yaml")
    what = "head only, on cached backbone features" if trainable is not net else "full net"
    log.info("%s on %s (%s): %d train images (%d classes), %d steps/epoch x %d epochs, batch %d, image %d px, "
             "amp %s%s", cfg.model, cfg.platform, what, source.train.num_images, cfg.num_classes, steps,
             cfg.epoch_size, cfg.batch_size, cfg.image_size, cfg.amp_level,
             ", PACT quantization-aware training (int8 weights and activations)" if cfg.pact_quant else "")

    history = History(records=read_metrics(out / "metrics.csv", initial_epoch) if resume else [])
    for r in history.records:
        if r.val_top1 is not None and r.val_top1 > history.best_top1:
            history.best_top1, history.best_epoch = r.val_top1, r.epoch
    model = Model(train_step, eval_network=eval_net, metrics=accuracy_metrics())
    meta = checkpoint_meta(cfg, source)
    monitor = TrainMonitor(history, lr, cfg.batch_size, steps, cfg.print_freq, cfg.epoch_size,
                           fingerprint_data=ranks.group_size > 1)
    callbacks = [monitor]
    if val_ds is not None:
        callbacks.append(EvalCallback(model, val_ds, history, cfg.eval_interval, cfg.epoch_size, net,
                                      ckpt_dir / "best.ckpt", meta))
    if ranks.is_main:
        # metrics first, so an upload after a checkpoint (ModelArts; always at the last epoch) carries them too
        callbacks += [MetricsCallback(history, out / "metrics.csv", out / "curves.png"),
                      CheckpointCallback([train_step, net], ckpt_dir, cfg.model, cfg.save_checkpoint_epochs,
                                         cfg.keep_checkpoint_max, cfg.epoch_size, steps, meta,
                                         on_saved=(lambda: upload_outputs(cfg)) if cfg.enable_modelarts else None)]
    model.train(cfg.epoch_size, train_ds, callbacks=callbacks, dataset_sink_mode=False, initial_epoch=initial_epoch)
    if ranks.group_size > 1:
        log.info("rank %d of %d: trained on data sha256 %s; final weights sha256 %s", ranks.rank, ranks.group_size,
                 monitor.data_digest.hexdigest()[:16], weights_digest(net)[:16])

    last = periodic_checkpoints(ckpt_dir, cfg.model)
    best = ckpt_dir / "best.ckpt"
    return TrainResult(out, best if best.exists() else None,
                       history.best_top1 if history.best_top1 >= 0 else None, last[-1] if last else None,
                       time.perf_counter() - start)
