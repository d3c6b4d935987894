"""The engine interface every implementation (ONNX Runtime, TensorRT, torch) provides."""

from __future__ import annotations

import abc

import numpy as np


class Engine(abc.ABC):
    """One tower of one bundle, ready to run. infer() is called from one worker thread at a time
    or concurrently, as the implementation documents; it never touches the event loop."""

    #: implementation and device, e.g. "onnxruntime/CPUExecutionProvider"
    kind: str
    #: "fp32", "fp16" or "int8"
    precision: str
    #: largest batch one infer() call accepts
    max_batch: int

    @abc.abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """[N, ...] input -> [N, D] float32 embeddings (not normalized); N <= max_batch."""

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """[N, ...] input -> [N, D] unit-length float32 embeddings: what the encoders serve."""
        return l2_normalize(self.infer(batch))

    def infer_all(self, inputs: np.ndarray) -> np.ndarray:
        """Any number of rows, split into engine calls of at most max_batch."""
        parts = [self.infer(inputs[i : i + self.max_batch]) for i in range(0, len(inputs), self.max_batch)]
        return np.concatenate(parts, axis=0)

    def close(self) -> None:
        """Release the engine's resources."""


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of [N, D] scaled to unit length (float32)."""
    x = x.astype(np.float32, copy=False)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class EngineError(Exception):
    """An engine cannot be created as asked."""
