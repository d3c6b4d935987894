"""Native TensorRT engine: a serialized plan run with the named-tensor API on a CUDA stream.

TensorRT and cuda-bindings are imported only when a plan is opened, so this module imports on
any machine; the `tensorrt` package comes with NVIDIA's TensorRT base image, not from pip.
Follows the TensorRT 11 Python API: plans are built from strongly typed networks
(by the build half's `plans` command), and inference uses set_input_shape / set_tensor_address /
execute_async_v3 on a stream created with cuda-bindings.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

from engines.runtime.engine import Engine, EngineError
from engines.runtime.manifest import FileEntry


@dataclasses.dataclass(frozen=True)
class Gpu:
    """The CUDA device a plan would run on."""

    index: int
    name: str
    compute_capability: str  # "major.minor", e.g. "9.0"

    @property
    def arch(self) -> str:
        """Short architecture tag used in plan file names, e.g. "sm90"."""
        return "sm" + self.compute_capability.replace(".", "")

    @property
    def model(self) -> str:
        """The GPU model as a file-name tag, e.g. "nvidia-h100-80gb-hbm3": `product` in lower case
        for ordinary names (a MIG profile's "." becomes "-" too)."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "unknown-gpu"

    @property
    def product(self) -> str:
        """The GPU as GPU Feature Discovery labels its node (`nvidia.com/gpu.product`): the CUDA
        device name with each space as "-", e.g. "NVIDIA-H100-80GB-HBM3", the key a Deployment
        schedules by. GFD appends "-SHARED" under time-slicing (the device, and its plans, are the
        same); a MIG profile changes the device name itself ("NVIDIA H100 80GB HBM3 MIG 1g.10gb"),
        so plans are built per profile."""
        return self.name.replace(" ", "-")


def _cudart() -> Any:
    """cuda-bindings' runtime module; EngineError when it is not installed."""
    try:
        from cuda.bindings import runtime
    except ImportError as exc:
        raise EngineError(f"cuda-bindings is not installed ({exc})") from exc
    return runtime


def _check(result: tuple, what: str) -> Any:
    """Unpack a cuda-bindings (error, value...) tuple; EngineError unless the call succeeded."""
    err, *values = result
    if int(err) != 0:
        raise EngineError(f"CUDA {what} failed: {getattr(err, 'name', err)}")
    return values[0] if len(values) == 1 else tuple(values)


def probe_gpu(index: int = 0) -> Gpu:
    """Name and compute capability of CUDA device `index`; EngineError when there is none."""
    cudart = _cudart()
    try:
        count = _check(cudart.cudaGetDeviceCount(), "device count")
        if count <= index:
            raise EngineError(f"no CUDA device {index} ({count} visible)")
        props = _check(cudart.cudaGetDeviceProperties(index), "device properties")
    except EngineError:
        raise
    except Exception as exc:  # a missing driver or library surfaces in many forms
        raise EngineError(f"CUDA is not usable here ({type(exc).__name__}: {exc})") from exc
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return Gpu(index=index, name=name, compute_capability=f"{props.major}.{props.minor}")


def import_tensorrt() -> Any:
    """The `tensorrt` module; EngineError when TensorRT is not installed."""
    try:
        # Imported by name at run time: it comes with NVIDIA's TensorRT image, not from our pins.
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise EngineError(f"TensorRT is not installed ({exc})") from exc


def plan_mismatch(entry: FileEntry, gpu: Gpu | None, tensorrt_version: str | None) -> str | None:
    """Why a plan cannot run here (None: it can): a plan is used only with the TensorRT version
    that built it, on the GPU model it was built on.

    TensorRT plans are specific to the GPU model, not just its compute capability: an L4 and an
    L40S (both 8.9), or an H100 and an H200 (both 9.0), differ in memory and SM count, and
    tactics timed on one may be wrong or slow on the other.
    """
    if tensorrt_version is None:
        return "TensorRT is not installed"
    if gpu is None:
        return "no CUDA device"
    if entry.compute_capability != gpu.compute_capability:
        return (f"built for compute capability {entry.compute_capability or '?'} ({entry.gpu or 'unknown GPU'}), "
                f"this GPU is {gpu.compute_capability} ({gpu.name})")
    if entry.gpu != gpu.name:
        return (f"built on {entry.gpu or 'an unrecorded GPU model'}, this GPU is {gpu.name} "
                f"(same compute capability {gpu.compute_capability}, another model)")
    if entry.tensorrt != tensorrt_version:
        return f"built with TensorRT {entry.tensorrt or '?'}, this is TensorRT {tensorrt_version}"
    return None


def plan_runtime(trt: Any) -> Any:
    """A TensorRT runtime under which a plan can run no code of its own before the golden check
    judges it: plans with host code refused (TensorRT 10+; also its default), no executable
    temporary files (lean runtimes, embedded plugin libraries), no plugin lookup in parent
    registries. Nothing here loads plugin libraries (init_libnvinfer_plugins is never called),
    so a plan with plugin layers fails to deserialize."""
    runtime = trt.Runtime(_Logger.get(trt))
    runtime.engine_host_code_allowed = False
    runtime.tempfile_control_flags = 0
    trt.get_plugin_registry().parent_search_enabled = False
    return runtime


class _Logger:
    """TensorRT logger at WARNING, created lazily with the module."""

    _instance = None

    @classmethod
    def get(cls, trt: Any) -> Any:
        if cls._instance is None:
            cls._instance = trt.Logger(trt.Logger.WARNING)
        return cls._instance


class TensorRTEngine(Engine):
    """One plan, one execution context, device buffers sized for the profile's largest shapes.

    infer() is serialized by a lock (one context runs one call at a time).
    """

    def __init__(self, plan: Path, entry: FileEntry, *, input_name: str, output_name: str,
                 max_batch: int = 32, gpu: Gpu | None = None) -> None:
        trt = import_tensorrt()
        gpu = gpu or probe_gpu()
        reason = plan_mismatch(entry, gpu, trt.__version__)
        if reason is not None:
            raise EngineError(f"plan {Path(plan).name} cannot run here: {reason}")
        self._cudart = cudart = _cudart()
        try:
            self._load(trt, cudart, Path(plan), gpu, input_name, output_name, max_batch)
        except BaseException:
            self.close()
            raise
        self.kind = f"tensorrt/{gpu.name}"
        self.precision = entry.precision

    def _load(self, trt: Any, cudart: Any, plan: Path, gpu: Gpu, input_name: str, output_name: str,
              max_batch: int) -> None:
        """Deserialize the plan, create the context, allocate buffers and the stream."""
        _check(cudart.cudaSetDevice(gpu.index), "set device")
        # Its sha256 was checked at load, but a plan from derived.json is unsigned until its golden check.
        self._runtime = plan_runtime(trt)  # kept: TensorRT wants the runtime to outlive its engines
        self._engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if self._engine is None:
            raise EngineError(f"TensorRT could not deserialize {plan.name}")
        self._context = self._engine.create_execution_context()
        self._input, self._output = input_name, output_name
        min_shape, _, max_shape = self._engine.get_tensor_profile_shape(input_name, 0)
        self._min_shape, self._max_shape = tuple(min_shape), tuple(max_shape)
        self._in_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(input_name)))
        self._out_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(output_name)))
        self.max_batch = min(max_batch, self._max_shape[0])
        # The output's largest shape: set the input to its largest and let TensorRT infer it.
        if not self._context.set_input_shape(input_name, self._max_shape):
            raise EngineError(f"plan {plan.name} refuses its own largest input shape {self._max_shape}")
        out_max = tuple(self._context.get_tensor_shape(output_name))
        self._in_bytes = int(np.prod(self._max_shape)) * self._in_dtype.itemsize
        self._out_bytes = int(np.prod(out_max)) * self._out_dtype.itemsize
        self._stream = _check(cudart.cudaStreamCreate(), "stream create")
        self._d_in = _check(cudart.cudaMalloc(self._in_bytes), "malloc")
        self._d_out = _check(cudart.cudaMalloc(self._out_bytes), "malloc")
        self._context.set_tensor_address(input_name, int(self._d_in))
        self._context.set_tensor_address(output_name, int(self._d_out))
        self._lock = threading.Lock()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """[N, ...] -> [N, D] float32; N and the other axes within the plan's optimization profile."""
        shape = tuple(batch.shape)
        if len(shape) != len(self._max_shape) or any(
                not lo <= s <= hi for s, lo, hi in zip(shape, self._min_shape, self._max_shape)):
            raise EngineError(f"input shape {shape} is outside the plan's profile {self._min_shape}..{self._max_shape}")
        host_in = np.ascontiguousarray(batch, dtype=self._in_dtype)
        cudart = self._cudart
        with self._lock:
            if not self._context.set_input_shape(self._input, shape):
                raise EngineError(f"TensorRT refused input shape {shape}")
            out = np.empty(tuple(self._context.get_tensor_shape(self._output)), dtype=self._out_dtype)
            _check(cudart.cudaMemcpyAsync(self._d_in, host_in.ctypes.data, host_in.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream), "copy in")
            if not self._context.execute_async_v3(int(self._stream)):
                raise EngineError("TensorRT execute_async_v3 failed")
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, self._d_out, out.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream), "copy out")
            _check(cudart.cudaStreamSynchronize(self._stream), "stream synchronize")
        return out.astype(np.float32, copy=False)

    def close(self) -> None:
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        for ptr in (getattr(self, "_d_in", None), getattr(self, "_d_out", None)):
            if ptr is not None:
                cudart.cudaFree(ptr)
        if getattr(self, "_stream", None) is not None:
            cudart.cudaStreamDestroy(self._stream)
        self._context = self._engine = self._runtime = None
        self._cudart = self._d_in = self._d_out = self._stream = None
