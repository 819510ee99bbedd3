"""Evaluate a checkpoint on the val split and append the ModelZoo result line to eval.log."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from mindspore.train import Model

from src.compile_cache import compile_cache, data_facts
from src.config import Config
from src.data.checks import check_dataset
from src.data.pipeline import create_dataset
from src.device import setup_device
from src.engine.metrics import accuracy_metrics
from src.engine.per_class import ConfusionCounts, log_worst, write_per_class
from src.engine.train_step import eval_cell
from src.engine.weights import inference_net, open_for_inference

log = logging.getLogger("train")


@dataclass
class EvalResult:
    acc: float
    top_5_accuracy: float
    ckpt: Path
    num_images: int

    def line(self) -> str:
        return (f"result:{{'acc': {self.acc:.4f}, 'top_5_accuracy': {self.top_5_accuracy:.4f}}} "
                f"ckpt={self.ckpt}")


def report(result: EvalResult, output_path: str | Path) -> None:
    """Print the result line and append it to output_path/eval.log."""
    print(result.line(), flush=True)
    log_path = Path(output_path) / "eval.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write(result.line() + "\n")


def evaluate(cfg: Config) -> EvalResult:
    cfg, weights = open_for_inference(cfg, cfg.pretrain_ckpt, "pretrain_ckpt")
    ckpt, meta = weights.path, weights.meta
    source = check_dataset(cfg, need_train=False, need_val=True, known_names=meta.class_names)
    if meta.class_names and source.named and source.class_names != meta.class_names:
        log.warning("the val classes differ from the classes %s was trained on; labels may not match", ckpt)
    setup_device(cfg)
    if cfg.platform == "CPU":
        log.info("CPU: onnxruntime is the faster path for inference here: python export.py --file_format ONNX, "
                 "then python eval_onnx.py or predict.py --onnx_file")
    dataset = create_dataset(cfg, source, training=False)
    names = meta.class_names if meta.class_names and len(meta.class_names) == cfg.num_classes else \
        source.class_names
    with compile_cache(cfg, "eval", data_facts(source)):
        eval_net = eval_cell(inference_net(cfg, weights), cfg).set_train(False)
        model = Model(eval_net, eval_network=eval_net,
                      metrics={**accuracy_metrics(), "per_class": ConfusionCounts(names)})
        result = model.eval(dataset, dataset_sink_mode=False)
    csv_path, png_path = write_per_class(result["per_class"], Path(cfg.output_path))
    log_worst(result["per_class"])
    log.info("per-class results: %s, %s", csv_path, png_path)
    return EvalResult(float(result["acc"]), float(result["top_5_accuracy"]), ckpt, source.val.num_images)
