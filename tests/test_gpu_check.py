"""The GPU check's own parts, checked on the CPU: arguments, the time budget, the report writer (a CPU
dry run says so everywhere), and a dry run of its torch step on the tiny model. It has never run on a
GPU here; its CUDA and TensorRT steps skip with their reasons."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import gpu_check


def test_arguments_are_checked():
    args = gpu_check.parse_args(["--device", "cpu", "--batches", "1,8", "--skip", "served,tensorrt"])
    assert args.device == "cpu" and args.batches == (1, 8) and args.skip == {"served", "tensorrt"}
    assert gpu_check.parse_args([]).budget_s == 480.0  # the 8-minute bound by default
    for bad in (["--batches", "1,x"], ["--batches", "0"], ["--skip", "everything"], ["--budget-s", "0"],
                ["--device", "rocm"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)


def test_budget_refuses_steps_that_do_not_fit():
    now = [0.0]
    budget = gpu_check.Budget(100.0, clock=lambda: now[0])
    assert budget.fits(100.0) and not budget.fits(100.1)
    now[0] = 70.0
    assert budget.left() == 30.0 and not budget.fits(gpu_check.ESTIMATES_S["served"])


def test_report_of_a_dry_run_says_it_is_one(tmp_path):
    report = gpu_check.Report(device="cpu", model="tiny", budget_s=60.0)
    report.environment = {"torch": "2.14.1", "cuda_available": False}
    report.step("torch", "ok", throughput=[{"precision": "fp32", "batch": 1, "images_per_s": 12.5}],
                fp16_vs_fp32_cosine_min=0.99991)
    report.step("tensorrt", "skipped", reason="TensorRT is not installed")
    json_path, md_path = report.write(tmp_path)
    data = json.loads(json_path.read_text())
    assert data["dry_run"] is True and data["note"] == gpu_check.DRY_RUN_NOTE
    assert data["steps"]["tensorrt"] == {"status": "skipped", "reason": "TensorRT is not installed"}
    md = md_path.read_text()
    assert md.startswith(f"# GPU check — {gpu_check.DRY_RUN_NOTE}")
    assert "## torch (CPU dry run, not a GPU figure)" in md and "| fp32 | 1 | 12.5 |" in md
    assert "status: skipped — TensorRT is not installed" in md
    gpu = gpu_check.Report(device="cuda", model="biomedclip-arch", budget_s=480.0)
    assert "dry" not in gpu.to_markdown().lower() and "note" not in json.loads(gpu.to_json())


def test_dry_run_measures_torch_on_the_cpu_and_skips_what_needs_a_gpu(tiny_bundle, tmp_path):
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    shutil.copytree(tiny_bundle, bundles / Path(tiny_bundle).name)
    out = tmp_path / "out"
    args = gpu_check.parse_args(["--device", "cpu", "--bundles", str(bundles), "--out", str(out),
                                 "--calls", "2", "--batches", "1,2", "--skip", "served", "--budget-s", "120"])
    report = gpu_check.run(args)
    assert report.steps["bundle"]["status"] == "ok" and report.steps["bundle"]["built"] is False
    torch_step = report.steps["torch"]
    assert torch_step["status"] == "ok"
    measured = [r for r in torch_step["throughput"] if r["precision"] == "fp32"]
    assert [r["batch"] for r in measured] == [1, 2] and all(r["images_per_s"] > 0 for r in measured)
    assert "fp16_vs_fp32_cosine_min" not in torch_step  # no fp16 on the CPU
    assert report.steps["served-torch"] == {"status": "skipped", "reason": "--skip served"}
    assert report.steps["tensorrt"]["status"] == "skipped"
    assert (out / "gpu-check.md").read_text().startswith("# GPU check — CPU DRY RUN")
