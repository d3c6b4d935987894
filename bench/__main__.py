"""`python -m bench`: benchmark the systems on the models asked for and write bench/results/."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = "demo,biomedclip-arch"
DEFAULT_CONCURRENCY = "1,4,16,64"
QUICK = {"models": "tiny", "concurrency": "1,4", "seconds": 1.0, "warmup_s": 0.3, "max_round_s": 15.0,
         "min_rounds": 1, "interleaved_rounds": 1}

log = logging.getLogger("bench")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Latency and throughput of medvlm's vision path against in-process torch and ONNX "
                    "Runtime and NVIDIA Triton, at several concurrencies. Writes results.json, README.md "
                    "and plots.",
    )
    p.add_argument("--models", default=None,
                   help=f"comma-separated registry models (default {DEFAULT_MODELS}; demo falls back to tiny "
                        f"when it cannot be built; --quick: tiny)")
    p.add_argument("--systems", default=None,
                   help="comma-separated subset of the systems bench/systems.py lists (default: all)")
    p.add_argument("--concurrency", default=None,
                   help=f"comma-separated concurrencies (default {DEFAULT_CONCURRENCY}; --quick: 1,4)")
    p.add_argument("--seconds", type=float, default=None,
                   help="measurement window per point in seconds (default 5; --quick: 1). A time budget, "
                        "not a request count, so slow models send few requests")
    p.add_argument("--warmup-s", type=float, default=None,
                   help="least warm-up per point in seconds; it also lasts until every worker got an answer "
                        "(default 2; --quick: 0.3)")
    p.add_argument("--max-round-s", type=float, default=None,
                   help="skip a point whose first round (concurrency / the throughput of the point before) "
                        "would take longer than this: a closed loop needs one round before it is steady, and "
                        "a slow model at high concurrency would take minutes per point (default 15; 0: never "
                        "skip)")
    p.add_argument("--min-rounds", type=int, default=None,
                   help="a window lasts at least this many rounds (every worker's first answer): a slow "
                        "model answers in bursts of one batch (default 3; --quick: 1)")
    p.add_argument("--interleaved-rounds", type=int, default=None,
                   help="rounds of alternating windows that judge side by side what separate points cannot "
                        "(bench/paired.py interleaved); 0: none (default 3; --quick: 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="engine threads of every system (default: the core count)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="batching on: largest batch, ours and Triton's (default: the encoders' default)")
    p.add_argument("--max-delay-ms", type=float, default=None,
                   help="batching on: longest wait for a fuller batch, ours and Triton's (default: the "
                        "encoders' default)")
    p.add_argument("--bundles", type=Path, default=ROOT / "bundles",
                   help="folder of bundles; missing ones are built into it (default: bundles/)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default bench/results, which is committed; --quick: bench/out/quick, "
                        "which git ignores)")
    p.add_argument("--triton-python", type=Path, default=None,
                   help="Python of the Triton environment (default: .cache/bench-triton/bin/python)")
    p.add_argument("--quick", action="store_true",
                   help="smoke mode: tiny model, concurrency 1,4, 1 s points (about a minute)")
    p.add_argument("--keep-workdir", action="store_true", help="keep server logs and scratch files")
    p.add_argument("--from-json", type=Path, default=None, metavar="RESULTS_JSON",
                   help="measure nothing: recompute the ratios and rewrite README.md and the plots of a "
                        "finished run (into --out, default: the folder of RESULTS_JSON)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


@dataclasses.dataclass(frozen=True)
class Plan:
    models: list[str]
    systems: list[str]
    concurrency: list[int]
    seconds: float
    warmup_s: float
    max_round_s: float
    min_rounds: int
    interleaved_rounds: int


def make_plan(args: argparse.Namespace, known_systems: list[str]) -> Plan:
    def pick(name: str, default: Any) -> Any:
        value = getattr(args, name)
        if value is not None:
            return value
        return QUICK[name] if args.quick else default

    systems = _csv(args.systems) if args.systems else list(known_systems)
    unknown = [s for s in systems if s not in known_systems]
    if unknown:
        raise SystemExit(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(known_systems)}")
    concurrency = sorted({int(c) for c in _csv(pick("concurrency", DEFAULT_CONCURRENCY))})
    if not concurrency or min(concurrency) < 1:
        raise SystemExit("--concurrency needs positive integers")
    return Plan(
        models=_csv(pick("models", DEFAULT_MODELS)),
        systems=[s for s in known_systems if s in systems],
        concurrency=concurrency,
        seconds=float(pick("seconds", 5.0)),
        warmup_s=float(pick("warmup_s", 2.0)),
        max_round_s=float(pick("max_round_s", 15.0)),
        min_rounds=max(1, int(pick("min_rounds", 3))),
        interleaved_rounds=max(0, int(pick("interleaved_rounds", 3))),
    )


def _relative(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def decode_cost(ctx, rounds: int) -> dict[str, float]:
    """PNG decode + preprocessing alone, one thread, as the encoder does it: per-image percentiles in ms."""
    from bench.load import percentile
    from bench.systems import decode_limits
    from medvlm.imaging.preprocess import PNG, decode_image, preprocess

    spec, limits = ctx.bundle.manifest.image, decode_limits()
    times = []
    for _ in range(rounds):
        for png in ctx.images.pngs:
            start = time.perf_counter()
            preprocess(decode_image(png, PNG, limits), spec)
            times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {"p50_ms": percentile(times, 50), "p95_ms": percentile(times, 95), "samples": len(times)}


def dicom_decode_cost(ctx, rounds: int) -> dict[str, dict[str, float]]:
    """Decode + window + preprocessing of a synthetic 512x512 12-bit CT slice, uncompressed and
    JPEG 2000 lossless, beside the same slice as an 8-bit PNG: per-image percentiles in ms."""
    import io

    import numpy as np
    from PIL import Image
    from pydicom.uid import JPEG2000Lossless

    from bench.load import percentile
    from bench.systems import decode_limits
    from medvlm.imaging.preprocess import decode, preprocess
    from scripts.make_dicom_samples import dicom_file

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:512, 0:512]
    body = 1024 + 900 * np.exp(-((xx - 256) ** 2 + (yy - 256) ** 2) / 25000.0)  # [512, 512], stored values
    ct = np.clip(body + rng.normal(0, 30, body.shape), 0, 4095).astype(np.uint16)
    header = dict(Modality="CT", BitsStored=12, HighBit=11, RescaleSlope=1, RescaleIntercept=-1024,
                  WindowCenter="40", WindowWidth="400")
    png = io.BytesIO()
    Image.fromarray(np.rint(ct / 4095 * 255).astype(np.uint8)).save(png, format="PNG")
    files = {"png_8bit": png.getvalue(), "dicom_uncompressed": dicom_file(ct, **header),
             "dicom_jpeg2000": dicom_file(ct, JPEG2000Lossless, **header)}
    spec, limits = ctx.bundle.manifest.image, decode_limits()
    out = {}
    for name, data in files.items():
        times = []
        for _ in range(10 * rounds):
            start = time.perf_counter()
            preprocess(decode(data, None, limits).image, spec)
            times.append((time.perf_counter() - start) * 1000)
        times.sort()
        out[name] = {"p50_ms": percentile(times, 50), "p95_ms": percentile(times, 95), "samples": len(times),
                     "bytes": len(data)}
    return out


def run_system(cls, ctx, plan: Plan) -> dict[str, Any]:
    """Start, check and measure one system; its failure is recorded, never raised."""
    from bench.procs import ServerFailed
    from bench.systems import SystemUnavailable, WrongAnswer

    system = cls(ctx)
    entry: dict[str, Any] = {"status": "ok", "reason": "", "check": {}, "points": []}
    started = time.perf_counter()
    try:
        log.info("%s: starting (%s)", cls.key, cls.title)
        system.start()
        entry["check"], points = system.run(plan.concurrency, plan.seconds, plan.warmup_s)
        entry["points"] = [p.as_dict() for p in points]
    except SystemUnavailable as exc:
        entry.update(status="skipped", reason=str(exc))
        log.warning("%s skipped: %s", cls.key, exc)
    except (ServerFailed, WrongAnswer) as exc:
        entry.update(status="failed", reason=str(exc))
        log.error("%s failed: %s", cls.key, exc)
    except Exception as exc:  # one broken system must not stop the others
        entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
        log.exception("%s failed", cls.key)
    finally:
        try:
            system.stop()
        except Exception:
            log.exception("%s: stopping failed", cls.key)
    entry["details"] = system.details
    entry["seconds"] = round(time.perf_counter() - started, 1)
    return entry


def summary(results: dict[str, Any], written: list[Path]) -> str:
    """What the run found, for stdout: the ratios, what was not measured, where the files are."""
    from bench import report

    lines = []
    for model, r in results["models"].items():
        lines += report.ratio_lines(model, r["ratios"])
        lines += [f"[{model}] {k} {s['status']}: {s['reason']}"
                  for k, s in r["systems"].items() if s["status"] != "ok"]
    lines += [f"model {x['model']} left out: {x['reason']}" for x in results.get("models_left_out", [])]
    lines.append(f"took {results['duration_s'] / 60:.1f} min; wrote {', '.join(str(p) for p in written)}")
    return "\n".join(lines) + "\n"


def rerender(path: Path, out: Path) -> int:
    """Recompute the ratios of a finished run and rewrite its report; nothing is measured."""
    import json

    from bench import bundles, report

    results = json.loads(path.read_text())
    for r in results["models"].values():
        # notes of earlier runs kept a log line's prefix and absolute repository paths
        r["note"] = bundles.LOG_PREFIX.sub("", r.get("note", "")).replace(f"{ROOT}/", "")
        r["ratios"] = report.ratios(r, results["config"]["concurrency"])
    sys.stdout.write(summary(results, report.write(results, out)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Ours at INFO; libraries (open_clip logs every step on the root logger) at WARNING.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("bench").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from bench import bundles, machine, report

    if args.from_json:
        return rerender(args.from_json, args.out or args.from_json.parent)

    from bench.images import load_images
    from bench.systems import Context, all_systems, setting_default
    from bench.triton import TritonSystem
    from engines.runtime.bundle import load_bundle

    classes = all_systems()
    plan = make_plan(args, list(classes))
    TritonSystem.python = args.triton_python.absolute() if args.triton_python else None  # keep the venv link
    max_batch = args.max_batch or setting_default("max_batch")
    max_delay_ms = args.max_delay_ms if args.max_delay_ms is not None else setting_default("max_delay_ms")
    batch_flags = ([f"--max-batch={args.max_batch}"] if args.max_batch else []) + (
        [f"--max-delay-ms={args.max_delay_ms}"] if args.max_delay_ms is not None else [])

    began = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    log.info("plan: models %s, systems %s, concurrency %s, %.1f s per point, %d engine threads", plan.models,
             plan.systems, plan.concurrency, plan.seconds, args.threads)
    results: dict[str, Any] = {
        "schema": 1,
        "command": "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "started": started,
        "machine": machine.describe(ROOT),
        "background": {"start": machine.busy_processes(machine.own_pids())},
    }
    results["machine"]["gemm"] = machine.gemm_rates(args.threads)
    images = load_images(ROOT)
    results["config"] = {
        "models": plan.models, "systems": plan.systems, "concurrency": plan.concurrency,
        "seconds": plan.seconds, "warmup_s": plan.warmup_s, "max_round_s": plan.max_round_s,
        "min_rounds": plan.min_rounds, "interleaved_rounds": plan.interleaved_rounds,
        "threads": args.threads, "quick": args.quick,
        "max_batch": max_batch, "max_delay_ms": max_delay_ms, "batch_flags": batch_flags,
        "images": images.describe(),
    }
    results["systems"] = {k: {"title": classes[k].title, "request": classes[k].request} for k in plan.systems}
    choices, left_out = bundles.choose(args.bundles.resolve(), plan.models, ROOT)
    results["models_left_out"] = left_out
    results["models"] = {}
    workdir = Path(tempfile.mkdtemp(prefix="medvlm-bench-"))
    try:
        for choice in choices:
            bundle = load_bundle(choice.bundle)
            log.info("model %s: bundle %s", choice.model, bundle.bundle_id)
            ctx = Context(root=ROOT, model=choice.model, bundle=bundle, images=images, threads=args.threads,
                          max_batch=max_batch, max_delay_ms=max_delay_ms, batch_flags=batch_flags,
                          workdir=workdir / choice.model, max_round_s=plan.max_round_s,
                          min_rounds=plan.min_rounds)
            ctx.workdir.mkdir(parents=True)
            model_result: dict[str, Any] = {
                "asked": choice.asked, "bundle": _relative(choice.bundle), "bundle_id": bundle.bundle_id,
                "kind": bundle.manifest.kind, "embed_dim": bundle.manifest.embed_dim,
                "image_size": bundle.manifest.image.size, "note": choice.note,
                "bundle_build_s": None if choice.built_s is None else round(choice.built_s, 1),
                "decode_ms": decode_cost(ctx, rounds=1 if args.quick else 3),
                "dicom_decode_ms": dicom_decode_cost(ctx, rounds=1 if args.quick else 3),
                "systems": {},
            }
            for key in plan.systems:
                model_result["systems"][key] = run_system(classes[key], ctx, plan)
                if key == "triton" and model_result["systems"][key]["status"] == "ok":
                    results["triton_versions"] = model_result["systems"][key]["details"].get("versions", {})
            if "ort-decode" in plan.systems and 1 in plan.concurrency:
                from bench.paired import paired_overhead

                model_result["paired_overhead"] = paired_overhead(ctx, pairs=60 if args.quick else 300)
            if "gateway-tls" in plan.systems and 1 in plan.concurrency:
                from bench.paired import tls_overhead

                model_result["tls_overhead"] = tls_overhead(ctx, pairs=60 if args.quick else 300)
            mid = report.ratios(model_result, plan.concurrency)["mid_concurrency"]
            if plan.interleaved_rounds and 1 in plan.concurrency and mid is not None:
                from bench.paired import interleaved

                measured = {k for k, s in model_result["systems"].items() if s["status"] == "ok"}
                model_result["interleaved"] = interleaved(
                    ctx, classes, measured, mid, plan.interleaved_rounds, plan.seconds, plan.warmup_s)
            model_result["ratios"] = report.ratios(model_result, plan.concurrency)
            results["models"][choice.model] = model_result
    finally:
        if args.keep_workdir:
            log.info("server logs and scratch files kept in %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results["background"]["end"] = machine.busy_processes(machine.own_pids())
    results["duration_s"] = round(time.perf_counter() - began, 1)
    out = args.out or (ROOT / "bench" / "out" / "quick" if args.quick else ROOT / "bench" / "results")
    written = report.write(results, out)

    sys.stdout.write(summary(results, written))
    measured = any(s["status"] == "ok" for r in results["models"].values() for s in r["systems"].values())
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())
