"""OpenVINO on CPU nodes: bf16 detection, the engine against the golden outputs, its place in the
automatic selection, the model cache, NNCF int8 judged by the precision gate, and a service
reporting what it runs. bf16 itself runs only where the CPU has native bf16; elsewhere its
detection is what is tested."""

from __future__ import annotations

import dataclasses
import io
import shutil
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import structlog
from conftest import encoder_settings, start_server
from medvlm.v1 import encoders_pb2_grpc, types_pb2
from PIL import Image
from test_gateway import png_bytes

from engines.build import openvino_int8
from engines.build.amend import amend_bundle
from engines.build.quantize import prepare_graph, quantize_dynamic_graph
from engines.runtime import manifest as mf, openvino as ov_engine, select
from engines.runtime.bundle import load_bundle
from engines.runtime.engine import EngineError, l2_normalize
from engines.runtime.onnx import OnnxRuntimeEngine
from medvlm.imaging.preprocess import preprocess
from services.plumbing.settings import VISION
from services.vision.servicer import VisionApp

CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 {extra}\n\nprocessor\t: 1\n"
AVX2 = ov_engine.CpuSupport("2026.4.1", "AMD EPYC", ("FP32", "INT8", "BIN", "EXPORT_IMPORT"),
                            ov_engine.cpu_flags(CPUINFO.format(extra="fma")))
ZEN4 = dataclasses.replace(AVX2, capabilities=("FP32", "BF16", "INT8", "BIN", "EXPORT_IMPORT"),
                           flags=ov_engine.cpu_flags(CPUINFO.format(extra="avx512f avx512_vnni avx512_bf16")))
CPU_ONLY = select.Environment(ort_providers=("CPUExecutionProvider",), gpu_reason="no CUDA device 0 (0 visible)",
                              tensorrt_reason="TensorRT is not installed (test)")


def _here() -> ov_engine.CpuSupport:
    return ov_engine.CpuSupport.probe()


def test_bf16_is_used_only_with_native_bf16_and_openvino_agreeing():
    assert AVX2.bf16_reason.startswith("this CPU has no native bf16") and "has avx2" in AVX2.bf16_reason
    assert ZEN4.bf16 and ZEN4.bf16_reason is None
    assert ZEN4.reported_flags == ("avx2", "avx512f", "avx512_vnni", "avx512_bf16")
    amx = dataclasses.replace(AVX2, capabilities=ZEN4.capabilities,
                              flags=ov_engine.cpu_flags(CPUINFO.format(extra="amx_tile amx_bf16 amx_int8")))
    assert amx.bf16
    # The flag alone is not enough: an OpenVINO that does not offer BF16 there is not asked for it.
    unsupported = dataclasses.replace(ZEN4, capabilities=AVX2.capabilities)
    assert "does not offer BF16" in unsupported.bf16_reason
    assert ov_engine.cpu_flags("no flags line here") == frozenset()


def test_this_machines_detection_matches_its_flags():
    here = _here()
    native = any(f in here.flags for f in ov_engine.BF16_FLAGS)
    assert here.bf16 == (native and "BF16" in here.capabilities)
    assert "FP32" in here.capabilities and "avx2" in here.reported_flags


