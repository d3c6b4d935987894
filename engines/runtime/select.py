"""Which engine serves a tower: a TensorRT plan for this GPU, then ONNX Runtime CUDA, then ONNX
Runtime CPU, at the precision asked for; every option passed over is logged with its reason.

`auto` takes, in that order, the first option that opens and reproduces the golden outputs
within its file's tolerance. Precision `auto` prefers the fastest gated variant the bundle holds
for the engine (int8, then fp16, then fp32): a reduced-precision file is only in a bundle if it
passed its gate against fp32 and was faster where it was built.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import onnxruntime as ort
import structlog

from engines.runtime import manifest as mf
from engines.runtime import tensorrt as trt_engine
from engines.runtime.bundle import TOWER_TENSORS, Bundle, BundleError, check_golden
from engines.runtime.engine import Engine, EngineError
from engines.runtime.onnx import CPU, CUDA, OnnxRuntimeEngine

log = structlog.get_logger("medvlm.engine")

AUTO = "auto"
TENSORRT = "tensorrt"
ORT_CUDA = "onnxruntime-cuda"
ORT_CPU = "onnxruntime-cpu"
TORCH_CPU = "torch-cpu"
TORCH_CUDA = "torch-cuda"
ENGINES = (AUTO, TENSORRT, ORT_CUDA, ORT_CPU, TORCH_CPU, TORCH_CUDA)
AUTO_ORDER = (TENSORRT, ORT_CUDA, ORT_CPU)
PRECISIONS = (AUTO, mf.FP32, mf.FP16, mf.INT8)
# Fastest first: the order `auto` precision tries the files of one engine in.
SPEED_ORDER = (mf.INT8, mf.FP16, mf.FP32)

# The torch reference needs torch and open_clip, so it lives in the build half and is imported
# only when asked for: a serving image without them never loads it.
TORCH_BACKEND = "engines.build.torch_engine"


@dataclasses.dataclass(frozen=True)
class Environment:
    """What this machine can run. probe() asks the machine; tests build their own."""

    ort_providers: tuple[str, ...]
    gpu: trt_engine.Gpu | None = None
    gpu_reason: str = "not probed"
    tensorrt: str | None = None  # version
    tensorrt_reason: str = "not probed"

    @classmethod
    def probe(cls, *, gpu: bool = True, tensorrt: bool = True) -> Environment:
        """ONNX Runtime's providers; the GPU and TensorRT only when asked (they cost a CUDA init)."""
        found: dict[str, Any] = {"ort_providers": tuple(ort.get_available_providers())}
        if gpu:
            try:
                found["gpu"], found["gpu_reason"] = trt_engine.probe_gpu(), ""
            except EngineError as exc:
                found["gpu_reason"] = str(exc)
        if tensorrt:
            try:
                found["tensorrt"], found["tensorrt_reason"] = trt_engine.import_tensorrt().__version__, ""
            except EngineError as exc:
                found["tensorrt_reason"] = str(exc)
        return cls(**found)


@dataclasses.dataclass(frozen=True)
class Option:
    """One way to serve a tower: an engine, a precision and the bundle file it runs."""

    engine: str
    precision: str
    file: str | None  # bundle-relative; None for the torch reference (it runs the source model)

    def describe(self) -> str:
        return f"{self.engine} {self.precision}" + (f" ({self.file})" if self.file else "")


@dataclasses.dataclass(frozen=True)
class Skipped:
    option: Option
    reason: str


@dataclasses.dataclass
class Selection:
    """The engine chosen for a tower, how well it reproduced the golden outputs, and what was passed over."""

    engine: Engine
    option: Option
    golden_cosine: float | None
    skipped: list[Skipped]


def _ordered(files: dict[str, mf.FileEntry]) -> list[tuple[str, mf.FileEntry]]:
    return sorted(files.items(), key=lambda item: SPEED_ORDER.index(item[1].precision)
                  if item[1].precision in SPEED_ORDER else len(SPEED_ORDER))


def options(bundle: Bundle, tower: str, engine: str, precision: str,
            env: Environment) -> tuple[list[Option], list[Skipped]]:
    """Options to try for `tower`, best first, and those ruled out before anything is opened."""
    manifest = bundle.manifest
    families = AUTO_ORDER if engine == AUTO else (engine,)
    tried: list[Option] = []
    skipped: list[Skipped] = []

    def consider(option: Option, reason: str | None) -> None:
        if reason is None and precision not in (AUTO, option.precision):
            reason = f"precision {precision} asked for"
        (tried.append(option) if reason is None else skipped.append(Skipped(option, reason)))

    for family in families:
        if family == TENSORRT:
            plans = manifest.plan_files(tower)
            if not plans:
                skipped.append(Skipped(Option(TENSORRT, precision, None),
                                       f"the bundle has no TensorRT plan for {tower} (python -m engines.build plans)"))
            for name, entry in _ordered(plans):
                consider(Option(TENSORRT, entry.precision, name), _plan_reason(entry, env))
        elif family in (ORT_CUDA, ORT_CPU):
            provider_missing = family == ORT_CUDA and CUDA not in env.ort_providers
            for name, entry in _ordered(manifest.engine_files(tower)):
                reason = None
                if provider_missing:
                    reason = f"{CUDA} not in this onnxruntime build ({', '.join(env.ort_providers)})"
                elif family == ORT_CUDA and entry.precision == mf.INT8:
                    reason = "int8 graphs run on the CPU provider; on GPUs int8 comes from TensorRT plans"
                elif family == ORT_CPU and entry.precision == mf.FP16:
                    reason = "fp16 graphs are for GPUs; on a CPU they run slower than fp32"
                consider(Option(family, entry.precision, name), reason)
        elif family in (TORCH_CPU, TORCH_CUDA):
            consider(Option(family, mf.FP32, None), None)
        else:
            raise EngineError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    return tried, skipped


