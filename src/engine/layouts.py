"""Published weights in other layouts, read as they are: MindSpore ModelZoo and mindcv `.ckpt` files, torchvision and
timm state dicts (`.safetensors`, or `.pth`/`.pt` when PyTorch is installed).

A file is recognised from its parameter names (which source, which family of nets) before anything is built; the
recognised `Layout` says the BatchNorm epsilon and padding convention the source's nets use, and the net is built
with them (config keys bn_eps and padding), so a converted net gives the source's logits. The tensors are then
mapped layer by layer: the source's layers, put in forward order by their names, are paired with the net's, and
every pair must agree in kind (convolution, BatchNorm, dense) and shape. torchvision's BatchNorm names become
MindSpore's (weight, bias, running_mean, running_var -> gamma, beta, moving_mean, moving_variance; its momentum
is 1 - MindSpore's, a training setting that is not part of the weights), a 1 x 1 convolution feeding the
classifier becomes a dense layer. Optimizer state and step counters in a training checkpoint are left out.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src.data.transforms import IMAGENET_PREPROCESSING
from src.engine.checkpoint import EMA_PREFIX, META_KEYS, OPTIMIZER_NAMES, CheckpointMeta, read_checkpoint
from src.engine.published import is_remote, local_path, remote_file_name
from src.errors import UserError, not_a_file
from src.models.registry import cards, family_of, models_of_family

log = logging.getLogger("train")

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar")
PUBLISHED_IMAGE_SIZE = 224
TORCH_BN = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
# where the alphabetical order of names is not the forward order (ResNet's blocks), and the classifier last
_RANKS = {"conv1": 1, "bn1": 2, "conv2": 3, "bn2": 4, "conv3": 5, "bn3": 6, "downsample": 7, "down_sample": 7,
          "down_sample_layer": 7, "layer1": 11, "layer2": 12, "layer3": 13, "layer4": 14, "fc1": 21, "fc2": 22,
          "conv_reduce": 21, "conv_expand": 22, "classifier": 90, "fc": 90, "head": 90, "dense": 90, "end_point": 90}
@dataclass(frozen=True)
class Layout:
    """Where a checkpoint's weights come from, and the conventions of the nets it was made with."""

    source: str  # "this package", "MindSpore ModelZoo", "mindcv", "torchvision/timm"
    family: str  # mobilenetv2, mobilenetv3, resnet
    bn_eps: float | None = None  # None: the net's own
    padding: str = "symmetric"
    by_name: bool = False  # the names are this package's (but for the classifier)

    def name(self, model: str, width: float = 1.0) -> str:
        card = cards().get(model)
        pattern = card.source_names.get(self.source) if card else None
        return f"{self.source} {pattern.format(w=f'{round(width * 100):03d}')}" if pattern else self.source


@dataclass
class Weights:
    """A checkpoint file's tensors (numpy, or MindSpore Parameters for .ckpt files) by name, its metadata, what was
    left out and the layout its names were recognised as."""

    path: Path
    params: dict
    meta: CheckpointMeta
    layout: Layout
    ignored: list[str]

    @property
    def foreign(self) -> bool:
        return self.layout.source != "this package"


def read_weights(path: str | Path, what: str) -> Weights:
    """A checkpoint of any layout this package reads, recognised; UserError if unreadable or of no known layout."""
    if is_remote(str(path)) and remote_file_name(str(path)).lower().endswith(TORCH_SUFFIXES):
        _torch_or_refuse(str(path), what)  # before a download of 100 MB that could not be read
    spec, path = str(path), local_path(str(path), what)
    try:
        if path.suffix.lower() == ".safetensors" or path.name.lower().endswith(TORCH_SUFFIXES):
            if problem := not_a_file(path):
                raise UserError(f"{what} {path} {problem} (check the path)")
            params, meta = _read_foreign(path, what), CheckpointMeta()
        else:
            params, meta = read_checkpoint(path, what)
    except UserError as exc:
        if not is_remote(spec):
            raise
        raise UserError(f"{exc}; it was downloaded from {spec}: delete {path} to download it again") from None
    if meta.ema and any(n.startswith(EMA_PREFIX) for n in params):  # a periodic checkpoint of a run with --ema True
        ema = {n.removeprefix(EMA_PREFIX): v for n, v in params.items() if n.startswith(EMA_PREFIX)}
        params = {**params, **{n: v for n, v in ema.items() if n in params}}
        log.info("%s %s: using its EMA weights (ema.*), as evaluation during its training did", what, path)
    ignored = [n for n in params if OPTIMIZER_NAMES.fullmatch(n)]
    params = {n: v for n, v in params.items() if n not in ignored and n not in META_KEYS}
    layout = recognise(params, meta, path, what)
    if meta.model is None:  # published weights: what this package's checkpoints record, from the layout
        meta.num_classes, meta.bn_eps, meta.padding = classifier_classes(params), layout.bn_eps, layout.padding
        meta.image_size = PUBLISHED_IMAGE_SIZE  # all of them: ImageNet at 224 px, 256 -> 224, bilinear
        meta.preprocess = IMAGENET_PREPROCESSING.to_json()
    return Weights(path, params, meta, layout, ignored)


