"""Results of a run: results.json, a markdown summary with the machine, latency/throughput plots, and ratios."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.report")

RATIO_LOW = 1  # served overhead is compared at this concurrency
RATIO_MID = 16  # throughput ratios are compared at this concurrency
OURS_SERVED = ("vision-nobatch", "vision-batch", "gateway")


def _point(result: dict[str, Any], key: str, concurrency: int) -> dict[str, Any] | None:
    system = result["systems"].get(key)
    if not system or system["status"] != "ok":
        return None
    return next((p for p in system["points"] if p["concurrency"] == concurrency and p["requests"] > 0), None)


def _pick(measured: list[int], wanted: int) -> int | None:
    """`wanted` if measured, else the largest measured concurrency below it, else the smallest."""
    if not measured:
        return None
    if wanted in measured:
        return wanted
    below = [c for c in measured if c < wanted]
    return max(below) if below else min(measured)


def _round(x: float | None, digits: int = 2) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, digits)


def ratios(result: dict[str, Any], concurrency: list[int]) -> dict[str, Any]:
    """Comparisons between systems measured in this run (absolute numbers vary +-30 % between runs)."""
    low, mid = _pick(concurrency, RATIO_LOW), _pick(concurrency, RATIO_MID)
    out: dict[str, Any] = {"low_concurrency": low, "mid_concurrency": mid}

    def p50(key: str, c: int | None) -> float | None:
        point = _point(result, key, c) if c is not None else None
        return point["p50_ms"] if point else None

    def thr(key: str, c: int | None) -> float | None:
        point = _point(result, key, c) if c is not None else None
        return point["throughput"] if point else None

    def diff(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    def div(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    overhead = {}
    for key in (*OURS_SERVED, "triton"):
        if p50(key, low) is None:
            continue
        overhead[key] = {
            "p50_ms": _round(p50(key, low)),
            "minus_ort_ms": _round(diff(p50(key, low), p50("ort", low))),
            "minus_ort_decode_ms": _round(diff(p50(key, low), p50("ort-decode", low))),
        }
    out["served_overhead_at_low"] = overhead

    relative = {}
    for key in result["systems"]:
        value = thr(key, mid)
        if value is None:
            continue
        relative[key] = {"throughput": _round(value), "vs_triton": _round(div(value, thr("triton", mid)), 3),
                         "vs_torch": _round(div(value, thr("torch", mid)), 3)}
    out["throughput_at_mid"] = relative

    out["batching_at_mid"] = {
        "throughput_on_over_off": _round(div(thr("vision-batch", mid), thr("vision-nobatch", mid)), 3),
        "p50_on_over_off": _round(div(p50("vision-batch", mid), p50("vision-nobatch", mid)), 3),
    }
    return out


def ratio_lines(model: str, r: dict[str, Any]) -> list[str]:
    """The ratios as plain sentences, for stdout and the markdown."""
    low, mid = r["low_concurrency"], r["mid_concurrency"]
    lines = [f"[{model}] served overhead at concurrency {low} (p50 minus the in-process engine's p50):"]
    for key, o in r["served_overhead_at_low"].items():
        parts = [f"p50 {o['p50_ms']} ms"]
        if o["minus_ort_ms"] is not None:
            parts.append(f"{o['minus_ort_ms']:+.2f} ms over ort (engine only)")
        if o["minus_ort_decode_ms"] is not None and key != "triton":
            parts.append(f"{o['minus_ort_decode_ms']:+.2f} ms over ort-decode (same decode work)")
        lines.append(f"  {key:15} " + ", ".join(parts))
    if not r["served_overhead_at_low"]:
        lines.append("  (no served system measured)")
    lines.append(f"[{model}] throughput at concurrency {mid} (img/s; x Triton; x torch eager):")
    for key, t in r["throughput_at_mid"].items():
        vs_triton = "n/a" if t["vs_triton"] is None else f"{t['vs_triton']:.2f}x"
        vs_torch = "n/a" if t["vs_torch"] is None else f"{t['vs_torch']:.2f}x"
        lines.append(f"  {key:15} {t['throughput']:9.2f} img/s  {vs_triton:>7} Triton  {vs_torch:>7} torch")
    b = r["batching_at_mid"]
    if b["throughput_on_over_off"] is not None:
        lines.append(f"[{model}] batching on vs off at concurrency {mid}: throughput x{b['throughput_on_over_off']:.2f}, "
                     f"p50 x{b['p50_on_over_off']:.2f}")
    else:
        lines.append(f"[{model}] batching on vs off: not both measured")
    return lines


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def markdown(results: dict[str, Any], plots: dict[str, str]) -> str:
    m = results["machine"]
    cfg = results["config"]
    background = results["background"]
    busy = "; ".join(f"{b['command']} ({b['cpu_percent']} % of a core)" for b in background["start"]["busy"]) or "none seen"
    busy_end = "; ".join(f"{b['command']} ({b['cpu_percent']} %)" for b in background["end"]["busy"]) or "none seen"
    triton_versions = results.get("triton_versions") or {}
    triton = (f"tritonserver {triton_versions.get('tritonserver', '?')} (nvidia-pytriton "
              f"{triton_versions.get('nvidia-pytriton', '?')}, tritonclient {triton_versions.get('tritonclient', '?')}, "
              f"onnxruntime {triton_versions.get('onnxruntime', '?')}, numpy {triton_versions.get('numpy', '?')})"
              if triton_versions else "not run (see below)")
    git = m["git"]
    code = f"commit {git['commit']}" + (f" + {git['uncommitted_changes']} uncommitted file(s)"
                                         if git.get("uncommitted_changes") else "")
    v = m["versions"]
    out = [
        "# medvlm benchmark results",
        "",
        f"`{results['command']}` — started {results['started']}, took {results['duration_s'] / 60:.1f} min.",
        "Timings on these shared machines vary by +-30 % between runs: compare systems within one run "
        "(the ratios below), not across runs.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {m['cpu_model']}, {m['cores']} cores ({m['cores_usable']} usable); flags: {', '.join(m['cpu_flags']) or '-'} |",
        f"| memory | {m['memory_gib']} GiB |",
        f"| OS | {m['os']} |",
        f"| Python | {m['python']} |",
        f"| packages | torch {v['torch']}, open_clip {v['open_clip_torch']}, onnxruntime {v['onnxruntime']}, "
        f"grpcio {v['grpcio']}, numpy {v['numpy']}, pillow {v['pillow']} |",
        f"| Triton | {triton} |",
        f"| code | {code} |",
        f"| other load at start | load average {background['start']['loadavg']}; busy processes: {busy} |",
        f"| other load at end | load average {background['end']['loadavg']}; busy processes: {busy_end} |",
        "",
        "## How it was measured",
        "",
        f"* Closed loop: N worker threads each send one request (one image) and wait for its answer. Per point "
        f"a warm-up of at least {cfg['warmup_s']} s (until every worker has had an answer), then a "
        f"{cfg['seconds']} s window. Throughput = answers completed in the window / window length (images/s); "
        f"latency percentiles over the requests started in the window, which are all awaited.",
        f"* Concurrency {', '.join(str(c) for c in cfg['concurrency'])}. Systems run one after another, never together.",
        f"* Every engine gets {cfg['threads']} threads (torch.set_num_threads, ONNX Runtime intra-op threads, "
        f"--intra-op-threads of the encoders, ONNX Runtime inside Triton). The load generator shares the same "
        f"{m['cores']} cores with the system under test.",
        f"* Batching on: ours with {' '.join(cfg['batch_flags']) or 'the service defaults'} "
        f"(max batch {cfg['max_batch']}, max delay {cfg['max_delay_ms']} ms); Triton with max_batch_size "
        f"{cfg['max_batch']} and dynamic_batching max_queue_delay_microseconds {int(cfg['max_delay_ms'] * 1000)}, "
        f"one model instance. Our delay applies only while other requests are still being decoded; Triton's "
        f"applies to every batch.",
        f"* Images: {cfg['images']['source']}; {cfg['images']['count']} PNGs of {cfg['images']['width']}x"
        f"{cfg['images']['height']}, {cfg['images']['png_bytes_mean'] // 1024} KiB on average.",
        "* **Inputs differ by design.** Triton, torch and ort receive preprocessed float32 tensors "
        "(3x224x224 = 588 KiB) and do no image decoding; the medvlm encoder and gateway receive PNG bytes and "
        "decode, resize and normalize them themselves. `ort-decode` is the in-process engine with that same "
        "decode work per request, so `vision-*` minus `ort-decode` is the serving overhead proper, and "
        "`ort-decode` minus `ort` is the decode cost (also measured alone, single-threaded, per model below).",
        "* Every system's answer for image 0 is checked against the in-process ONNX Runtime answer before "
        "it is measured (cosine >= 0.999; for the gateway the image x label cosines, within 1e-3).",
        "",
    ]
    systems_meta = results["systems"]
    for model, r in results["models"].items():
        out += [f"## {model}", ""]
        out.append(f"Bundle `{r['bundle_id']}` ({r['kind']}){'; ' + r['note'] if r.get('note') else ''}. "
                   f"Decode + preprocess alone, one thread: p50 {_fmt(r['decode_ms']['p50_ms'], 2)} ms "
                   f"(p95 {_fmt(r['decode_ms']['p95_ms'], 2)} ms) per {cfg['images']['width']}x"
                   f"{cfg['images']['height']} PNG.")
        out += ["", "| system | concurrency | img/s | p50 ms | p95 ms | p99 ms | requests | errors |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for key, s in r["systems"].items():
            if s["status"] != "ok":
                continue
            for p in s["points"]:
                out.append(f"| {key} | {p['concurrency']} | {_fmt(p['throughput'])} | {_fmt(p['p50_ms'])} | "
                           f"{_fmt(p['p95_ms'])} | {_fmt(p['p99_ms'])} | {p['requests']} | {p['errors']} |")
        out += ["", "```", *ratio_lines(model, r["ratios"]), "```", ""]
        missing = [(k, s) for k, s in r["systems"].items() if s["status"] != "ok"]
        if missing:
            out += ["Not measured:", ""]
            out += [f"* `{k}` {s['status']}: {s['reason']}" for k, s in missing]
            out.append("")
        if model in plots:
            out += [f"![p50 latency vs throughput, {model}]({plots[model]})", ""]
    out += ["## Systems", "", "| key | system | one request |", "|---|---|---|"]
    out += [f"| `{k}` | {s['title']} | {s['request']} |" for k, s in systems_meta.items()]
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
            ax.plot(xs, ys, marker="o", label=key)
            for p, x, y in zip(pts, xs, ys):
                ax.annotate(str(p["concurrency"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_yscale("log")
        ax.set_xlabel("throughput (images/s)")
        ax.set_ylabel("p50 latency (ms, log scale)")
        ax.set_title(f"{model}: p50 latency vs throughput (labels: concurrency)")
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
