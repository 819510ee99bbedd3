"""An exported ONNX model in onnxruntime, with the metadata export.py stored in it (classes, image size)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src.config import Config
from src.errors import UserError, first_line, not_a_file


@dataclass
class OnnxModel:
    """An onnxruntime session plus the metadata export.py stored in the file."""

    session: object
    path: Path
    metadata: dict[str, str]
    fixed_batch: int | None
    fixed_size: int | None = None  # the input's height and width when the file fixes them
    outputs: int | None = None  # the logits' width when the file fixes it
    expected: int | None = None  # the class count the config asks for (settings() sets it)

    @property
    def class_names(self) -> list[str] | None:
        names = self.metadata.get("class_names")
        return json.loads(names) if names else None

    def settings(self, cfg: Config) -> Config:
        """The config checked against the file (image size, class count) and with its recorded preprocessing."""
        from src.data.transforms import with_recorded_preprocessing

        size = self.metadata.get("image_size")
        if size and not size.isdigit():
            raise UserError(f"{self.path} has image_size {size!r} in its metadata, which is not a number of pixels "
                            "(export it again with export.py)")
        size = int(size) if size else self.fixed_size
        if size and size != cfg.image_size:
            raise UserError(f"{self.path} was exported for image_size {size} but the config has {cfg.image_size} "
                            f"(pass --image_size {size})")
        names = self.class_names
        if names and len(names) != cfg.num_classes:
            raise UserError(f"{self.path} has {len(names)} classes but num_classes is {cfg.num_classes} "
                            f"(pass --num_classes {len(names)})")
        if self.outputs and self.outputs != cfg.num_classes:
            raise UserError(f"{self.path} outputs {self.outputs} class scores but num_classes is {cfg.num_classes} "
                            f"(pass --num_classes {self.outputs} with data of that many classes, or export the "
                            "model trained on this data)")
        self.expected = cfg.num_classes  # checked on every batch too: the file may leave its width open
        return with_recorded_preprocessing(cfg, self.metadata.get("preprocess"))

    def _run(self, images: np.ndarray) -> np.ndarray:
        try:
            logits = self.session.run(None, {"image": images.astype(np.float32)})[0]
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise UserError(f"onnxruntime cannot run {self.path} on {'x'.join(map(str, images.shape))} images: "
                            f"{first_line(exc)[:300]} (pass the --image_size it was exported for)") from None
        if logits.ndim != 2 or (self.expected and logits.shape[1] != self.expected):
            raise UserError(f"{self.path} gives outputs of shape {'x'.join(map(str, logits.shape))} where "
                            f"{len(images)} x {self.expected} class scores were expected (pass --num_classes to "
                            "match it, or export the model trained on this data)")
        return logits

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Logits for a batch of any size (split or padded when the model has a fixed batch)."""
        if self.fixed_batch is None:
            return self._run(images)
        outs = []
        b = self.fixed_batch
        for i in range(0, len(images), b):
            chunk = images[i:i + b]
            padded = np.concatenate([chunk, np.zeros((b - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            outs.append(self._run(padded)[:len(chunk)])
        return np.concatenate(outs)


def load_onnx(path: str | Path) -> OnnxModel:
    import onnxruntime as ort

    from src.engine.run_folder import settled_for_reading

    path = Path(path)
    settled_for_reading(path.parent, "onnx_file")  # a run killed in its commit window set the earlier one aside
    if problem := not_a_file(path):
        raise UserError(f"ONNX file {path} {problem} (export one with python export.py --file_format ONNX)")
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4  # its own error lines go to stderr before it raises: the exception says it
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise UserError(f"{path} is not a valid ONNX model: {first_line(exc)[:200]} (export it again with "
                        "export.py)") from None
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != "image" or len(inputs[0].shape) != 4:
        raise UserError(f"{path} does not have one N x 3 x H x W input named 'image' (export it with this package's "
                        "export.py)")
    batch, _, height, width = (d if isinstance(d, int) else None for d in inputs[0].shape)
    out = session.get_outputs()[0].shape
    meta = dict(session.get_modelmeta().custom_metadata_map)
    return OnnxModel(session, path, meta, batch, height if height == width else None,
                     out[-1] if len(out) == 2 and isinstance(out[-1], int) else None)
