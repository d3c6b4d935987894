"""Results of a run: results.json, a markdown summary with the machine, latency plots, and ratios."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from bench import goals

log = logging.getLogger("bench.report")

RATIO_LOW = 1  # served overhead is compared at this concurrency
RATIO_MID = 16  # throughput ratios are compared at this concurrency
OURS_SERVED = ("vision-nobatch", "vision-batch", "vision-calls", "gateway", "gateway-tls", "gateway-int8",
               "gateway-torch")
# Classify end to end and the in-process engines, compared at low concurrency across precisions
PRECISION_ROWS = ("gateway-int8", "gateway", "gateway-torch", "ort-int8", "ort", "torch")


def _pick(result: dict[str, Any], concurrency: list[int], wanted: int) -> int | None:
    """The concurrency to compare systems at: `wanted`, or if fewer systems were measured there (a point
    skipped as too slow), the highest one below it at which the most systems were measured."""
    candidates = sorted((c for c in concurrency if c <= wanted), reverse=True) or sorted(concurrency)
    coverage = {c: sum(1 for key in result["systems"] if goals.point(result, key, c)) for c in candidates}
    best = max(coverage.values(), default=0)
    return next((c for c in candidates if coverage[c] == best), None) if best else None


def _round(x: float | None, digits: int = 2) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, digits)


def ratios(result: dict[str, Any], concurrency: list[int]) -> dict[str, Any]:
    """Comparisons between systems measured in this run (absolute numbers vary +-30 % between runs)."""
    low, mid = _pick(result, concurrency, RATIO_LOW), _pick(result, concurrency, RATIO_MID)
    out: dict[str, Any] = {"low_concurrency": low, "mid_concurrency": mid}

    def p50(key: str, c: int | None) -> float | None:
        point = goals.point(result, key, c)
        return point["p50_ms"] if point else None

    def thr(key: str, c: int | None) -> float | None:
        point = goals.point(result, key, c)
        return point["throughput"] if point else None

    def diff(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    def div(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    overhead = {}
    for key in (*OURS_SERVED, "triton", "triton-decode"):
        if p50(key, low) is None:
            continue
        overhead[key] = {
            "p50_ms": _round(p50(key, low)),
            "minus_ort_ms": _round(diff(p50(key, low), p50("ort", low))),
            "minus_ort_decode_ms": _round(diff(p50(key, low), p50("ort-decode", low))),
        }
    out["served_overhead_at_low"] = overhead
    out["paired_overhead"] = result.get("paired_overhead", {})
    out["tls_overhead"] = result.get("tls_overhead", {})

    relative = {}
    for key in result["systems"]:
        value = thr(key, mid)
        if value is None:
            continue
        relative[key] = {"throughput": _round(value), "vs_triton": _round(div(value, thr("triton", mid)), 3),
                         "vs_triton_decode": _round(div(value, thr("triton-decode", mid)), 3),
                         "vs_torch": _round(div(value, thr("torch", mid)), 3)}
    out["throughput_at_mid"] = relative

    out["precision_at_low"] = {key: _round(p50(key, low)) for key in PRECISION_ROWS if p50(key, low) is not None}
    int8 = p50("gateway-int8", low)
    out["int8_speedup_at_low"] = {
        "classify_vs_fp32": _round(div(p50("gateway", low), int8), 3),
        "classify_vs_torch_served": _round(div(p50("gateway-torch", low), int8), 3),
        "classify_vs_torch_eager_in_process": _round(div(p50("torch", low), int8), 3),
        "engine_vs_fp32_engine": _round(div(p50("ort", low), p50("ort-int8", low)), 3),
        "engine_vs_torch_eager": _round(div(p50("torch", low), p50("ort-int8", low)), 3),
    }

    out["batching_at_mid"] = {
        "throughput_on_over_off": _round(div(thr("vision-batch", mid), thr("vision-nobatch", mid)), 3),
        "p50_on_over_off": _round(div(p50("vision-batch", mid), p50("vision-nobatch", mid)), 3),
        "side_by_side": (result.get("interleaved") or {}).get("batching"),
    }
    out["engine_calls_at_mid"] = (result.get("interleaved") or {}).get("engine-calls")
    return out


def ratio_lines(model: str, r: dict[str, Any]) -> list[str]:
    """The ratios as plain sentences, for stdout and the markdown."""
    low, mid = r["low_concurrency"], r["mid_concurrency"]
    lines = [f"[{model}] served overhead at concurrency {low} (p50 minus the in-process engine's p50):"]
    for key, o in r["served_overhead_at_low"].items():
        parts = [f"p50 {o['p50_ms']} ms"]
        if o["minus_ort_ms"] is not None:
            parts.append(f"{o['minus_ort_ms']:+.2f} ms over ort (engine only)")
        if o["minus_ort_decode_ms"] is not None and key != "triton":  # triton gets tensors: no decode
            parts.append(f"{o['minus_ort_decode_ms']:+.2f} ms over ort-decode (same decode work)")
        lines.append(f"  {key:15} " + ", ".join(parts))
    if not r["served_overhead_at_low"]:
        lines.append("  (no served system measured)")
    paired = r.get("paired_overhead") or {}
    if paired:
        lines.append(f"[{model}] served overhead at concurrency 1, in alternating pairs with ort-decode "
                     f"(median of the differences, p25-p75):")
    for key, o in paired.items():
        if "error" in o:
            lines.append(f"  {key:15} failed: {o['error']}")
            continue
        lines.append(f"  {key:15} {o['overhead_p50_ms']:+.2f} ms ({o['overhead_p25_ms']:+.2f} to "
                     f"{o['overhead_p75_ms']:+.2f}) over {o['pairs']} pairs; p50 {o['served_p50_ms']} ms "
                     f"served vs {o['in_process_p50_ms']} ms in process")
    tls = r.get("tls_overhead") or {}
    if "error" in tls:
        lines.append(f"[{model}] TLS + auth overhead at concurrency 1: failed: {tls['error']}")
    elif tls:
        lines.append(f"[{model}] TLS + mTLS + bearer token, Classify at concurrency 1, in alternating pairs with "
                     f"the plaintext stack: {tls['overhead_p50_ms']:+.2f} ms ({tls['overhead_p25_ms']:+.2f} to "
                     f"{tls['overhead_p75_ms']:+.2f}) over {tls['pairs']} pairs; p50 {tls['served_p50_ms']} ms "
                     f"secured vs {tls['in_process_p50_ms']} ms plaintext")
    lines.append(f"[{model}] throughput at concurrency {mid} (img/s; x Triton fed tensors; x Triton decoding "
                 f"PNGs as we do; x torch eager):")

    def times(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}x"

    for key, t in r["throughput_at_mid"].items():
        lines.append(f"  {key:15} {t['throughput']:9.2f} img/s  {times(t['vs_triton']):>7} Triton  "
                     f"{times(t.get('vs_triton_decode')):>7} Triton-decode  {times(t['vs_torch']):>7} torch")
    precision = r.get("precision_at_low") or {}
    if precision:
        lines.append(f"[{model}] p50 at concurrency {low}, by precision (ms): "
                     + ", ".join(f"{key} {ms}" for key, ms in precision.items()))
        speedup = {k: v for k, v in r["int8_speedup_at_low"].items() if v is not None}
        if speedup:
            lines.append(f"[{model}] int8 speed-up at concurrency {low}: "
                         + ", ".join(f"{k.replace('_', ' ')} x{v:.2f}" for k, v in speedup.items()))
    b = r["batching_at_mid"]
    if b["throughput_on_over_off"] is not None:
        lines.append(f"[{model}] batching on vs off at concurrency {mid}, separate points: "
                     f"throughput x{b['throughput_on_over_off']:.2f}, p50 x{b['p50_on_over_off']:.2f}")
    else:
        lines.append(f"[{model}] batching on vs off: not both measured")
    both = b.get("side_by_side")
    if both and "error" in both:
        lines.append(f"[{model}] batching on vs off side by side: failed: {both['error']}")
    elif both:
        lines.append(f"[{model}] batching on vs off at concurrency {mid}, side by side: throughput "
                     f"x{both['ratio_median']:.2f}: {goals.side_by_side_text(both)}")
    calls = r.get("engine_calls_at_mid")
    if calls and "error" in calls:
        lines.append(f"[{model}] one engine call per core vs the default, side by side: failed: {calls['error']}")
    elif calls:
        lines.append(f"[{model}] one single-threaded engine call per core (vision-calls) vs one call on every "
                     f"core (vision-batch) at concurrency {mid}, side by side: throughput "
                     f"x{calls['ratio_median']:.2f}: {goals.side_by_side_text(calls)}")
    return lines


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def gemm_row(g: dict[str, Any]) -> str:
    """The machine's matrix-multiply rates and the ViT-B/16 latency floors they imply."""
    shape = "x".join(str(x) for x in g["shape"])
    return (f"| GEMM ({shape}, {g['threads']} threads, ONNX Runtime) | fp32 {g['fp32']['gmac_per_s']} G "
            f"multiply-adds/s, int8 {g['int8']['gmac_per_s']} G/s: at these rates a ViT-B/16 image tower "
            f"(17.6 G) needs at least {g['fp32']['vit_b16_floor_ms']} ms in fp32 and "
            f"{g['int8']['vit_b16_floor_ms']} ms in int8 |")


