"""The benchmark harness in --quick mode on the tiny bundle: the in-process engine and the vision encoder
over gRPC (a real subprocess), and the results it writes."""

from __future__ import annotations

import json
import math

import pytest

from bench import goals
from bench.__main__ import main

SYSTEMS = ("ort", "ort-decode", "vision-batch", "vision-calls", "openvino", "vision-openvino")


@pytest.mark.slow
def test_quick_run_writes_sane_results(tiny_bundle, tmp_path):
    out = tmp_path / "results"
    status = main(["--quick", "--models", "tiny", "--systems", ",".join(SYSTEMS), "--seconds", "0.6",
                   "--bundles", str(tiny_bundle.parent), "--out", str(out)])
    assert status == 0

    results = json.loads((out / "results.json").read_text())
    assert {"machine", "config", "background", "systems", "models", "duration_s"} <= results.keys()
    machine = results["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"] and machine["python"]
    assert machine["versions"]["onnxruntime"] and machine["versions"]["grpcio"]
    assert results["config"]["concurrency"] == [1, 4]
    assert list(results["systems"]) == list(SYSTEMS)

    tiny = results["models"]["tiny"]
    assert tiny["bundle_id"].startswith("tiny-")
    assert tiny["decode_ms"]["p50_ms"] > 0
    for key in SYSTEMS:
        system = tiny["systems"][key]
        assert system["status"] == "ok", system["reason"]
        assert system["check"]["cosine"] >= 0.999
        assert [p["concurrency"] for p in system["points"]] == [1, 4]
        for point in system["points"]:
            assert point["errors"] == 0
            assert point["requests"] > 0
            assert point["throughput"] > 0 and math.isfinite(point["throughput"])
            assert 0 < point["p50_ms"] <= point["p95_ms"] <= point["p99_ms"] <= point["max_ms"]
            assert point["cpu_ms_per_image"] > 0  # the system and the load generator used CPU per answer

    overhead = tiny["ratios"]["served_overhead_at_low"]["vision-batch"]
    assert overhead["minus_ort_ms"] is not None
    for key in ("vision-batch", "gateway"):  # measured in alternating pairs with ort-decode
        paired = tiny["paired_overhead"][key]
        assert paired["pairs"] >= 20, paired
        assert paired["overhead_p25_ms"] <= paired["overhead_p50_ms"] <= paired["overhead_p75_ms"]
        assert paired["served_p50_ms"] > 0 and paired["in_process_p50_ms"] > 0
    assert tiny["ratios"]["throughput_at_mid"]["ort"]["throughput"] > 0
    readme = (out / "README.md").read_text()
    assert "## Machine" in readme and "| vision-batch | 4 |" in readme
    assert "in alternating pairs" in readme

    for key in ("vision-batch", "vision-openvino"):  # each server's memory, read after its measurements
        memory = tiny["systems"][key]["details"]["memory_mib"]["vision"]
        assert 20 < memory["rss_mib"] <= memory["peak_mib"] < 8192, memory
    assert "Resident memory of each server" in readme
    mid = tiny["ratios"]["mid_concurrency"]
    served = {g["goal"]: g for g in tiny["goals"]}
    for key, engine in (("vision-batch", "ort"), ("vision-calls", "ort"), ("vision-openvino", "openvino")):
        both = tiny["interleaved"][key]
        assert (both["base"], both["base_concurrency"], both["other"], both["other_concurrency"]) == (
            engine, 1, key, mid)
        assert both["rounds"] == 1 and len(both["base_img_s"]) == len(both["other_img_s"]) == 1
        assert both["ratio_median"] == pytest.approx(both["other_img_s"][0] / both["base_img_s"][0], rel=0.01)
        assert both["other_cpu_ms_per_image"] > 0 and both["base_cpu_ms_per_image"] > 0
        row = served[f"`{key}` at {mid} vs `{engine}` in process one at a time, throughput"]
        assert row["ratio"] == both["ratio_median"] and "1 alternating rounds" in row["measured"]
        assert row["verdict"] == ("met" if row["ratio"] >= 1.0 else "not met")
    assert "batching" not in tiny["interleaved"]  # vision-nobatch was not among the systems
    assert "| CPU ms/img |" in readme
    assert "CPU serving goals" in readme


