"""Which checkpoint goes into which net: checked against the config, for fine-tuning, resuming and inference.

One check (`check_fits`) serves every tool: a checkpoint records the model, width, class count and
quantization it was trained with, and a difference from the config is refused naming the flag to pass.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from src.config import MODE_KEYS, Config, given_on_command_line
from src.data.transforms import with_recorded_preprocessing
from src.engine.checkpoint import (
    ARCH_KEYS,
    SCHEDULE_KEYS,
    SHAPE_HINT,
    CheckpointMeta,
    best_checkpoint,
    check_shapes,
    has_optimizer_state,
    periodic_checkpoints,
    read_checkpoint,
)
from src.engine.layouts import Weights, check_family, map_onto, read_weights
from src.engine.published import PUBLISHED, is_remote
from src.engine.run_folder import ASIDE, settled_for_reading
from src.errors import NothingToDo, UserError
from src.models.common import ClassifierNet
from src.models.quant import is_quant_param
from src.models.registry import model_card, net_from_config

log = logging.getLogger("train")
FILTER_HINT = "fine-tune onto other classes with --filter_head True, or pass the --model/--width it was trained with"


def check_fits(meta: CheckpointMeta, path: Path, cfg: Config, flag: str, fine_tune: bool = False) -> None:
    """Refuse a checkpoint of another model, width, class count or quantization than the config.

    `fine_tune`: the checkpoint is a starting point (--pretrain_ckpt), so its classifier may be dropped
    (--filter_head True) and a float checkpoint may start quantization-aware training.
    """
    what = flag if fine_tune else "checkpoint"
    for key in ("model", "width", "num_classes") if fine_tune else ("model", "num_classes", "width"):
        have, want = getattr(meta, key), getattr(cfg, key)
        if have is None or have == want:
            continue
        if key == "num_classes" and fine_tune:
            if cfg.filter_head:
                continue
            raise UserError(f"{flag} {path} has a {have}-class classifier but num_classes is {want} (pass "
                            f"--filter_head True to drop it and train a new one, or --num_classes {have})")
        how = f"pass --{key} {have}" if fine_tune else f"pass --{key} {have}, or the --config_path it was trained with"
        raise UserError(f"{what} {path} was trained with {key}={have} but the config has {key}={want} ({how})")
    if fine_tune or bool(meta.pact_quant) == cfg.pact_quant:
        return
    if meta.pact_quant:
        raise UserError(f"{what} {path} was trained with --pact_quant True (pass --pact_quant True to use "
                        "its quantization scales)")
    raise UserError(f"{what} {path} is a float checkpoint and has no quantization scales (quantize it by "
                    f"QAT fine-tuning: python train.py --pact_quant True --pretrain_ckpt {path}; or drop "
                    "--pact_quant)")


@dataclass
class LoadReport:
    loaded: int
    dropped: list[str]
    left_at_init: list[str]


def load_pretrained(net: ClassifierNet, weights: Weights, cfg: Config) -> LoadReport:
    """Load a --pretrain_ckpt of any layout into `net`: every backbone parameter must be found; with cfg.filter_head
    the classifier is dropped, else its shape must fit. Logs what was mapped, ignored, dropped and left at init."""
    path, head = weights.path, net.head_prefixes
    mapped = map_onto(weights, net, cfg.model, cfg.width)
    own = {p.name: tuple(p.shape) for p in net.get_parameters()}
    if weights.foreign:
        log.info("%s layout: %d/%d parameters mapped%s", weights.layout.name(cfg.model, cfg.width), len(mapped),
                 len(weights.params), f" (bn_eps {cfg.bn_eps:g}, padding {cfg.padding})" if cfg.bn_eps else "")
    if weights.ignored:
        log.info("pretrain_ckpt %s: ignored %d optimizer entries (%s%s): fine-tuning starts a new optimizer", path,
                 len(weights.ignored), ", ".join(weights.ignored[:3]), ", ..." if len(weights.ignored) > 3 else "")
    dropped = sorted(n for n in mapped if n.startswith(head)) if cfg.filter_head else []
    for name in dropped:
        del mapped[name]
    check_shapes(mapped, own, f"pretrain_ckpt {path}", FILTER_HINT)
    missing = [n for n in own if n not in mapped and not n.startswith(head) and not is_quant_param(n)]
    if missing:
        raise UserError(f"pretrain_ckpt {path} ({weights.layout.name(cfg.model, cfg.width)} layout) lacks "
                        f"{len(missing)} backbone parameter{'s' if len(missing) > 1 else ''} of {cfg.model}: "
                        f"{', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''} (they would train from "
                        "random values: pass a complete checkpoint of the net)")
    load_mapped(net, mapped)
    left = [n for n in own if n not in mapped]
    report = LoadReport(len(mapped), dropped, left)
    log.info("pretrain_ckpt %s: loaded %d parameters, dropped %d classifier parameters%s, %d left at init%s", path,
             report.loaded, len(dropped), f" ({', '.join(dropped)})" if dropped else "", len(left),
             f" ({', '.join(left[:4])}{', ...' if len(left) > 4 else ''})" if left else "")
    return report


def load_mapped(net: ClassifierNet, mapped: dict) -> None:
    import mindspore as ms

    ms.load_param_into_net(net, {n: ms.Parameter(ms.Tensor(v), name=n) for n, v in mapped.items()}, strict_load=False)


def read_pretrained(cfg: Config) -> tuple[Config, Weights]:
    """The --pretrain_ckpt file, read, recognised and checked against the config (before anything compiles), and the
    config with the net conventions (BatchNorm epsilon, padding) of the weights."""
    weights = read_weights(cfg.pretrain_ckpt, "pretrain_ckpt")
    check_family(weights, cfg.model, "pretrain_ckpt")
    check_fits(weights.meta, weights.path, cfg, "pretrain_ckpt", fine_tune=True)
    # the weights' input normalization and interpolation; the eval crop stays the data set's
    cfg = with_recorded_preprocessing(arch_from_checkpoint(cfg, weights.meta, weights.path), weights.meta.preprocess,
                                      keys=("mean", "std", "interpolation"))
    return cfg, weights


def arch_from_checkpoint(cfg: Config, meta: CheckpointMeta, ckpt: Path) -> Config:
    """The config with the checkpoint's BatchNorm epsilon and padding, unless the command line sets them."""
    return settings_from_checkpoint(cfg, meta, ckpt, ARCH_KEYS)


