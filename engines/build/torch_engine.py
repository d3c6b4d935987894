"""The torch reference engine: a bundle's source model through open_clip, fp32, on CPU or CUDA.

It is the baseline the exported engines are measured against (parity checks, benchmarks) and an
optional serving backend (`--engine torch-cpu|torch-cuda`). It needs torch and open_clip, so it
lives in the build half, and importing this module registers `torch-cpu` and `torch-cuda` with
engines.runtime.select; the runtime half never imports it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from engines.build import registry
from engines.build.localdir import LoadedModel
from engines.runtime import select
from engines.runtime.bundle import Bundle
from engines.runtime.engine import Engine, EngineError
from engines.runtime.manifest import FP32


class TorchEngine(Engine):
    """One tower of an open_clip model. Calls are serialized by torch's own locking; the
    model is shared read-only between towers."""

    def __init__(self, model: torch.nn.Module, tower: str, *, device: str = "cpu", max_batch: int = 32) -> None:
        if tower not in ("vision", "text"):
            raise EngineError(f"unknown tower {tower!r}")
        self._model = model.to(device).eval()
        self._device = torch.device(device)
        self._encode = model.encode_image if tower == "vision" else model.encode_text
        self.kind = f"torch/{self._device}"
        self.precision = FP32
        self.max_batch = max_batch

    @torch.no_grad()
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed images [N, 3, H, W] or input ids [N, L] -> [N, D] float32, not normalized."""
        inputs = torch.from_numpy(np.ascontiguousarray(batch)).to(self._device)
        return self._encode(inputs, normalize=False).float().cpu().numpy()  # [N, D]

    def close(self) -> None:
        self._model = None  # type: ignore[assignment]


def load_source(bundle: Bundle) -> LoadedModel:
    """The bundle's source model, loaded offline from the registry as the bundle was built.

    The registry rebuilds it from the same inputs (committed demo weights, a BiomedCLIP
    snapshot, or a fixed seed for random-weight models); the caller's golden check proves
    it is the model the bundle was exported from.
    """
    manifest = bundle.manifest
    try:
        source = registry.get_source(manifest.model)
    except registry.SourceError as exc:
        raise EngineError(f"torch reference: {exc}") from exc
    if source.version != manifest.version:
        raise EngineError(f"torch reference: the registry has {manifest.model} version {source.version}, "
                          f"the bundle was built from version {manifest.version}")
    with tempfile.TemporaryDirectory(prefix="medvlm-torch-") as tmp:
        try:
            return source.load(Path(tmp), None)
        except registry.SourceError as exc:
            raise EngineError(f"torch reference: {exc}") from exc


def open_torch_engine(bundle: Bundle, tower: str, *, device: str = "cpu", max_batch: int = 32,
                      threads: int = 0) -> TorchEngine:
    """The torch engine of `tower` on `device` ("cpu" or "cuda"); EngineError if it cannot run here."""
    if device == "cuda" and not torch.cuda.is_available():
        raise EngineError("torch reports no usable CUDA device")
    if threads > 0:
        torch.set_num_threads(threads)
    return TorchEngine(load_source(bundle).model, tower, device=device, max_batch=max_batch)


def _open(bundle: Bundle, tower: str, option: select.Option, env: select.Environment, intra_op_threads: int,
          max_batch: int, *, cache_dir: str = "") -> TorchEngine:
    device = "cuda" if option.engine == select.TORCH_CUDA else "cpu"
    return open_torch_engine(bundle, tower, device=device, max_batch=max_batch, threads=intra_op_threads)


for _kind in select.TORCH_ENGINES:
    select.register_engine(_kind, _open)
