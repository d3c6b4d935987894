"""The `medvlm` command against the real local stack: batch with resume, bad files, evaluate, README examples."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import shlex
import signal
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from conftest import ORT_FP32, ROOT, served_engines, start_stack
from medvlm.client.cli import build_parser, main

SAMPLES = ROOT / "samples"
ENV = {"PYTHONPATH": f"{ROOT}:{ROOT / 'gen'}", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
       "HF_HUB_OFFLINE": "1"}


async def medvlm(stack, *args: str, cwd: Path = ROOT, timeout: float = 300) -> tuple[int, str, str]:
    """Run the command in its own process against `stack` (target from MEDVLM_TARGET)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "medvlm.client", *args, cwd=cwd, env={**ENV, "MEDVLM_TARGET": stack.target},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


def write_pngs(folder: Path, count: int, start: int = 0) -> list[Path]:
    """Distinct small PNGs spread over nested folders."""
    paths = []
    for i in range(start, start + count):
        rng = np.random.default_rng(i)
        path = folder / f"site{i % 3}" / f"study{i // 50:03d}" / f"img{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_entry_point_names_main():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["medvlm"].partition(":")
    assert (module, attr) == ("medvlm.client.cli", "main")
    subcommands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(subcommands) == {"classify", "similarity", "embed", "info", "health", "batch", "evaluate"}


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["classify", "x.png"])  # neither --labels nor --label-set
    assert exited.value.code == 2
    with pytest.raises(SystemExit) as exited:
        main(["health", "--token", "t"])  # a token without TLS
    assert exited.value.code == 2 and "TLS" in capsys.readouterr().err


