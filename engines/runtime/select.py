"""Which engine serves a tower: a TensorRT plan for this GPU, then ONNX Runtime CUDA, then on the
CPU OpenVINO or ONNX Runtime, at the precision asked for; every option passed over is logged with
its reason.

`auto` takes, in that order, the first option that opens and reproduces the golden outputs
within its file's tolerance; files added after signing (derived.json) are options like the others,
at a tolerance no looser than the signed floor of their precision. Precision `auto` prefers the
fastest gated variant the bundle holds for the engine (int8, then bf16, fp16, fp32): a
reduced-precision file is only in a bundle if it passed its gate against fp32 and was faster
where it was built. On the CPU, OpenVINO's and ONNX
Runtime's options are tried together in that precision order (OpenVINO first at equal precision,
except fp32, where ONNX Runtime measured as fast or faster), so `auto` never takes OpenVINO f32
over a gated ONNX Runtime int8 graph. bf16 is OpenVINO running the fp32 graph in bf16 arithmetic,
offered only where the CPU has native bf16.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Protocol

import onnxruntime as ort
import structlog

from engines.runtime import derived
from engines.runtime import manifest as mf
from engines.runtime import openvino as ov_engine
from engines.runtime import tensorrt as trt_engine
from engines.runtime.bundle import TOWER_TENSORS, Bundle, BundleError, check_golden
from engines.runtime.engine import Engine, EngineError
from engines.runtime.onnx import CPU, CUDA, OnnxRuntimeEngine

log = structlog.get_logger("medvlm.engine")

AUTO = "auto"
TENSORRT = "tensorrt"
ORT_CUDA = "onnxruntime-cuda"
ORT_CPU = "onnxruntime-cpu"
OPENVINO = "openvino"
TORCH_CPU = "torch-cpu"
TORCH_CUDA = "torch-cuda"
AUTO_ORDER = (TENSORRT, ORT_CUDA, OPENVINO, ORT_CPU)
BF16 = ov_engine.BF16
PRECISIONS = (AUTO, mf.FP32, BF16, mf.FP16, mf.INT8)
# Fastest first: the order `auto` precision tries the files of one engine in.
SPEED_ORDER = (mf.INT8, BF16, mf.FP16, mf.FP32)
# Engines tried as one tier by `auto`: their options in SPEED_ORDER, the earlier family first.
CPU_TIER = (OPENVINO, ORT_CPU)

# The torch reference needs torch and open_clip, so the build half registers its engines when
# imported; a serving image without them never has them.
TORCH_ENGINES = (TORCH_CPU, TORCH_CUDA)


@dataclasses.dataclass(frozen=True)
class Environment:
    """What this machine can run. probe() asks the machine; tests build their own."""

    ort_providers: tuple[str, ...]
    gpu: trt_engine.Gpu | None = None
    gpu_reason: str = "not probed"
    tensorrt: str | None = None  # version
    tensorrt_reason: str = "not probed"
    openvino: ov_engine.CpuSupport | None = None
    openvino_reason: str = "not probed"

    @classmethod
    def probe(cls, *, gpu: bool = True, tensorrt: bool = True, openvino: bool = True) -> Environment:
        """ONNX Runtime's providers; the GPU and TensorRT only when asked (they cost a CUDA init);
        OpenVINO and the CPU's bf16 support when asked."""
        found: dict[str, Any] = {"ort_providers": tuple(ort.get_available_providers())}
        if openvino:
            try:
                found["openvino"], found["openvino_reason"] = ov_engine.CpuSupport.probe(), ""
            except EngineError as exc:
                found["openvino_reason"] = str(exc)
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


class Opener(Protocol):
    """Opens one option of a tower; raises EngineError when it cannot run here."""

    def __call__(self, bundle: Bundle, tower: str, option: Option, env: Environment, intra_op_threads: int,
                 max_batch: int, *, cache_dir: str = "") -> Engine: ...


# Engine name -> opener. TensorRT, ONNX Runtime and OpenVINO run the bundle's files and are
# registered below; any other registered engine runs the bundle's source model in fp32.
_OPENERS: dict[str, Opener] = {}


def register_engine(kind: str, opener: Opener) -> None:
    """Make `kind` an engine `open_engine` can select; registering a kind again replaces its opener."""
    if kind == AUTO:
        raise EngineError(f"{AUTO!r} is not an engine name")
    _OPENERS[kind] = opener


