"""Export a checkpoint to MINDIR, ONNX or AIR, then reload the file and check it reproduces the net."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from src.checkpoint import CheckpointMeta, inference_net, open_for_inference
from src.config import Config
from src.dataset import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
from src.device import setup_device
from src.errors import UserError
from src.models.common import onnx_exportable
from src.quant import QMAX, is_quant_param, quant_layers

log = logging.getLogger("train")
EXTENSIONS = {"MINDIR": ".mindir", "ONNX": ".onnx", "AIR": ".air"}
TOLERANCE = 1e-4


@dataclass
class ExportResult:
    path: Path
    size_bytes: int
    max_abs_diff: float | None


def export_path(cfg: Config) -> Path:
    base = Path(cfg.file_name) if cfg.file_name else Path(cfg.output_path) / cfg.model
    ext = EXTENSIONS[cfg.file_format]
    return base if base.suffix.lower() == ext else base.with_name(base.name + ext)


def model_metadata(cfg: Config, meta: CheckpointMeta) -> dict[str, str]:
    """What a deployed model needs to preprocess inputs and name its outputs."""
    mean, std = (CIFAR_MEAN, CIFAR_STD) if cfg.dataset == "cifar10" else (IMAGENET_MEAN, IMAGENET_STD)
    names = meta.class_names or [str(i) for i in range(cfg.num_classes)]
    return {"model": cfg.model, "image_size": str(cfg.image_size), "dataset": cfg.dataset,
            "class_names": json.dumps(names), "mean": json.dumps(mean), "std": json.dumps(std),
            "pact_quant": str(cfg.pact_quant)}


def _tmp_base(path: Path) -> Path:
    return path.with_name(f".tmp-{os.getpid()}-{path.stem}")


def export_model(cfg: Config) -> ExportResult:
    if cfg.file_format == "AIR" and cfg.platform != "Ascend":
        raise UserError("AIR export needs an Ascend device (MindSpore builds AIR files only on Ascend; use "
                        "--file_format MINDIR or ONNX here, or run with --platform Ascend on an Ascend machine)")
    ckpt, params, meta = open_for_inference(cfg, cfg.ckpt_file, "ckpt_file")
    setup_device(cfg)
    path = export_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(0).standard_normal((cfg.batch_size, 3, cfg.image_size, cfg.image_size))
    x = Tensor(x.astype(np.float32))
    net = inference_net(cfg, params, ckpt)
    reference = net(x).asnumpy()
    tmp = _tmp_base(path)
    diff = None
    if cfg.file_format == "ONNX":
        # MindSpore cannot export one net instance twice: always export from a fresh one. A QAT net is
        # exported as its float twin and the quantization is written into the ONNX graph as QDQ nodes.
        float_cfg = dataclasses.replace(cfg, pact_quant=False)
        float_params = {k: v for k, v in params.items() if not is_quant_param(k)}
        ms.onnx.export(onnx_exportable(inference_net(float_cfg, float_params, ckpt)), x, file_name=str(tmp) + ".onnx",
                       input_names=["image"], output_names=["logits"], dynamic_axes={"image": {0: "batch"}})
        tmp_file = Path(str(tmp) + ".onnx")
        diff = _finish_onnx(tmp_file, x.asnumpy(), reference, model_metadata(cfg, meta),
                            qdq=_qdq_settings(net) if cfg.pact_quant else None)
    else:
        ms.export(net, x, file_name=str(tmp), file_format=cfg.file_format)
        tmp_file = Path(str(tmp) + EXTENSIONS[cfg.file_format])
        if cfg.file_format == "MINDIR":
            graph = nn.GraphCell(ms.load(str(tmp_file)))
            diff = float(np.abs(graph(x).asnumpy() - reference).max())
    os.replace(tmp_file, path)
    result = ExportResult(path, path.stat().st_size, diff)
    check = "" if diff is None else f"; max abs diff vs the MindSpore net: {diff:.3g}"
    log.info("exported %s: %s (%.2f MB)%s", cfg.file_format, path, result.size_bytes / 2**20, check)
    if diff is not None and diff > TOLERANCE:
        log.warning("the exported model differs from the MindSpore net by %.3g (more than %g)", diff, TOLERANCE)
    return result


@dataclass
class QdqLayer:
    """What the ONNX graph needs to reproduce one quantized layer of a QAT net."""

    weight: np.ndarray  # float weight
    act_scale: float  # int8 scale of the layer's input
    act_clip: float  # PACT alpha, capped at the int8 range 127 * act_scale


def _qdq_settings(net: nn.Cell) -> dict[str, QdqLayer]:
    """Per weight name, the learned activation scale and clip of each quantized layer of `net`."""
    out = {}
    for name, layer in quant_layers(net):
        quant = layer.act_quant
        state, accum = float(quant.act_state.asnumpy()[0]), quant.act_accum.asnumpy().astype(np.float32)[0]
        if state <= 0:
            raise UserError(f"layer {name[: -len('.weight')]} has no activation scale: the checkpoint was not "
                            "trained with --pact_quant True (QAT fine-tune it first)")
        scale = np.float32(max(np.float32(accum / np.float32(state)), np.float32(1e-12)) / np.float32(QMAX))
        alpha = float(quant.pact_alpha.asnumpy()[0])
        weight = (layer.conv if hasattr(layer, "conv") else layer.dense).weight.asnumpy()
        out[name] = QdqLayer(weight, float(scale), min(abs(alpha), QMAX * float(scale)))
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
        w = layer.weight if axis == 0 else layer.weight.T
        reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
        w_scale = (np.maximum(np.abs(w).max(axis=reduce_axes), np.float32(1e-12)) / np.float32(QMAX)).astype(np.float32)
        shape = [-1 if i == axis else 1 for i in range(w.ndim)]
        w_int8 = np.clip(np.round(w / w_scale.reshape(shape)), -QMAX, QMAX).astype(np.int8)
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


def _finish_onnx(path: Path, x: np.ndarray, reference: np.ndarray, metadata: dict[str, str],
                 qdq: dict[str, QdqLayer] | None = None) -> float:
    """Add metadata (and QDQ nodes for a QAT net), validate with onnx.checker, compare onnxruntime with MindSpore."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    if qdq is not None:
        model = insert_qdq(model, qdq)
    # MindSpore marks the input batch dynamic but leaves fixed batch sizes on the output and intermediate
    # shapes, which makes onnxruntime warn for every other batch size
    output_batch = model.graph.output[0].type.tensor_type.shape.dim[0]
    output_batch.ClearField("dim_value")
    output_batch.dim_param = "batch"
    del model.graph.value_info[:]
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float(np.abs(session.run(None, {"image": x})[0] - reference).max())
