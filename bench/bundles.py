"""Bundles to benchmark: reuse bundles/<model>-<version>, or build them with `python -m engines.build`."""

from __future__ import annotations

import dataclasses
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

from engines.runtime.bundle import find_bundle

log = logging.getLogger("bench.bundles")

# "2026-01-01 12:00:00,000 ERROR engines.build: " before a logged message
LOG_PREFIX = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ [\w.]+: ")
FALLBACKS = {"demo": "tiny"}  # a model that cannot be built is replaced by this one, with the reason recorded


class BundleUnavailable(RuntimeError):
    """The model's bundle neither exists nor can be built here."""


@dataclasses.dataclass(frozen=True)
class ModelChoice:
    """A model asked for and the bundle that will stand for it."""

    asked: str
    model: str  # the model actually benchmarked (differs from `asked` after a fallback)
    bundle: Path
    built_s: float | None  # seconds the build took; None when an existing bundle was reused
    note: str = ""


def ensure_bundle(bundles: Path, model: str, root: Path,
                  timeout_s: float = 900.0) -> tuple[Path, float | None]:
    """The model's bundle, built first if there is none. Raises BundleUnavailable with the build's reason."""
    existing = find_bundle(bundles, model)
    if existing is not None:
        return existing, None
    log.info("building bundle %s into %s (biomedclip-arch takes about 70 s)", model, bundles)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "engines.build", "--model", model, "--out", str(bundles)],
            cwd=root, capture_output=True, text=True, timeout=timeout_s, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BundleUnavailable(f"building {model} took longer than {timeout_s:.0f} s") from exc
    built = find_bundle(bundles, model)
    if proc.returncode != 0 or built is None:
        lines = [line for line in (proc.stderr or "").splitlines() if line.strip()]
        reason = LOG_PREFIX.sub("", lines[-1]) if lines else f"exit status {proc.returncode}"
        reason = reason.replace(f"{root}/", "")  # repository paths, relative
        raise BundleUnavailable(f"`python -m engines.build --model {model}` failed: {reason}")
    return built, time.perf_counter() - start


def choose(bundles: Path, models: list[str], root: Path) -> tuple[list[ModelChoice], list[dict[str, str]]]:
    """Resolve every model asked for to a bundle; returns the choices and the models left out (with why)."""
    chosen: list[ModelChoice] = []
    left_out: list[dict[str, str]] = []
    for asked in models:
        try:
            path, took = ensure_bundle(bundles, asked, root)
            chosen.append(ModelChoice(asked, asked, path, took))
            continue
        except BundleUnavailable as exc:
            reason = str(exc)
        fallback = FALLBACKS.get(asked)
        if fallback and fallback not in models and all(c.model != fallback for c in chosen):
            log.warning("%s; benchmarking %s instead", reason, fallback)
            try:
                path, took = ensure_bundle(bundles, fallback, root)
                chosen.append(ModelChoice(asked, fallback, path, took, note=f"{asked} unavailable: {reason}"))
                continue
            except BundleUnavailable as exc:
                reason = f"{reason}; fallback {fallback}: {exc}"
        log.warning("model %s left out: %s", asked, reason)
        left_out.append({"model": asked, "reason": reason})
    return chosen, left_out


@dataclasses.dataclass(frozen=True)
class Int8Bundle:
    """A bundle that serves an int8 vision engine, and where that engine came from."""

    path: Path
    gated: bool  # False: random weights, made for speed only (the gate cannot judge such a model)
    note: str
    built_s: float | None = None


def _has_int8_vision(bundle_dir: Path) -> bool:
    from engines.runtime import manifest as mf

    return any(e.role == "vision" and e.precision == mf.INT8 for e in mf.Manifest.read(bundle_dir).files.values())


def _copy_bundle(src: Path, dst: Path) -> None:
    """A copy of a bundle to amend without touching the original: files hard-linked where the file
    system allows (amending replaces files, it never writes into them), copied otherwise."""
    import os
    import shutil

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link_or_copy, ignore=shutil.ignore_patterns(".*"))


def _add_speed_only_int8(bundle_dir: Path, work: Path) -> str:
    """Random-weight bundles: dynamic int8 of the vision graph, the scheme the demo model's gate
    keeps, added WITHOUT the precision gate (random weights cannot be judged; the gate refuses
    them), with the golden tolerance it measures. Returns what it did."""
    from engines.build import gate, quantize
    from engines.build.amend import amend_bundle
    from engines.runtime import manifest as mf
    from engines.runtime.bundle import golden_cosine, load_bundle

    bundle = load_bundle(bundle_dir)
    prepared = quantize.prepare_graph(bundle.engine_file("vision"), work / "vision.prepared.onnx")
    graph = quantize.quantize_dynamic_graph(prepared, work / "vision.int8.onnx")
    engine = quantize.open_cpu(graph, "vision", mf.INT8, 2)
    try:
        worst = golden_cosine(bundle.golden(), "vision", engine.infer_all)
    finally:
        engine.close()
    entry = mf.FileEntry(sha256="", role="vision", precision=mf.INT8, scheme=mf.SCHEME_DYNAMIC,
                         golden_min_cosine=gate.golden_tolerance(worst))
    amend_bundle(bundle_dir, {"vision.int8.onnx": (graph, entry)},
                 build=lambda record: record.__setitem__("precision", {"ungated": "speed measurement only"}))
    return (f"random weights: the precision gate cannot judge int8 on them (it refuses it), so this run "
            f"made an ungated dynamic int8 vision graph to measure speed only (golden cosine {worst:.4f})")


def int8_bundle(bundle_dir: Path, kind: str, workdir: Path, root: Path, timeout_s: float = 1800.0) -> Int8Bundle:
    """A bundle serving an int8 vision engine: the bundle itself if it has one; otherwise a copy in
    `workdir` given one by the gated build step (`python -m engines.build quantize`), or for a
    random-weight benchmark bundle an ungated one for speed only. BundleUnavailable with the gate's
    reasons when the gate keeps none. The original bundle is never changed."""
    from engines.runtime import manifest as mf

    if _has_int8_vision(bundle_dir):
        return Int8Bundle(bundle_dir, True, "the bundle's own int8 vision engine (kept by its precision gate)")
    copy = workdir / f"{bundle_dir.name}-int8"
    _copy_bundle(bundle_dir, copy)
    start = time.perf_counter()
    if kind == mf.KIND_BENCHMARK:
        scratch = workdir / "int8-scratch"
        scratch.mkdir(exist_ok=True)
        note = _add_speed_only_int8(copy, scratch)
        return Int8Bundle(copy, False, note, time.perf_counter() - start)
    log.info("quantizing a copy of %s with the precision gate (the demo model takes a few minutes)", bundle_dir.name)
    command = [sys.executable, "-m", "engines.build", "quantize", "--bundle", str(copy)]
    try:
        proc = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BundleUnavailable(f"quantizing took longer than {timeout_s:.0f} s") from exc
    if proc.returncode != 0 or not _has_int8_vision(copy):
        kept = [LOG_PREFIX.sub("", line) for line in (proc.stderr or "").splitlines()
                if "not kept vision" in line or "Error" in line]
        raise BundleUnavailable("the precision gate kept no int8 vision engine: "
                                + ("; ".join(kept) or f"exit status {proc.returncode}"))
    return Int8Bundle(copy, True, "int8 vision engine kept by the precision gate "
                      "(`python -m engines.build quantize` on a copy of the bundle, for this run)",
                      time.perf_counter() - start)
