"""Checkpoint files: atomic saves with metadata, reading them back, loading parameters with checked shapes."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np

from src.errors import UserError, first_line, not_a_file
from src.files import periodic_checkpoints, write_atomically  # noqa: F401 - periodic_checkpoints: re-exported

# the config keys that fix a run's learning-rate schedule, with the steps per epoch: a resumed run keeps them
SCHEDULE_KEYS = ("batch_size", "gradient_accumulation_steps", "epoch_size", "lr_decay_mode", "lr_init", "lr_max",
                 "lr_end", "warmup_epochs", "steps_per_epoch", "lr_step_size", "lr_gamma", "lr_milestones",
                 "lr_step_per_epoch", "num_cycles", "cycle_decay")
# the net's shape beyond model/width/num_classes: a checkpoint made from published weights keeps their convention
ARCH_KEYS = ("bn_eps", "padding")
OWN_META_KEYS = ("model", "image_size", "class_names", "pact_quant", "steps_per_epoch")  # not written by others
EMA_PREFIX = "ema."  # the EMA copy of parameter X is saved as ema.X
OPTIMIZER_MARKERS = ("moments.", "global_step")  # this package's optimizer state (Momentum) and step counter
# optimizer state and step counters of any MindSpore training checkpoint (the ModelZoo's keep them; Momentum, Adam(W),
# RMSProp, Lamb, FTRL, mindcv's Lion/NAdam, EMA copies), left out when its weights are read
OPTIMIZER_NAMES = re.compile(r"(moments|moment[123]?|accum|stat|adam_[mv]|mean_square|mean_grad|lamb_[mv]|linear|"
                             rf"lion_m|nadam_[mv]|prev_gradient|vhat|{re.escape(EMA_PREFIX[:-1])}|swap)\..*|learning_rate|"
                             r"global_step|momentum|beta[12]_power|scale_sense|current_iterator_step|"
                             r"last_overflow_iterator_step|epoch_num|step_num|loss_scale")
# rebuilt from the config on resume: the LR array, and nn.Momentum's and nn.SGD's momentum (the other optimizers take
# theirs from the config too)
NOT_RESTORED = ("learning_rate", "momentum")


@dataclass
class CheckpointMeta:
    """What a checkpoint of this package says about itself (absent fields are None)."""

    epoch_num: int | None = None
    step_num: int | None = None
    model: str | None = None
    num_classes: int | None = None
    image_size: int | None = None
    width: float | None = None
    class_names: list[str] | None = None
    val_top1: float | None = None
    pact_quant: bool | None = None
    ema: bool | None = None  # trained with an EMA: periodic checkpoints hold it as ema.*, best.ckpt as the weights
    bn_eps: float | None = None
    padding: str | None = None
    preprocess: str | None = None  # JSON: mean, std (0..1), crop_pct, interpolation (data.transforms.Preprocessing)
    source: str | None = None  # JSON: the published weights it was converted from (layout, file, sha256)
    lr: float | None = None  # the learning rate of the epoch's last step
    batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    epoch_size: int | None = None
    lr_decay_mode: str | None = None
    lr_init: float | None = None
    lr_max: float | None = None
    lr_end: float | None = None
    warmup_epochs: float | None = None
    steps_per_epoch: int | None = None
    lr_step_size: float | None = None
    lr_gamma: float | None = None
    lr_milestones: str | None = None
    lr_step_per_epoch: bool | None = None
    num_cycles: int | None = None
    cycle_decay: float | None = None
    opt: str | None = None  # the optimizer whose state the checkpoint holds (None: momentum, the only one before)
    mlflow_run_id: str | None = None  # the MLflow run it logged to (--tracker mlflow): a resumed run goes on in it


META_KEYS = tuple(f.name for f in dataclasses.fields(CheckpointMeta))  # stored in the file beside the tensors


def arch_meta(cfg) -> dict[str, Any]:
    """What a checkpoint records of the net's conventions beyond model, width and classes."""
    return {key: getattr(cfg, key) for key in ARCH_KEYS}


class NonFiniteParameter(UserError):
    """A checkpoint would hold nan or inf: it is not written."""


def first_non_finite(obj) -> str | None:
    """The name of the first parameter of `obj` (a Cell or a save list) holding nan or inf, or None."""
    params = obj.get_parameters() if hasattr(obj, "get_parameters") else (item["data"] for item in obj)
    for param in params:
        value = param.asnumpy()
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return param.name
    return None


def check_finite(obj) -> None:
    """Raise NonFiniteParameter naming the first parameter of `obj` that is not finite."""
    name = first_non_finite(obj)
    if name:
        raise NonFiniteParameter(f"parameter {name} holds nan or inf: training diverged, so no checkpoint was "
                                 "written (lower --lr_max, or --loss_scale, and train again)")


