"""Cross-entropy with label smoothing as in the ModelZoo: on-value 1-s, off-value s/(C-1), and class weights.

Int labels are smoothed here; soft targets (batch x classes, from mixup/cutmix, smoothed when they were mixed)
are taken as they are. Class weights weigh samples, as Keras's class_weight: a sample of class c counts w_c times
in the batch mean (a mixed sample lam x w_a + (1 - lam) x w_b), its target unchanged, and the mean is over the
batch, not renormalised by the weights, so balanced weights keep the loss's scale (their mean over the training
images is 1). PyTorch's cross_entropy(weight=w) instead multiplies each class's term of the target, smoothing
mass included, which pulls a common class's samples towards the rare classes."""
from __future__ import annotations

import logging
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from src.config import list_items
from src.errors import UserError

log = logging.getLogger("train")


class CrossEntropySmooth(nn.Cell):
    def __init__(self, num_classes: int, smooth_factor: float = 0.0, weights: np.ndarray | None = None):
        super().__init__()
        self.num_classes = num_classes
        on, off = 1.0 - smooth_factor, smooth_factor / (num_classes - 1)
        self.on_value, self.off_value = Tensor(on, ms.float32), Tensor(off, ms.float32)
        self.ce = nn.SoftmaxCrossEntropyWithLogits(reduction="mean")
        self.weights = None
        if weights is not None:
            if abs(on - off) < 1e-6:
                raise UserError(f"--label_smooth {smooth_factor} makes every target uniform over {num_classes} "
                                "classes, so no class weight applies (lower --label_smooth)")
            self.per_sample = nn.SoftmaxCrossEntropyWithLogits(reduction="none")
            self.weights = Tensor(np.asarray(weights, np.float32).reshape(1, -1))
            # a (mixed) smoothed target t = off + (on - off) x the unsmoothed mix: its weight is the mix's
            self.unsmooth = (Tensor(off * float(np.sum(weights)), ms.float32), Tensor(on - off, ms.float32))

    def construct(self, logits, label):
        if label.ndim == 2:  # soft targets
            target = ops.cast(label, ms.float32)
        else:
            target = ops.one_hot(label, self.num_classes, self.on_value, self.off_value)
        if self.weights is None:
            return self.ce(logits, target)
        offset, scale = self.unsmooth
        sample_weight = (ops.sum(target * self.weights, -1) - offset) / scale
        return ops.mean(ops.cast(self.per_sample(logits, target), ms.float32) * sample_weight)


def class_weights(text: str, counts: list[int] | tuple[int, ...], names: list[str]) -> np.ndarray | None:
    """The `class_weights` key's weights: None (none), scikit-learn's balanced n / (C x n_c) from the train split's
    class counts, a comma list, or a file (one number per line, or 'name weight' lines in any order)."""
    if text == "none":
        return None
    if text == "balanced":
        counts = np.asarray(counts, np.float64)
        if (counts == 0).any():
            empty = [names[i] for i in np.flatnonzero(counts == 0)[:5]]
            raise UserError(f"--class_weights balanced: classes {', '.join(empty)} have no train images, so no "
                            "weight (give the weights as a list or a file, or add images)")
        return (counts.sum() / (len(counts) * counts)).astype(np.float32)
    path = Path(text).expanduser()
    if path.is_file():
        values = _weights_file(path, names)
    elif any(sep in text for sep in ",[ ") or _number(text) is not None:
        values = [_number(part) for part in list_items(text)]
        if None in values:
            raise UserError(f"--class_weights got {text!r} (use none, balanced, a comma list of {len(names)} "
                            "numbers, or a file of them)")
    else:
        raise UserError(f"--class_weights {text}: no such file (use none, balanced, a comma list of {len(names)} "
                        "numbers, or a file of them, one per line)")
    if len(values) != len(names):
        raise UserError(f"--class_weights has {len(values)} weights for {len(names)} classes (one per class, in "
                        "label order)")
    if any(v < 0 for v in values) or not any(v > 0 for v in values):
        raise UserError("--class_weights must be numbers of at least 0, not all 0")
    return np.asarray(values, np.float32)


def _weights_file(path: Path, names: list[str]) -> list[float]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--class_weights {path} cannot be read as UTF-8 text ({exc})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if all(_number(line) is not None for line in lines):
        return [_number(line) for line in lines]
    by_name = {}
    for number, line in enumerate(lines, 1):
        name, value = (line.rsplit(None, 1) + [""])[:2]
        if _number(value) is None or name.strip() not in names:
            raise UserError(f"{path} line {number}: {line[:80]!r} is not 'class_name weight' for one of the classes "
                            f"(or write one number per line, in label order)")
        by_name[name.strip()] = _number(value)
    missing = [name for name in names if name not in by_name]
    if missing:
        raise UserError(f"{path} has no weight for {', '.join(missing[:5])} (one line per class)")
    return [by_name[name] for name in names]


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if np.isfinite(value) else None
