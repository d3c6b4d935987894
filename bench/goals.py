"""The CPU serving goals, judged from the systems measured in one run (ratios within the run only).

Each goal is a row: what it asks, what was measured, the ratio, and a verdict ("met", "not met", or
"not measured" with the reason). Computed when the report is written, so `--from-json` re-judges an
old run.
"""

from __future__ import annotations

import statistics
from typing import Any

# Classify end to end, one row per engine the vision encoder can serve
CLASSIFY_ROWS = ("gateway", "gateway-int8", "gateway-openvino")
# served system -> the in-process engine doing the same inference one request at a time
SERVED_VS_ENGINE = (
    ("vision-batch", "ort"), ("vision-calls", "ort"), ("gateway", "ort"), ("gateway-int8", "ort-int8"),
    ("vision-openvino", "openvino"), ("gateway-openvino", "openvino"), ("gateway-torch", "torch"),
)
VIT_B16_MODELS = ("biomedclip-arch", "biomedclip")  # the GEMM-rate bound is a ViT-B/16 image tower's


def point(r: dict[str, Any], key: str, concurrency: int | None) -> dict[str, Any] | None:
    """The measured point of system `key` at `concurrency`, if it ran and answered there (the
    report's tables and ratios read points through this too)."""
    system = r["systems"].get(key)
    if concurrency is None or not system or system["status"] != "ok":
        return None
    return next((p for p in system["points"] if p["concurrency"] == concurrency and p["requests"] > 0), None)


def _value(r: dict[str, Any], key: str, concurrency: int | None, field: str) -> float | None:
    found = point(r, key, concurrency)
    return None if found is None else found[field]


def _row(goal: str, target: str, measured: str, ratio: float | None, met: bool | None, why: str = "") -> dict:
    verdict = f"not measured: {why}" if met is None else ("met" if met else "not met")
    return {"goal": goal, "target": target, "measured": measured,
            "ratio": None if ratio is None else round(ratio, 3), "verdict": verdict}


def _gated_note(r: dict[str, Any], key: str) -> str:
    details = r["systems"].get(key, {}).get("details", {})
    if key == "gateway-int8" and "gated" in details:
        return " (int8 kept by the precision gate)" if details["gated"] else " (int8 ungated: no gate can judge it)"
    return ""


def _vit_b16_goals(r: dict[str, Any], machine: dict[str, Any], low: int, mid: int) -> list[dict[str, Any]]:
    """The goals set for BiomedCLIP's shapes: Classify against the int8 GEMM-rate bound and against
    Triton + ONNX Runtime fp32, each on the best engine measured."""
    rows = []
    classify = {k: v for k in CLASSIFY_ROWS if (v := _value(r, k, low, "p50_ms")) is not None}
    gemm = (machine.get("gemm") or {}).get("int8", {})
    if classify and gemm.get("vit_b16_floor_ms"):
        best = min(classify, key=classify.get)
        bound = gemm["vit_b16_floor_ms"]
        ratio = classify[best] / bound
        rows.append(_row("Classify p50 at 1, best engine, within 1.3x the int8 GEMM-rate bound", "<= 1.3x",
                         f"`{best}`{_gated_note(r, best)} {classify[best]:.1f} ms vs bound {bound} ms "
                         f"(int8 {gemm['gmac_per_s']} G MAC/s)", ratio, ratio <= 1.3))
    else:
        rows.append(_row("Classify p50 at 1 within 1.3x the int8 GEMM-rate bound", "<= 1.3x", "-", None, None,
                         "no Classify row or no GEMM rate in this run"))
    triton = _value(r, "triton", mid, "throughput")
    served = {k: v for k in CLASSIFY_ROWS if (v := _value(r, k, mid, "throughput")) is not None}
    if triton and served:
        best = max(served, key=served.get)
        ratio = served[best] / triton
        rows.append(_row(f"Classify throughput at {mid}, best engine, vs Triton + ONNX Runtime fp32", ">= 3x",
                         f"`{best}`{_gated_note(r, best)} {served[best]:.2f} vs {triton:.2f} img/s", ratio,
                         ratio >= 3.0))
    else:
        rows.append(_row("Classify throughput vs Triton + ONNX Runtime fp32", ">= 3x", "-", None, None,
                         "Triton or every Classify row missing from this run"))
    return rows


