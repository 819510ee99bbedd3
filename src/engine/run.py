"""The training run, top to bottom: check, read the start weights, build data and net, build the step, fit, outcome.

All checks that can fail (data layout, checkpoints, batch size) run before the output folder is
touched and before the first graph compiles.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from mindspore import nn
from mindspore.train import Model

from src.cloud import upload_outputs
from src.compile_cache import compile_cache, data_facts
from src.config import Config
from src.data.checks import DataSource, check_dataset, train_class_counts
from src.data.feature_cache import cached_features, feature_datasets
from src.data.pipeline import create_dataset, pipeline_error, resume_at
from src.device import ISA_VAR, RankInfo, amp_speed_warning, setup_device
from src.engine.callbacks import EpochEnd, Evaluator
from src.engine.checkpoint import (
    NOT_RESTORED,
    CheckpointMeta,
    load_into,
    periodic_checkpoints,
    read_checkpoint,
)
from src.engine.history import History, read_metrics
from src.engine.layouts import Weights
from src.engine.loss import class_weights
from src.engine.lr_schedule import schedule_of
from src.engine.metrics import accuracy_metrics
from src.engine.outputs import epoch_outputs
from src.engine.per_class import ConfusionCounts
from src.engine.progress import Accumulation, ProgressBar, RunState, StepBudget, StepLog, TrainMonitor
from src.engine.run_folder import RunFolder
from src.engine.sinking import Sinking, sink_plan
from src.engine.trackers import NO_TRACKERS, Trackers, check_reachable, open_trackers, tracker_names
from src.engine.train_step import EMA_PREFIX, build_train_step, ema_in_place
from src.engine.weights import (
    check_same_steps,
    load_pretrained,
    read_pretrained,
    read_resume,
    resolve_auto_resume,
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
    log_file: Path | None = None  # rank 0's; train.new.log when no epoch was written (an earlier run stays)


class Resume(NamedTuple):
    """The --resume_ckpt checkpoint: its tensors (net, optimizer state, EMA), metadata and path."""

    params: dict
    meta: CheckpointMeta
    path: Path


class Data(NamedTuple):
    train: object  # mindspore.dataset of the train split (or of cached backbone features)
    val: object | None  # None: no evaluation on this rank
    trainable: nn.Cell  # the net itself, or its head alone on cached features
    batches: int  # per epoch, on this rank
    updates: int  # optimizer steps per epoch (the last accumulation group may be short)
    sinking: Sinking


def train(cfg: Config) -> TrainResult:
    start = time.perf_counter()
    cfg = resolve_auto_resume(cfg)
    source = check_dataset(cfg, need_train=True, need_val=cfg.run_eval)
    counts = train_class_counts(source)
    loss_weights = class_weights(cfg.class_weights, counts, source.class_names)
    cfg, resume, pretrain = _start_weights(cfg, source)
    check_reachable(cfg)
    stop_if_signalled()  # the safe points before training: a signal during the checks or the imports stops here
    ranks = setup_device(cfg, distributed=cfg.run_distribute)
    stop_if_signalled()
    _check_batch_size(cfg, source, ranks)
    folder = RunFolder(cfg, resuming=resume is not None) if ranks.is_main else None  # only rank 0 writes outputs
    if folder:
        folder.open()
    trackers = NO_TRACKERS
    try:
        trackers = _open_trackers(cfg, folder, resume)  # before anything compiles
        _warn_about_settings(cfg, ranks)
        with compile_cache(cfg, "train", data_facts(source, counts, cfg.class_weights), ranks.rank, ranks.group_size):
            net = _build_net(cfg, resume, pretrain)
            data = _build_data(cfg, source, net, ranks, resume)
            trackers.images_per_epoch = data.batches * cfg.batch_size * ranks.group_size
            lr = schedule_of(cfg, data.updates)
            train_step, eval_net = build_train_step(data.trainable, cfg, lr, data.batches, loss_weights)
            initial_epoch = _restore_training_state(cfg, train_step, resume)
            _log_summary(cfg, source, data, net)
            if ranks.is_main:
                _log_classes(cfg, source, counts, loss_weights)
            state = _fit(cfg, source, data, net, train_step, eval_net, lr, ranks, folder, resume, initial_epoch,
                         trackers)
        result = _outcome(cfg, state, net, ranks, folder, start)
        tracking = trackers.on
        # the folder's files are this run's once it has settled (a --max_steps run may stop in its first epoch)
        trackers.finish(Path(cfg.output_path), files=folder is not None and folder.settled)
        if tracking and cfg.enable_modelarts:  # what they wrote at the end (MLflow's database, the last events)
            upload_outputs(cfg)
        return result
    except BaseException as exc:
        trackers.fail("KILLED" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "FAILED")
        if folder:
            folder.abort()
        raise
    finally:
        if folder:
            folder.close()


def _open_trackers(cfg: Config, folder: RunFolder | None, resume: Resume | None) -> Trackers:
    """--tracker's trackers, on rank 0: a resumed run goes on in its MLflow run, and TensorBoard drops the steps
    after its checkpoint that the interrupted run had logged."""
    if folder is None or not tracker_names(cfg.tracker):
        return Trackers([])
    purge_step = resume.meta.step_num + 1 if resume and resume.meta.step_num is not None else None
    resumed = (resume.meta.mlflow_run_id, resume.meta.epoch_num) if resume and resume.meta.mlflow_run_id else None
    return open_trackers(cfg, folder.tensorboard_dir, purge_step, resumed)


def _start_weights(cfg: Config, source: DataSource) -> tuple[Config, Resume | None, Weights | None]:
    """The checkpoint to resume (--resume_ckpt) or to start from (--pretrain_ckpt), read and checked, and the config
    with the settings they record."""
    if cfg.resume_ckpt:
        cfg, params, meta = read_resume(cfg)
        resume = Resume(params, meta, Path(cfg.resume_ckpt))
        RunFolder(cfg, resuming=True).check_resume_target(resume.path)
        return cfg, resume, None
    if cfg.pretrain_ckpt:
        cfg, pretrain = read_pretrained(cfg)
        if source.named:  # (a label list without class names has only the label numbers to compare)
            warn_if_other_classes(pretrain.meta, source.class_names, pretrain.path, cfg)
        return cfg, None, pretrain
    return cfg, None, None


def _warn_about_settings(cfg: Config, ranks: RankInfo) -> None:
    if not ranks.is_main:
        return
    warning = amp_speed_warning(cfg)
    if warning:
        log.warning("%s", warning)
    if cfg.warmup_epochs >= cfg.epoch_size > 0 and cfg.warmup_epochs > 0:
        log.warning("warmup_epochs %g is not below epoch_size %d: the whole run warms up from lr_init "
                    "%g towards lr_max %g and never decays (fine for a trial run; for a real run raise --epoch_size)",
                    cfg.warmup_epochs, cfg.epoch_size, cfg.lr_init, cfg.lr_max)


def _build_net(cfg: Config, resume: Resume | None, pretrain: Weights | None) -> nn.Cell:
    net = net_from_config(cfg)
    if resume:
        load_into(net, resume.params, resume.path)
    elif pretrain:
        load_pretrained(net, pretrain, cfg)
    return net


def _build_data(cfg: Config, source: DataSource, net: nn.Cell, ranks: RankInfo, resume: Resume | None) -> Data:
    """The train and val datasets (eval during training runs on rank 0 over the whole val set; the other ranks wait
    at the next step), and what trains: the net itself, or only its head on cached backbone features."""
    evaluates = cfg.run_eval and ranks.is_main
    if cfg.freeze_layer == "backbone":
        train_ds, val_ds = feature_datasets(cfg, cached_features(cfg, source, net), **ranks.shard)
        val_ds, trainable = val_ds if evaluates else None, HeadOnFeatures(net)
    else:
        train_ds = create_dataset(cfg, source, training=True, **ranks.shard)
        val_ds, trainable = create_dataset(cfg, source, training=False) if evaluates else None, net
    batches = train_ds.get_dataset_size()
    if resume:
        check_same_steps(resume.meta, batches, resume.path, ranks.group_size)
        resume_at(train_ds, resume.meta.epoch_num, cfg.resume_data == "exact")
    sinking = sink_plan(cfg, batches, say=ranks.is_main)
    updates = Accumulation(batches, cfg.gradient_accumulation_steps).updates_per_epoch
    return Data(train_ds, val_ds, trainable, batches, updates, sinking)


def _restore_training_state(cfg: Config, train_step: nn.Cell, resume: Resume | None) -> int:
    """The optimizer state, step counter and EMA of a resumed run; the epoch it goes on from (0 for a new run)."""
    if not resume:
        return 0
    missing = load_into(train_step, resume.params, resume.path, skip=NOT_RESTORED)
    weights = {p.name for p in train_step.optimizer.parameters}
    state = {p.name for p in train_step.optimizer.get_parameters()} - weights  # its moments and step count
    lacking = [n for n in missing if n in state]
    if lacking:  # its optimizer would start from zero moments: not the run it continues
        raise UserError(f"resume_ckpt {resume.path} holds no {lacking[0]} ({len(lacking)} optimizer entries of "
                        f"--opt {cfg.optimizer_kind} are missing; resume with the optimizer it was trained with, or "
                        f"start a new run from its weights with --pretrain_ckpt {resume.path})")
    if cfg.ema and not any(name.startswith(EMA_PREFIX) for name in resume.params):
        # the EMA was cloned from the net, which holds the resumed weights already (loaded above)
        log.warning("resume_ckpt %s holds no EMA (its run had --ema False): the EMA starts from its weights",
                    cfg.resume_ckpt)
    log.info("resuming %s from epoch %d (global step %d)", cfg.resume_ckpt, resume.meta.epoch_num,
             int(train_step.optimizer.global_step.asnumpy().reshape(-1)[0]))
    return resume.meta.epoch_num


def _log_summary(cfg: Config, source: DataSource, data: Data, net: nn.Cell) -> None:
    n = cfg.gradient_accumulation_steps
    accumulated = f" ({data.batches} batches of {cfg.batch_size}, the optimizer steps every {n}: an effective batch " \
        f"of {cfg.batch_size * n})" if n > 1 else ""
    isa = "" if cfg.platform != "CPU" else f", {ISA_VAR}={os.environ[ISA_VAR]}" if ISA_VAR in os.environ else \
        f", {ISA_VAR} unset (oneDNN takes the CPU's best)"
    log.info("%s on %s (%s): %d train images (%d classes), %d steps/epoch%s x %d epochs, batch %d, image %d px, "
             "amp %s%s%s", cfg.model, cfg.platform, "full net" if data.trainable is net else
             "head only, on cached backbone features", source.train.num_images, cfg.num_classes, data.updates,
             accumulated, cfg.epoch_size, cfg.batch_size, cfg.image_size, cfg.amp_level, isa,
             ", PACT quantization-aware training (int8 weights and activations)" if cfg.pact_quant else "")


def _log_classes(cfg: Config, source: DataSource, counts: tuple[int, ...], weights) -> None:
    """The train images per class, naming the rarest, and what counters an imbalance."""
    names = source.class_names
    order = sorted(range(len(counts)), key=lambda i: (counts[i], i))
    low, high = counts[order[0]], counts[order[-1]]
    rarest = ", ".join(f"{names[i]} {counts[i]}" for i in order[:5])
    counter = []
    if weights is not None:
        counter.append(f"class weights {cfg.class_weights} ({min(weights):.3g}..{max(weights):.3g})")
    if cfg.sampler == "balanced":
        counter.append("balanced sampling")
    hint = f"; countered by {' and '.join(counter)}" if counter else \
        " (imbalanced: --class_weights balanced or --sampler balanced counter it)" if high >= 3 * max(low, 1) else ""
    log.info("train images per class: %d..%d, rarest %s%s", low, high, rarest, hint)


def _fit(cfg: Config, source: DataSource, data: Data, net: nn.Cell, train_step: nn.Cell, eval_net: nn.Cell, lr,
         ranks: RankInfo, folder: RunFolder | None, resume: Resume | None, initial_epoch: int,
         trackers: Trackers) -> RunState:
    """Model.train with the callbacks; an interruption or a pipeline failure becomes its one line."""
    out = Path(cfg.output_path)
    metrics = {**accuracy_metrics(), "per_class": ConfusionCounts(source.class_names)}
    model = Model(train_step, eval_network=eval_net, metrics=metrics)
    history = History(read_metrics(out / "metrics.csv", initial_epoch) if resume else [])
    trackers.attach(history)  # a resumed run's epochs that its trackers lack are logged now
    steps = StepLog(lr, cfg.batch_size, data.sinking, cfg.print_freq, train_step.stats,
                    accumulation=cfg.gradient_accumulation_steps,
                    on_line=_per_job(trackers, ranks.group_size) if trackers.on else None)
    budget = StepBudget(cfg.max_steps, steps.groups, cfg.batch_size * cfg.gradient_accumulation_steps,
                        ranks.group_size) if cfg.max_steps else None
    state = RunState(budget=budget)
    bar = ProgressBar(cfg.epoch_size, data.sinking.steps_per_epoch)
    evaluator = Evaluator(model, data.val, cfg.eval_interval, cfg.epoch_size, counter=metrics["acc"],
                          expected=(source.val.num_images, source.val.path) if ranks.group_size == 1 else None,
                          weights=lambda: ema_in_place(train_step), per_class_folder=out,
                          ) if data.val is not None else None
    _log_recipe(cfg, ranks)
    outputs = epoch_outputs(cfg, folder, source, net, train_step, data.batches, resume is not None, trackers,
                             evaluator.write_per_class if evaluator else None) if folder else _nothing
    callbacks = [TrainMonitor(state, steps, bar, cfg.fingerprint_data, budget),
                 EpochEnd(state, steps, bar, history, evaluator, outputs, net)]
    try:
        stop_if_signalled()
        model.train(train_dataset=data.train, callbacks=callbacks,
                    **data.sinking.train_kwargs(cfg.epoch_size, initial_epoch))
        stop_if_signalled()  # a signal during the last epoch's end: the run did not finish as asked
    except (KeyboardInterrupt, Exception) as exc:  # Ctrl-C or SIGTERM (errors.stop_on_signals), or an error after one
        signum = interrupting_signal(exc)
        if signum is None:
            if isinstance(exc, RuntimeError) and "Dataset Pipeline Error Message" in str(exc):
                raise UserError(pipeline_error(exc, state.epoch, state.step, source.kind)) from None
            raise
        last = _last_checkpoint_of_this_run(cfg, folder)
        resume_hint = f"resume with --resume_ckpt {last}" if last else "no checkpoint of this run yet"
        lost = "; MindSpore stops a rank this way too when another rank is lost" if ranks.group_size > 1 else ""
        raise Interrupted(f"training interrupted at epoch {state.epoch} step {state.step} ({resume_hint}; "
                          f"every file written so far is complete{lost})", signum) from None
    return state


def _per_job(trackers: Trackers, ranks: int):
    """The speed line's numbers for the trackers, with images/s of the whole job (the line's are one rank's)."""
    def step(global_step: int, scalars: dict[str, float]) -> None:
        trackers.step(global_step, {**scalars, "images_per_s": scalars["images_per_s"] * ranks})

    return step


