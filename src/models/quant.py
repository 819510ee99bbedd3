"""PACT quantization-aware training (Choi et al., 2018) built from ordinary ops, so it trains on CPU too.

`quantize_net(net)` replaces every Conv2d and Dense by a quantized version of itself, in place:

- weights are fake-quantized to int8 per output channel: scale = max|w_c| / 127, w_q = clip(round(w / scale),
  -127, 127) * scale;
- the activation entering the layer is first clipped by PACT to [-alpha, alpha] with a learnable alpha per
  layer (init 20, as PaddleSlim), written x - relu(x - alpha) + relu(-alpha - x) so that autodiff gives
  alpha the PACT gradient (sum of the upstream gradient where x > alpha, minus where x < -alpha);
- then fake-quantized to int8 with a moving-average abs-max scale (rate 0.9, bias-corrected like
  PaddleSlim's moving_average_abs_max: accum = 0.9 accum + max|x|, state = 0.9 state + 1, scale =
  accum / state / 127), updated in training, frozen in eval;
- rounding passes gradients straight through (x + stop_gradient(q(x) - x)).

The float layer's parameters are reused under their own names, so a float checkpoint loads unchanged; the
new state is named `<layer>.pact_alpha`, `<layer>.act_accum` and `<layer>.act_state` and saved with it.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

QMAX = 127.0
ALPHA_INIT = 20.0
EMA_RATE = 0.9
QUANT_SUFFIXES = ("pact_alpha", "act_accum", "act_state")
_EPS = 1e-12


def int8_grid(x, scale):
    """x / scale rounded onto the int8 grid [-127, 127] (still a float tensor)."""
    return ops.clamp(ops.round(x / scale), -QMAX, QMAX)


def fake_quant(x, scale):
    """Round x / scale onto the int8 grid and back; the gradient passes straight through."""
    return x + ops.stop_gradient(int8_grid(x, scale) * scale - x)


def weight_scale(weight):
    """Per-output-channel abs-max scale (axis 0), shaped to broadcast against the weight."""
    axes = tuple(range(1, weight.ndim))
    return act_scale(ops.amax(ops.abs(weight), axes, keepdims=True))


def act_scale(amax):
    """The int8 scale for values within [-amax, amax]."""
    return ops.maximum(amax, _EPS) / QMAX


def int8_weight(weight: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weight, per-output-channel scale) exactly as training fake-quantizes it, for the QDQ export."""
    scale = weight_scale(weight)
    return int8_grid(weight, scale).asnumpy().astype(np.int8), scale.asnumpy().reshape(-1)


def pact_clip(x, alpha):
    """clip(x, -alpha, alpha) written so that d/d(alpha) is 1 above alpha and -1 below -alpha."""
    return x - ops.relu(x - alpha) + ops.relu(-alpha - x)


class ActQuant(nn.Cell):
    """PACT clip, then int8 fake quantization with a moving-average abs-max scale."""

    def __init__(self, alpha: float = ALPHA_INIT, rate: float = EMA_RATE):
        super().__init__()
        self.rate = rate
        self.pact_alpha = Parameter(Tensor(np.array([alpha], np.float32)), name="pact_alpha")
        self.act_accum = Parameter(Tensor(np.zeros(1, np.float32)), name="act_accum", requires_grad=False)
        self.act_state = Parameter(Tensor(np.zeros(1, np.float32)), name="act_state", requires_grad=False)

    def construct(self, x):
        x = pact_clip(x, ops.cast(self.pact_alpha, x.dtype))
        batch_max = ops.stop_gradient(ops.cast(ops.amax(ops.abs(x)), ms.float32)).reshape((1,))
        if self.training:
            state = self.rate * self.act_state + 1.0
            accum = self.rate * self.act_accum + batch_max
            x = ops.depend(x, ops.assign(self.act_state, state))
            x = ops.depend(x, ops.assign(self.act_accum, accum))
        else:
            state, accum = self.act_state, self.act_accum
        # never calibrated (a float checkpoint evaluated as is): fall back to this batch's range
        amax = ops.select(state > 0, accum / ops.maximum(state, _EPS), batch_max)
        return fake_quant(x, ops.cast(act_scale(amax), x.dtype))

    def calibrated_scale(self) -> float | None:
        """The int8 scale evaluation uses (from the moving average), or None if the layer never trained."""
        if float(self.act_state.asnumpy()[0]) <= 0:
            return None
        return float(act_scale(self.act_accum / self.act_state).asnumpy()[0])


class QuantLayer(nn.Cell):
    """A float layer whose input is PACT-clipped and fake-quantized and whose weight is fake-quantized per channel.

    `layer` keeps its parameters (and names); subclasses say how the layer applies its weight.
    """

    def __init__(self, layer: nn.Cell):
        super().__init__()
        self.layer = layer
        self.act_quant = ActQuant()

    def construct(self, x):
        x = self.act_quant(x)
        weight = self.layer.weight
        out = self.apply_weight(x, ops.cast(fake_quant(weight, weight_scale(weight)), x.dtype))
        if self.layer.has_bias:
            out = self.layer.bias_add(out, ops.cast(self.layer.bias, out.dtype))
        return out


class QuantConv2d(QuantLayer):
    def apply_weight(self, x, weight):
        return self.layer.conv2d(x, weight)


class QuantDense(QuantLayer):
    """A Dense on N x C input without a fused activation."""

    def __init__(self, dense: nn.Dense):
        if dense.activation_flag:
            raise ValueError("QuantDense supports Dense layers without a fused activation")
        super().__init__(dense)

    def apply_weight(self, x, weight):
        return self.layer.matmul(x, weight)


def _replace_children(cell: nn.Cell) -> list[nn.Cell]:
    """Swap every Conv2d/Dense child below `cell` for its quantized version; returns the new cells."""
    made = []
    for key, child in list(cell._cells.items()):  # noqa: SLF001 (MindSpore keeps children here)
        if isinstance(child, nn.Conv2d):
            new = QuantConv2d(child)
        elif isinstance(child, nn.Dense):
            new = QuantDense(child)
        else:
            made += _replace_children(child) if child is not None else []
            continue
        cell._cells[key] = new  # noqa: SLF001
        made.append(new)
    if isinstance(cell, nn.SequentialCell):
        cell.cell_list = list(cell._cells.values())  # noqa: SLF001
    return made


def quantize_net(net: nn.Cell) -> nn.Cell:
    """Make `net` a PACT QAT net in place; parameter names of the float net are kept."""
    names = {id(p): p.name for p in net.get_parameters()}
    for new in _replace_children(net):
        float_layer = new.layer
        prefix = names[id(float_layer.weight)][: -len("weight")]
        for param in float_layer.get_parameters():
            param.name = names[id(param)]
        for suffix in QUANT_SUFFIXES:
            getattr(new.act_quant, suffix).name = prefix + suffix
    return net


def is_quant_param(name: str) -> bool:
    return name.endswith(QUANT_SUFFIXES)


def quant_layers(net: nn.Cell) -> list[tuple[str, nn.Cell]]:
    """(weight parameter name, quantized layer) for every quantized layer of `net`."""
    return [(cell.layer.weight.name, cell) for _, cell in net.cells_and_names() if isinstance(cell, QuantLayer)]
