"""Export a checkpoint to MINDIR, ONNX or AIR, then reload the file and check it reproduces the net."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from src.config import Config
from src.data.transforms import preprocessing
from src.deploy.qdq import QdqLayer, insert_qdq, qdq_settings
from src.device import setup_device
from src.engine.checkpoint import CheckpointMeta
from src.engine.layouts import Weights
from src.engine.weights import inference_net, open_for_inference
from src.errors import UserError, writable_folder
from src.files import write_atomically
from src.models.common import onnx_exportable

log = logging.getLogger("train")
EXTENSIONS = {"MINDIR": ".mindir", "ONNX": ".onnx", "AIR": ".air"}
# the largest difference from the MindSpore net an export may have, relative to its largest logit (at least 1):
# float exports agree to ~1e-7; a QDQ int8 graph may round an activation at a tie to the other level
TOLERANCE = 1e-4
QDQ_TOLERANCE = 1e-2


class ExportMismatch(UserError):
    """The exported file does not reproduce the MindSpore net: it is not written."""


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
    pre = preprocessing(cfg, cfg.dataset)
    names = meta.class_names or [str(i) for i in range(cfg.num_classes)]
    return {"model": cfg.model, "image_size": str(cfg.image_size), "dataset": cfg.dataset,
            "class_names": json.dumps(names), "preprocess": pre.to_json(),
            "mean": json.dumps([v * 255 for v in pre.mean]), "std": json.dumps([v * 255 for v in pre.std]),
            "pact_quant": str(cfg.pact_quant)}


def export_model(cfg: Config) -> ExportResult:
    if cfg.file_format == "AIR" and cfg.platform != "Ascend":
        raise UserError("AIR export needs an Ascend device (MindSpore builds AIR files only on Ascend; use "
                        "--file_format MINDIR or ONNX here, or run with --platform Ascend on an Ascend machine)")
    cfg, weights = open_for_inference(cfg, cfg.ckpt_file, "ckpt_file")
    setup_device(cfg)
    path = export_path(cfg)
    if path.is_dir():
        raise UserError(f"file_name {path} is a folder (pass a file name, e.g. {path / cfg.model})")
    writable_folder(path.parent, "the folder of file_name", "--file_name")
    x = np.random.default_rng(0).standard_normal((cfg.batch_size, 3, cfg.image_size, cfg.image_size))
    x = Tensor(x.astype(np.float32))
    net = inference_net(cfg, weights)
    reference = net(x).asnumpy()
    found: list[float | None] = []

    def write(tmp_file: Path) -> None:  # MindSpore appends the extension to the name it is given
        diff = _export_and_check(cfg, net, weights, x, reference, tmp_file.with_suffix(""), tmp_file)
        limit = (QDQ_TOLERANCE if cfg.pact_quant and cfg.file_format == "ONNX" else TOLERANCE) * max(
            1.0, float(np.abs(reference).max()))
        if diff is not None and not diff <= limit:  # nan fails too
            raise ExportMismatch(f"the exported {cfg.file_format} model differs from the MindSpore net by {diff:.3g} "
                                 f"(more than {limit:.3g}), so {path} was not written (an export bug: please report "
                                 "it with the command and the checkpoint)")
        found.append(diff)

    write_atomically(path, write)
    diff = found[0]
    result = ExportResult(path, path.stat().st_size, diff)
    check = "" if diff is None else f"; max abs diff vs the MindSpore net: {diff:.3g}"
    log.info("exported %s: %s (%.2f MB)%s", cfg.file_format, path, result.size_bytes / 2**20, check)
    return result


def _export_and_check(cfg: Config, net, weights: Weights, x: Tensor, reference: np.ndarray, tmp: Path,
                      tmp_file: Path) -> float | None:
    """Write the model to `tmp_file`; the largest difference of its output from `reference` (None for AIR)."""
    if cfg.file_format == "ONNX":
        # MindSpore cannot export one net instance twice: always export from a fresh one. A QAT net is
        # exported as its float twin and the quantization is written into the ONNX graph as QDQ nodes.
        float_cfg = cfg.replace(pact_quant=False)
        ms.onnx.export(onnx_exportable(inference_net(float_cfg, weights)), x, file_name=str(tmp_file),
                       input_names=["image"], output_names=["logits"], dynamic_axes={"image": {0: "batch"}})
        return _finish_onnx(tmp_file, x.asnumpy(), reference, model_metadata(cfg, weights.meta),
                            qdq=qdq_settings(net) if cfg.pact_quant else None)
    ms.export(net, x, file_name=str(tmp), file_format=cfg.file_format)
    if cfg.file_format == "MINDIR":
        graph = nn.GraphCell(ms.load(str(tmp_file)))
        return float(np.abs(graph(x).asnumpy() - reference).max())
    return None


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
