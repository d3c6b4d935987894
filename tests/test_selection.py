"""Engine selection: TensorRT plan -> ONNX Runtime CUDA -> CPU, precisions, reasons for every skip,
the torch reference, and what a service reports about the engine it picked."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import structlog
from conftest import ROOT, encoder_settings, start_server
from medvlm.v1 import encoders_pb2_grpc, types_pb2

from engines.build.amend import amend_bundle
from engines.build.quantize import prepare_graph, quantize_dynamic_graph
import engines.build.torch_engine  # noqa: F401 - registers the torch reference engines
from engines.runtime import manifest as mf, select, tensorrt as trt_engine
from engines.runtime.bundle import BundleError, load_bundle
from engines.runtime.engine import EngineError
from services.plumbing import metrics
from services.plumbing.settings import VISION
from services.vision.servicer import VisionApp

CPU_ONLY = select.Environment(ort_providers=("CPUExecutionProvider",), gpu_reason="no CUDA device 0 (0 visible)",
                              tensorrt_reason="TensorRT is not installed (test)")
H100 = trt_engine.Gpu(index=0, name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
GPU_NO_CUDA_EP = dataclasses.replace(CPU_ONLY, gpu=H100, gpu_reason="", tensorrt="11.4.0", tensorrt_reason="")


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle: Path, tmp_path_factory) -> Path:
    """The tiny bundle plus a vision int8 graph and a plan entry, as the build steps would add them.

    The int8 graph is not gated here (random weights cannot judge quantization, see
    test_precision.py): these tests are about which file serves, not how well.
    """
    path = tmp_path_factory.mktemp("selection") / "tiny-1"
    shutil.copytree(tiny_bundle, path)
    work = tmp_path_factory.mktemp("selection-work")
    int8 = quantize_dynamic_graph(prepare_graph(path / "vision.onnx", work / "prepared.onnx"), work / "int8.onnx")
    plan = work / "plan"
    plan.write_bytes(b"not a real plan: it must never be deserialized here")
    amend_bundle(path, {
        "vision.int8.onnx": (int8, mf.FileEntry(sha256="", role="vision", precision="int8",
                                                 scheme=mf.SCHEME_DYNAMIC, golden_min_cosine=0.5)),
        "vision.fp16.sm90.plan": (plan, mf.FileEntry(sha256="", role=mf.PLAN_ROLE, precision="fp16", tower="vision",
                                                      source="vision.onnx", tensorrt="11.4.0", gpu=H100.name,
                                                      compute_capability="9.0", golden_min_cosine=0.999)),
    })
    return path


def _edit_manifest(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / mf.MANIFEST_NAME).read_text())
    edit(data)
    (dst / mf.MANIFEST_NAME).write_text(json.dumps(data))
    return dst


def test_derived_files_keep_the_bundle_id_and_fp32_stays_the_reference(tiny_bundle, int8_bundle):
    before, after = mf.Manifest.read(tiny_bundle), mf.Manifest.read(int8_bundle)
    assert after.bundle_id == before.bundle_id
    assert after.file_for("vision") == "vision.onnx" and after.precision_of("vision") == "fp32"
    assert after.file_for("vision", "int8") == "vision.int8.onnx"
    assert list(after.engine_files("vision")) == ["vision.onnx", "vision.int8.onnx"]
    assert list(after.plan_files("vision")) == ["vision.fp16.sm90.plan"] and not after.plan_files("text")
    assert after.golden_tolerance("vision.int8.onnx") == 0.5
    assert after.golden_tolerance("vision.onnx") == after.golden_min_cosine
    # Entries keep the old JSON shape: optional fields only where set.
    assert json.loads(after.to_json())["files"]["vision.onnx"] == {
        "sha256": after.files["vision.onnx"].sha256, "role": "vision", "precision": "fp32"}
    assert mf.Manifest.from_dict(json.loads(after.to_json())) == after


def test_auto_prefers_int8_on_cpu_and_logs_every_skip(int8_bundle):
    with structlog.testing.capture_logs() as logs:
        chosen = select.open_engine(load_bundle(int8_bundle), "vision", env=CPU_ONLY)
    assert (chosen.option.engine, chosen.option.file, chosen.engine.precision) == (
        "onnxruntime-cpu", "vision.int8.onnx", "int8")
    assert chosen.engine.kind == "onnxruntime/CPUExecutionProvider"
    skipped = {(e["engine"], e["file"]): e["reason"] for e in logs if e["event"] == "engine_skipped"}
    assert "TensorRT is not installed" in skipped[("tensorrt", "vision.fp16.sm90.plan")]
    assert "CUDAExecutionProvider not in this onnxruntime build" in skipped[("onnxruntime-cuda", "vision.onnx")]
    chosen.engine.close()


@pytest.mark.parametrize("precision, file", [("fp32", "vision.onnx"), ("int8", "vision.int8.onnx")])
def test_precision_setting_picks_the_file(int8_bundle, precision, file):
    chosen = select.open_engine(load_bundle(int8_bundle), "vision", precision=precision, env=CPU_ONLY)
    assert (chosen.option.file, chosen.engine.precision) == (file, precision)
    chosen.engine.close()


def test_precision_the_bundle_lacks_is_refused_with_reasons(int8_bundle):
    with pytest.raises(EngineError, match="no text engine can run here.*precision int8.*no TensorRT plan for text"):
        select.open_engine(load_bundle(int8_bundle), "text", precision="int8", env=CPU_ONLY)
    with pytest.raises(EngineError, match="unknown precision 'int4'"):
        select.open_engine(load_bundle(int8_bundle), "text", precision="int4", env=CPU_ONLY)
    with pytest.raises(EngineError, match="unknown engine 'openvino-gpu'"):
        select.open_engine(load_bundle(int8_bundle), "text", engine="openvino-gpu", env=CPU_ONLY)


@pytest.mark.parametrize("entry_edit, reason", [
    ({"compute_capability": "8.9", "gpu": "NVIDIA L4"}, "built for compute capability 8.9 (NVIDIA L4), this GPU is 9.0"),
    ({"tensorrt": "11.1.0"}, "built with TensorRT 11.1.0, this is TensorRT 11.4.0"),
    # Same compute capability, another GPU model: plans are specific to the model.
    ({"gpu": "NVIDIA H200"},
     "built on NVIDIA H200, this GPU is NVIDIA H100 80GB HBM3 (same compute capability 9.0"),
])
def test_mismatched_plan_is_skipped_before_loading_and_onnxruntime_serves(int8_bundle, tmp_path, entry_edit, reason):
    bundle = _edit_manifest(int8_bundle, tmp_path / "b",
                            lambda d: d["files"]["vision.fp16.sm90.plan"].update(entry_edit))
    loads = []

    def opener(bundle, tower, option, env, threads, max_batch):
        loads.append(option.engine)
        return select._open(bundle, tower, option, env, threads, max_batch)

    with structlog.testing.capture_logs() as logs:
        chosen = select.open_engine(load_bundle(bundle), "vision", env=GPU_NO_CUDA_EP, opener=opener)
    assert "tensorrt" not in loads  # ruled out from the manifest alone
    assert chosen.option.engine == "onnxruntime-cpu"
    plan_skips = [e["reason"] for e in logs if e["event"] == "engine_skipped" and e["engine"] == "tensorrt"]
    assert len(plan_skips) == 1 and plan_skips[0].startswith(reason)
    # Holding a GPU and computing on the CPU is never silent.
    (unused,) = [e for e in logs if e["event"] == "engine_gpu_unused"]
    assert unused["gpu"] == H100.name and unused["log_level"] == "warning" and reason in unused["reasons"]
    chosen.engine.close()
    # Engine tensorrt (the gpu overlay's setting) fails closed instead: no engine, never serving.
    refused = f"no vision engine can run here \\(engine tensorrt.*{re.escape(reason)}"
    with pytest.raises(EngineError, match=refused):
        select.open_engine(load_bundle(bundle), "vision", engine="tensorrt", env=GPU_NO_CUDA_EP,
                           opener=opener)
    assert "tensorrt" not in loads


def test_matching_plan_that_cannot_load_falls_back(int8_bundle):
    # Manifest says the plan fits this (pretend) GPU, but no TensorRT can load it here.
    with structlog.testing.capture_logs() as logs:
        chosen = select.open_engine(load_bundle(int8_bundle), "vision", env=GPU_NO_CUDA_EP)
    assert chosen.option.engine == "onnxruntime-cpu"
    failed = [e for e in logs if e["event"] == "engine_skipped" and e["engine"] == "tensorrt"]
    assert failed and "TensorRT is not installed" in failed[0]["reason"]
    chosen.engine.close()


def test_missing_cuda_provider_falls_back_to_cpu_unless_cuda_is_demanded(int8_bundle):
    chosen = select.open_engine(load_bundle(int8_bundle), "text", env=CPU_ONLY)
    assert chosen.engine.kind == "onnxruntime/CPUExecutionProvider"
    chosen.engine.close()
    with pytest.raises(EngineError, match="CUDAExecutionProvider not in this onnxruntime build"):
        select.open_engine(load_bundle(int8_bundle), "text", engine="onnxruntime-cuda", env=CPU_ONLY)


def test_cuda_provider_that_cannot_run_is_skipped(int8_bundle):
    # onnxruntime-gpu lists the CUDA provider even on a machine whose CUDA cannot start.
    env = dataclasses.replace(CPU_ONLY, ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"))

    def opener(bundle, tower, option, env, threads, max_batch):
        if option.engine == "onnxruntime-cuda":
            raise EngineError("ONNX Runtime could not use CUDAExecutionProvider (it chose CPUExecutionProvider)")
        return select._open(bundle, tower, option, env, threads, max_batch)

    chosen = select.open_engine(load_bundle(int8_bundle), "text", env=env, opener=opener)
    assert chosen.option.engine == "onnxruntime-cpu"
    assert any(s.option.engine == "onnxruntime-cuda" and "could not use" in s.reason for s in chosen.skipped)
    chosen.engine.close()


def test_engine_failing_its_golden_tolerance_gives_way_to_fp32(int8_bundle, tmp_path):
    bundle = _edit_manifest(int8_bundle, tmp_path / "b",
                            lambda d: d["files"]["vision.int8.onnx"].update(golden_min_cosine=1.0))
    chosen = select.open_engine(load_bundle(bundle), "vision", env=CPU_ONLY)
    assert chosen.option.file == "vision.onnx"
    assert any(s.option.file == "vision.int8.onnx" and "golden check failed" in s.reason for s in chosen.skipped)
    chosen.engine.close()
    with pytest.raises(BundleError, match="reproduces the golden outputs"):
        select.open_engine(load_bundle(bundle), "vision", precision="int8", env=CPU_ONLY)


def test_torch_reference_engine_reproduces_the_golden_outputs(tiny_bundle):
    chosen = select.open_engine(load_bundle(tiny_bundle), "text", engine="torch-cpu", env=CPU_ONLY)
    assert (chosen.engine.kind, chosen.engine.precision) == ("torch/cpu", "fp32")
    assert chosen.golden_cosine > 0.99999
    chosen.engine.close()


def test_the_runtime_half_offers_torch_only_once_the_build_half_registers_it(tiny_bundle):
    probe = """
