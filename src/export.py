"""Export a checkpoint to MINDIR, ONNX or AIR, then reload the file and check it reproduces the net."""
from __future__ import annotations

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
            "class_names": json.dumps(names), "mean": json.dumps(mean), "std": json.dumps(std)}


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
        # MindSpore cannot export one net instance twice: always export from a fresh one
        ms.onnx.export(inference_net(cfg, params, ckpt), x, file_name=str(tmp) + ".onnx", input_names=["image"],
                       output_names=["logits"], dynamic_axes={"image": {0: "batch"}})
        tmp_file = Path(str(tmp) + ".onnx")
        diff = _finish_onnx(tmp_file, x.asnumpy(), reference, model_metadata(cfg, meta))
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


def _finish_onnx(path: Path, x: np.ndarray, reference: np.ndarray, metadata: dict[str, str]) -> float:
    """Add metadata, validate with onnx.checker and compare onnxruntime's output with MindSpore's."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
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
