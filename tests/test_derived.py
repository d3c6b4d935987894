"""Files added to a signed bundle after signing (derived.json): the signature stays valid, and a derived
file is served only if it reproduces the signed golden outputs within the floor of its precision.

TensorRT cannot run here, so the "plans" are what a plans Job would build from (the reference graph
prepared for the parser, or one with perturbed weights), recorded exactly as the Job records a plan
and run by ONNX Runtime in place of TensorRT (plan_standin)."""

from __future__ import annotations

import dataclasses
import re
import shutil
import types
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import structlog
from conftest import encoder_settings, precision_name, start_server
from medvlm.v1 import encoders_pb2_grpc, types_pb2
from onnx import numpy_helper
from test_selection import CPU_ONLY, GPU_NO_CUDA_EP, H100

from engines.build.__main__ import main as build_main
from engines.build.amend import amend_bundle
from engines.build.plans import plan_key, plan_name
from engines.build.quantize import prepare_graph, quantize_dynamic_graph
from engines.build.sign import sign_bundle
from engines.runtime import manifest as mf, select, tensorrt as trt_engine
from engines.runtime.bundle import BundleError, golden_cosine, load_bundle
from engines.runtime.derived import DERIVED_NAME, DerivedIndex
from engines.runtime.signature import SIGNATURE_NAME
from services.plumbing.settings import TEXT, VISION
from services.text.servicer import TextApp
from services.vision.servicer import VisionApp

TENSORRT = GPU_NO_CUDA_EP.tensorrt
PLAN = plan_name("vision", mf.FP32, H100, TENSORRT)  # vision.fp32.nvidia-h100-80gb-hbm3.sm90.trt11.4.0.plan
SIGNED_FILES = (mf.MANIFEST_NAME, SIGNATURE_NAME)


def plan_entry(tower: str, **fields) -> mf.FileEntry:
    """A plan's entry as the plans Job records it (sha256 is filled in by amend_bundle)."""
    return mf.FileEntry(sha256="", role=mf.PLAN_ROLE, precision=mf.FP32, tower=tower, source=f"{tower}.onnx",
                        tensorrt=TENSORRT, gpu=H100.name, compute_capability=H100.compute_capability, **fields)


def int8_entry(tower: str, **fields) -> mf.FileEntry:
    return mf.FileEntry(sha256="", role=tower, precision=mf.INT8, scheme=mf.SCHEME_DYNAMIC, **fields)


def plan_standin(bundle, tower, option, env, threads, max_batch):
    """Opens options as open_engine does, except a "plan", which ONNX Runtime runs in TensorRT's place."""
    if option.engine == select.TENSORRT:
        option = dataclasses.replace(option, engine=select.ORT_CPU)
    return select._open(bundle, tower, option, env, threads, max_batch)


def perturbed(graph: Path, out: Path, scale: float) -> Path:
    """`graph` with noise of `scale` standard deviations added to each weight tensor (fixed seed)."""
    model = onnx.load(graph)
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        weights = numpy_helper.to_array(init)
        if weights.dtype == np.float32 and weights.size >= 256:
            noisy = weights + scale * weights.std() * rng.standard_normal(weights.shape)
            init.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), init.name))
    onnx.save(model, out)
    return out


@pytest.fixture(scope="module")
def graphs(tiny_bundle: Path, tmp_path_factory) -> dict[str, Path]:
    """What the build steps would add: per tower the prepared reference graph (a plan's source) and its
    dynamic int8 variant, and a vision graph whose weights were changed."""
    work = tmp_path_factory.mktemp("derived-graphs")
    made = {}
    for tower in mf.TOWERS:
        made[tower] = prepare_graph(tiny_bundle / f"{tower}.onnx", work / f"{tower}.prepared.onnx")
        made[f"{tower}.int8"] = quantize_dynamic_graph(made[tower], work / f"{tower}.int8.onnx")
    made["vision.changed"] = perturbed(made["vision"], work / "vision.changed.onnx", scale=0.03)
    return made


@pytest.fixture
def signed(tiny_bundle: Path, signing: Path, tmp_path: Path) -> Path:
    """A copy of the tiny bundle signed with the release key."""
    path = Path(shutil.copytree(tiny_bundle, tmp_path / tiny_bundle.name))
    sign_bundle(path, signing / "release.key")
    return path


@pytest.fixture
def trusted(signing: Path) -> list[Path]:
    return [signing / "release.pub"]


