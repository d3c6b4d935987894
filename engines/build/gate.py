"""The precision gate: a reduced-precision engine is kept only if it answers like fp32 on held-out data.

Random or collapsed embeddings make a plain cosine meaningless (an untrained BERT gives
~0.99 between any two texts), so the gate judges what a clinician would see: zero-shot top-1
answers (agreement with fp32, and accuracy where labels exist), plus the cosine to fp32 after
subtracting the mean fp32 embedding, per tower.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from engines.runtime.bundle import golden_cosine, row_cosines
from engines.runtime.manifest import PrecisionGate

Infer = Callable[[np.ndarray], np.ndarray]  # [N, ...] engine input -> [N, D] embeddings

# Golden tolerance recorded for a gated engine: twice its measured golden error, at least
# GOLDEN_MIN_MARGIN below what it measured; an engine whose tolerance would fall below the
# gate's golden_floor is refused.
GOLDEN_MIN_MARGIN = 0.002


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """Held-out inputs the gate runs through both engines."""

    images: np.ndarray  # float32 [N, 3, H, W], preprocessed exactly as the vision encoder does
    prompt_sets: tuple[np.ndarray, ...]  # each int64 [C, L]: one prompt per class, one set per template
    templates: tuple[str, ...]  # template of each prompt set, for reports
    texts: np.ndarray  # int64 [T, L]: texts for the text tower's cosine (captions, reports)
    labels: np.ndarray | None  # int64 [N] class of each image, or None where no ground truth exists
    description: str  # where the data came from, for the manifest


@dataclasses.dataclass(frozen=True)
class Embeddings:
    """Outputs of one pair of engines on an EvalSet (not normalized)."""

    images: np.ndarray  # [N, D]
    prompts: tuple[np.ndarray, ...]  # each [C, D]
    texts: np.ndarray  # [T, D]


@dataclasses.dataclass(frozen=True)
class TowerScore:
    """One tower's outputs against fp32's on the held-out inputs."""

    centred_mean: float  # mean row cosine after subtracting the fp32 mean embedding
    centred_p01: float  # 1st percentile of the same
    centred_min: float
    plain_min: float


@dataclasses.dataclass(frozen=True)
class GateReport:
    """The verdict on one candidate (one engine per tower; the other tower may be the reference)."""

    name: str
    images: int
    agreement: float  # worst over templates: share of images whose top-1 equals fp32's
    top1_reference: float | None  # worst template's fp32 accuracy (None without labels)
    top1_candidate: float | None
    towers: dict[str, TowerScore]  # only the towers the candidate replaces
    golden: dict[str, float]  # tower -> lowest golden cosine (plain or centred) vs torch fp32
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def top1_drop(self) -> float | None:
        if self.top1_reference is None or self.top1_candidate is None:
            return None
        return self.top1_reference - self.top1_candidate

    def summary(self) -> str:
        """One line for logs: the figures the gate judged, then the verdict."""
        parts = [f"{self.name}: agreement {100 * self.agreement:.2f} % on {self.images} images"]
        if self.top1_drop is not None:
            parts.append(f"top-1 {100 * self.top1_reference:.1f} -> {100 * self.top1_candidate:.1f} %")
        parts += [f"{tower} centred cosine {s.centred_mean:.4f} (p01 {s.centred_p01:.4f})"
                  for tower, s in self.towers.items()]
        parts += [f"{tower} golden {c:.4f}" for tower, c in self.golden.items()]
        verdict = "PASS" if self.passed else "FAIL: " + "; ".join(self.failures)
        return ", ".join(parts) + " -> " + verdict

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures (rounded) for the manifest's build record."""
        def r(x: float | None) -> float | None:
            return None if x is None else round(float(x), 5)

        return {
            "images": self.images,
            "agreement": r(self.agreement),
            "top1_reference": r(self.top1_reference),
            "top1_candidate": r(self.top1_candidate),
            "top1_drop": r(self.top1_drop),
            "towers": {t: {k: r(v) for k, v in dataclasses.asdict(s).items()} for t, s in self.towers.items()},
            "golden": {t: r(c) for t, c in self.golden.items()},
            "passed": self.passed,
            "failures": list(self.failures),
        }


def embed(data: EvalSet, vision: Infer, text: Infer) -> Embeddings:
    """Run the held-out inputs through one vision and one text engine."""
    return Embeddings(
        images=vision(data.images),
        prompts=tuple(text(p) for p in data.prompt_sets),
        texts=text(data.texts),
    )


def _normalize(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)


