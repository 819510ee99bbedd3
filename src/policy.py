"""The grammar of the auto_augment key (a config value, checked when the config is read; src/data/augment.py
builds the transforms). No MindSpore here."""
from __future__ import annotations

import re
from dataclasses import dataclass

from src.errors import UserError

GRAMMAR = ("autoaug (ImageNet AutoAugment; torchvision's imagenet), randaug-mM[-nN][-mstdS][-inc1] (RandAugment: "
           "magnitude M 0..10, N ops (default 2), magnitude noise std S, e.g. randaug-m9-mstd0.5-inc1; timm's rand-... "
           "too), or trivialaugwide (torchvision's ta_wide)")
LEVELS = 10  # timm's magnitude scale: 0..10
_RANDAUG = re.compile(r"(?:randaug|rand)((?:-[a-z]+[0-9.]+)*)")  # timm writes rand-m9-mstd0.5
# torchvision's --auto-augment names of the same policies
TORCHVISION_NAMES = {"imagenet": "autoaug", "ta_wide": "trivialaugwide"}
_PART = re.compile(r"-([a-z]+)([0-9]+(?:\.[0-9]+)?)")


@dataclass(frozen=True)
class Policy:
    name: str  # autoaug | randaug | trivialaugwide
    magnitude: int = 9
    num_ops: int = 2
    magnitude_std: float = 0.0


def parse_policy(text: str) -> Policy:
    """A policy string, checked; UserError naming the grammar otherwise."""
    text = text.strip().lower()
    text = TORCHVISION_NAMES.get(text, text)
    if text in ("autoaug", "trivialaugwide"):
        return Policy(text)
    found = _RANDAUG.fullmatch(text)
    if not found:
        raise UserError(f"--auto_augment got {text!r} (use {GRAMMAR})")
    values = {}
    for key, value in _PART.findall(found.group(1)):
        if key in values or key not in ("m", "n", "mstd", "inc"):
            raise UserError(f"--auto_augment {text!r}: '{key}' is {'repeated' if key in values else 'not a part'} "
                            f"(use {GRAMMAR})")
        values[key] = value
    if "m" not in values:
        raise UserError(f"--auto_augment {text!r} has no magnitude (use {GRAMMAR})")
    try:
        magnitude, num_ops = int(values["m"]), int(values.get("n", 2))
        std, inc = float(values.get("mstd", 0)), int(values.get("inc", 1))
    except ValueError:
        raise UserError(f"--auto_augment {text!r}: m, n and inc are integers (use {GRAMMAR})") from None
    if not 0 <= magnitude <= LEVELS or not 1 <= num_ops <= 10 or std > 10 or inc not in (0, 1):
        raise UserError(f"--auto_augment {text!r}: m must be 0..10, n 1..10, mstd at most 10, inc 0 or 1 "
                        f"(use {GRAMMAR})")
    if inc == 0:
        raise UserError(f"--auto_augment {text!r}: inc0 (timm's non-increasing posterize/solarize) is not what "
                        "MindSpore's RandAugment does; drop -inc0 (its ops are timm's inc1 variant)")
    return Policy("randaug", magnitude, num_ops, std)
