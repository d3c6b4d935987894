"""TensorRT plans of a bundle for the GPU of this node, each gated against fp32 before it is added.

`python -m engines.build plans --bundle DIR` (the plans Job of each GPU pool runs exactly this).

TensorRT 11 networks are strongly typed (its precision builder flags and int8 calibrators are
gone): the precision of a plan comes from the ONNX graph it is parsed from. fp32 plans come
from the reference graphs, fp16 from a mixed-precision graph (MatMul/Gemm/Conv in fp16,
LayerNorm, Softmax and the rest in fp32), int8 from the bundle's Q/DQ graph, the same file
ONNX Runtime serves on CPUs. Each plan gets an optimization profile over the batch axis (and the
sequence axis for text), is judged on held-out data against ONNX Runtime fp32 like every
reduced-precision engine, and is named for what it runs on, the GPU model, its compute capability
and the TensorRT version: `vision.int8.nvidia-h100-80gb-hbm3.sm90.trt11.4.0.plan`. Plans of other
GPU models or TensorRT versions in the bundle are left alone, so one bundle serves every pool.
In a signed bundle the plans go to derived.json and the manifest and its signature stay as they
are: encoders serve a plan only if it reproduces the signed golden outputs (engines/runtime/derived.py).
Temporary graphs go to the temporary directory (TMPDIR): a few GiB for BiomedCLIP.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engines.build import gate as gates
from engines.build import quantize
from engines.build.amend import amend_bundle
from engines.runtime import manifest as mf
from engines.runtime import tensorrt as trt_engine
from engines.runtime.bundle import TOWER_TENSORS, Bundle, load_bundle
from engines.runtime.engine import EngineError

log = logging.getLogger(__name__)

PRECISIONS = (mf.FP32, mf.FP16, mf.INT8)
MAX_BATCH = 32
OPT_BATCH = 8  # the batch size TensorRT tunes kernels for; the batcher's typical batch under load
OPT_TEXT_LENGTH = 32  # typical label or prompt length in tokens
WORKSPACE_BYTES = 4 << 30


class PlanError(RuntimeError):
    """Plans cannot be built here (no GPU, no TensorRT, a graph TensorRT refuses)."""


def plan_key(gpu: trt_engine.Gpu, tensorrt_version: str) -> str:
    """What a plan is built for: GPU model, compute capability and TensorRT version, e.g.
    "nvidia-l4.sm89.trt11.4.0"; the build record of the manifest is keyed by it."""
    return f"{gpu.model}.{gpu.arch}.trt{tensorrt_version}"


def plan_name(tower: str, precision: str, gpu: trt_engine.Gpu, tensorrt_version: str) -> str:
    """File name of a plan, e.g. "vision.fp16.nvidia-l4.sm89.trt11.4.0.plan"."""
    return f"{tower}.{precision}.{plan_key(gpu, tensorrt_version)}.plan"


def profile_shapes(tower: str, manifest: mf.Manifest, max_batch: int) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) input shapes of the optimization profile of a tower."""
    if tower == "vision":
        size = manifest.image.size
        return (1, 3, size, size), (min(OPT_BATCH, max_batch), 3, size, size), (max_batch, 3, size, size)
    context = manifest.text.context_length
    return (1, 1), (min(OPT_BATCH, max_batch), min(OPT_TEXT_LENGTH, context)), (max_batch, context)


def build_plan(onnx_path: Path, tower: str, manifest: mf.Manifest, max_batch: int) -> bytes:
    """Parse an ONNX graph into a strongly typed TensorRT network and build a serialized plan."""
    trt = trt_engine.import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # No creation flags: TensorRT 11 networks are always strongly typed (the STRONGLY_TYPED flag
    # is deprecated and ignored), so tensor types come from the ONNX graph alone.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise PlanError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    input_name, _ = TOWER_TENSORS[tower]
    profile.set_shape(input_name, *profile_shapes(tower, manifest, max_batch))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise PlanError(f"TensorRT could not build a plan from {onnx_path.name} (see its log above)")
    return bytes(plan)


def _source_graph(bundle: Bundle, tower: str, precision: str, work: Path) -> tuple[Path, str] | str:
    """(ONNX graph to build from, its bundle name or "") or why this precision has none."""
    manifest = bundle.manifest
    present = {e.precision: n for n, e in manifest.engine_files(tower).items() if e.scheme != mf.SCHEME_NNCF}
    if precision == mf.FP16 and mf.FP16 in present:
        return bundle.file(present[mf.FP16]), present[mf.FP16]  # gated by quantize --precision fp16
    if precision in (mf.FP32, mf.FP16):
        # The exporter's graph, constant-folded (ONNX Runtime's basic, provider-neutral rewrites)
        # so the parser meets plain weights instead of the exporter's Constant/CastLike chains.
        prepared = work / f"{tower}.prepared.onnx"
        if not prepared.exists():
            quantize.prepare_graph(bundle.engine_file(tower), prepared)
        if precision == mf.FP32:
            return prepared, manifest.file_for(tower)
        return quantize.mixed_fp16_graph(prepared, work / f"{tower}.fp16.onnx"), ""
    if mf.INT8 not in present:
        return f"the bundle has no gated int8 graph for {tower} (python -m engines.build quantize)"
    entry = manifest.files[present[mf.INT8]]
    if entry.scheme != mf.SCHEME_QDQ:
        return (f"{present[mf.INT8]} is {entry.scheme} int8, which only ONNX Runtime runs; TensorRT needs the Q/DQ "
                "variant (quantize --schemes qdq)")
    return bundle.file(present[mf.INT8]), present[mf.INT8]


