"""The training run, top to bottom: check, build data and net, build the step, train with callbacks, report.

All checks that can fail (data layout, checkpoints, batch size) run before the output folder is
touched and before the first graph compiles.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from mindspore import nn
from mindspore.train import Model

from src.cloud import upload_outputs
from src.config import Config
from src.data.checks import DataSource, check_dataset
from src.data.feature_cache import cached_features, feature_datasets
from src.data.pipeline import create_dataset
from src.data.transforms import preprocessing
from src.device import ISA_VAR, RankInfo, amp_speed_warning, setup_device
from src.engine.callbacks import (
    BestCheckpoint,
    EpochEnd,
    Evaluator,
    LossAlarm,
    MetricsFiles,
    PeriodicCheckpoints,
    TrainMonitor,
)
from src.engine.checkpoint import (
    NOT_RESTORED,
    SCHEDULE_KEYS,
    arch_meta,
    load_into,
    periodic_checkpoints,
    read_checkpoint,
)
from src.engine.history import History, read_metrics
from src.engine.lr_schedule import build_lr_schedule
from src.engine.metrics import accuracy_metrics
from src.engine.per_class import ConfusionCounts
from src.engine.run_folder import RunFolder
from src.engine.sinking import sink_plan
from src.engine.train_step import EMA_PREFIX, build_train_step, ema_by_name, ema_in_place
from src.engine.weights import (
    check_same_steps,
    load_pretrained,
    read_pretrained,
    read_resume,
    warn_if_other_classes,
)
from src.errors import Interrupted, UserError, interrupting_signal, stop_if_signalled
from src.models.common import HeadOnFeatures
from src.models.registry import net_from_config

log = logging.getLogger("train")


class TrainingDiverged(UserError):
    """The loss became nan or inf; no checkpoint was written after it."""


@dataclass
class TrainResult:
    output_path: Path
    best_ckpt: Path | None
    best_top1: float | None
    last_ckpt: Path | None
    elapsed_s: float


def train(cfg: Config) -> TrainResult:
    start = time.perf_counter()
    source = check_dataset(cfg, need_train=True, need_val=cfg.run_eval)
    resume = pretrain = None
    if cfg.resume_ckpt:
        cfg, *resume = read_resume(cfg)
        RunFolder(cfg, resuming=True).check_resume_target(Path(cfg.resume_ckpt))
    elif cfg.pretrain_ckpt:
        cfg, pretrain = read_pretrained(cfg)
        warn_if_other_classes(pretrain.meta, source.class_names, pretrain.path, cfg)
    stop_if_signalled()  # the safe points before training: a signal during the checks or the imports stops here
    ranks = setup_device(cfg, distributed=cfg.run_distribute)
    stop_if_signalled()
    _check_batch_size(cfg, source, ranks)
    folder = RunFolder(cfg, resuming=bool(resume)) if ranks.is_main else None  # only rank 0 writes outputs
    if folder:
        folder.open()
    try:
        return _train(cfg, source, resume, pretrain, ranks, folder, start)
    except BaseException:
        if folder:
            folder.abort()
        raise
    finally:
        if folder:
            folder.close()


def _train(cfg: Config, source: DataSource, resume, pretrain, ranks: RankInfo, folder: RunFolder | None,
           start: float) -> TrainResult:
    warning = amp_speed_warning(cfg)
    if warning and ranks.is_main:
        log.warning("%s", warning)
    if cfg.warmup_epochs >= cfg.epoch_size > 0 and cfg.warmup_epochs > 0 and ranks.is_main:
        log.warning("warmup_epochs %g is not below epoch_size %d: the whole run warms up from lr_init "
                    "%g towards lr_max %g and never decays (fine for a trial run; for a real run raise --epoch_size)",
                    cfg.warmup_epochs, cfg.epoch_size, cfg.lr_init, cfg.lr_max)

    net = net_from_config(cfg)
    if resume:
        load_into(net, resume[0], Path(cfg.resume_ckpt))
    elif pretrain:
        load_pretrained(net, pretrain, cfg)
    train_ds, val_ds, trainable = _datasets(cfg, source, net, ranks, resume[1].epoch_num if resume else 0)
    steps = train_ds.get_dataset_size()
    if resume:
        check_same_steps(resume[1], steps, Path(cfg.resume_ckpt), ranks.group_size)
    sinking = sink_plan(cfg, steps, say=ranks.is_main)
    updates = -(-steps // cfg.gradient_accumulation_steps)  # optimizer steps per epoch (the last group may be short)
    lr = build_lr_schedule(cfg.lr_decay_mode, cfg.lr_init, cfg.lr_max, cfg.lr_end, cfg.warmup_epochs,
                           cfg.epoch_size, updates)
    train_step, eval_net = build_train_step(trainable, cfg, lr, steps)
    initial_epoch = 0
    if resume:
        load_into(train_step, resume[0], Path(cfg.resume_ckpt), skip=NOT_RESTORED)
        if cfg.ema and not any(name.startswith(EMA_PREFIX) for name in resume[0]):
            # the EMA was cloned from the net, which holds the resumed weights already (loaded above)
            log.warning("resume_ckpt %s holds no EMA (its run had --ema False): the EMA starts from its weights",
                        cfg.resume_ckpt)
        initial_epoch = resume[1].epoch_num
        log.info("resuming %s from epoch %d (global step %d)", cfg.resume_ckpt, initial_epoch,
                 int(train_step.optimizer.global_step.asnumpy().reshape(-1)[0]))

    out, ckpt_dir = Path(cfg.output_path), Path(cfg.output_path) / "checkpoint"
    n = cfg.gradient_accumulation_steps
    accumulated = f" ({steps} batches of {cfg.batch_size}, the optimizer steps every {n}: an effective batch of " \
        f"{cfg.batch_size * n})" if n > 1 else ""
    isa = "" if cfg.platform != "CPU" else f", {ISA_VAR}={os.environ[ISA_VAR]}" if ISA_VAR in os.environ else \
        f", {ISA_VAR} unset (oneDNN takes the CPU's best)"
    log.info("%s on %s (%s): %d train images (%d classes), %d steps/epoch%s x %d epochs, batch %d, image %d px, "
             "amp %s%s%s", cfg.model, cfg.platform, "full net" if trainable is net else
             "head only, on cached backbone features", source.train.num_images, cfg.num_classes, updates, accumulated,
             cfg.epoch_size, cfg.batch_size, cfg.image_size, cfg.amp_level, isa,
             ", PACT quantization-aware training (int8 weights and activations)" if cfg.pact_quant else "")

    metrics = {**accuracy_metrics(), "per_class": ConfusionCounts(source.class_names)}
    model = Model(train_step, eval_network=eval_net, metrics=metrics)
    history = History(read_metrics(out / "metrics.csv", initial_epoch) if resume else [])
    monitor = TrainMonitor(lr, cfg.batch_size, sinking, cfg.print_freq, cfg.epoch_size, train_step.stats,
                           fingerprint_data=cfg.fingerprint_data, accumulation=cfg.gradient_accumulation_steps)
    evaluator = Evaluator(model, val_ds, cfg.eval_interval, cfg.epoch_size, counter=metrics["acc"],
                          expected=(source.val.num_images, source.val.path) if ranks.group_size == 1 else None,
                          weights=lambda: ema_in_place(train_step), per_class_folder=out,
                          ) if val_ds is not None else None
    if cfg.ema and ranks.is_main:
        log.info("EMA of the weights (decay %g, warmed up over the first few thousand steps as mindcv): evaluation, "
                 "best.ckpt, and eval/export/fine-tuning from this run's checkpoints use it", cfg.ema_decay)
    if cfg.mixes and ranks.is_main:
        log.info("mixing train batches (mixup alpha %g, cutmix alpha %g, probability %g, cutmix share %g, %s): soft "
                 "targets; train top-1/top-5 count each target's largest class", cfg.mixup, cfg.cutmix,
                 cfg.mixup_prob, cfg.mixup_switch_prob if cfg.mixup > 0 and cfg.cutmix > 0 else
                 float(cfg.cutmix > 0), f"epochs 1..{cfg.mixup_off_epoch}" if cfg.mixup_off_epoch else "every epoch")
    alarm = LossAlarm(cfg.num_classes, f"lower --lr_max, now {cfg.lr_max:g}, and train again")
    outputs = [folder.commit, alarm, *_epoch_outputs(cfg, ckpt_dir, source, net, train_step, steps, bool(resume),
                                                     evaluator.write_per_class if evaluator else None),
               folder.settle] if folder else []
    try:
        stop_if_signalled()
        model.train(train_dataset=train_ds, callbacks=[monitor, EpochEnd(monitor, history, evaluator, outputs, net)],
                    **sinking.train_kwargs(cfg.epoch_size, initial_epoch))
        stop_if_signalled()  # a signal during the last epoch's end: the run did not finish as asked
    except (KeyboardInterrupt, Exception) as exc:  # Ctrl-C or SIGTERM (errors.stop_on_signals), or an error after one
        signum = interrupting_signal(exc)
        if signum is None:
            if isinstance(exc, RuntimeError) and "Dataset Pipeline Error Message" in str(exc):
                raise UserError(pipeline_error(exc, monitor.epoch, monitor.iter)) from None
            raise
        last = _last_checkpoint_of_this_run(cfg, folder)
        resume_hint = f"resume with --resume_ckpt {last}" if last else "no checkpoint of this run yet"
        lost = "; MindSpore stops a rank this way too when another rank is lost" if ranks.group_size > 1 else ""
        raise Interrupted(f"training interrupted at epoch {monitor.epoch} step {monitor.iter} ({resume_hint}; "
                          f"every file written so far is complete{lost})", signum) from None
    if monitor.diverged:
        epoch, step, loss = monitor.diverged
        what = loss if isinstance(loss, str) else f"loss {loss}"
        raise TrainingDiverged(
            f"training diverged at epoch {epoch} step {step} ({what}); last good checkpoint: "
            f"{_last_checkpoint_of_this_run(cfg, folder) or 'none of this run'}; lower --lr_max (now {cfg.lr_max:g})"
            + (f" or --loss_scale (now {cfg.loss_scale:g})" if cfg.loss_scale > 1 else "")
            + (f", or train in float32 with --amp_level O0 (now {cfg.amp_level}: float16 on CPU is slower and "
               "overflows easily)" if cfg.platform == "CPU" and cfg.amp_level != "O0" else "") + " and train again")
    if ranks.group_size > 1 or cfg.fingerprint_data:  # the weights digest is one pass over them, at the end
        data = f"trained on data sha256 {monitor.data_digest.hexdigest()[:16]}; " if cfg.fingerprint_data else ""
        log.info("rank %d of %d: %sfinal weights sha256 %s", ranks.rank, ranks.group_size, data,
                 weights_digest(net)[:16])

    best = ckpt_dir / "best.ckpt"
    best_top1 = read_checkpoint(best, "best.ckpt")[1].val_top1 if best.is_file() else None
    return TrainResult(out, best if best.is_file() else None, best_top1, _last_checkpoint_of_this_run(cfg, folder),
                       time.perf_counter() - start)


def pipeline_error(exc: Exception, epoch: int, step: int) -> str:
    """One line for a mindspore.dataset failure during training, naming the file when MindSpore does."""
    text = " ".join(line.strip() for line in str(exc).splitlines())
    found = re.search(r"The corresponding data file is: (.+?)\. (.+?\.)(?:\s|$)", text)
    if found:
        return (f"{found.group(1)} cannot be read by MindSpore ({found.group(2).strip().rstrip('.')}), found at epoch "
                f"{epoch} step {step} although the check before training decoded every image (was the file changed? "
                "delete or re-encode it and train again)")
    detail = re.search(r"\[ERROR\] (.+?\.)(?:\s|$)", text)
    return (f"the data pipeline failed at epoch {epoch} step {step}: "
            f"{(detail.group(1) if detail else text)[:300].strip()} (run with --debug for MindSpore's message)")


def _last_checkpoint_of_this_run(cfg: Config, folder: RunFolder | None) -> Path | None:
    """The newest periodic checkpoint, unless it still belongs to an earlier run, or this fresh run has not yet
    written all of its first epoch's files (a failure then puts the earlier run back)."""
    if folder is not None and not folder.settled:
        return None
    last = periodic_checkpoints(Path(cfg.output_path) / "checkpoint", cfg.model)
    return last[-1] if last else None


