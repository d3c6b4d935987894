"""ONNX Runtime engine (CUDA or CPU provider). Choosing an engine is engines.runtime.select's job;
choose_provider and open_engine here are the former entry points, kept for their callers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import structlog

from engines.runtime.bundle import TOWER_TENSORS, Bundle
from engines.runtime.engine import Engine, EngineError

log = structlog.get_logger("medvlm.engine")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
ENGINE_PROVIDERS = {"onnxruntime-cuda": CUDA, "onnxruntime-cpu": CPU}


class OnnxRuntimeEngine(Engine):
    """One ONNX graph in one InferenceSession. Sessions are thread-safe for run()."""

    def __init__(
        self,
        path: Path,
        *,
        input_name: str,
        output_name: str,
        precision: str,
        provider: str = CPU,
        intra_op_threads: int = 0,
        max_batch: int = 32,
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        # No spin-waiting between calls: on a CPU shared with image decoding the spinning
        # threads starve the decoders. Measured on 2 cores, tiny bundle, 512 px PNGs through
        # the vision encoder: c=1 p50 39-47 ms -> 20-26 ms, c=16 29-36 -> 37-47 img/s.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = [provider] if provider == CPU else [provider, CPU]
        self._session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        used = self._session.get_providers()[0]
        if used != provider:
            raise EngineError(f"ONNX Runtime could not use {provider} (it chose {used})")
        self._input = input_name
        self._output = output_name
        self.kind = f"onnxruntime/{used}"
        self.precision = precision
        self.max_batch = max_batch

    def infer(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self._session.run([self._output], {self._input: batch})
        return out

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]


def choose_provider(requested: str, available: list[str] | None = None) -> str:
    """The ONNX Runtime provider for an engine setting; `auto` prefers CUDA and logs why not.

    Superseded by engines.runtime.select, which also considers TensorRT plans and precisions."""
    available = ort.get_available_providers() if available is None else available
    if requested == "auto":
        if CUDA in available:
            return CUDA
        log.info("engine_skipped", engine="onnxruntime-cuda",
                 reason="CUDAExecutionProvider not in this onnxruntime build")
        return CPU
    if requested not in ENGINE_PROVIDERS:
        raise EngineError(f"unknown engine {requested!r}; expected auto or one of {sorted(ENGINE_PROVIDERS)}")
    provider = ENGINE_PROVIDERS[requested]
    if provider not in available:
        raise EngineError(f"engine {requested} asked for, but {provider} is not available here")
    return provider


def open_engine(bundle: Bundle, tower: str, requested: str = "auto", intra_op_threads: int = 0,
                max_batch: int = 32) -> Engine:
    """Open the fp32 ONNX Runtime engine serving `tower` of a verified bundle (no golden check).

    Services use engines.runtime.select.open_engine, which picks among every engine and precision."""
    input_name, output_name = TOWER_TENSORS[tower]
    engine = OnnxRuntimeEngine(
        bundle.engine_file(tower),
        input_name=input_name,
        output_name=output_name,
        precision=bundle.manifest.precision_of(tower),
        provider=choose_provider(requested),
        intra_op_threads=intra_op_threads,
        max_batch=max_batch,
    )
    log.info("engine_opened", tower=tower, engine=engine.kind, precision=engine.precision)
    return engine