def warn_if_other_classes(meta: CheckpointMeta, class_names: list[str], path: Path, cfg: Config) -> bool:
    """Warn when a fine-tuning checkpoint's classifier, kept because the class count fits, was trained on other
    classes than the data set's (its outputs would be read as the wrong classes). Returns whether it warned."""
    if cfg.filter_head or not meta.class_names or meta.class_names == list(class_names) or \
            len(meta.class_names) != len(class_names):
        return False

    def show(names):
        return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")

    log.warning("pretrain_ckpt %s was trained on other classes (%s) than this data set's (%s): its "
                "classifier is reused as it is, so pass --filter_head True to train a new one", path,
                show(meta.class_names), show(list(class_names)))
    return True


AUTO = "auto"


def resolve_auto_resume(cfg: Config) -> Config:
    """`--resume_ckpt auto`: the newest periodic checkpoint of this run in output_path/checkpoint/ that is whole (its
    CRC32 matches), falling back past damaged ones with a line naming them; none: a fresh start, said in one line.
    A run that has finished every epoch: NothingToDo (a restarted job that is done ends 0). Other configs pass."""
    if cfg.resume_ckpt != AUTO:
        return cfg
    folder = Path(cfg.output_path) / "checkpoint"
    if (Path(cfg.output_path) / ASIDE).is_dir():  # this run was killed in its first epoch's outputs: they are undone
        log.info("resume_ckpt auto: %s holds a run killed at the end of its first epoch, which is undone: starting "
                 "from epoch 1", cfg.output_path)
        return cfg.replace(resume_ckpt=None)
    found = periodic_checkpoints(folder, cfg.model) if folder.is_dir() else []
    damaged = []
    for path in reversed(found):  # newest first
        try:
            _, meta = read_checkpoint(path, "resume_ckpt")
        except UserError as exc:
            damaged.append(path)
            log.warning("resume_ckpt auto: %s", exc)
            continue
        if damaged:
            log.warning("resume_ckpt auto: %s is damaged; resuming from the one before it, %s", damaged[0].name,
                        path.name)
        check_fits(meta, path, cfg, "resume_ckpt")  # an explicit --resume_ckpt's checks, before "finished"
        check_same_schedule(meta, cfg, path)
        if meta.epoch_num is not None and meta.epoch_num >= cfg.epoch_size:
            raise NothingToDo(f"resume_ckpt auto: {path} has finished all {cfg.epoch_size} epochs: nothing to train "
                              f"(to train further, {extend_hint(meta, path)})")
        log.info("resume_ckpt auto: resuming from %s, the newest checkpoint of this run", path)
        return cfg.replace(resume_ckpt=str(path))
    if damaged:
        raise UserError(f"resume_ckpt auto: every checkpoint in {folder} is damaged ({len(damaged)}, newest "
                        f"{damaged[0].name}): pass one to resume from, or start afresh without --resume_ckpt")
    log.info("resume_ckpt auto: no checkpoint of this run in %s: starting from epoch 1", folder)
    return cfg.replace(resume_ckpt=None)