def classifier_classes(params: dict) -> int | None:
    """The output count of the classifier (the last layer in forward order, named as one), None without one."""
    last = max(_units(params).items(), key=lambda item: _sort_key(item[0]))
    if not _is_classifier(last[0]) or "weight" not in last[1] or "moving_mean" in last[1] or "running_mean" in last[1]:
        return None
    return int(params[f"{last[0]}.weight"].shape[0])


def _is_classifier(prefix: str) -> bool:
    return _RANKS.get(prefix.split(".")[0]) == _RANKS["classifier"]


def _read_foreign(path: Path, what: str) -> dict[str, np.ndarray]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{what} {path} is not a readable .safetensors file: {str(exc)[:200]} (download it "
                            "again)") from None
    else:
        tensors = _read_torch(path, what)
    return {name: np.asarray(value, dtype=np.float32) if np.asarray(value).dtype.kind == "f" else np.asarray(value)
            for name, value in tensors.items() if not name.endswith(".num_batches_tracked")}  # a step counter


def _torch_or_refuse(path, what: str):
    try:
        import torch
    except ImportError:
        raise UserError(f"{what} {path} is a PyTorch file, and reading one needs PyTorch (pip install torch, or "
                        "save the state dict as .safetensors where PyTorch is installed: python -c \"import torch; "
                        "from safetensors.torch import save_file; save_file(torch.load('IN.pth'), "
                        "'OUT.safetensors')\")") from None
    return torch


def _read_torch(path: Path, what: str) -> dict[str, np.ndarray]:
    torch = _torch_or_refuse(path, what)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged or pickled-model file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        if "Weights only load failed" in first:  # torch's text for both a pickled model and a damaged file
            first = "it is damaged, or holds pickled objects besides tensors"
        raise UserError(f"{what} {path} is not a readable PyTorch state dict: {first} (pass a file saved with "
                        "torch.save(model.state_dict(), PATH))") from None
    for key in ("state_dict", "model", "model_state", "net"):  # training checkpoints wrap the state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"{what} {path} holds a {type(state).__name__}, not a state dict (pass a file saved with "
                        "torch.save(model.state_dict(), PATH))")
    out = {}
    for name, value in state.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu()
            out[name.removeprefix("module.")] = (value.float() if value.is_floating_point() else value).numpy()
    return out


def recognise(params: dict, meta: CheckpointMeta, path: Path, what: str) -> Layout:
    """The layout of a checkpoint, from its metadata (this package's) or its parameter names."""
    names = list(params)
    if meta.model is not None:
        return Layout("this package", family_of(meta.model), meta.bn_eps, meta.padding or "symmetric",
                      by_name=True)

    def has(pattern: str) -> bool:
        regex = re.compile(pattern)
        return any(regex.match(n) for n in names)

    if has(r".*\.running_(mean|var)$"):
        if has(r"conv_stem\.|blocks\.\d+\.\d+\."):
            raise UserError(f"{what} {path} is in timm's MobileNet layout (conv_stem, blocks.*), which this package "
                            "does not read (use torchvision's or mindcv's weights of the net, e.g. --pretrain_ckpt "
                            "torchvision:mobilenet_v2)")
        if has(r"layer1\.0\.conv1\.weight"):
            return Layout("torchvision/timm", "resnet", bn_eps=1e-5)
        if has(r"features\.\d+\.block\.\d+\."):
            return Layout("torchvision/timm", "mobilenetv3", bn_eps=1e-3)
        if has(r"features\.\d+\.conv\.\d+\."):
            return Layout("torchvision/timm", "mobilenetv2", bn_eps=1e-5)
    else:
        if has(r"layer\d\.0\.down_sample_layer\.|end_point\."):
            return Layout("MindSpore ModelZoo", "resnet", bn_eps=1e-4, padding="modelzoo", by_name=True)
        if has(r"layer1\.0\.down_sample\.|layer1\.0\.conv1\.weight"):
            return Layout("mindcv", "resnet", bn_eps=1e-5, padding="mindcv")
        if has(r"features\.\d+\.layers\.\d+\."):
            if has(r".*conv_reduce\.|classifier\.3\."):
                return Layout("mindcv", "mobilenetv3", bn_eps=1e-5, padding="mindcv")
            return Layout("mindcv", "mobilenetv2", bn_eps=1e-5)
        if has(r"features\.0\.features\.0\.weight"):
            return Layout("MindSpore ModelZoo", "mobilenetv2", bn_eps=1e-5, by_name=True)
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    raise UserError(f"{what} {path}: its parameter names ({shown or 'none'}) match none of the layouts this package "
                    "reads (its own, the MindSpore ModelZoo's and mindcv's .ckpt files, torchvision's and timm's "
                    "ResNet and torchvision's MobileNet state dicts; pass one of those)")