def _judged(points: dict[str, dict[int, tuple[float, float]]], **extra) -> dict[str, dict]:
    """Goal rows of a hand-made result: system -> concurrency -> (img/s, p50 ms)."""
    systems = {k: {"status": "ok", "details": {}, "points": [
        {"concurrency": c, "requests": 10, "throughput": t, "p50_ms": p50} for c, (t, p50) in v.items()]}
        for k, v in points.items()}
    r = {"systems": systems, "ratios": {"low_concurrency": 1, "mid_concurrency": 16}, **extra}
    machine = {"cpu_flags": ["avx2"], "gemm": {"int8": {"gmac_per_s": 140.0, "vit_b16_floor_ms": 125}}}
    return {g["goal"].split(",")[0]: g for g in goals.evaluate("biomedclip-arch", r, machine)}


def test_goals_are_judged_from_the_run_and_say_what_was_not_measured():
    rows = _judged({"gateway": {1: (4.0, 250.0), 16: (3.5, 4000.0)},
                    "gateway-int8": {1: (6.2, 160.0), 16: (6.9, 2300.0)},
                    "ort": {1: (4.1, 240.0)}, "triton": {16: (3.3, 4800.0)}},
                   paired_overhead={"gateway": {"overhead_p50_ms": 4.1, "overhead_p25_ms": 3.5,
                                                "overhead_p75_ms": 4.6, "pairs": 300}})
    bound = rows["Classify p50 at 1"]
    assert bound["ratio"] == pytest.approx(160 / 125, abs=1e-3) and bound["verdict"] == "met"
    assert "`gateway-int8`" in bound["measured"]  # the best engine, not the first row
    triton = rows["Classify throughput at 16"]
    assert triton["ratio"] == pytest.approx(6.9 / 3.3, abs=1e-3) and triton["verdict"] == "not met"
    assert rows["`gateway` at 16 vs `ort` in process one at a time"]["verdict"] == "not met"
    assert rows["`gateway` served overhead at 1"]["verdict"] == "not met"
    assert "`gateway-int8` at 16 vs `ort-int8` in process one at a time" not in rows  # ort-int8 not run
    bf16 = rows["OpenVINO bf16 p50 at 1 vs ONNX Runtime fp32"]
    assert bf16["verdict"] == "not measured: the openvino row did not run in this run"

    side = {"base": "ort", "base_concurrency": 1, "other": "gateway", "other_concurrency": 16, "rounds": 3,
            "ratio_median": 1.04, "ratio_min": 0.98, "ratio_max": 1.1, "other_img_s": [4.2, 4.4, 4.1],
            "base_img_s": [4.0, 4.3, 3.9], "other_cpu_ms_per_image": 480.0, "base_cpu_ms_per_image": 470.0}
    both = _judged({"gateway": {16: (3.5, 4000.0)}, "vision-batch": {16: (3.0, 5000.0)}, "ort": {1: (4.1, 240.0)}},
                   interleaved={"gateway": side, "vision-batch": {"base": "ort", "other": "vision-batch",
                                                                   "error": "boom"}})
    row = both["`gateway` at 16 vs `ort` in process one at a time"]  # the windows side by side, not the points
    assert row["ratio"] == 1.04 and row["verdict"] == "met" and "3 alternating rounds" in row["measured"]
    assert "4.20 vs 4.00 img/s" in row["measured"] and "480.00 vs 470.00 ms" in row["measured"]
    fallback = both["`vision-batch` at 16 vs `ort` in process one at a time"]
    assert fallback["ratio"] == pytest.approx(3.0 / 4.1, abs=1e-3) and fallback["verdict"] == "not met"
    assert "side by side failed: boom" in fallback["measured"]

    slow = _judged({"gateway-int8": {1: (5.0, 170.0)}, "ort": {1: (4.1, 240.0)},
                    "openvino": {1: (4.5, 220.0)}})
    assert slow["Classify p50 at 1"]["verdict"] == "not met"
    assert slow["Classify throughput vs Triton + ONNX Runtime fp32"]["verdict"].startswith("not measured")


