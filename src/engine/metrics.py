"""Top-k accuracy for ms.Model evaluation and for the per-batch log line."""
from __future__ import annotations

import numpy as np
from mindspore.train import Metric


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k largest logits (k is capped at the class count)."""
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


class TopKAccuracy(Metric):
    """Like MindSpore's Top1/Top5CategoricalAccuracy, but valid when there are fewer than k classes."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self.clear()

    def clear(self) -> None:
        self.correct, self.total = 0.0, 0

    def update(self, *inputs) -> None:
        logits, labels = (self._convert_data(x) for x in inputs[:2])
        self.correct += topk_hits(logits, labels.reshape(-1), self.k) * len(labels)
        self.total += len(labels)

    def eval(self) -> float:
        if self.total == 0:
            raise RuntimeError("TopKAccuracy.eval() called before any update")
        return self.correct / self.total


def accuracy_metrics() -> dict[str, Metric]:
    """The metric names eval.log has always used: acc (top-1) and top_5_accuracy."""
    return {"acc": TopKAccuracy(1), "top_5_accuracy": TopKAccuracy(5)}