def test_a_plan_added_after_signing_keeps_the_signature_and_is_served(signed, graphs, trusted):
    before = {name: (signed / name).read_bytes() for name in SIGNED_FILES}
    verified = load_bundle(signed, trusted)
    key = plan_key(H100, TENSORRT)
    written = amend_bundle(signed, {PLAN: (graphs["vision"], plan_entry("vision", golden_min_cosine=0.9999))},
                           build=lambda record: record.setdefault("plans", {}).__setitem__(key, {"gpu": H100.name}))
    assert written == signed / DERIVED_NAME
    assert {name: (signed / name).read_bytes() for name in SIGNED_FILES} == before  # byte for byte
    index = DerivedIndex.read(signed)
    assert list(index.files) == [PLAN] and index.build == {"plans": {key: {"gpu": H100.name}}}
    assert index.files[PLAN] == dataclasses.replace(plan_entry("vision", golden_min_cosine=0.9999),
                                                    sha256=mf.sha256_file(signed / PLAN))

    bundle = load_bundle(signed, trusted)
    assert bundle.signing_key_id == verified.signing_key_id != ""
    assert bundle.bundle_id == verified.bundle_id  # encoders and gateway still agree on the identity
    assert bundle.derived == {PLAN} and list(bundle.manifest.plan_files("vision")) == [PLAN]
    chosen = select.open_engine(bundle, "vision", env=GPU_NO_CUDA_EP, opener=plan_standin)
    assert (chosen.option.engine, chosen.option.file) == (select.TENSORRT, PLAN)
    assert chosen.golden_cosine >= 0.9999
    chosen.engine.close()


def test_a_plan_that_changes_outputs_is_refused_with_the_signed_floor_not_its_claim(signed, graphs, trusted):
    claimed = 0.9  # what derived.json says; unsigned, it cannot loosen the fp32 floor
    amend_bundle(signed, {PLAN: (graphs["vision.changed"], plan_entry("vision", golden_min_cosine=claimed))})
    bundle = load_bundle(signed, trusted)
    floor = mf.BF16_GOLDEN_MIN_COSINE
    assert bundle.manifest.golden_tolerance(PLAN) == floor
    assert select.golden_bound(bundle.manifest, select.Option(select.TENSORRT, mf.FP32, PLAN)) == floor
    assert select.precision_bound(bundle.manifest, "vision", mf.FP32) == floor  # not the claimed 0.9
    plan = plan_standin(bundle, "vision", select.Option(select.TENSORRT, mf.FP32, PLAN), GPU_NO_CUDA_EP, 1, 8)
    worst = golden_cosine(bundle.golden(), "vision", plan.infer_all)
    plan.close()
    assert claimed < worst < floor  # it would pass what it claims

    with structlog.testing.capture_logs() as logs:
        chosen = select.open_engine(bundle, "vision", env=GPU_NO_CUDA_EP, opener=plan_standin)
    assert (chosen.option.engine, chosen.option.file) == (select.ORT_CPU, "vision.onnx")  # the signed reference
    chosen.engine.close()
    (reason,) = [e["reason"] for e in logs if e["event"] == "engine_skipped" and e["file"] == PLAN]
    assert reason == (f"vision golden check failed: cosine {worst:.6f} < {floor}; {PLAN} is listed in "
                      f"{DERIVED_NAME}, unsigned, and is not served")
    with pytest.raises(BundleError, match=f"no vision engine reproduces the golden outputs.*< {floor}"):
        select.open_engine(bundle, "vision", engine=select.TENSORRT, env=GPU_NO_CUDA_EP, opener=plan_standin)


@pytest.mark.parametrize("tower, entry, served", [
    ("vision", plan_entry("vision", golden_min_cosine=0.5), mf.BF16_GOLDEN_MIN_COSINE),  # raised to the floor
    ("vision", plan_entry("vision", golden_min_cosine=0.99995), 0.99995),  # tighter than the floor: kept
    ("vision", int8_entry("vision", golden_min_cosine=0.5), mf.PrecisionGate().golden_floor),
    ("text", int8_entry("text"), 0.9999),  # none recorded: the signed manifest's golden_min_cosine
])
def test_a_derived_file_tightens_its_golden_bound_never_loosens_it(signed, graphs, trusted, tower, entry, served):
    name = PLAN if entry.role == mf.PLAN_ROLE else f"{tower}.int8.onnx"
    amend_bundle(signed, {name: (graphs[tower if entry.role == mf.PLAN_ROLE else f"{tower}.int8"], entry)})
    manifest = load_bundle(signed, trusted).manifest
    assert manifest.golden_tolerance(name) == served
    assert DerivedIndex.read(signed).files[name].golden_min_cosine == entry.golden_min_cosine  # as recorded
    assert select.precision_bound(manifest, tower, entry.precision) == min(served, manifest.golden_min_cosine)


