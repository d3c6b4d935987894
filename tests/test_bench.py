"""The benchmark harness in --quick mode on the tiny bundle: the in-process engine and the vision encoder
over gRPC (a real subprocess), and the results it writes."""

from __future__ import annotations

import json
import math

import pytest

from bench.__main__ import main

SYSTEMS = ("ort", "ort-decode", "vision-batch")


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
