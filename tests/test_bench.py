"""The benchmark harness in --quick mode on the tiny bundle: the in-process engine and the vision encoder
over gRPC (a real subprocess), and the results it writes."""

from __future__ import annotations

import json
import math

import pytest

from bench.__main__ import main

SYSTEMS = ("ort", "vision-batch")


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
    assert tiny["ratios"]["throughput_at_mid"]["ort"]["throughput"] > 0
    readme = (out / "README.md").read_text()
    assert "## Machine" in readme and "| vision-batch | 4 |" in readme