def _index(bundle: Path, name: str, entry: mf.FileEntry) -> None:
    (bundle / DERIVED_NAME).write_text(DerivedIndex(files={name: entry}).to_json())


@pytest.mark.parametrize("name, entry, reason", [
    ("vision.onnx", "int8", "derived.json names 'vision.onnx', a signed file of the bundle"),
    ("tokenizer/../vision.onnx", "int8", "derived.json names 'tokenizer/../vision.onnx', a signed file of the bundle"),
    (SIGNATURE_NAME, "int8", "derived.json names 'manifest.sig', a signed file of the bundle (or its index)"),
    ("../elsewhere.plan", "plan", "derived.json names a file outside the bundle: '../elsewhere.plan'"),
    ("golden2.npz", "golden", "derived.json lists 'golden2.npz' as role 'golden', precision '': only TensorRT plans"),
    ("text.fp32.onnx", "fp32", "derived.json lists 'text.fp32.onnx' as role 'text', precision 'fp32': only TensorRT"),
    ("vision.int8.onnx", "missing", "bundle file vision.int8.onnx (listed in derived.json) is missing"),
])
def test_a_derived_json_naming_what_it_must_not_is_refused(signed, trusted, name, entry, reason):
    entries = {"int8": int8_entry("vision"), "plan": plan_entry("vision"), "missing": int8_entry("vision"),
               "golden": mf.FileEntry(sha256="", role="golden"),
               "fp32": mf.FileEntry(sha256="", role="text", precision=mf.FP32)}
    listed = dataclasses.replace(entries[entry], sha256=mf.sha256_file(signed / "vision.onnx"))
    (signed / DERIVED_NAME).write_text(DerivedIndex(files={name: listed}).to_json())
    for keys in (trusted, ()):  # the same rules with and without signature checks
        with pytest.raises(BundleError, match=re.escape(reason)):
            load_bundle(signed, keys)


def test_a_tampered_derived_file_is_refused(signed, graphs, trusted):
    amend_bundle(signed, {PLAN: (graphs["vision"], plan_entry("vision"))})
    with open(signed / PLAN, "ab") as plan:
        plan.write(b"\0")
    with pytest.raises(BundleError, match=f"bundle file {PLAN} does not match its sha256 in {DERIVED_NAME}"):
        load_bundle(signed, trusted)


def test_amending_a_signed_bundle_never_touches_a_signed_file(signed, graphs, trusted):
    before = {name: (signed / name).read_bytes() for name in (*SIGNED_FILES, "vision.onnx")}
    with pytest.raises(BundleError, match="cannot add 'vision.onnx' .*a signed file of the bundle"):
        amend_bundle(signed, {"vision.onnx": (graphs["vision.int8"], int8_entry("vision"))})
    with pytest.raises(BundleError, match="signed: its precision gate cannot change"):
        amend_bundle(signed, {}, precision_gate=mf.PrecisionGate(golden_floor=0.1))
    # remove sees only derived.json: asked to drop everything, it drops no signed file
    amend_bundle(signed, {"vision.int8.onnx": (graphs["vision.int8"], int8_entry("vision"))})
    amend_bundle(signed, {}, remove=lambda name, entry: True)
    assert {name: (signed / name).read_bytes() for name in before} == before
    assert not (signed / "vision.int8.onnx").exists() and DerivedIndex.read(signed).files == {}
    assert load_bundle(signed, trusted).derived == frozenset()


def test_an_unsigned_bundle_is_amended_in_its_manifest_and_signed_after(tiny_bundle, graphs, signing, trusted,
                                                                        tmp_path):
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / tiny_bundle.name))
    written = amend_bundle(bundle, {PLAN: (graphs["vision"], plan_entry("vision", golden_min_cosine=0.5))})
    assert written == bundle / mf.MANIFEST_NAME and not (bundle / DERIVED_NAME).exists()
    sign_bundle(bundle, signing / "release.key")
    loaded = load_bundle(bundle, trusted)
    # Signed, its entry is trusted as recorded.
    assert loaded.derived == frozenset() and loaded.manifest.golden_tolerance(PLAN) == 0.5