def _plan_reason(entry: mf.FileEntry, env: Environment) -> str | None:
    """Why a plan is ruled out before loading (None: try it)."""
    if env.tensorrt is None:
        return env.tensorrt_reason or "TensorRT is not installed"
    if env.gpu is None:
        return env.gpu_reason or "no CUDA device"
    return trt_engine.plan_mismatch(entry, env.gpu, env.tensorrt)


def _open(bundle: Bundle, tower: str, option: Option, env: Environment, intra_op_threads: int,
          max_batch: int) -> Engine:
    input_name, output_name = TOWER_TENSORS[tower]
    if option.engine in (ORT_CPU, ORT_CUDA):
        return OnnxRuntimeEngine(bundle.file(option.file), input_name=input_name, output_name=output_name,
                                 precision=option.precision, provider=CUDA if option.engine == ORT_CUDA else CPU,
                                 intra_op_threads=intra_op_threads, max_batch=max_batch)
    if option.engine == TENSORRT:
        return trt_engine.TensorRTEngine(bundle.file(option.file), bundle.manifest.files[option.file],
                                         input_name=input_name, output_name=output_name, max_batch=max_batch,
                                         gpu=env.gpu)
    try:
        backend = importlib.import_module(TORCH_BACKEND)
    except ImportError as exc:
        raise EngineError(f"the torch reference engine needs torch, open_clip and engines/build "
                          f"(requirements/build.txt); this installation lacks them ({exc})") from exc
    return backend.open_torch_engine(bundle, tower, device="cuda" if option.engine == TORCH_CUDA else "cpu",
                                     max_batch=max_batch, threads=intra_op_threads)


def open_engine(
    bundle: Bundle,
    tower: str,
    engine: str = AUTO,
    precision: str = AUTO,
    intra_op_threads: int = 0,
    max_batch: int = 32,
    *,
    env: Environment | None = None,
    verify: bool = True,
    opener: Callable[..., Engine] | None = None,
) -> Selection:
    """Open the best engine for `tower` of a verified bundle that passes its golden check.

    Options are tried best first; one that cannot be opened or misses its file's golden
    tolerance is logged and passed over. Raises EngineError when the settings name an
    unknown engine or precision, or nothing can run what they ask for; BundleError when
    options opened but none reproduced the golden outputs.
    """
    if engine not in ENGINES:
        raise EngineError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        raise EngineError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    manifest = bundle.manifest
    if env is None:
        wants_gpu = engine in (AUTO, TENSORRT, ORT_CUDA) and (
            bool(manifest.plan_files(tower)) or CUDA in ort.get_available_providers())
        env = Environment.probe(gpu=wants_gpu, tensorrt=wants_gpu and bool(manifest.plan_files(tower)))
    tried, skipped = options(bundle, tower, engine, precision, env)
    for s in skipped:
        log.info("engine_skipped", tower=tower, engine=s.option.engine, precision=s.option.precision,
                 file=s.option.file, reason=s.reason)
    golden_failures = 0
    for option in tried:
        try:
            opened = (opener or _open)(bundle, tower, option, env, intra_op_threads, max_batch)
        except EngineError as exc:
            _skip(skipped, tower, option, str(exc))
            continue
        try:
            cosine = None
            if verify:
                bound = manifest.golden_tolerance(option.file) if option.file else None
                cosine = check_golden(bundle, tower, opened.infer_all, bound)
        except BundleError as exc:
            opened.close()
            golden_failures += 1
            _skip(skipped, tower, option, str(exc))
            continue
        except BaseException:
            opened.close()
            raise
        log.info("engine_selected", tower=tower, engine=opened.kind, precision=opened.precision,
                 file=option.file, golden_cosine=None if cosine is None else round(cosine, 7),
                 passed_over=len(skipped))
        if env.gpu is not None and option.engine in (ORT_CPU, TORCH_CPU):
            # Never silent: a pod that holds a GPU and computes on its CPU is a misconfiguration
            # (engine tensorrt refuses to start instead; see docs/deploy.md).
            log.warning("engine_gpu_unused", tower=tower, engine=opened.kind, gpu=env.gpu.name,
                        reasons="; ".join(f"{s.option.describe()}: {s.reason}" for s in skipped))
        return Selection(opened, option, cosine, skipped)
    reasons = "; ".join(f"{s.option.describe()}: {s.reason}" for s in skipped)
    what = f"engine {engine}, precision {precision}"
    if golden_failures:
        raise BundleError(f"no {tower} engine reproduces the golden outputs ({what}): {reasons}")
    raise EngineError(f"no {tower} engine can run here ({what}): {reasons}")


def _skip(skipped: list[Skipped], tower: str, option: Option, reason: str) -> None:
    skipped.append(Skipped(option, reason))
    log.warning("engine_skipped", tower=tower, engine=option.engine, precision=option.precision,
                file=option.file, reason=reason)