def _check_batch_size(cfg: Config, source: DataSource, ranks: RankInfo) -> None:
    if cfg.mixes and cfg.batch_size % 2:
        raise UserError(f"--mixup/--cutmix pair each image with the one at the mirrored batch position, so "
                        f"batch_size must be even (got {cfg.batch_size}; as timm and mindcv)")
    per_rank = source.train.num_images // ranks.group_size
    if per_rank < cfg.batch_size:
        where = f"each of the {ranks.group_size} ranks gets {per_rank}" if ranks.group_size > 1 else \
            f"there are {per_rank}"
        raise UserError(f"batch_size {cfg.batch_size} is larger than the training set: {where} training images "
                        f"(lower --batch_size to at most {per_rank})")


def _datasets(cfg: Config, source: DataSource, net: nn.Cell, ranks: RankInfo, first_epoch: int = 0):
    """(train_ds, val_ds, trainable): `trainable` is the net itself, or only its head on cached features.

    Eval during training runs on rank 0 over the whole val set; the other ranks wait at the next step.
    """
    evaluates = cfg.run_eval and ranks.is_main
    if cfg.freeze_layer == "backbone":
        train_ds, val_ds = feature_datasets(cfg, cached_features(cfg, source, net), **ranks.shard)
        return train_ds, val_ds if evaluates else None, HeadOnFeatures(net)
    train_ds = create_dataset(cfg, source, training=True, first_epoch=first_epoch, **ranks.shard)
    return train_ds, create_dataset(cfg, source, training=False) if evaluates else None, net