def engine_names() -> tuple[str, ...]:
    """The engine settings this process accepts: auto and every registered engine."""
    return (AUTO, *_OPENERS)


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
                                       f"the bundle has no TensorRT plan for {tower} (the build half's `plans` command builds them)"))
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
                if reason is None and entry.scheme == mf.SCHEME_NNCF:
                    reason = "NNCF int8 graphs are gated on OpenVINO, not on ONNX Runtime"
                consider(Option(family, entry.precision, name), reason)
        elif family == OPENVINO:
            for name, entry in _ordered(manifest.engine_files(tower)):
                for option, reason in _openvino_options(name, entry, env):
                    consider(option, reason)
        else:
            consider(Option(family, mf.FP32, None), None)
    if engine == AUTO:
        tried.sort(key=_cpu_tier_rank)  # stable: the GPU options keep their place ahead
    return tried, skipped


def _cpu_tier_rank(option: Option) -> tuple[int, int, int]:
    if option.engine not in CPU_TIER:
        return (0, 0, 0)
    speed = SPEED_ORDER.index(option.precision) if option.precision in SPEED_ORDER else len(SPEED_ORDER)
    # OpenVINO f32 after ONNX Runtime fp32: measured no faster on a ViT-B/16 (1.02x slower, AVX2,
    # 2 threads) and 2.6x slower on the small demo towers, and it costs seconds of compilation.
    return (1, speed, int(option.engine == OPENVINO and option.precision == mf.FP32))


def _openvino_options(name: str, entry: mf.FileEntry, env: Environment) -> list[tuple[Option, str | None]]:
    """OpenVINO's ways to run one ONNX file, each with the reason it is ruled out (None: try it)."""
    if env.openvino is None:
        return [(Option(OPENVINO, entry.precision, name), env.openvino_reason or "OpenVINO is not installed")]
    if entry.precision == mf.FP16:
        return [(Option(OPENVINO, entry.precision, name), "fp16 graphs are for GPUs; on a CPU they run slower than fp32")]
    if entry.scheme == mf.SCHEME_DYNAMIC:
        return [(Option(OPENVINO, entry.precision, name),
                 "dynamic int8 (MatMulInteger) is ONNX Runtime's scheme; OpenVINO runs Q/DQ int8 graphs")]
    if entry.precision == mf.FP32:
        # bf16 arithmetic on the fp32 graph where the CPU has it, then f32
        return [(Option(OPENVINO, BF16, name), env.openvino.bf16_reason), (Option(OPENVINO, mf.FP32, name), None)]
    if entry.scheme != mf.SCHEME_NNCF:
        return [(Option(OPENVINO, entry.precision, name),
                 f"{entry.scheme or entry.precision} graphs are gated on ONNX Runtime, not on OpenVINO "
                 "(make quantize-openvino adds OpenVINO's own int8)")]
    return [(Option(OPENVINO, entry.precision, name), None)]


def golden_bound(manifest: mf.Manifest, option: Option) -> float | None:
    """Lowest golden cosine `option` must reach: its file's bound (for a derived file, the clamped one
    its Bundle serves: derived.served_entry), and for bf16 arithmetic on an fp32 graph at most
    BF16_GOLDEN_MIN_COSINE. None (the manifest's own bound) for the torch reference."""
    bound = manifest.golden_tolerance(option.file) if option.file else None
    if option.precision == BF16:
        bound = min(bound or manifest.golden_min_cosine, mf.BF16_GOLDEN_MIN_COSINE)
    return bound


def precision_bound(manifest: mf.Manifest, tower: str, precision: str) -> float:
    """The embedding agreement with fp32 that an engine of `tower` serving at `precision` was held to:
    the lowest golden bound of the bundle's files it could be running (bf16 runs the fp32 graphs)."""
    graph_precision = mf.FP32 if precision == BF16 else precision
    files = {**manifest.engine_files(tower), **manifest.plan_files(tower)}
    bounds = [golden_bound(manifest, Option("", precision, name))
              for name, entry in files.items() if entry.precision == graph_precision]
    return min((b for b in bounds if b is not None), default=manifest.golden_min_cosine)


def _plan_reason(entry: mf.FileEntry, env: Environment) -> str | None:
    """Why a plan is ruled out before loading (None: try it)."""
    if env.tensorrt is None:
        return env.tensorrt_reason or "TensorRT is not installed"
    if env.gpu is None:
        return env.gpu_reason or "no CUDA device"
    return trt_engine.plan_mismatch(entry, env.gpu, env.tensorrt)