def read_resume(cfg: Config) -> tuple[Config, dict, CheckpointMeta]:
    """The --resume_ckpt file: a periodic checkpoint of this config with optimizer state and epochs left to run."""
    path = Path(cfg.resume_ckpt)
    params, meta = read_checkpoint(path, "resume_ckpt")
    check_fits(meta, path, cfg, "resume_ckpt")
    if not has_optimizer_state(params) or meta.epoch_num is None:
        raise UserError(f"resume_ckpt {path} has no optimizer state or epoch (resume from a periodic checkpoint "
                        f"checkpoint/{cfg.model}-<epoch>_<step>.ckpt; to start from weights use --pretrain_ckpt)")
    check_same_schedule(meta, cfg, path)
    if meta.epoch_num >= cfg.epoch_size:
        raise UserError(f"resume_ckpt {path} already finished epoch {meta.epoch_num} of epoch_size "
                        f"{cfg.epoch_size} (to train further, {extend_hint(meta, path)})")
    return with_recorded_preprocessing(arch_from_checkpoint(cfg, meta, path), meta.preprocess), params, meta


def extend_hint(meta: CheckpointMeta, path: Path) -> str:
    """How to train on from a checkpoint without an LR jump: a new run from its weights, starting at its LR."""
    lr = f" --lr_max {meta.lr:.6g}" if meta.lr is not None else ""
    return (f"start a new run from its weights, continuing its LR: python train.py --pretrain_ckpt {path}{lr} "
            "--warmup_epochs 0 --epoch_size <more epochs> --output_path <another folder>")


# what a checkpoint of this package that lacks a key was trained with (the key did not exist yet)
BEFORE_THE_KEY = {"gradient_accumulation_steps": 1, "num_cycles": 1, "cycle_decay": 1.0}


def check_same_schedule(meta: CheckpointMeta, cfg: Config, path: Path) -> None:
    """A resumed run continues the checkpoint's learning-rate curve, so every key that shapes it must be the same
    (the optimizer's global step indexes a curve built from them), and its optimizer, whose moments it holds.
    Keys an older checkpoint lacks are not checked."""
    if meta.batch_size is not None and (meta.opt or "momentum") != cfg.optimizer_kind:  # momentum: before opt
        have = meta.opt or "momentum"
        raise UserError(f"resume_ckpt {path} was trained with --opt {have} but this run has {cfg.optimizer_kind} (a "
                        f"resumed run continues its optimizer's state: pass --opt {have}, or start a new run from "
                        f"its weights with --pretrain_ckpt {path})")
    mode_only = {key for keys in MODE_KEYS.values() for key in keys}
    used = MODE_KEYS.get(meta.lr_decay_mode, ())
    for key in SCHEDULE_KEYS:
        have = getattr(meta, key)
        if have is None and meta.batch_size is not None:  # a checkpoint of this package from before the key existed
            have = BEFORE_THE_KEY.get(key)
        if key == "steps_per_epoch" or have is None or (key in mode_only and key not in used):
            continue
        want = getattr(cfg, key)
        same = have == want if isinstance(have, str) or want is None else \
            math.isclose(have, want, rel_tol=1e-6, abs_tol=1e-12)
        if same:
            continue
        shown, now = (v if isinstance(v, str) else f"{v:.6g}" for v in (have, want))
        how = (f"pass --{key} {shown}; to train further, {extend_hint(meta, path)}" if key == "epoch_size" else
               f"pass --{key} {shown}, or start a new run from its weights with --pretrain_ckpt {path}")
        raise UserError(f"resume_ckpt {path} was trained with --{key} {shown} but this run has {now} (a resumed "
                        f"run keeps its learning-rate schedule: {how})")


