"""Model registry: every net's facts in one `ModelCard`, registered by the net's own package.

A model is a package under src/models/ whose `__init__.py` calls `register_model(ModelCard(...))` and whose net
module (named by `ModelCard.build`) holds the MindSpore cells. The cards are read without loading MindSpore (the
config's choices come from them, and the config is read before MindSpore loads); the net module is imported when
a net is built. The config's `model` choices, the checkpoint-layout families, the published short names
(`--pretrain_ckpt mindcv:resnet50`) and the tests all derive from the cards. See docs/models.md.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from src.errors import UserError

if TYPE_CHECKING:
    from src.models.common import ClassifierNet


@dataclass(frozen=True)
class PublishedWeights:
    """ImageNet weights a peer publishes for the net: `--pretrain_ckpt <name>` downloads them."""

    name: str  # short name "<source>:<their model name>", e.g. "mindcv:resnet50"
    url: str
    digest_in_name: bool  # the hex after the last "-" of the file name starts its sha256 (torch.hub's rule)
    model: str = ""  # the net they are for (register_model fills it in from the card)

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[1]


@dataclass(frozen=True)
class ModelCard:
    """What the package knows of one net. `build` is "module:function"; the function takes (num_classes, width,
    dropout, bn_eps, padding), and drop_path_rate when the card says `drop_path`, and returns a ClassifierNet."""

    name: str
    build: str
    family: str = ""  # nets whose checkpoint layouts are read alike (mobilenetv3 for Large and Small); default name
    dropout: float = 0.0  # the net's own dropout before the classifier
    bn_eps: float = 1e-5  # the net's own BatchNorm epsilon
    width_multiplier: bool = True  # whether --width applies
    drop_path: bool = False  # whether the builder takes drop_path_rate (stochastic depth of its residual blocks)
    min_image_size: int = 16
    source_names: dict[str, str] = field(default_factory=dict)  # the net's name at a peer ("{w}": width x 100)
    published: tuple[PublishedWeights, ...] = ()

    def __post_init__(self) -> None:
        module, _, function = self.build.partition(":")
        if not (module and function.isidentifier()):
            raise ValueError(f"model '{self.name}': build {self.build!r} is not 'module:function'")
        if not self.family:
            object.__setattr__(self, "family", self.name)

    def builder(self) -> Callable[..., ClassifierNet]:
        module, _, function = self.build.partition(":")
        return getattr(importlib.import_module(module), function)


_CARDS: dict[str, ModelCard] = {}
_SKIP = {"kernels"}  # packages under src/models that are not models
_discovered = False


def register_model(card: ModelCard) -> ModelCard:
    """Make `card` known under its name; a name registered twice by two nets is an error (the same net's card
    registered again, e.g. its package reloaded, replaces the first)."""
    if card.name in _CARDS and _CARDS[card.name].build != card.build:
        raise ValueError(f"model '{card.name}' is registered twice (by {_CARDS[card.name].build} and {card.build}; "
                         "rename one)")
    taken = {p.name: c.name for c in _CARDS.values() for p in c.published if c.name != card.name}
    for weights in card.published:
        if weights.name in taken:
            raise ValueError(f"published weights '{weights.name}' are registered by {taken[weights.name]} and "
                             f"{card.name} (give each its own short name)")
    card = dataclasses.replace(card, published=tuple(dataclasses.replace(p, model=card.name) for p in card.published))
    _CARDS[card.name] = card
    return card


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    import src.models as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg and info.name not in _SKIP:
            importlib.import_module(f"{package.__name__}.{info.name}")


def cards() -> dict[str, ModelCard]:
    """Every registered model's card by name, in registration order (the built-in nets first)."""
    _discover()
    return dict(_CARDS)


def list_models() -> list[str]:
    return list(cards())


def model_card(name: str) -> ModelCard:
    known = cards()
    if name not in known:
        raise UserError(f"unknown model '{name}' (known: {', '.join(known)})")
    return known[name]


def family_of(name: str) -> str:
    """The checkpoint-layout family of a model (its own name for a model the registry does not know)."""
    card = cards().get(name)
    return card.family if card else name


def models_of_family(family: str) -> list[str]:
    return [c.name for c in cards().values() if c.family == family]


def published_weights() -> dict[str, PublishedWeights]:
    """Every published short name -> its weights."""
    return {p.name: p for c in cards().values() for p in c.published}


def canonical_name(name: str) -> str | None:
    """This package's name for a net as a peer spells it (torchvision's mobilenet_v3_large, mindcv's
    mobilenet_v3_large_100, timm's mobilenetv3_large_100, resnet50), or None. Widths other than 1.0 are not names
    here (--width sets them)."""
    if name in cards():
        return name
    key = re.sub(r"_100$", "", name.lower()).replace("_", "").replace("-", "")
    return {own.replace("_", ""): own for own in cards()}.get(key)


def create_model(name: str, num_classes: int = 1000, width: float = 1.0, dropout: float | None = None,
                 bn_eps: float | None = None, padding: str = "symmetric", drop_path_rate: float = 0.0) -> ClassifierNet:
    """The named net; dropout and bn_eps None keep the card's (the net's own); `padding` see config.Config.padding."""
    card = model_card(name)
    if width != 1.0 and not card.width_multiplier:
        raise ValueError(f"{name} has no width multiplier (got width={width}; use 1.0)")
    if drop_path_rate and not card.drop_path:
        raise ValueError(f"{name} has no stochastic depth (got drop_path_rate={drop_path_rate}; use 0)")
    extra = {"drop_path_rate": drop_path_rate} if card.drop_path else {}
    return card.builder()(num_classes=num_classes, width=width, dropout=card.dropout if dropout is None else dropout,
                          bn_eps=card.bn_eps if bn_eps is None else bn_eps, padding=padding, **extra)


def net_from_config(cfg) -> ClassifierNet:
    """The configured net, made a PACT QAT net when cfg.pact_quant is set."""
    net = create_model(cfg.model, cfg.num_classes, cfg.width, cfg.dropout, cfg.bn_eps, cfg.padding,
                       cfg.drop_path_rate if cfg.drop_path_rate and model_card(cfg.model).drop_path else 0.0)
    if cfg.pact_quant:
        from src.models.quant import quantize_net

        quantize_net(net)
    return net


def count_trainable_params(net) -> int:
    return sum(int(p.size) for p in net.trainable_params())