def evaluate(model: str, r: dict[str, Any], machine: dict[str, Any]) -> list[dict[str, Any]]:
    """The goal rows of one model's results."""
    low, mid = r["ratios"]["low_concurrency"], r["ratios"]["mid_concurrency"]
    rows = _vit_b16_goals(r, machine, low, mid) if model in VIT_B16_MODELS else []

    ov = r["systems"].get("openvino", {})
    precision = ov.get("details", {}).get("precision")
    ov_p50, ort_p50 = _value(r, "openvino", low, "p50_ms"), _value(r, "ort", low, "p50_ms")
    if precision == "bf16" and ov_p50 and ort_p50:
        ratio = ov_p50 / ort_p50
        rows.append(_row("OpenVINO bf16 p50 at 1 vs ONNX Runtime fp32 (top-1 agreement: not measured here)",
                         "<= 0.6x", f"{ov_p50:.1f} vs {ort_p50:.1f} ms", ratio, ratio <= 0.6))
    else:
        flags = ", ".join(machine.get("cpu_flags", [])) or "-"
        why = (f"OpenVINO ran {precision}: this CPU has no native bf16 (flags: {flags})" if precision
               else "the openvino row did not run in this run")
        rows.append(_row("OpenVINO bf16 p50 at 1 vs ONNX Runtime fp32", "<= 0.6x", "-", None, None, why))

    rows.extend(_openvino_vs_triton(r, low, mid))

    for served_key, engine_key in SERVED_VS_ENGINE:
        row = _served_vs_engine(r, served_key, engine_key, mid)
        if row:
            rows.append(row)

    for key, o in (r.get("paired_overhead") or {}).items():
        if "error" in o:
            rows.append(_row(f"`{key}` served overhead at 1, paired", "< 3 ms", "-", None, None, o["error"]))
            continue
        rows.append(_row(f"`{key}` served overhead at 1, paired with `ort-decode`", "< 3 ms",
                         f"{o['overhead_p50_ms']:+.2f} ms (p25-p75 {o['overhead_p25_ms']:+.2f} to "
                         f"{o['overhead_p75_ms']:+.2f}) over {o['pairs']} pairs", None, o["overhead_p50_ms"] < 3.0))
    return rows


def _openvino_vs_triton(r: dict[str, Any], low: int | None, mid: int | None) -> list[dict[str, Any]]:
    """Our OpenVINO vision encoder against Triton serving the same OpenVINO model: throughput at `mid`
    and p50 at `low`, each judged side by side where the run has it (bench.paired.interleaved), else
    from the two systems' separate points, which says so."""
    rows = []
    throughput = _ours_vs_triton(r, "openvino-vs-triton", mid, "throughput")
    if throughput:
        ratio, measured = throughput
        rows.append(_row(f"vision encoder on OpenVINO vs Triton serving the same OpenVINO model, "
                         f"throughput at {mid} (Triton gets tensors, ours decodes PNGs)", ">= 1.0x", measured,
                         ratio, ratio >= 1.0))
    p50 = _ours_vs_triton(r, "openvino-vs-triton-at-1", low, "p50_ms")
    if p50:
        ratio, measured = p50
        rows.append(_row(f"vision encoder on OpenVINO vs Triton + OpenVINO, p50 at {low}", "<= 1.05x",
                         measured, ratio, ratio <= 1.05))
    if not rows:
        rows.append(_row("vision encoder on OpenVINO vs Triton + OpenVINO", ">= 1.0x, <= 1.05x", "-", None,
                         None, "triton-openvino or vision-openvino missing from this run"))
    return rows