def _nothing(record, history) -> None:
    """The epoch outputs of a rank other than 0: none."""


def _log_recipe(cfg: Config, ranks: RankInfo) -> None:
    if ranks.is_main:
        from src.engine import lr_schedule, optimizer

        log.info("optimizer %s; LR %s%s", optimizer.describe(cfg), lr_schedule.describe(cfg),
                 f"; stochastic depth up to {cfg.drop_path_rate:g}" if cfg.drop_path_rate else "")
    if cfg.ema and ranks.is_main:
        log.info("EMA of the weights (decay %g, warmed up over the first few thousand steps as mindcv): evaluation, "
                 "best.ckpt, and eval/export/fine-tuning from this run's checkpoints use it", cfg.ema_decay)
    if cfg.mixes and ranks.is_main:
        log.info("mixing train batches (mixup alpha %g, cutmix alpha %g, probability %g, cutmix share %g, %s): soft "
                 "targets; train top-1/top-5 count each target's largest class", cfg.mixup, cfg.cutmix,
                 cfg.mixup_prob, cfg.mixup_switch_prob if cfg.mixup > 0 and cfg.cutmix > 0 else
                 float(cfg.cutmix > 0), f"epochs 1..{cfg.mixup_off_epoch}" if cfg.mixup_off_epoch else "every epoch")