def markdown(results: dict[str, Any], plots: dict[str, str]) -> str:
    """README.md of a run: the machine, the method, a table and the ratios per model, the plots."""
    m, cfg, background = results["machine"], results["config"], results["background"]

    def busy(when: str) -> str:
        return "; ".join(f"{b['command']} ({b['cpu_percent']} % of a core)"
                         for b in background[when]["busy"]) or "none seen"

    tv = results.get("triton_versions") or {}
    triton = "not run (see below)"
    if tv:
        triton = (f"tritonserver {tv.get('tritonserver', '?')} "
                  f"(nvidia-pytriton {tv.get('nvidia-pytriton', '?')}, "
                  f"tritonclient {tv.get('tritonclient', '?')}, onnxruntime {tv.get('onnxruntime', '?')}, "
                  f"numpy {tv.get('numpy', '?')})")
    git = m["git"]
    code = f"commit {git['commit']}" + (f" + {git['uncommitted_changes']} uncommitted file(s)"
                                         if git.get("uncommitted_changes") else "")
    v = m["versions"]
    img = cfg["images"]
    out = [
        "# medvlm benchmark results",
        "",
        f"`{results['command']}` — started {results['started']}, took {results['duration_s'] / 60:.1f} min.",
        ("Timings on these shared machines vary by +-30 % between runs: compare systems within one run "
         "(the ratios below), not across runs."),
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        (f"| CPU | {m['cpu_model']} (family/model {m['cpu_family_model']}), {m['cores']} cores "
         f"({m['cores_usable']} usable); flags: {', '.join(m['cpu_flags']) or '-'} |"),
        f"| memory | {m['memory_gib']} GiB |",
        *([gemm_row(m["gemm"])] if m.get("gemm") else []),
        f"| OS | {m['os']} |",
        f"| Python | {m['python']} |",
        (f"| packages | torch {v['torch']}, open_clip {v['open_clip_torch']}, "
         f"onnxruntime {v['onnxruntime']}, grpcio {v['grpcio']}, numpy {v['numpy']}, pillow {v['pillow']} |"),
        f"| Triton | {triton} |",
        f"| code | {code} |",
        f"| other load at start | load average {background['start']['loadavg']}; busy: {busy('start')} |",
        f"| other load at end | load average {background['end']['loadavg']}; busy: {busy('end')} |",
        "",
        "## How it was measured",
        "",
        (f"* Closed loop: N worker threads each send one request (one image) and wait for its answer. "
         f"Per point a warm-up of at least {cfg['warmup_s']} s and until every worker has had an answer "
         f"(one round), then a window of {cfg['seconds']} s or {cfg.get('min_rounds', 1)} round(s) if longer "
         f"(a slow model answers in bursts of one batch). Latency percentiles "
         f"cover the requests started in the window, all awaited. Throughput (images/s) = N / mean "
         f"latency (Little's law): requests served side by side or in batches complete in bursts once "
         f"per round, which skews a count over a short window (the count is in results.json as "
         f"`throughput_window`). A point whose round would exceed {cfg['max_round_s']} s, judged from "
         f"the point before, is skipped and listed."),
        (f"* Concurrency {', '.join(str(c) for c in cfg['concurrency'])}. Systems run one after another, "
         f"never together."),
        (f"* Every engine gets {cfg['threads']} threads (torch.set_num_threads, ONNX Runtime intra-op "
         f"threads, --intra-op-threads of the encoders, ONNX Runtime inside Triton). The load generator "
         f"shares the same {m['cores']} cores with the system under test."),
        (f"* Batching on: ours with {' '.join(cfg['batch_flags']) or 'the service defaults'} "
         f"(max batch {cfg['max_batch']}, max delay {cfg['max_delay_ms']} ms); Triton with max_batch_size "
         f"{cfg['max_batch']} and dynamic_batching max_queue_delay_microseconds "
         f"{round(cfg['max_delay_ms'] * 1000)}, one model instance. Our delay applies only while other "
         f"requests are still being decoded; Triton's applies to every batch."),
        (f"* Images: {img['source']}; {img['count']} PNGs of {img['width']}x{img['height']}, "
         f"{img['png_bytes_mean'] // 1024} KiB on average."),
        ("* **Inputs differ by design.** `triton`, `torch`, `ort` and `ort-int8` receive preprocessed float32 "
         "tensors (3x224x224 = 588 KiB) and do no image decoding; the medvlm encoder and gateway receive PNG "
         "bytes and decode, resize and normalize them themselves, and so does `triton-decode` (in its Python "
         "backend, with the encoder's own preprocessing code): compare served systems with `triton-decode` for "
         "the same work, with `triton` for Triton's best case. `ort-decode` is the in-process engine with the "
         "same decode work per request, so `vision-*` minus `ort-decode` is the serving overhead proper, and "
         "`ort-decode` minus `ort` is the decode cost (also measured alone, single-threaded, per model below)."),
        ("* *Served overhead in pairs*: separate runs drift apart on a shared machine by more than a server "
         "adds, so the overhead at concurrency 1 is also measured in alternating pairs: the same PNG through "
         "`ort-decode` and through the served system back to back, first one then the other, and the median "
         "of the per-pair differences is reported (bench/paired.py)."),
        ("* *Side by side*: whether a served system at the middle concurrency keeps up with its "
         "in-process engine one request at a time, batching on against off, one engine call per core "
         "against the default, and the vision encoder on OpenVINO against Triton serving the same OpenVINO "
         "model (throughput at the middle concurrency, p50 at 1) are judged from windows "
         "of the two systems, both started, alternating (A B, B A, ...), and the median of the per-round "
         "ratios (bench/paired.py): the tables' points are measured minutes apart, and a shared machine "
         "drifts by more than the difference in between."),
        (f"* *CPU ms/img* is the CPU that the benchmark's own processes (the system under test and the load "
         f"generator) used during the window per answer: a system cannot serve more than "
         f"{m['cores']} x 1000 / (CPU ms/img) images per second on this machine, whatever it overlaps."),
        (f"* *other load* is the CPU that processes outside the benchmark used during each window, in "
         f"cores (of {m['cores']}): where it is high, that point was measured on a busy machine."),
        ("* Every system's answer for image 0 is checked against the in-process ONNX Runtime answer "
         "before it is measured (cosine >= 0.999 with fp32; int8 >= 0.98 with fp32, a sanity bound, since "
         "precision is the build's gate to judge; for the gateway the image x label cosines within 1e-3 "
         "of the same engine's in process)."),
        ("* Precision rows: `ort-int8` and `gateway-int8` run the model's int8 vision graph (the note "
         "under each model says where it came from: kept by the precision gate, or, for random weights "
         "that no gate can judge, made for speed only); `gateway-torch` serves the torch reference "
         "engine in both encoders; the `*-openvino` rows run OpenVINO (`--engine openvino`: bf16 where "
         "the CPU has native bf16, f32 elsewhere; `triton-openvino` the same inside Triton's Python "
         "backend), the gateway's text encoder on ONNX Runtime fp32; every other served row pins "
         "`--engine onnxruntime-cpu --precision fp32`."),
        "",
    ]
    for model, r in results["models"].items():
        out += [f"## {model}", ""]
        note = f"; {r['note']}" if r.get("note") else ""
        out.append(f"Bundle `{r['bundle_id']}` ({r['kind']}){note}. Decode + preprocess alone, one thread: "
                   f"p50 {_fmt(r['decode_ms']['p50_ms'], 2)} ms (p95 {_fmt(r['decode_ms']['p95_ms'], 2)} ms) "
                   f"per {img['width']}x{img['height']} PNG.")
        if r.get("dicom_decode_ms"):
            cost = r["dicom_decode_ms"]
            out.append("Decode + window + preprocess of a 512x512 12-bit CT slice, p50 (p95): " + ", ".join(
                f"{name.replace('_', ' ')} {_fmt(c['p50_ms'], 2)} ms ({_fmt(c['p95_ms'], 2)} ms)"
                for name, c in cost.items()) + ".")
        out += ["", ("| system | concurrency | img/s | p50 ms | p95 ms | p99 ms | requests | errors "
                     "| CPU ms/img | other load (cores) |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        skipped_points, incomplete = [], False
        for key, s in r["systems"].items():
            for p in s["points"] if s["status"] == "ok" else []:
                if p.get("skipped"):
                    skipped_points.append(f"* `{key}` at concurrency {p['concurrency']}: {p['skipped']}")
                    continue
                warm = p.get("warmed_up", True)
                incomplete = incomplete or not warm
                out.append(f"| {key} | {p['concurrency']}{'' if warm else '*'} | {_fmt(p['throughput'])} | "
                           f"{_fmt(p['p50_ms'])} | {_fmt(p['p95_ms'])} | {_fmt(p['p99_ms'])} | "
                           f"{p['requests']} | {p['errors']} | {_fmt(p.get('cpu_ms_per_image'), 2)} | "
                           f"{_fmt(p.get('background_cores'), 2)} |")
        if incomplete:
            out += ["", "\\* warm-up incomplete: not every worker had an answer before the window opened."]
        out += ["", "```", *ratio_lines(model, r["ratios"]), "```", ""]
        out += goals.markdown(model, r, m)
        missing = [f"* `{k}` {s['status']}: {s['reason']}" for k, s in r["systems"].items()
                   if s["status"] != "ok"]
        if missing or skipped_points:
            out += ["Not measured:", "", *missing, *skipped_points, ""]
        served = [f"* `{k}`: {'; '.join(s['details']['served_engines'])}" for k, s in r["systems"].items()
                  if s.get("details", {}).get("served_engines")]
        int8_notes = sorted({s["details"]["int8"] for s in r["systems"].values() if s.get("details", {}).get("int8")})
        if int8_notes:
            out += ["int8 engine of this model: " + "; ".join(int8_notes) + ".", ""]
        if served:
            out += ["What the servers reported running (GetModelInfo):", "", *served, ""]
        if model in plots:
            out += [f"![p50 latency vs throughput, {model}]({plots[model]})", ""]
    out += ["## Systems", "", "| key | system | one request |", "|---|---|---|"]
    out += [f"| `{k}` | {s['title']} | {s['request']} |" for k, s in results["systems"].items()]
    if results.get("models_left_out"):
        out += ["", "Models left out:", ""]
        out += [f"* {x['model']}: {x['reason']}" for x in results["models_left_out"]]
    return "\n".join(out) + "\n"


def plot(results: dict[str, Any], out_dir: Path) -> tuple[dict[str, str], str]:
    """One PNG per model: p50 latency against throughput, a line per system, points labelled by
    concurrency. Returns model -> file name, and why there are none if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import ScalarFormatter
    except ImportError:
        return {}, "matplotlib is not installed (pip install -r requirements/bench.txt): no plots"
    files = {}
    for model, r in results["models"].items():
        fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
        drawn = False
        for key, s in r["systems"].items():
            pts = [p for p in s.get("points", []) if p["requests"] > 0] if s["status"] == "ok" else []
            if not pts:
                continue
            xs, ys = [p["throughput"] for p in pts], [p["p50_ms"] for p in pts]
            ax.plot(xs, ys, marker="o", label=key, linestyle="-" if key in OURS_SERVED else "--")
            for p, x, y in zip(pts, xs, ys, strict=True):
                ax.annotate(str(p["concurrency"]), (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("throughput (images/s)")
        ax.set_ylabel("p50 latency (ms, log scale)")
        ax.set_title(f"{model}: p50 latency vs throughput (labels: concurrency; solid: medvlm served)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"latency-throughput-{model}.png"
        fig.savefig(out_dir / name)
        plt.close(fig)
        files[model] = name
    return files, ""


def write(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """results.json, README.md and the plots into `out_dir`; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots, why_not = plot(results, out_dir)
    if why_not:
        log.warning("%s", why_not)
        results["plots_missing"] = why_not
    results["plots"] = plots
    written = [out_dir / "results.json", out_dir / "README.md", *(out_dir / f for f in plots.values())]
    for model, r in results["models"].items():
        r["goals"] = goals.evaluate(model, r, results["machine"])
    (out_dir / "results.json").write_text(json.dumps(clean_nans(results), indent=2, allow_nan=False) + "\n")
    (out_dir / "README.md").write_text(markdown(results, plots))
    return written


def clean_nans(value: Any) -> Any:
    """NaN and infinity -> None, so results.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean_nans(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_nans(v) for v in value]
    return value
