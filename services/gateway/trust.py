"""When not to trust a zero-shot answer: calibrated probabilities, an out-of-distribution score and
the abstain decision, from a bundle's calibration. Plain functions and objects; no gRPC."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from engines.runtime.calibration import Calibration, CalibrationError, Scope, nearest_distance
from services.domain import Inconsistent
from services.gateway.labels.files import LabelSet
from services.gateway.labels.search import softmax

# Why an answer is withheld ("" when it is not).
OUT_OF_DISTRIBUTION = "out_of_distribution"
LOW_CONFIDENCE = "low_confidence"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The trust assessment of one image against one list of labels."""

    calibrated: np.ndarray  # [N_labels] calibrated probabilities, request order, sum to 1
    ood_score: float  # distance to the nearest in-distribution class centroid (larger = stranger)
    ood_threshold: float
    min_probability: float
    temperature: float
    scope: str  # the calibrated label set used, or "bundle"
    calibration_id: str
    abstain: bool
    reason: str  # OUT_OF_DISTRIBUTION, LOW_CONFIDENCE or ""


class Trust:
    """Judges answers with one bundle's calibration."""

    def __init__(self, calibration: Calibration) -> None:
        self.calibration = calibration
        self._rows = {s.name: calibration.class_rows(s.labels) for s in calibration.scopes}

    @classmethod
    def load(cls, path: str | Path, bundle_id: str) -> Trust:
        """Read the calibration file; Inconsistent when it is unusable or made for another bundle."""
        try:
            return cls(Calibration.read(Path(path), bundle_id))
        except CalibrationError as exc:
            raise Inconsistent(str(exc)) from exc

    def scope(self, label_set: LabelSet) -> Scope:
        """The scope that judges answers over a set: for the labels of a request, the one fitted on
        exactly these labels (any order) and this template; for a served set, its own by
        name@version; else the bundle's."""
        if label_set.transient:
            return self.calibration.scope_for([label.name for label in label_set.labels], label_set.templates[0])
        return self.calibration.scope_named(label_set.ref) or self.calibration.default()

    def judge(self, cosine: np.ndarray, vector: np.ndarray, label_set: LabelSet, logit_scale: float) -> Verdict:
        """Assess one answer: `cosine` [N_labels] of the unit image embedding `vector` [D] against
        the labels of `label_set`, judged by its scope."""
        scope = self.scope(label_set)
        rows = self._rows[scope.name]
        score = float(nearest_distance(vector[None, :], self.calibration.centroids[rows], self.calibration.precision)[0])
        calibrated = softmax(logit_scale * cosine / scope.temperature)
        if score > scope.ood_threshold:
            reason = OUT_OF_DISTRIBUTION
        elif calibrated.max() < scope.min_probability:
            reason = LOW_CONFIDENCE
        else:
            reason = ""
        return Verdict(calibrated=calibrated, ood_score=score, ood_threshold=scope.ood_threshold,
                       min_probability=scope.min_probability, temperature=scope.temperature, scope=scope.name,
                       calibration_id=self.calibration.calibration_id, abstain=bool(reason), reason=reason)