def _outcome(cfg: Config, state: RunState, net: nn.Cell, ranks: RankInfo, folder: RunFolder | None,
             start: float) -> TrainResult:
    """A divergence as its one line, else the digests of a distributed run and the result."""
    if state.divergence:
        epoch, step, what = state.divergence
        raise TrainingDiverged(
            f"training diverged at epoch {epoch} step {step} ({what}); last good checkpoint: "
            f"{_last_checkpoint_of_this_run(cfg, folder) or 'none of this run'}; lower --lr_max (now {cfg.lr_max:g})"
            + (f" or --loss_scale (now {cfg.loss_scale:g})" if cfg.loss_scale > 1 else "")
            + (f", or train in float32 with --amp_level O0 (now {cfg.amp_level}: float16 on CPU is slower and "
               "overflows easily)" if cfg.platform == "CPU" and cfg.amp_level != "O0" else "") + " and train again")
    if state.budget_spent and ranks.is_main:
        log.info("%s", state.budget.summary(state))
    if ranks.group_size > 1 or cfg.fingerprint_data:  # the weights digest is one pass over them, at the end
        data = f"trained on data sha256 {state.data_digest.hexdigest()[:16]}; " if cfg.fingerprint_data else ""
        log.info("rank %d of %d: %sfinal weights sha256 %s", ranks.rank, ranks.group_size, data,
                 weights_digest(net)[:16])
    out = Path(cfg.output_path)
    best = out / "checkpoint" / "best.ckpt"
    # a run --max_steps stopped in its first epoch has no best.ckpt: the one there is an earlier run's
    ours = best.is_file() and (folder is None or folder.settled)
    best_top1 = read_checkpoint(best, "best.ckpt")[1].val_top1 if ours else None
    return TrainResult(out, best if ours else None, best_top1, _last_checkpoint_of_this_run(cfg, folder),
                       time.perf_counter() - start, folder.log_file if folder else None)


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


def weights_digest(net: nn.Cell) -> str:
    """sha256 of every parameter: equal on all ranks after synchronous data-parallel training."""
    digest = hashlib.sha256()
    for p in net.trainable_params():
        digest.update(p.asnumpy().tobytes())
    return digest.hexdigest()