def test_openvino_against_triton_is_judged_side_by_side_where_the_run_has_it():
    points = {"vision-openvino": {1: (30.0, 33.0), 16: (99.0, 160.0)},
              "triton-openvino": {1: (31.0, 32.0), 16: (100.0, 158.0)}}
    apart = _judged(points)  # 0.99x and 1.03x from separate points
    row = apart["vision encoder on OpenVINO vs Triton serving the same OpenVINO model"]
    assert row["ratio"] == pytest.approx(0.99, abs=1e-3) and row["verdict"] == "not met"
    assert "separate points" in row["measured"]
    p50_apart = apart["vision encoder on OpenVINO vs Triton + OpenVINO"]
    assert p50_apart["ratio"] == pytest.approx(33 / 32, abs=1e-3)

    def side(c: int, ours: list[float], theirs: list[float], ours_p50: list[float], theirs_p50: list[float]):
        ratios = sorted(o / t for o, t in zip(ours, theirs))
        return {"base": "triton-openvino", "base_concurrency": c, "other": "vision-openvino",
                "other_concurrency": c, "rounds": 3, "ratio_median": ratios[1], "ratio_min": ratios[0],
                "ratio_max": ratios[2], "other_img_s": ours, "base_img_s": theirs, "other_p50_ms": ours_p50,
                "base_p50_ms": theirs_p50,
                "p50_ratio_median": sorted(o / t for o, t in zip(ours_p50, theirs_p50))[1]}

    both = _judged(points, interleaved={
        "openvino-vs-triton": side(16, [101.0, 98.0, 103.0], [99.0, 97.0, 100.0], [160.0] * 3, [158.0] * 3),
        "openvino-vs-triton-at-1": side(1, [30.0] * 3, [31.0] * 3, [31.0, 33.0, 32.0], [32.0, 32.5, 33.0])})
    row = both["vision encoder on OpenVINO vs Triton serving the same OpenVINO model"]
    assert row["ratio"] == pytest.approx(101 / 99, abs=1e-3) and row["verdict"] == "met"
    assert "3 alternating rounds" in row["measured"] and "separate" not in row["measured"]
    p50 = both["vision encoder on OpenVINO vs Triton + OpenVINO"]
    assert p50["ratio"] == pytest.approx(32 / 33, abs=1e-3) and p50["verdict"] == "met"
    assert "32.0 vs 32.5 ms (medians)" in p50["measured"]

    broken = {"base": "triton-openvino", "other": "vision-openvino", "error": "boom"}
    failed = _judged(points, interleaved={"openvino-vs-triton": broken})
    row = failed["vision encoder on OpenVINO vs Triton serving the same OpenVINO model"]
    assert row["ratio"] == pytest.approx(0.99, abs=1e-3) and "side by side failed: boom" in row["measured"]


def test_int8_for_random_weights_is_made_on_a_copy_for_speed_only(tiny_bundle, tmp_path):
    """A random-weight bundle gets an ungated int8 vision graph on a copy, which the service's engine
    selection then opens at --precision int8; the original bundle is left as it was."""
    from bench.bundles import int8_bundle
    from engines.runtime import manifest as mf
    from engines.runtime.bundle import load_bundle
    from engines.runtime.select import ORT_CPU, open_engine

    before = (tiny_bundle / mf.MANIFEST_NAME).read_text()
    made = int8_bundle(tiny_bundle, mf.KIND_BENCHMARK, tmp_path, tiny_bundle.parent)
    assert not made.gated and "speed only" in made.note
    assert made.path.parent == tmp_path
    assert (tiny_bundle / mf.MANIFEST_NAME).read_text() == before
    assert not (tiny_bundle / "vision.int8.onnx").exists()

    copy = load_bundle(made.path)  # every file hash-checked
    assert copy.bundle_id == load_bundle(tiny_bundle).bundle_id  # reduced-precision files are not in the id
    assert copy.manifest.build["precision"] == {"ungated": "speed measurement only"}
    selected = open_engine(copy, "vision", ORT_CPU, mf.INT8, 1)  # passes the golden tolerance it records
    try:
        assert selected.engine.precision == mf.INT8 and selected.option.file == "vision.int8.onnx"
    finally:
        selected.engine.close()
    # a bundle that already holds an int8 vision engine is used as it is
    assert int8_bundle(made.path, mf.KIND_BENCHMARK, tmp_path / "again", tiny_bundle.parent).path == made.path


def test_gemm_rates_are_measured_and_give_a_floor():
    from bench.machine import gemm_rates

    rates = gemm_rates(1, repeats=5)
    for precision in ("fp32", "int8"):
        assert rates[precision]["gmac_per_s"] > 0
        assert rates[precision]["vit_b16_floor_ms"] > 0