def check_same_steps(meta: CheckpointMeta, steps_per_epoch: int, path: Path, group_size: int) -> None:
    """The steps per epoch of a resumed run must be the checkpoint's (same data, batch size and device count)."""
    if meta.steps_per_epoch is not None and meta.steps_per_epoch != steps_per_epoch:
        raise UserError(f"resume_ckpt {path} was trained with {meta.steps_per_epoch} steps per epoch but this run "
                        f"has {steps_per_epoch} (on {group_size} device{'s' if group_size > 1 else ''}): the "
                        "training set or the number of devices changed (resume with the same data and devices, or "
                        f"start a new run from its weights with --pretrain_ckpt {path})")


def open_for_inference(cfg: Config, path: str | None, flag: str) -> tuple[Config, Weights]:
    """The checkpoint named by --`flag` (default: the run's best.ckpt), of any layout, read, and the config it is
    used with.

    The model settings the checkpoint records (model, width, num_classes, image_size, bn_eps, padding; for published
    weights the class count of their classifier and their layout's conventions) replace the YAML's unless the
    command line gives them; a command-line image_size other than the trained one is used with a warning.
    """
    ckpt = Path(path) if path else best_checkpoint(cfg.output_path)
    if not (path and is_remote(path)) and ckpt.parent.name == "checkpoint":
        settled_for_reading(ckpt.parent.parent, flag)  # a run killed in its commit window: its epoch-1 files
    if not path and not ckpt.is_file():
        raise UserError(f"no checkpoint at {ckpt} (run `python train.py` first, or pass --{flag} PATH)")
    if path in PUBLISHED and "model" not in given_on_command_line(cfg):
        cfg = cfg.replace(model=PUBLISHED[path].model, width=1.0)  # the short name says which net
    weights = read_weights(path or ckpt, flag)  # the string: Path() would fold a URL's "//"
    ckpt = weights.path
    check_family(weights, weights.meta.model or cfg.model, flag)
    cfg = with_recorded_preprocessing(settings_from_checkpoint(cfg, weights.meta, ckpt), weights.meta.preprocess)
    check_fits(weights.meta, ckpt, cfg, flag)
    return cfg, weights


MODEL_KEYS = ("model", "width", "num_classes", "image_size", *ARCH_KEYS)


def settings_from_checkpoint(cfg: Config, meta: CheckpointMeta, ckpt: Path, keys: tuple[str, ...] = MODEL_KEYS
                             ) -> Config:
    """The config with the checkpoint's values of `keys`, except those the command line gives (a different
    image_size or net convention from the command line is used with a warning)."""
    given = given_on_command_line(cfg)
    taken = {}
    for key in keys:
        have = getattr(meta, key)
        if have is None or have == getattr(cfg, key):
            continue
        if key not in given:
            taken[key] = have
        elif key == "image_size":
            log.warning("image_size %d: %s was trained at %d px; its accuracy at another size may differ",
                        cfg.image_size, ckpt, have)
        elif key in ARCH_KEYS:
            log.warning("%s was trained with %s=%s; --%s %s changes its outputs", ckpt, key, have, key,
                        getattr(cfg, key))
    if not taken:
        return cfg
    log.info("%s: %s from the checkpoint", ckpt, ", ".join(f"{k}={v}" for k, v in taken.items()))
    if "model" in taken and not model_card(taken["model"]).width_multiplier and "width" not in given:
        taken.setdefault("width", 1.0)
    return cfg.replace(**taken)


def inference_net(cfg: Config, weights: Weights) -> ClassifierNet:
    """A fresh net in eval mode with every parameter loaded from `weights`."""
    net = net_from_config(cfg)
    mapped = map_onto(weights, net, cfg.model, cfg.width)
    missing = [p.name for p in net.get_parameters() if p.name not in mapped]
    if missing:
        raise UserError(f"checkpoint {weights.path} lacks {len(missing)} parameters of {cfg.model}, e.g. {missing[0]} "
                        "(pass a checkpoint of the same --model)")
    check_shapes(mapped, {p.name: tuple(p.shape) for p in net.get_parameters()}, f"checkpoint {weights.path}",
                 SHAPE_HINT)
    load_mapped(net, mapped)
    net.set_train(False)
    return net