def save_checkpoint(obj, path: Path, meta: dict[str, Any]) -> None:
    """Write `obj` (a Cell or a save list) with metadata to `path` via a temp file and rename: never half-written,
    never with a non-finite parameter."""
    check_finite(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    append = {k: (json.dumps(v) if k == "class_names" else v) for k, v in meta.items() if v is not None}

    def write(tmp: Path) -> None:
        try:
            with _mindspore_log_muted():  # its CRITICAL line for a failed save guesses; ours names the cause
                ms.save_checkpoint(obj, str(tmp), append_dict=append, crc_check=True)
        finally:  # MindSpore writes `<tmp stem>.tmp` and renames it to `tmp`: a failed write leaves it behind
            tmp.with_suffix(".tmp").unlink(missing_ok=True)

    write_atomically(path, write, errors=(OSError, RuntimeError))


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> tuple[dict, CheckpointMeta]:
    """Parameters and metadata of a checkpoint file; UserError if it is missing, not a checkpoint, or damaged
    (files saved with a CRC32, as all of this package's are, are verified)."""
    path = Path(path)
    if problem := not_a_file(path):
        raise UserError(f"{what} {path} {problem} (check the path; training writes "
                        "output_path/checkpoint/best.ckpt and <model>-<epoch>_<step>.ckpt)")
    crc = has_crc(path)
    try:
        with _mindspore_log_muted():  # its own ERROR line for a CRC mismatch blames permissions; ours says it all
            raw = ms.load_checkpoint(str(path), crc_check=crc)
    except (ValueError, RuntimeError, TypeError, OSError) as exc:
        if crc:
            raise UserError(f"{what} {path} is damaged: its CRC32 checksum does not match its contents (it was "
                            "changed or cut after it was saved; use another checkpoint, e.g. an earlier "
                            "<model>-<epoch>_<step>.ckpt of the run)") from None
        raise UserError(f"{what} {path} is not a readable MindSpore checkpoint: {first_line(exc)[:200]} "
                        "(pass a .ckpt file written by MindSpore)") from None
    if not crc and any(name in OWN_META_KEYS for name in raw):  # this package's, which all end with a CRC32
        raise UserError(f"{what} {path} is damaged: it was cut short (it holds this package's metadata but not the "
                        "CRC32 every checkpoint of this package ends with; use another checkpoint, e.g. an earlier "
                        "<model>-<epoch>_<step>.ckpt of the run)")
    meta = CheckpointMeta()
    params = {}
    for name, value in raw.items():
        if name in META_KEYS:
            if isinstance(value, ms.Parameter):
                value = value.asnumpy().item()
            if name == "bn_eps":  # saved as float32: 1e-05 comes back as 9.99999974e-06
                value = float(f"{value:.7g}")
            setattr(meta, name, json.loads(value) if name == "class_names" else value)
        else:
            params[name] = value
    return params, meta


@contextlib.contextmanager
def _mindspore_log_muted():
    from mindspore import log as ms_log

    logger = ms_log._get_logger()  # noqa: SLF001 - MindSpore's Python log has no public handle
    was, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = was


CRC_MARKER = b"crc_num"  # MindSpore's crc_check=True ends the file with b"crc_num" + 10 bytes of CRC32


def has_crc(path: Path) -> bool:
    """Whether the file was saved with MindSpore's crc_check (all of this package's are; foreign ones may not be)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() < len(CRC_MARKER) + 10:
                return False
            f.seek(-(len(CRC_MARKER) + 10), os.SEEK_END)
            return f.read(len(CRC_MARKER)) == CRC_MARKER
    except OSError:
        return False


def has_optimizer_state(params: dict) -> bool:
    return any(name.startswith(OPTIMIZER_MARKERS) for name in params)


SHAPE_HINT = "use the --model, --num_classes and --width it was trained with"


def check_shapes(values: dict, shapes: dict[str, tuple], what: str, hint: str) -> None:
    """UserError naming the first of `values` whose shape is not the net's (`shapes`, by parameter name)."""
    for name, value in values.items():
        if tuple(value.shape) != tuple(shapes[name]):
            raise UserError(f"{what}: parameter {name} has shape {tuple(value.shape)} but the net expects "
                            f"{tuple(shapes[name])} ({hint})")


def load_into(cell, params: dict, path: Path, skip: tuple[str, ...] = (), hint: str = SHAPE_HINT) -> list[str]:
    """Load matching parameters into `cell`; a shape mismatch is an error naming the parameter.

    Returns the names of the cell's parameters that the checkpoint did not provide.
    """
    own = {p.name: p for p in cell.get_parameters()}
    check_shapes({n: v for n, v in params.items() if n in own and n not in skip},
                 {n: tuple(p.shape) for n, p in own.items()}, f"checkpoint {path}", hint)
    usable = {k: v for k, v in params.items() if k in own and k not in skip}
    if not any(k in usable for k in own if not k.startswith(OPTIMIZER_MARKERS)):
        raise UserError(f"checkpoint {path} holds none of this net's parameters (is it a checkpoint of "
                        "another model? pass the matching --model)")
    ms.load_param_into_net(cell, usable, strict_load=False)
    return [k for k in own if k not in usable and k not in skip]


def best_checkpoint(output_path: str | Path) -> Path:
    return Path(output_path) / "checkpoint" / "best.ckpt"