def build_plans(bundle_dir: Path, *, precisions: Sequence[str] = PRECISIONS, max_batch: int = MAX_BATCH,
                calibration: Path | None = None, towers: Sequence[str] = mf.TOWERS) -> dict[str, Any]:
    """Build, gate and time plans for this GPU; add the ones that earn it to the bundle.

    A reduced-precision plan is kept when it passes the gate and is faster at batch 1 than the
    kept plan of the next higher precision. Returns the record written to the bundle's build record
    (the manifest's, or derived.json's in a signed bundle).
    """
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise PlanError(f"unknown precision {unknown[0]!r}; choose from {', '.join(PRECISIONS)}")
    try:
        trt = trt_engine.import_tensorrt()
        gpu = trt_engine.probe_gpu()
    except EngineError as exc:
        raise PlanError(f"cannot build TensorRT plans here: {exc}") from exc
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    started = time.perf_counter()
    log.info("building plans for %s (compute capability %s) with TensorRT %s", gpu.name,
             gpu.compute_capability, trt.__version__)
    try:
        data = quantize.precision_data(bundle, calibration, golden_fallback=True)
    except quantize.QuantizeError as exc:
        raise PlanError(str(exc)) from exc
    evaluation = data.evaluation
    golden = bundle.golden()
    reference = {t: quantize.open_cpu(bundle.engine_file(t), t, mf.FP32, 0) for t in mf.TOWERS}
    ref_out = gates.embed(evaluation, reference["vision"].infer_all, reference["text"].infer_all)
    gate = manifest.precision_gate
    added: dict[str, tuple[Path, mf.FileEntry]] = {}
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="medvlm-plans-") as tmp:
        work = Path(tmp)
        for tower in towers:
            kept_ms: float | None = None
            for precision in [p for p in PRECISIONS if p in precisions]:
                record: dict[str, Any] = {"tower": tower, "precision": precision, "kept": False}
                records.append(record)
                source = _source_graph(bundle, tower, precision, work)
                if isinstance(source, str):
                    record["note"] = source
                    log.warning("no %s %s plan: %s", tower, precision, source)
                    continue
                graph, source_name = source
                start = time.perf_counter()
                name = plan_name(tower, precision, gpu, trt.__version__)
                path = work / name
                path.write_bytes(build_plan(graph, tower, manifest, max_batch))
                record["build_seconds"] = round(time.perf_counter() - start, 1)
                entry = mf.FileEntry(sha256="", role=mf.PLAN_ROLE, precision=precision, tower=tower,
                                     source=source_name, tensorrt=trt.__version__, gpu=gpu.name,
                                     compute_capability=gpu.compute_capability)
                input_name, output_name = TOWER_TENSORS[tower]
                engine = trt_engine.TensorRTEngine(path, entry, input_name=input_name, output_name=output_name,
                                                   max_batch=max_batch, gpu=gpu)
                try:
                    report = gates.judge(f"{tower} {precision} plan on {gpu.name}", evaluation, ref_out, gate,
                                         golden=golden, **{tower: engine.infer_all})
                    timed = quantize.latencies_ms({"plan": engine.infer}, quantize.latency_example(
                        tower, evaluation, manifest.text.pad_id))["plan"]
                finally:
                    engine.close()
                record.update(latency_ms_b1=round(timed, 3), gate=report.to_dict())
                log.info("gate %s; %.3f ms at batch 1", report.summary(), timed)
                if not report.passed:
                    record["note"] = "failed the gate"
                    continue
                if precision != mf.FP32 and kept_ms is not None and timed * quantize.MIN_SPEEDUP > kept_ms:
                    record["note"] = f"not faster than the kept higher-precision plan ({timed:.3f} vs {kept_ms:.3f} ms)"
                    continue
                record.update(kept=True, note="kept")
                kept_ms = timed
                added[name] = (path, dataclasses.replace(
                    entry, golden_min_cosine=gates.golden_tolerance(report.golden[tower])))
        summary = {
            "gpu": gpu.name, "compute_capability": gpu.compute_capability, "tensorrt": trt.__version__,
            "max_batch": max_batch, "data": evaluation.description,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "plans": records, "seconds": round(time.perf_counter() - started, 1),
        }
        amend_bundle(
            bundle.path, added,
            # Earlier plans of the towers rebuilt here for this GPU model and TensorRT version are
            # replaced, kept or not; those of other GPU models and versions stay.
            remove=lambda n, e: e.role == mf.PLAN_ROLE and e.tower in towers and e.gpu == gpu.name
            and e.compute_capability == gpu.compute_capability and e.tensorrt == trt.__version__,
            build=lambda build: build.setdefault("plans", {}).__setitem__(
                plan_key(gpu, trt.__version__), summary),
        )
    for record in records:
        log.info("%s %s plan: %s", record["tower"], record["precision"], record.get("note", ""))
    return summary


__all__ = ["PlanError", "build_plan", "build_plans", "plan_key", "plan_name", "profile_shapes"]
