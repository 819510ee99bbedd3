"""Classify single images with the eval preprocessing, through MindSpore or onnxruntime."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from src.config import Config
from src.data.checks import IMAGE_EXTENSIONS, image_problem
from src.data.image_check import decode_problem
from src.data.transforms import eval_transforms
from src.errors import UserError, not_a_file


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def load_images(cfg: Config, paths: list[str]) -> np.ndarray:
    """N x 3 x S x S float32, preprocessed exactly as the val pipeline does."""
    import mindspore.dataset.transforms as transforms

    pipeline = transforms.Compose(eval_transforms(cfg, "imagefolder"))
    batch = []
    for p in map(Path, paths):
        if p.is_dir():
            raise UserError(f"{p} is a folder (pass image files, e.g. {p}/*.jpg)")
        if problem := not_a_file(p):
            raise UserError(f"image {p} {problem} (check the path)")
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            raise UserError(f"{p} is not a {'/'.join(IMAGE_EXTENSIONS)} file (convert it to JPEG or PNG)")
        problem = image_problem(p) or decode_problem(p)[0]  # before MindSpore's decoder, which would write
        if problem:                                            # ./abnormal_image.jpg for a file it cannot decode
            raise UserError(f"{p} {problem} (pass a valid image)")
        batch.append(pipeline(np.fromfile(p, dtype=np.uint8)))
    return np.stack(batch).astype(np.float32)


def predict_images(cfg: Config, paths: list[str], k: int = 5):
    """[(path, [(class_name, probability), ...top k])]."""
    if cfg.onnx_file:
        from src.deploy.onnx_model import load_onnx

        model = load_onnx(cfg.onnx_file)
        cfg = model.settings(cfg)
        logits, names = model(load_images(cfg, paths)), model.class_names
    else:
        logits, names = _predict_ckpt(cfg, paths)
    probs = _softmax(logits)
    names = names or [str(i) for i in range(probs.shape[1])]
    out = []
    for path, row in zip(paths, probs):
        order = np.argsort(-row)[:k]
        out.append((path, [(names[i], float(row[i])) for i in order]))
    return out


def _predict_ckpt(cfg: Config, paths: list[str]):
    import mindspore as ms

    from src.device import setup_device
    from src.engine.weights import inference_net, open_for_inference

    cfg, weights = open_for_inference(cfg, cfg.ckpt_file, "ckpt_file")
    images = load_images(cfg, paths)
    setup_device(cfg)
    return inference_net(cfg, weights)(ms.Tensor(images)).asnumpy(), weights.meta.class_names
