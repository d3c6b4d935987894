"""Bundles to benchmark: reuse bundles/<model>-<version>, or build them with `python -m engines.build`."""

from __future__ import annotations

import dataclasses
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

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


def find_bundle(bundles: Path, model: str) -> Path | None:
    """The newest bundles/<model>-<version> directory with a manifest."""
    found = sorted(bundles.glob(f"{model}-*/manifest.json"), key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else None


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