def zero_shot(images: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    """Top-1 class of each image: argmax of cosine to each class prompt -> int64 [N]."""
    return (_normalize(images) @ _normalize(prompts).T).argmax(axis=1)


def tower_score(reference: np.ndarray, candidate: np.ndarray) -> TowerScore:
    """Row cosines of candidate vs reference outputs, plain and centred on the reference mean."""
    centre = reference.mean(axis=0, keepdims=True)  # [1, D]
    centred = row_cosines(candidate - centre, reference - centre)  # [N]
    return TowerScore(
        centred_mean=float(centred.mean()),
        centred_p01=float(np.percentile(centred, 1)),
        centred_min=float(centred.min()),
        plain_min=float(row_cosines(candidate, reference).min()),
    )


def golden_tolerance(worst: float) -> float:
    """The golden bound recorded for an engine that measured `worst` at build time."""
    error = max(0.0, 1.0 - worst)
    return float(np.floor(min(worst - GOLDEN_MIN_MARGIN, 1.0 - 2.0 * error) * 1e4) / 1e4)


def judge(
    name: str,
    data: EvalSet,
    reference: Embeddings,
    gate: PrecisionGate,
    *,
    vision: Infer | None = None,
    text: Infer | None = None,
    golden: dict[str, np.ndarray] | None = None,
) -> GateReport:
    """Judge a candidate engine for one or both towers against the fp32 reference outputs.

    A tower without a candidate uses the reference outputs, so a vision engine is judged with
    fp32 text and the other way round; passing both gives the combination a service pair serves.
    With `golden` (the bundle's golden.npz), each candidate tower also runs the golden inputs and
    must leave a usable load-time tolerance (golden_tolerance >= gate.golden_floor).
    """
    images = vision(data.images) if vision is not None else reference.images
    prompts = tuple(text(p) for p in data.prompt_sets) if text is not None else reference.prompts
    texts = text(data.texts) if text is not None else reference.texts
    failures: list[str] = []
    towers: dict[str, TowerScore] = {}
    if vision is not None:
        towers["vision"] = tower_score(reference.images, images)
    if text is not None:
        towers["text"] = tower_score(np.concatenate([reference.texts, *reference.prompts]),
                                     np.concatenate([texts, *prompts]))
    for arr in (images, texts, *prompts):
        if not np.isfinite(arr).all():
            failures.append("non-finite outputs")
            break

    agreements, top1_ref, top1_cand = [], [], []
    for template, ref_prompts, cand_prompts in zip(data.templates, reference.prompts, prompts):
        ref_pred = zero_shot(reference.images, ref_prompts)
        cand_pred = zero_shot(images, cand_prompts)
        agreements.append((float((ref_pred == cand_pred).mean()), template))
        if data.labels is not None:
            top1_ref.append(float((ref_pred == data.labels).mean()))
            top1_cand.append(float((cand_pred == data.labels).mean()))
    agreement, worst_template = min(agreements)
    if agreement < gate.min_agreement:
        failures.append(f"zero-shot answers agree with fp32 on {100 * agreement:.2f} % of {len(images)} images "
                        f"(template {worst_template!r}), need >= {100 * gate.min_agreement:.2f} %")
    reference_top1 = candidate_top1 = None
    if data.labels is not None:
        drops = [r - c for r, c in zip(top1_ref, top1_cand)]
        worst = int(np.argmax(drops))
        reference_top1, candidate_top1 = top1_ref[worst], top1_cand[worst]
        if drops[worst] > gate.max_top1_drop + 1e-12:
            failures.append(f"zero-shot top-1 drops {100 * drops[worst]:.2f} points "
                            f"({100 * reference_top1:.1f} -> {100 * candidate_top1:.1f} %, template "
                            f"{data.templates[worst]!r}), allowed {100 * gate.max_top1_drop:.2f}")
    for tower, score in towers.items():
        if not score.centred_mean >= gate.min_centred_cosine:
            failures.append(f"{tower} centred cosine to fp32 {score.centred_mean:.4f} "
                            f"< {gate.min_centred_cosine}")

    golden_scores: dict[str, float] = {}
    if golden is not None:
        for tower, infer in (("vision", vision), ("text", text)):
            if infer is None:
                continue
            worst_golden = golden_cosine(golden, tower, infer)
            golden_scores[tower] = worst_golden
            if not golden_tolerance(worst_golden) >= gate.golden_floor:
                failures.append(f"{tower} golden cosine {worst_golden:.4f} leaves a load-time tolerance "
                                f"below {gate.golden_floor}")
    return GateReport(
        name=name,
        images=len(images),
        agreement=agreement,
        top1_reference=reference_top1,
        top1_candidate=candidate_top1,
        towers=towers,
        golden=golden_scores,
        failures=tuple(failures),
    )
