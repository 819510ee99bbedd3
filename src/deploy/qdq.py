"""QDQ int8 ONNX for a PACT QAT net: the float graph plus Quantize/DequantizeLinear nodes with its learned scales."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mindspore import nn

from src.errors import UserError
from src.models.quant import QMAX, int8_weight, quant_layers


@dataclass
class QdqLayer:
    """What the ONNX graph needs to reproduce one quantized layer of a QAT net."""

    weight_int8: np.ndarray  # in MindSpore's layout (output channels first)
    weight_scale: np.ndarray  # per output channel
    act_scale: float  # int8 scale of the layer's input
    act_clip: float  # PACT alpha, capped at the int8 range 127 * act_scale


def qdq_settings(net: nn.Cell) -> dict[str, QdqLayer]:
    """Per weight name, the learned activation scale and clip of each quantized layer of `net`."""
    out = {}
    for name, layer in quant_layers(net):
        scale = layer.act_quant.calibrated_scale()
        if scale is None:
            raise UserError(f"layer {name[: -len('.weight')]} has no activation scale: the checkpoint was not "
                            "trained with --pact_quant True (QAT fine-tune it first)")
        alpha = float(layer.act_quant.pact_alpha.asnumpy()[0])
        w_int8, w_scale = int8_weight(layer.layer.weight)
        out[name] = QdqLayer(w_int8, w_scale.astype(np.float32), scale, min(abs(alpha), QMAX * scale))
    return out


def insert_qdq(model, layers: dict[str, QdqLayer]):
    """Rewrite a float ONNX graph into QDQ form: int8 weights (per output channel) and int8 activations.

    For every Conv/Gemm whose weight is a quantized layer: the weight initializer becomes int8 plus a
    per-channel DequantizeLinear, and the activation input goes through Clip(-c, c) (PACT, c = alpha capped
    at 127 * scale) -> QuantizeLinear -> DequantizeLinear with the learned scale.
    """
    import onnx
    import onnx.version_converter
    from onnx import helper, numpy_helper

    if model.opset_import[0].version < 13:  # per-axis DequantizeLinear needs opset 13
        model = onnx.version_converter.convert_version(model, 13)
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    new_nodes, done = [], 0
    for node in graph.node:
        weight_name = node.input[1] if node.op_type in ("Conv", "Gemm") and len(node.input) > 1 else None
        layer = layers.get(weight_name)
        if layer is None or weight_name not in inits:
            new_nodes.append(node)
            continue
        tag = weight_name[: -len(".weight")]
        trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
        axis = 0 if node.op_type == "Conv" or trans_b else 1
        w_int8, w_scale = (layer.weight_int8 if axis == 0 else layer.weight_int8.T), layer.weight_scale
        graph.initializer.remove(inits.pop(weight_name))
        graph.initializer.extend([
            numpy_helper.from_array(w_int8, f"{tag}.weight_int8"),
            numpy_helper.from_array(w_scale, f"{tag}.weight_scale"),
            numpy_helper.from_array(np.zeros(w_scale.shape, np.int8), f"{tag}.weight_zero_point"),
            numpy_helper.from_array(np.array(-layer.act_clip, np.float32), f"{tag}.act_min"),
            numpy_helper.from_array(np.array(layer.act_clip, np.float32), f"{tag}.act_max"),
            numpy_helper.from_array(np.array(layer.act_scale, np.float32), f"{tag}.act_scale"),
            numpy_helper.from_array(np.array(0, np.int8), f"{tag}.act_zero_point")])
        new_nodes += [
            helper.make_node("DequantizeLinear", [f"{tag}.weight_int8", f"{tag}.weight_scale",
                                                  f"{tag}.weight_zero_point"], [weight_name], axis=axis,
                             name=f"{tag}.weight_dq"),
            helper.make_node("Clip", [node.input[0], f"{tag}.act_min", f"{tag}.act_max"], [f"{tag}.act_clip"],
                             name=f"{tag}.pact"),
            helper.make_node("QuantizeLinear", [f"{tag}.act_clip", f"{tag}.act_scale", f"{tag}.act_zero_point"],
                             [f"{tag}.act_q"], name=f"{tag}.act_q"),
            helper.make_node("DequantizeLinear", [f"{tag}.act_q", f"{tag}.act_scale", f"{tag}.act_zero_point"],
                             [f"{tag}.act_dq"], name=f"{tag}.act_dq")]
        node.input[0] = f"{tag}.act_dq"
        new_nodes.append(node)
        done += 1
    if done != len(layers):
        raise RuntimeError(f"QDQ export matched {done} of {len(layers)} quantized layers in the ONNX graph")
    del graph.node[:]
    graph.node.extend(new_nodes)
    return model
