"""An exported ONNX model in onnxruntime, with the metadata export.py stored in it (classes, image size)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src.config import Config
from src.errors import UserError


@dataclass
class OnnxModel:
    """An onnxruntime session plus the metadata export.py stored in the file."""

    session: object
    path: Path
    metadata: dict[str, str]
    fixed_batch: int | None

    @property
    def class_names(self) -> list[str] | None:
        names = self.metadata.get("class_names")
        return json.loads(names) if names else None

    def settings(self, cfg: Config) -> Config:
        """The config checked against the file (image size, class count) and with its recorded preprocessing."""
        from src.data.transforms import with_recorded_preprocessing

        size = self.metadata.get("image_size")
        if size and int(size) != cfg.image_size:
            raise UserError(f"{self.path} was exported for image_size {size} but the config has {cfg.image_size} "
                            f"(pass --image_size {size})")
        names = self.class_names
        if names and len(names) != cfg.num_classes:
            raise UserError(f"{self.path} has {len(names)} classes but num_classes is {cfg.num_classes} "
                            f"(pass --num_classes {len(names)})")
        return with_recorded_preprocessing(cfg, self.metadata.get("preprocess"))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Logits for a batch of any size (split or padded when the model has a fixed batch)."""
        if self.fixed_batch is None:
            return self.session.run(None, {"image": images.astype(np.float32)})[0]
        outs = []
        b = self.fixed_batch
        for i in range(0, len(images), b):
            chunk = images[i:i + b]
            padded = np.concatenate([chunk, np.zeros((b - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            outs.append(self.session.run(None, {"image": padded.astype(np.float32)})[0][:len(chunk)])
        return np.concatenate(outs)


def load_onnx(path: str | Path) -> OnnxModel:
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX file {path} not found (export one with python export.py --file_format ONNX)")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a valid ONNX model: {first} (export it again with export.py)") from None
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != "image":
        raise UserError(f"{path} does not have one input named 'image' (export it with this package's export.py)")
    batch = inputs[0].shape[0]
    meta = dict(session.get_modelmeta().custom_metadata_map)
    return OnnxModel(session, path, meta, batch if isinstance(batch, int) else None)