def test_tls_row_pairs_the_secured_stack_with_the_plaintext_one(tiny_bundle, tmp_path):
    out = tmp_path / "results"
    status = main(["--quick", "--models", "tiny", "--systems", "gateway-tls", "--concurrency", "1",
                   "--seconds", "0.6", "--bundles", str(tiny_bundle.parent), "--out", str(out)])
    assert status == 0
    tiny = json.loads((out / "results.json").read_text())["models"]["tiny"]
    system = tiny["systems"]["gateway-tls"]
    assert system["status"] == "ok", system["reason"]
    assert all(point["errors"] == 0 and point["requests"] > 0 for point in system["points"])
    paired = tiny["tls_overhead"]
    assert paired["pairs"] >= 20, paired
    assert paired["overhead_p25_ms"] <= paired["overhead_p50_ms"] <= paired["overhead_p75_ms"]
    assert "TLS + mTLS + bearer token" in (out / "README.md").read_text()


def test_batching_on_vs_off_is_reported_side_by_side_beside_the_separate_points():
    from bench import report

    points = {"vision-batch": (180.0, 80.0), "vision-nobatch": (200.0, 72.0)}  # the points: batching loses
    result = {"systems": {k: {"status": "ok", "details": {}, "points": [
        {"concurrency": c, "requests": 10, "throughput": t, "p50_ms": p50} for c in (1, 16)]}
        for k, (t, p50) in points.items()},
        "interleaved": {"batching": {"base": "vision-nobatch", "other": "vision-batch", "rounds": 3,
                                     "ratio_median": 1.18, "ratio_min": 1.05, "ratio_max": 1.3,
                                     "base_img_s": [150.0, 146.0, 140.0], "other_img_s": [189.0, 173.0, 166.0],
                                     "base_cpu_ms_per_image": 11.0, "other_cpu_ms_per_image": 9.5}}}
    lines = report.ratio_lines("demo", report.ratios(result, [1, 16]))
    assert "[demo] batching on vs off at concurrency 16, separate points: throughput x0.90, p50 x1.11" in lines
    side = next(line for line in lines if "side by side" in line)
    assert "throughput x1.18" in side and "173.00 vs 146.00 img/s (medians), 3 alternating rounds" in side
    assert "CPU per image 9.50 vs 11.00 ms" in side
    assert not any("engine call per core" in line for line in lines)  # not measured in this result

    result["interleaved"]["engine-calls"] = {"base": "vision-batch", "other": "vision-calls", "error": "boom"}
    lines = report.ratio_lines("demo", report.ratios(result, [1, 16]))
    assert "[demo] one engine call per core vs the default, side by side: failed: boom" in lines


async def test_the_soaks_leaky_gateway_retains_every_request_and_serving_has_no_switch(tiny_bundle):
    """make soak LEAK=1 must fail: its gateway (bench/leaky_gateway.py) keeps each Classify it
    answers. The stock gateway keeps none and has no setting that would make it."""
    import dataclasses

    import grpc

    from bench.leaky_gateway import LeakyGatewayApp
    from conftest import ROOT, gateway_settings, start_server, start_stack
    from medvlm.v1 import gateway_pb2, gateway_pb2_grpc, types_pb2
    from services.gateway.app import GatewayApp
    from services.plumbing.settings import Settings

    assert not [f.name for f in dataclasses.fields(Settings) if "retain" in f.name or "fault" in f.name]
    stack = await start_stack(tiny_bundle)
    try:
        settings = gateway_settings(stack.vision.port, stack.text.port)
        leaky = await start_server(settings, app := LeakyGatewayApp(settings))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{leaky.port}") as channel:
                stub = gateway_pb2_grpc.GatewayServiceStub(channel)
                request = gateway_pb2.ClassifyRequest(image=types_pb2.Image(data=(ROOT / "samples/chest_normal.png").read_bytes()), labels=["a", "b"])
                for _ in range(3):
                    await stub.Classify(request, timeout=30)
            assert app.retained == [request] * 3
        finally:
            await leaky.stop(0)
        await stack.gateway_stub.Classify(request, timeout=30)
        assert type(stack.gateway.app) is GatewayApp and not hasattr(stack.gateway.app, "retained")
    finally:
        await stack.stop()