async def test_classify_json_and_errors_name_the_file(demo_stack, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    code, out, err = await medvlm(
        demo_stack, "classify", str(SAMPLES / "chest_left_effusion.png"), str(SAMPLES / "chest_cardiomegaly.png"),
        str(notes), "--labels", "normal chest radiograph", "left pleural effusion", "cardiomegaly", "--json")
    assert code == 1
    reply = json.loads(out)
    assert [r["top"][0]["label"] for r in reply["results"]] == ["left pleural effusion", "cardiomegaly"]
    assert reply["failed"] == [{"file": str(notes), "code": "UNRECOGNIZED_FILE",
                                "message": reply["failed"][0]["message"]}]
    assert f"{notes}: UNRECOGNIZED_FILE" in err


async def test_batch_1000_killed_halfway_resumes_without_recomputing(demo_stack, tmp_path):
    folder, out = tmp_path / "studies", tmp_path / "results.csv"
    write_pngs(folder, 1000)
    args = ["batch", str(folder), "--out", str(out), "--labels", "normal chest radiograph", "cardiomegaly",
            "--no-progress", "--json"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "medvlm.client", *args, cwd=ROOT, env={**ENV, "MEDVLM_TARGET": demo_stack.target},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(6000):  # bounded polling of the output, up to 5 minutes
            if out.exists() and out.read_bytes().count(b"\n") > 400:
                break
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        await proc.wait()
    first = out.read_text()
    complete = [line for line in first.splitlines(keepends=True)[1:] if line.endswith("\n")]
    assert 400 <= len(complete) < 1000, "the first run was not killed halfway"

    code, stdout, _ = await medvlm(demo_stack, *args)
    summary = json.loads(stdout)
    assert code == 0 and summary["failed"] == [] and summary["not_processed"] == 0
    rows = csv_rows(out)
    finished_first = {row["path"] for row in csv.DictReader(io.StringIO(first.splitlines(keepends=True)[0] +
                                                                       "".join(complete)))}
    assert summary["skipped"] == len(finished_first)
    assert summary["classified"] == 1000 - len(finished_first)
    assert len(rows) == 1000 and len({r["path"] for r in rows}) == 1000  # each item once
    assert all(r["status"] == "ok" and r["label"] for r in rows)
    # the finished rows were kept as written, not recomputed
    assert out.read_text().startswith("".join(first.splitlines(keepends=True)[:1] + complete))

    code, stdout, _ = await medvlm(demo_stack, *args)
    assert code == 0 and json.loads(stdout)["skipped"] == 1000 and json.loads(stdout)["classified"] == 0


async def test_batch_lists_bad_files_and_fails(demo_stack, tmp_path):
    from test_client import dicom_bytes

    folder = tmp_path / "mixed"
    good = write_pngs(folder, 3)
    (folder / "corrupt.png").write_bytes(good[0].read_bytes()[:80])
    (folder / "nopixels.dcm").write_bytes(dicom_bytes(tmp_path, with_pixels=False))
    (folder / "readme.txt").write_text("referral letter")
    out = tmp_path / "results.jsonl"
    code, stdout, err = await medvlm(demo_stack, "batch", str(folder), "--out", str(out), "--labels",
                                     "normal chest radiograph", "cardiomegaly", "--no-progress", "--json")
    assert code == 1
    summary = json.loads(stdout)
    failed = {f["path"]: f for f in summary["failed"]}
    assert set(failed) == {"corrupt.png", "nopixels.dcm", "readme.txt"} and summary["classified"] == 3
    assert failed["readme.txt"]["code"] == "UNRECOGNIZED_FILE"
    assert failed["corrupt.png"]["code"] == "INVALID_ARGUMENT" and failed["corrupt.png"]["message"]
    assert failed["nopixels.dcm"]["code"] == "INVALID_ARGUMENT" and failed["nopixels.dcm"]["message"]
    for name in failed:
        assert f"medvlm: {name}: " in err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["status"] for r in records) == ["failed"] * 3 + ["ok"] * 3
    assert "CANARY" not in stdout + err + out.read_text()  # DICOM header values never come back


async def test_evaluate_reproduces_bench_accuracy(demo_stack, tmp_path):
    """`medvlm evaluate` on the generator's held-out set (a small slice of bench.accuracy's) gives
    the top-1 of bench.accuracy's own ClassifyStream loop within 0.5 points, and writes the report."""
    from bench import accuracy
    from engines.build import synthetic
    from medvlm.v1 import gateway_pb2_grpc

    per_class = 2
    heldout = tmp_path / "heldout"
    synthetic.write_samples(heldout, accuracy.EVAL_SEED, per_class, by_class=True)
    images, labels = synthetic.generate(accuracy.EVAL_SEED, per_class * synthetic.NUM_CLASSES)

    def bench_top1() -> float:
        with grpc.insecure_channel(demo_stack.target) as channel:
            predictions = accuracy.classify_all(gateway_pb2_grpc.GatewayServiceStub(channel), images, "{}")
        return 100 * float((predictions == labels).mean())

    expected = await asyncio.to_thread(bench_top1)
    report = tmp_path / "report"
    code, stdout, err = await medvlm(demo_stack, "evaluate", str(heldout), "--out", str(report),
                                     "--bootstrap", "50", "--json")
    assert code == 0, err
    metrics = json.loads(stdout)
    assert abs(100 * metrics["accuracy"]["value"] - expected) <= 0.5
    assert metrics["images"] == metrics["answered"] == per_class * synthetic.NUM_CLASSES
    assert [c["class"] for c in metrics["classes"]] == sorted(synthetic.CLASS_LABELS)
    for row in metrics["classes"]:
        for key in ("sensitivity", "specificity", "ppv", "npv", "auc"):
            assert row[key]["value"] is not None and row[key]["ci95_low"] <= row[key]["value"] + 1e-9
    assert np.array(metrics["confusion"]).sum() == metrics["answered"]
    assert metrics["bundle_ids"] == [metrics["model"]["bundle_id"]]
    markdown = (report / "report.md").read_text()
    engines = await served_engines(demo_stack.gateway_stub)  # whichever engine serves
    for needle in ("Sensitivity", "Specificity", "PPV", "NPV", "ROC AUC", "macro average",
                   metrics["model"]["bundle_id"], *(e.engine for e in engines.values()), "roc.png", "Not clinical"):
        assert needle in markdown
    assert "<table>" in (report / "report.html").read_text()
    for png in ("roc.png", "confusion.png"):
        assert (report / png).read_bytes().startswith(b"\x89PNG")


async def test_evaluate_report_names_the_engine_that_answered(calibrated_stack, tmp_path):
    from engines.build import synthetic

    heldout = tmp_path / "heldout"
    synthetic.write_samples(heldout, 7, 1, by_class=True)
    code, _, err = await medvlm(calibrated_stack, "evaluate", str(heldout), "--out", str(tmp_path / "report"),
                                "--bootstrap", "10")
    assert code == 0, err
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert ("| engines | vision: onnxruntime/CPUExecutionProvider fp32, "
            "text: onnxruntime/CPUExecutionProvider fp32 |") in markdown


async def test_readme_command_line_examples_run(demo_stack, tmp_path):
    """Every command of the README's block, in a scratch folder that sees the repository's samples.
    Two changes keep it short: 2 held-out images per class instead of 25, and 50 bootstrap resamples."""
    (tmp_path / "samples").symlink_to(SAMPLES)
    block = next(b for b in __import__("test_client").readme_blocks("Command line", "bash"))
    commands = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    commands = [c for c in commands if c]
    assert commands[0][0] == "export" and commands[0][1].startswith("MEDVLM_TARGET=")
    ran = []
    for argv in commands[1:]:
        if argv[0] == "medvlm":
            if argv[1] == "evaluate":
                argv = [*argv, "--bootstrap", "50"]
            code, out, err = await medvlm(demo_stack, *argv[1:], cwd=tmp_path)
        else:
            argv = [a if a != "25" else "2" for a in argv]
            assert argv[:3] == ["python", "-m", "engines.build.synthetic"]
            proc = await asyncio.create_subprocess_exec(sys.executable, *argv[1:], cwd=tmp_path, env=ENV,
                                                        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out_b, err_b = await asyncio.wait_for(proc.communicate(), 300)
            code, out, err = proc.returncode, out_b.decode(), err_b.decode()
        assert code == 0, f"{argv}: {err}"
        ran.append((argv[1] if argv[0] == "medvlm" else "synthetic", out))
    outputs = dict(ran)
    assert list(outputs) == ["health", "info", "classify", "similarity", "embed", "batch", "synthetic", "evaluate"]
    assert "SERVING" in outputs["health"] and "demo" in outputs["info"]
    assert "left pleural effusion" in outputs["classify"]
    assert json.loads(outputs["similarity"])["cosine"][0][0] > json.loads(outputs["similarity"])["cosine"][0][1]
    assert len(json.loads(outputs["embed"])["embeddings"]) == 2
    assert len(csv_rows(tmp_path / "results.csv")) == len(list(SAMPLES.iterdir()))
    assert (tmp_path / "report" / "report.html").exists() and (tmp_path / "report" / "roc.png").exists()


async def test_an_unknown_label_set_is_refused_with_the_servers_message(tiny_stack, capsys):
    code = await asyncio.to_thread(main, ["classify", str(SAMPLES / "chest_normal.png"), "--label-set",
                                          "chest-findings@1", "--target", tiny_stack.target])
    assert code == 1
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "label set" in err


@pytest.fixture(scope="module")
async def calibrated_stack(demo_bundle, demo_calibration):
    """Pinned to ONNX Runtime fp32: reports name that engine literally."""
    stack = await start_stack(demo_bundle, encoder_overrides=ORT_FP32, calibration=str(demo_calibration))
    yield stack
    await stack.stop()


CHEST = ["normal chest radiograph", "left pleural effusion", "right pleural effusion", "cardiomegaly",
         "pneumothorax", "lobar consolidation"]


async def test_classify_shows_abstain_first_calibrated_probabilities_and_the_calibration(
        calibrated_stack, demo_calibration, demo_stack):
    from engines.runtime.calibration import Calibration

    calibration_id = Calibration.read(demo_calibration).calibration_id
    chest, derm = SAMPLES / "chest_left_effusion.png", SAMPLES / "derm_naevus.png"
    code, out, err = await medvlm(calibrated_stack, "classify", str(chest), str(derm), "--labels", *CHEST, "--json")
    assert code == 0, err
    trusted, foreign = json.loads(out)["results"]
    assert trusted["abstain"] is False and trusted["abstain_reason"] == ""
    assert foreign["abstain"] is True and foreign["abstain_reason"] == "out_of_distribution"
    assert foreign["trust"]["scope"] == "chest" and foreign["trust"]["calibration_id"] == calibration_id
    best = trusted["top"][0]
    assert best["label"] == "left pleural effusion" and 0 < best["calibrated_probability"] <= 1

    code, out, err = await medvlm(calibrated_stack, "classify", str(chest), str(derm), "--labels", *CHEST,
                                  "--top-k", "2")
    assert code == 0, err
    lines = out.splitlines()
    header = next(line for line in lines if "label" in line)
    assert "calibrated probability" in header
    derm_rows = [i for i, line in enumerate(lines) if "derm_naevus.png" in line]
    assert len(derm_rows) == 1 and "ABSTAIN: out of distribution" in lines[derm_rows[0]]  # before any label
    chest_row = next(line for line in lines if "chest_left_effusion.png" in line)
    assert "left pleural effusion" in chest_row and f"{best['calibrated_probability']:.4f}" in chest_row
    assert f"calibration {calibration_id}, scope chest" in out

    code, out, err = await medvlm(demo_stack, "classify", str(chest), "--labels", *CHEST)
    assert code == 0, err
    assert "not calibrated" in out and "ABSTAIN" not in out and "calibrated probability" not in out
    code, out, _ = await medvlm(demo_stack, "classify", str(chest), "--labels", *CHEST, "--json")
    (plain,) = json.loads(out)["results"]
    assert plain["trust"] is None and plain["abstain"] is False
    assert plain["top"][0]["calibrated_probability"] is None


async def test_batch_rows_say_abstain_and_why(calibrated_stack, tmp_path):
    folder = tmp_path / "studies"
    folder.mkdir()
    for name in ("chest_left_effusion.png", "chest_cardiomegaly.png", "derm_naevus.png", "fundus_glaucoma.png"):
        (folder / name).write_bytes((SAMPLES / name).read_bytes())
    out = tmp_path / "results.csv"
    code, stdout, err = await medvlm(calibrated_stack, "batch", str(folder), "--out", str(out), "--labels", *CHEST,
                                     "--no-progress", "--json")
    assert code == 0, err
    rows = {r["path"]: r for r in csv_rows(out)}
    assert {p: (r["abstain"], r["abstain_reason"]) for p, r in rows.items()} == {
        "chest_left_effusion.png": ("no", ""), "chest_cardiomegaly.png": ("no", ""),
        "derm_naevus.png": ("yes", "out_of_distribution"), "fundus_glaucoma.png": ("yes", "out_of_distribution")}
    assert all(r["calibration_id"] and r["calibrated_probability"] for r in rows.values())
    assert json.loads(stdout)["abstained"] == 2

    jsonl = tmp_path / "results.jsonl"
    code, _, err = await medvlm(calibrated_stack, "batch", str(folder), "--out", str(jsonl), "--labels", *CHEST,
                                "--no-progress", "--json")
    assert code == 0, err
    records = {r["path"]: r for r in map(json.loads, jsonl.read_text().splitlines())}
    assert records["derm_naevus.png"]["abstain"] is True
    assert records["derm_naevus.png"]["abstain_reason"] == "out_of_distribution"
    assert "calibrated_probability" in records["chest_cardiomegaly.png"]["top"][0]


async def test_window_flags_reach_the_encoder(calibrated_stack):
    from medvlm.client import AsyncClient, Window, load_image

    dcm = str(SAMPLES / "chest_left_effusion.dcm")
    runs = {}
    for flags in ((), ("--window-preset", "lung"), ("--window=-600,1500",)):
        code, out, err = await medvlm(calibrated_stack, "classify", dcm, "--labels", *CHEST, "--json", *flags)
        assert code == 0, err
        runs[flags] = json.loads(out)["results"][0]["scores"]
    async with AsyncClient(calibrated_stack.target) as client:
        expected = await client.classify(load_image(dcm, window=Window(-600, 1500)), CHEST)
    assert [s["probability"] for s in runs[("--window=-600,1500",)]] == [s.probability for s in expected.scores]
    assert runs[("--window-preset", "lung")] == runs[("--window=-600,1500",)]
    assert runs[()] != runs[("--window-preset", "lung")]
    # the same flags on embed; a preset on a PNG is the server's INVALID_ARGUMENT, named per file
    code, out, err = await medvlm(calibrated_stack, "classify", str(SAMPLES / "chest_normal.png"), "--labels",
                                  *CHEST, "--window-preset", "lung")
    assert code == 1 and "chest_normal.png: INVALID_ARGUMENT" in err and "CT" in err


def test_window_flags_usage_errors(capsys):
    for flags in (["--window", "40"], ["--window", "40,400", "--window-preset", "lung"],
                  ["--window-preset", "liver"]):
        with pytest.raises(SystemExit) as exited:
            main(["classify", "x.dcm", "--labels", "a", "b", *flags])
        assert exited.value.code == 2
    assert "CENTER,WIDTH" in capsys.readouterr().err
