"""OpenVINO engine for CPU nodes: a bundle's ONNX graph compiled by OpenVINO's CPU plugin, in bf16
where the CPU computes bf16 natively (AVX512_BF16 or AMX), in f32 elsewhere, and int8 from
Q/DQ graphs (NNCF's or ONNX Runtime's static ones)."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import structlog

from engines.runtime.engine import Engine, EngineError

log = structlog.get_logger("medvlm.engine")

BF16 = "bf16"
# CPU flags (as /proc/cpuinfo spells them) under which bf16 runs as native instructions. Without
# them OpenVINO would emulate bf16 or refuse it: slower than f32, never worth it.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# CPU flags recorded beside every figure: what the int8 and bf16 paths depend on.
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def import_openvino():
    """The openvino module, or EngineError saying how to get it."""
    try:
        import openvino
    except ImportError as exc:
        raise EngineError(f"OpenVINO is not installed (pip install openvino; requirements/serve.txt): {exc}") from exc
    return openvino


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """Flags of the first CPU in /proc/cpuinfo (or of `cpuinfo`, its text); empty where unreadable."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


@dataclasses.dataclass(frozen=True)
class CpuSupport:
    """What OpenVINO's CPU plugin can run fast on this machine."""

    version: str  # OpenVINO's
    device: str  # the CPU's name as OpenVINO reports it
    capabilities: tuple[str, ...]  # OpenVINO's OPTIMIZATION_CAPABILITIES, e.g. ("FP32", "INT8", "BF16")
    flags: frozenset[str]  # /proc/cpuinfo flags

    @property
    def bf16(self) -> bool:
        return self.bf16_reason is None

    @property
    def bf16_reason(self) -> str | None:
        """Why bf16 is not used here (None: it is)."""
        native = [f for f in BF16_FLAGS if f in self.flags]
        if not native:
            return (f"this CPU has no native bf16 ({' or '.join(BF16_FLAGS)} not in its flags; "
                    f"has {', '.join(self.reported_flags) or 'none of ' + ', '.join(REPORTED_FLAGS)})")
        if "BF16" not in self.capabilities:
            return (f"the CPU has {', '.join(native)} but OpenVINO {self.version} does not offer BF16 on it "
                    f"(capabilities {', '.join(self.capabilities)})")
        return None

    @property
    def reported_flags(self) -> tuple[str, ...]:
        return tuple(f for f in REPORTED_FLAGS if f in self.flags)

    @classmethod
    def probe(cls) -> CpuSupport:
        """Ask OpenVINO and /proc/cpuinfo; EngineError without OpenVINO."""
        ov = import_openvino()
        core = ov.Core()
        return cls(version=ov.__version__.split("-")[0], device=str(core.get_property("CPU", "FULL_DEVICE_NAME")),
                   capabilities=tuple(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")), flags=cpu_flags())


class OpenVinoEngine(Engine):
    """One ONNX graph compiled for OpenVINO's CPU plugin.

    `precision` is what the engine computes in: "bf16" runs an fp32 graph with bf16 arithmetic
    (only where CpuSupport.bf16), "fp32" pins f32 (OpenVINO would otherwise pick bf16 by itself
    on such CPUs), "int8" runs a Q/DQ graph (its unquantized layers in f32). Thread-safe: every
    thread that calls infer() gets its own infer request.
    """

    def __init__(
        self,
        path: Path,
        *,
        input_name: str,
        output_name: str,
        precision: str,
        threads: int = 0,
        max_batch: int = 32,
        cache_dir: str = "",
    ) -> None:
        ov = import_openvino()
        core = ov.Core()
        config: dict[str, object] = {
            # LATENCY: one stream using every thread for one call. THROUGHPUT (several streams)
            # measured slower for a ViT-B/16 on 2 cores; the batcher supplies the parallelism.
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "bf16" if precision == BF16 else "f32",
        }
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        if cache_dir:
            # Compiled blobs keyed by graph, device and config: a restart skips the compilation.
            config["CACHE_DIR"] = cache_dir
        started = time.perf_counter()
        try:
            # Compiling from the path (not a read model) lets a cache hit skip reading the ONNX.
            self._compiled = core.compile_model(str(path), "CPU", config)
        except RuntimeError as exc:
            raise EngineError(f"OpenVINO could not compile {Path(path).name}: {exc}") from exc
        self.load_s = time.perf_counter() - started
        try:
            self._input = self._compiled.input(input_name)
            self._output = self._compiled.output(output_name)
        except RuntimeError as exc:
            raise EngineError(f"{Path(path).name} has no tensor {input_name!r} -> {output_name!r}") from exc
        actual = self._compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # e.g. "f32"
        self._local = threading.local()
        self.kind = "openvino/CPU"
        self.precision = precision
        self.max_batch = max_batch
        log.info("openvino_compiled", file=Path(path).name, precision=precision, inference_precision=actual,
                 threads=self._compiled.get_property("INFERENCE_NUM_THREADS"), cache_dir=cache_dir or None,
                 load_s=round(self.load_s, 3))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        result = request.infer({self._input: np.ascontiguousarray(batch)}, share_inputs=True)
        return np.array(result[self._output], copy=True)  # the request reuses its output buffer

    def close(self) -> None:
        self._local = threading.local()
        self._compiled = None  # type: ignore[assignment]