def test_engine_reproduces_the_golden_outputs_and_is_thread_safe(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    engine = ov_engine.OpenVinoEngine(bundle.engine_file("vision"), input_name=mf.VISION_INPUT,
                                      output_name=mf.VISION_OUTPUT, precision="fp32", threads=1, max_batch=8)
    golden = bundle.golden()
    assert engine.kind == "openvino/CPU" and engine.precision == "fp32"
    from engines.runtime.bundle import golden_cosine

    assert golden_cosine(golden, "vision", engine.infer_all) > 0.99999
    images = golden[mf.VISION_INPUT]
    expected = [engine.infer(images[i:i + 1]) for i in range(len(images))]
    results: dict[int, list[np.ndarray]] = {}

    def worker(k: int) -> None:
        results[k] = [engine.infer(images[i:i + 1]) for _ in range(5) for i in range(len(images))]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for outs in results.values():
        for n, out in enumerate(outs):
            np.testing.assert_allclose(out, expected[n % len(images)], rtol=1e-5, atol=1e-6)
    engine.close()


def test_missing_tensor_is_an_engine_error(tiny_bundle):
    with pytest.raises(EngineError, match="has no tensor 'input_ids'"):
        ov_engine.OpenVinoEngine(load_bundle(tiny_bundle).engine_file("vision"), input_name="input_ids",
                                 output_name=mf.VISION_OUTPUT, precision="fp32")


def test_model_cache_is_written_and_used(tiny_bundle, tmp_path):
    path = load_bundle(tiny_bundle).engine_file("vision")
    cache = tmp_path / "ov-cache"
    first = ov_engine.OpenVinoEngine(path, input_name=mf.VISION_INPUT, output_name=mf.VISION_OUTPUT,
                                     precision="fp32", cache_dir=str(cache))
    blobs = sorted(p.name for p in cache.iterdir())
    assert blobs, "OpenVINO wrote nothing to its cache directory"
    second = ov_engine.OpenVinoEngine(path, input_name=mf.VISION_INPUT, output_name=mf.VISION_OUTPUT,
                                      precision="fp32", cache_dir=str(cache))
    assert sorted(p.name for p in cache.iterdir()) == blobs  # a hit adds no new blob
    x = np.zeros((2, 3, 224, 224), np.float32)
    np.testing.assert_allclose(second.infer(x), first.infer(x), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def cpu_bundle(tiny_bundle: Path, tmp_path_factory) -> Path:
    """The tiny bundle with an ONNX Runtime dynamic int8 vision graph (not gated: these tests are
    about which option is tried, not how well it answers)."""
    path = tmp_path_factory.mktemp("openvino") / "tiny-1"
    shutil.copytree(tiny_bundle, path)
    work = tmp_path_factory.mktemp("openvino-work")
    int8 = quantize_dynamic_graph(prepare_graph(path / "vision.onnx", work / "prepared.onnx"), work / "int8.onnx")
    amend_bundle(path, {"vision.int8.onnx": (int8, mf.FileEntry(sha256="", role="vision", precision="int8",
                                                                 scheme=mf.SCHEME_DYNAMIC, golden_min_cosine=0.5))})
    return path


@pytest.mark.parametrize("cpu, expected", [
    (AVX2, [("onnxruntime-cpu", "int8"), ("onnxruntime-cpu", "fp32"), ("openvino", "fp32")]),
    (ZEN4, [("onnxruntime-cpu", "int8"), ("openvino", "bf16"), ("onnxruntime-cpu", "fp32"), ("openvino", "fp32")]),
])
def test_auto_orders_the_cpu_options_by_speed(cpu_bundle, cpu, expected):
    env = dataclasses.replace(CPU_ONLY, openvino=cpu, openvino_reason="")
    tried, skipped = select.options(load_bundle(cpu_bundle), "vision", "auto", "auto", env)
    assert [(o.engine, o.precision) for o in tried] == expected
    reasons = {(s.option.engine, s.option.precision): s.reason for s in skipped}
    assert "dynamic int8 (MatMulInteger) is ONNX Runtime's scheme" in reasons[("openvino", "int8")]
    if not cpu.bf16:
        assert "no native bf16" in reasons[("openvino", "bf16")]


def test_forced_openvino_serves_f32_here_and_logs_why_not_bf16(cpu_bundle):
    here = _here()
    env = dataclasses.replace(CPU_ONLY, openvino=here, openvino_reason="")
    with structlog.testing.capture_logs() as logs:
        chosen = select.open_engine(load_bundle(cpu_bundle), "vision", engine="openvino", env=env)
    assert chosen.engine.kind == "openvino/CPU"
    assert chosen.option.precision == ("bf16" if here.bf16 else "fp32")
    assert chosen.golden_cosine > (mf.BF16_GOLDEN_MIN_COSINE if here.bf16 else 0.9999)
    skips = [e for e in logs if e["event"] == "engine_skipped"]
    assert all(e["engine"] == "openvino" for e in skips)
    if not here.bf16:
        assert any(e["precision"] == "bf16" and "no native bf16" in e["reason"] for e in skips)
    chosen.engine.close()
    if not here.bf16:
        with pytest.raises(EngineError, match="no vision engine can run here.*no native bf16"):
            select.open_engine(load_bundle(cpu_bundle), "vision", engine="openvino", precision="bf16", env=env)


def test_without_openvino_its_options_are_skipped_with_the_reason(cpu_bundle):
    env = dataclasses.replace(CPU_ONLY, openvino_reason="OpenVINO is not installed (test)")
    chosen = select.open_engine(load_bundle(cpu_bundle), "vision", precision="fp32", env=env)
    assert chosen.option.engine == "onnxruntime-cpu"
    assert any(s.option.engine == "openvino" and s.reason == "OpenVINO is not installed (test)"
               for s in chosen.skipped)
    chosen.engine.close()


@pytest.mark.skipif(not _here().bf16, reason=f"bf16 runs only on a CPU with native bf16: {_here().bf16_reason}")
def test_bf16_reproduces_the_golden_outputs_where_the_cpu_has_it(cpu_bundle):
    env = dataclasses.replace(CPU_ONLY, openvino=_here(), openvino_reason="")
    chosen = select.open_engine(load_bundle(cpu_bundle), "vision", engine="openvino", precision="bf16", env=env)
    assert chosen.engine.precision == "bf16" and chosen.golden_cosine >= mf.BF16_GOLDEN_MIN_COSINE
    chosen.engine.close()


async def test_service_on_openvino_reports_it_and_answers_like_the_golden_outputs(tiny_bundle, tmp_path):
    settings = encoder_settings(VISION, tiny_bundle, engine="openvino", precision="fp32",
                                openvino_cache_dir=str(tmp_path / "cache"))
    server = await start_server(settings, VisionApp(settings))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = encoders_pb2_grpc.VisionEncoderServiceStub(channel)
            info = await stub.GetModelInfo(types_pb2.GetModelInfoRequest(), timeout=10)
            (engine,) = info.model.engines
            assert (engine.engine, engine.precision) == ("openvino/CPU", types_pb2.PRECISION_FP32)
            assert any((tmp_path / "cache").iterdir())
            images = [png_bytes(seed) for seed in range(3)]
            reply = await stub.EmbedImages(types_pb2.EmbedImagesRequest(
                images=[types_pb2.Image(data=d) for d in images]), timeout=20)
        bundle = load_bundle(tiny_bundle)
        reference = OnnxRuntimeEngine(bundle.engine_file("vision"), input_name=mf.VISION_INPUT,
                                      output_name=mf.VISION_OUTPUT, precision="fp32")
        pixels = np.stack([preprocess(Image.open(io.BytesIO(d)).convert("RGB"), bundle.manifest.image)
                           for d in images])  # [3, 3, H, W]
        expected = l2_normalize(reference.infer(pixels))
        got = np.array([e.values for e in reply.embeddings], np.float32)
        assert (got * expected).sum(axis=1).min() > 0.9999
    finally:
        await server.stop(0)


def test_nncf_int8_is_gated_on_openvino_and_refused_on_random_weights(tiny_bundle, tmp_path):
    """tiny's random weights cannot judge int8 (see test_precision.py): the gate must refuse it,
    write nothing, and record why."""
    path = tmp_path / "tiny-1"
    shutil.copytree(tiny_bundle, path)
    result = openvino_int8.quantize_openvino(path, towers=("vision",), threads=1)
    (variant,) = result.variants
    assert not variant.kept and not result.kept and variant.report.failures
    manifest = mf.Manifest.read(path)
    assert not any(e.scheme == mf.SCHEME_NNCF for e in manifest.files.values())
    record = manifest.build["precision_openvino"]
    assert record["variants"][0]["gate"]["passed"] is False and record["variants"][0]["scheme"] == "nncf"