def check_family(weights: Weights, model: str, flag: str) -> None:
    """Refuse a checkpoint of another family of nets than --model, before anything is built."""
    if weights.layout.family == family_of(model) or not weights.foreign:  # check_fits names this package's model
        return
    models = models_of_family(weights.layout.family)
    raise UserError(f"{flag} {weights.path} holds {weights.layout.source} {weights.layout.family} weights but --model "
                    f"is {model} (pass --model {' or '.join(models) or weights.layout.family})")


def _sort_key(prefix: str) -> tuple:
    return tuple((1, int(t), "") if t.isdigit() else (0, _RANKS.get(t, 50), t) for t in prefix.split("."))


def _units(names: Iterable[str]) -> dict[str, list[str]]:
    """Parameter names grouped by their layer (the name without its last part), in the given order."""
    units: dict[str, list[str]] = {}
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        units.setdefault(prefix, []).append(leaf)
    return units


def _as_numpy(value) -> np.ndarray:
    return value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)


class LayoutMismatch(UserError):
    """The checkpoint's layers do not pair with the net's."""


def map_onto(weights: Weights, net, model: str, width: float) -> dict[str, np.ndarray]:
    """The checkpoint's tensors under the net's parameter names (classifier tensors unchecked, for the loading rules).

    Raises LayoutMismatch naming the first layer that does not fit (another model or width)."""
    from src.models.quant import is_quant_param

    params = {n: _as_numpy(v) for n, v in weights.params.items()}
    if weights.layout.by_name:  # quantization state (PACT clipping values) too
        own = {p.name for p in net.get_parameters()}
        renamed = {_modelzoo_head(n, own): v for n, v in params.items()}
        return {n: v for n, v in renamed.items() if n in own}
    own = {p.name: tuple(p.shape) for p in net.get_parameters() if not is_quant_param(p.name)}
    head = net.head_prefixes
    if weights.layout.source == "torchvision/timm":
        params = _torch_batchnorm_names(params)
    theirs = sorted(_units(params).items(), key=lambda item: _sort_key(item[0]))
    ours = list(_units(own).items())
    what = f"{weights.path} ({weights.layout.source} {weights.layout.family} layout)"
    fix = "pass the --model and --width it was trained with"
    if len(theirs) == len(ours) - 1 and not any(_is_classifier(p) for p, _ in theirs) and \
            f"{ours[-1][0]}.".startswith(head):
        ours = ours[:-1]  # a backbone without its classifier: the net's stays at init (the loading rules say so)
    if len(theirs) != len(ours):
        fits = [m for m in models_of_family(weights.layout.family) if m != model and _layer_count(m) == len(theirs)]
        raise LayoutMismatch(f"{what} has {len(theirs)} layers where {model} (width {width:g}) has {len(ours)} "
                             f"({f'it fits {fits[0]}: pass --model {fits[0]}' if fits else fix})")
    mapped = {}
    for (src, src_leaves), (dst, dst_leaves) in zip(theirs, ours):
        if sorted(src_leaves) != sorted(dst_leaves):
            raise LayoutMismatch(f"{what}: its layer {src} ({', '.join(src_leaves)}) falls where {model} has {dst} "
                                 f"({', '.join(dst_leaves)}) ({fix})")
        for leaf in dst_leaves:
            value, shape = params[f"{src}.{leaf}"], own[f"{dst}.{leaf}"]
            if value.ndim == 4 and len(shape) == 2 and value.shape == (*shape, 1, 1):
                value = value.reshape(shape)  # a 1 x 1 convolution on pooled features is a dense layer
            if value.shape != shape and not f"{dst}.{leaf}".startswith(head):
                raise LayoutMismatch(f"{what}: its {src}.{leaf} has shape {value.shape} where {model} (width "
                                     f"{width:g}) has {dst}.{leaf} {shape} ({fix})")
            mapped[f"{dst}.{leaf}"] = value
    return mapped


def _layer_count(model: str) -> int:
    from src.models import create_model

    return len(_units(p.name for p in create_model(model, 10).get_parameters()))


def _torch_batchnorm_names(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    norms = {n.rpartition(".")[0] for n in params if n.endswith(".running_mean")}
    out = {}
    for name, value in params.items():
        prefix, _, leaf = name.rpartition(".")
        if leaf == "num_batches_tracked":
            continue
        out[f"{prefix}.{TORCH_BN.get(leaf, leaf) if prefix in norms else leaf}"] = value
    return out


def _modelzoo_head(name: str, own: dict) -> str:
    """The ModelZoo's MobileNetV2 classifier is `dense.*` (`head.2.*` with dropout); this package's `head.1.*`."""
    for other in ("dense.", "head.2."):
        if name.startswith(other) and "head.1." + name[len(other):] in own:
            return "head.1." + name[len(other):]
    return name