def _epoch_outputs(cfg: Config, ckpt_dir: Path, source: DataSource, net: nn.Cell, train_step: nn.Cell,
                   steps_per_epoch: int, resuming: bool, per_class=None) -> list:
    """What rank 0 writes after each epoch, in this order: best.ckpt, metrics.csv + curves.png, per_class.csv +
    confusion_matrix.png (`per_class`, after the last epoch), the periodic checkpoint (an upload after it, on
    ModelArts, carries the others). A resumed run's best.ckpt is replaced only
    by a better epoch than the one it holds."""
    out = Path(cfg.output_path)
    best = ckpt_dir / "best.ckpt"
    floor = read_checkpoint(best, "best.ckpt")[1].val_top1 if resuming and best.is_file() else None
    meta = {"model": cfg.model, "num_classes": cfg.num_classes, "image_size": cfg.image_size,
            "width": cfg.width, "class_names": source.class_names, "pact_quant": cfg.pact_quant, "ema": cfg.ema,
            **arch_meta(cfg), "preprocess": preprocessing(cfg, source.kind).to_json(),
            **{key: getattr(cfg, key) for key in SCHEDULE_KEYS if key != "steps_per_epoch"},
            "steps_per_epoch": steps_per_epoch}
    return [BestCheckpoint(net, best, meta, floor, ema=ema_by_name(train_step)),
            MetricsFiles(out / "metrics.csv", out / "curves.png"), *([per_class] if per_class else []),
            PeriodicCheckpoints([train_step, net], ckpt_dir, cfg.model, cfg.save_checkpoint_epochs,
                                cfg.keep_checkpoint_max, cfg.epoch_size, meta,
                                on_saved=(lambda: upload_outputs(cfg)) if cfg.enable_modelarts else None)]


def weights_digest(net: nn.Cell) -> str:
    """sha256 of every parameter: equal on all ranks after synchronous data-parallel training."""
    digest = hashlib.sha256()
    for p in net.trainable_params():
        digest.update(p.asnumpy().tobytes())
    return digest.hexdigest()