import sys
from engines.runtime import select
from engines.runtime.bundle import load_bundle
from engines.runtime.engine import EngineError
assert not [m for m in sys.modules if m.startswith("engines.build")], "the runtime half imported the build half"
names = select.engine_names()
assert "torch-cpu" not in names and "onnxruntime-cpu" in names, names
try:
    select.open_engine(load_bundle(sys.argv[1]), "text", engine="torch-cpu")
except EngineError as exc:
    print("refused:", exc)
import engines.build.torch_engine
chosen = select.open_engine(load_bundle(sys.argv[1]), "text", engine="torch-cpu")
print("registered:", chosen.engine.kind)
"""
    done = subprocess.run([sys.executable, "-c", probe, str(tiny_bundle)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'gen'}"})
    assert done.returncode == 0, done.stderr[-2000:]
    said = {line.split(":", 1)[0]: line for line in done.stdout.splitlines() if line.startswith(("refused:", "registered:"))}
    refused, registered = said.get("refused", ""), said.get("registered", "")
    assert refused.startswith("refused: engine torch-cpu is the torch reference") and "requirements/build.txt" in refused
    assert registered == "registered: torch/cpu"


def test_torch_cuda_without_a_gpu_is_refused_with_its_reason(tiny_bundle):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(EngineError, match="torch reports no usable CUDA device"):
        select.open_engine(load_bundle(tiny_bundle), "text", engine="torch-cuda", env=CPU_ONLY)


def test_tensorrt_module_imports_without_tensorrt_and_explains():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(EngineError, match="TensorRT is not installed"):
            trt_engine.import_tensorrt()
    else:
        pytest.skip("TensorRT is installed here")
    entry = mf.FileEntry(sha256="", role="plan", precision="fp16", tower="vision", tensorrt="11.4.0",
                         compute_capability="9.0", gpu=H100.name)
    assert trt_engine.plan_mismatch(entry, H100, "11.4.0") is None
    assert trt_engine.plan_mismatch(entry, None, "11.4.0") == "no CUDA device"
    assert trt_engine.plan_mismatch(entry, H100, None) == "TensorRT is not installed"


def _tensorrt_and_gpu() -> str | None:
    try:
        trt_engine.import_tensorrt()
        trt_engine.probe_gpu()
    except EngineError as exc:
        return str(exc)
    return None


@pytest.mark.skipif(_tensorrt_and_gpu() is not None, reason=f"needs TensorRT and a CUDA GPU: {_tensorrt_and_gpu()}")
def test_tensorrt_plans_build_gate_and_serve(tiny_bundle, tmp_path):
    """On a GPU node: fp32 and fp16 plans of the tiny model build from strongly typed networks,
    pass their golden check at load and are what `auto` picks."""
    from engines.build import plans

    bundle = tmp_path / "tiny-1"
    shutil.copytree(tiny_bundle, bundle)
    relaxed = mf.PrecisionGate(min_agreement=0.0, max_top1_drop=1.0, min_centred_cosine=0.9, golden_floor=0.9)
    amend_bundle(bundle, {}, precision_gate=relaxed)  # tiny's near-tied random answers say nothing
    plans.build_plans(bundle, precisions=("fp32", "fp16"), max_batch=8)
    chosen = select.open_engine(load_bundle(bundle), "vision")
    assert chosen.engine.kind.startswith("tensorrt/") and chosen.golden_cosine is not None
    out = chosen.engine.infer(np.zeros((3, 3, 224, 224), np.float32))
    assert out.shape == (3, 64) and out.dtype == np.float32
    chosen.engine.close()


async def test_service_reports_the_engine_and_precision_it_picked(int8_bundle, tmp_path):
    # A version no other test serves: the metrics registry is process-wide, and another test may
    # already have set the engine-info gauge of the int8 bundle.
    version = f"selection-{tmp_path.name}"
    bundle = _edit_manifest(int8_bundle, tmp_path / "b", lambda d: d.update(version=version))
    settings = encoder_settings(VISION, bundle, engine="onnxruntime-cpu", precision="int8")  # its dynamic int8
    server = await start_server(settings, VisionApp(settings))
    try:
        import grpc

        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            info = await encoders_pb2_grpc.VisionEncoderServiceStub(channel).GetModelInfo(
                types_pb2.GetModelInfoRequest(), timeout=5)
        (engine,) = info.model.engines
        assert engine.engine == "onnxruntime/CPUExecutionProvider"
        assert engine.precision == types_pb2.PRECISION_INT8
        assert info.model.version == version
        labels = {tuple(s.labels.values()) for m in metrics.ENGINE_INFO.collect() for s in m.samples if s.value == 1}
        assert ("vision", "onnxruntime/CPUExecutionProvider", "int8", info.model.bundle_id) in labels
    finally:
        await server.stop(0)


def test_plans_take_their_precision_from_the_graph_and_say_what_is_missing(int8_bundle, tmp_path):
    """What the plans step builds from, checked without TensorRT: fp32 from the reference graph,
    fp16 from a mixed graph made on the spot, int8 only from a Q/DQ graph."""
    import onnx

    from engines.build import plans

    bundle = load_bundle(int8_bundle)
    _, source = plans._source_graph(bundle, "vision", "fp32", tmp_path)
    assert source == "vision.onnx"
    graph, source = plans._source_graph(bundle, "vision", "fp16", tmp_path)
    assert source == "" and any(i.data_type == onnx.TensorProto.FLOAT16 for i in onnx.load(str(graph)).graph.initializer)
    assert "only ONNX Runtime runs" in plans._source_graph(bundle, "vision", "int8", tmp_path)
    assert "no gated int8 graph for text" in plans._source_graph(bundle, "text", "int8", tmp_path)
    assert plans.plan_name("vision", "int8", H100, "11.4.0") == (
        "vision.int8.nvidia-h100-80gb-hbm3.sm90.trt11.4.0.plan")
    assert plans.profile_shapes("text", bundle.manifest, 16) == ((1, 1), (8, 32), (16, 32))
    if _tensorrt_and_gpu() is not None:
        with pytest.raises(plans.PlanError, match="cannot build TensorRT plans here"):
            plans.build_plans(int8_bundle)