def _ours_vs_triton(r: dict[str, Any], name: str, concurrency: int | None,
                    field: str) -> tuple[float, str] | None:
    """(vision-openvino / triton-openvino in `field`, what was measured), or None if neither way ran."""
    side = (r.get("interleaved") or {}).get(name)
    if side and "error" not in side:
        if field == "throughput":
            return side["ratio_median"], side_by_side_text(side)
        ours, theirs = statistics.median(side["other_p50_ms"]), statistics.median(side["base_p50_ms"])
        return side["p50_ratio_median"], (f"{ours:.1f} vs {theirs:.1f} ms (medians), {side['rounds']} "
                                          f"alternating rounds")
    ours = _value(r, "vision-openvino", concurrency, field)
    theirs = _value(r, "triton-openvino", concurrency, field)
    if not (ours and theirs):
        return None
    unit = "img/s" if field == "throughput" else "ms"
    why = f"; side by side failed: {side['error']}" if side else ""
    return ours / theirs, f"{ours:.2f} vs {theirs:.2f} {unit}, separate points minutes apart{why}"


def _served_vs_engine(r: dict[str, Any], served_key: str, engine_key: str, mid: int | None) -> dict | None:
    """Judged from the two side by side where the run has them (bench.paired.interleaved), else from
    the two systems' separate points, which says so."""
    goal = f"`{served_key}` at {mid} vs `{engine_key}` in process one at a time, throughput"
    both = (r.get("interleaved") or {}).get(served_key)
    if both and "error" not in both:
        return _row(goal, ">= 1.0x", side_by_side_text(both), both["ratio_median"], both["ratio_median"] >= 1.0)
    at_mid = _value(r, served_key, mid, "throughput")
    alone = _value(r, engine_key, 1, "throughput")
    if at_mid is None or alone is None:
        return None
    why = f"; side by side failed: {both['error']}" if both else ""
    ratio = at_mid / alone
    return _row(goal, ">= 1.0x", f"{at_mid:.2f} vs {alone:.2f} img/s, separate points minutes apart{why}",
                ratio, ratio >= 1.0)


def side_by_side_text(both: dict[str, Any]) -> str:
    """What one side-by-side comparison measured (bench.paired.side_by_side), in a phrase."""
    other, base = statistics.median(both["other_img_s"]), statistics.median(both["base_img_s"])
    cpu = ""
    if both.get("other_cpu_ms_per_image") and both.get("base_cpu_ms_per_image"):
        cpu = f"; CPU per image {both['other_cpu_ms_per_image']:.2f} vs {both['base_cpu_ms_per_image']:.2f} ms"
    return (f"{other:.2f} vs {base:.2f} img/s (medians), {both['rounds']} alternating rounds, "
            f"per-round ratios {both['ratio_min']:.3f} to {both['ratio_max']:.3f}{cpu}")


def memory_rows(r: dict[str, Any]) -> list[str]:
    """Resident memory of every server process a system started, after its measurements."""
    lines = []
    for key, s in r["systems"].items():
        if s["status"] != "ok":
            continue
        details = s.get("details", {})
        for server, mem in (details.get("memory_mib") or {}).items():
            engine = next((e for e in details.get("served_engines", []) if e.startswith(f"{server}:")), "")
            lines.append(f"| `{key}` | {server} | {engine.partition(': ')[2] or '-'} | {mem['rss_mib']:.0f} | "
                         f"{mem['peak_mib']:.0f} |")
    return lines


def markdown(model: str, r: dict[str, Any], machine: dict[str, Any]) -> list[str]:
    """The goals table and the memory table of one model, for the run's README."""
    out = [f"CPU serving goals, judged from this run ({model}):", "",
           "| goal | target | measured | ratio | verdict |", "|---|---|---|---:|---|"]
    for g in evaluate(model, r, machine):
        ratio = "-" if g["ratio"] is None else f"{g['ratio']:.3f}x"
        out.append(f"| {g['goal']} | {g['target']} | {g['measured']} | {ratio} | {g['verdict']} |")
    memory = memory_rows(r)
    if memory:
        out += ["", "Resident memory of each server after its measurements (MiB; peak = VmHWM):", "",
                "| system | server | engine | RSS | peak |", "|---|---|---|---:|---:|", *memory]
    return out + [""]