def test_quantize_does_not_offer_to_sign_a_bundle_signed_already(signed, signing, caplog):
    assert build_main(["quantize", "--bundle", str(signed), "--sign-key", str(signing / "release.key")]) == 1
    assert "is signed already: quantize adds its engines to derived.json" in caplog.text
    assert not (signed / DERIVED_NAME).exists()  # refused before any work


@pytest.mark.parametrize("name, product", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA-H100-80GB-HBM3"),
    ("NVIDIA H200", "NVIDIA-H200"),
    ("NVIDIA L4", "NVIDIA-L4"),
    ("NVIDIA L40S", "NVIDIA-L40S"),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA-A100-SXM4-80GB"),
    ("Tesla T4", "Tesla-T4"),
])
def test_gpu_product_is_the_gpu_feature_discovery_label_and_the_plan_key_its_lower_case(name, product):
    gpu = trt_engine.Gpu(index=0, name=name, compute_capability="9.0")
    assert gpu.product == product  # nvidia.com/gpu.product without time-slicing's "-SHARED"
    assert gpu.model == product.lower()
    assert plan_key(gpu, TENSORRT).startswith(f"{product.lower()}.sm90.")


def test_a_mig_profile_is_its_own_product():
    mig = trt_engine.Gpu(index=0, name="NVIDIA H100 80GB HBM3 MIG 1g.10gb", compute_capability="9.0")
    assert mig.product == "NVIDIA-H100-80GB-HBM3-MIG-1g.10gb" and mig.model != H100.model


def test_plans_are_deserialized_with_host_code_and_plugin_loading_off(monkeypatch):
    """TensorRT is not installed here: a stand-in module records what plan_runtime sets."""
    registry = types.SimpleNamespace(parent_search_enabled=True)

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed, self.tempfile_control_flags = True, 3

    def init_libnvinfer_plugins(*args):
        raise AssertionError("plugin libraries must never be loaded for serving")

    trt = types.SimpleNamespace(Runtime=Runtime, Logger=lambda level: object(), get_plugin_registry=lambda: registry,
                                init_libnvinfer_plugins=init_libnvinfer_plugins)
    trt.Logger.WARNING = 2
    monkeypatch.setattr(trt_engine._Logger, "_instance", None)
    runtime = trt_engine.plan_runtime(trt)
    assert (runtime.engine_host_code_allowed, runtime.tempfile_control_flags) == (False, 0)
    assert registry.parent_search_enabled is False


async def test_encoders_serve_a_signed_bundle_with_derived_files_that_pass_only(signed, graphs, signing):
    # Both int8 graphs claim 0.5; the signed floor for int8 is the gate's golden_floor (0.9). Vision int8
    # reproduces the golden outputs within it and is served; text int8 (random weights: cosine about 0.6)
    # would pass its claim but not the floor, so the text encoder serves the signed fp32 graph.
    amend_bundle(signed, {f"{t}.int8.onnx": (graphs[f"{t}.int8"], int8_entry(t, golden_min_cosine=0.5))
                          for t in mf.TOWERS})
    expected = load_bundle(signed, [signing / "release.pub"])
    for service, app, stub, precision in ((VISION, VisionApp, encoders_pb2_grpc.VisionEncoderServiceStub, "int8"),
                                          (TEXT, TextApp, encoders_pb2_grpc.TextEncoderServiceStub, "fp32")):
        settings = encoder_settings(service, signed, trusted_bundle_keys=str(signing / "release.pub"),
                                    engine=select.ORT_CPU)
        server = await start_server(settings, app(settings))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                reply = await stub(channel).GetModelInfo(types_pb2.GetModelInfoRequest(), timeout=10)
        finally:
            await server.stop(0)
        assert reply.model.bundle_id == expected.bundle_id and reply.model.signing_key_id == expected.signing_key_id
        assert [precision_name(e.precision) for e in reply.model.engines] == [precision], service


def test_int8_graphs_used_here_measure_what_the_server_test_relies_on(signed, graphs):
    """Guards the premise of the test above: the cosines of the tiny model's int8 graphs."""
    amend_bundle(signed, {f"{t}.int8.onnx": (graphs[f"{t}.int8"], int8_entry(t)) for t in mf.TOWERS})
    bundle = load_bundle(signed)
    for tower, low, high in (("vision", 0.9, 1.0), ("text", 0.5, 0.9)):
        option = select.Option(select.ORT_CPU, mf.INT8, f"{tower}.int8.onnx")
        engine = select._open(bundle, tower, option, CPU_ONLY, 1, 8)
        assert low < golden_cosine(bundle.golden(), tower, engine.infer_all) < high, tower
        engine.close()