def _open_openvino(bundle: Bundle, tower: str, option: Option, env: Environment, intra_op_threads: int,
                   max_batch: int, *, cache_dir: str = "") -> Engine:
    input_name, output_name = TOWER_TENSORS[tower]
    return ov_engine.OpenVinoEngine(bundle.file(option.file), input_name=input_name, output_name=output_name,
                                    precision=option.precision, threads=intra_op_threads, max_batch=max_batch,
                                    cache_dir=cache_dir)


def _open_onnxruntime(bundle: Bundle, tower: str, option: Option, env: Environment, intra_op_threads: int,
                      max_batch: int, *, cache_dir: str = "") -> Engine:
    input_name, output_name = TOWER_TENSORS[tower]
    return OnnxRuntimeEngine(bundle.file(option.file), input_name=input_name, output_name=output_name,
                             precision=option.precision, provider=CUDA if option.engine == ORT_CUDA else CPU,
                             intra_op_threads=intra_op_threads, max_batch=max_batch)


def _open_tensorrt(bundle: Bundle, tower: str, option: Option, env: Environment, intra_op_threads: int,
                   max_batch: int, *, cache_dir: str = "") -> Engine:
    input_name, output_name = TOWER_TENSORS[tower]
    return trt_engine.TensorRTEngine(bundle.file(option.file), bundle.manifest.files[option.file],
                                     input_name=input_name, output_name=output_name, max_batch=max_batch,
                                     gpu=env.gpu)


register_engine(TENSORRT, _open_tensorrt)
register_engine(ORT_CUDA, _open_onnxruntime)
register_engine(OPENVINO, _open_openvino)
register_engine(ORT_CPU, _open_onnxruntime)


def _open(bundle: Bundle, tower: str, option: Option, env: Environment, intra_op_threads: int,
          max_batch: int, *, cache_dir: str = "") -> Engine:
    """Open `option` with its engine's registered opener."""
    return _OPENERS[option.engine](bundle, tower, option, env, intra_op_threads, max_batch, cache_dir=cache_dir)


def _unknown_engine(engine: str) -> EngineError:
    if engine in TORCH_ENGINES:
        return EngineError(f"engine {engine} is the torch reference, which the build half registers when imported; "
                           "this process has not loaded it (it needs torch and open_clip: requirements/build.txt)")
    return EngineError(f"unknown engine {engine!r}; expected one of {', '.join(engine_names())}")


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
    openvino_cache_dir: str = "",
) -> Selection:
    """Open the best engine for `tower` of a verified bundle that passes its golden check.

    Options are tried best first; one that cannot be opened or misses its file's golden
    tolerance is logged and passed over. Raises EngineError when the settings name an
    unknown engine or precision, or nothing can run what they ask for; BundleError when
    options opened but none reproduced the golden outputs.
    """
    if engine not in engine_names():
        raise _unknown_engine(engine)
    if precision not in PRECISIONS:
        raise EngineError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    manifest = bundle.manifest
    if env is None:
        wants_gpu = engine in (AUTO, TENSORRT, ORT_CUDA) and (
            bool(manifest.plan_files(tower)) or CUDA in ort.get_available_providers())
        env = Environment.probe(gpu=wants_gpu, tensorrt=wants_gpu and bool(manifest.plan_files(tower)),
                                openvino=engine in (AUTO, OPENVINO))
    tried, skipped = options(bundle, tower, engine, precision, env)
    for s in skipped:
        log.info("engine_skipped", tower=tower, engine=s.option.engine, precision=s.option.precision,
                 file=s.option.file, reason=s.reason)
    open_one = opener or functools.partial(_open, cache_dir=openvino_cache_dir)
    golden_failures = 0
    for option in tried:
        try:
            opened = open_one(bundle, tower, option, env, intra_op_threads, max_batch)
        except EngineError as exc:
            _skip(skipped, tower, option, str(exc))
            continue
        try:
            cosine = None
            if verify:
                cosine = check_golden(bundle, tower, opened.infer_all, golden_bound(manifest, option))
        except BundleError as exc:
            opened.close()
            golden_failures += 1
            unsigned = f"; {option.file} is listed in {derived.DERIVED_NAME}, unsigned, and is not served"
            _skip(skipped, tower, option, f"{exc}{unsigned if option.file in bundle.derived else ''}")
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
