"""Calibration of a bundle: temperatures, abstention thresholds and image-embedding statistics.

Written by the build half's `calibrate` command (`make calibrate`) beside the bundle's manifest
(`calibration.json`), read by the gateway. It is not listed in the manifest, so calibrating never changes the bundle id;
instead the file names the bundle id it was fitted for and carries the sha256 of its own content,
and a reader refuses it for any other bundle or when the hash does not match.

Scopes: one per calibrated label set (the labels and template it was fitted on) plus the bundle-wide
default used for any other labels. A named label set of the gateway maps onto a scope by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
CALIBRATION_NAME = "calibration.json"
DEFAULT_SCOPE = "bundle"

# Out-of-distribution score: Mahalanobis distance of the L2-normalised image embedding to the
# nearest class centroid among the scope's labels, with one covariance shared by all classes
# (Ledoit-Wolf shrinkage). See README "When not to trust an answer" for the measurement behind it.
OOD_METHOD = "nearest-centroid-mahalanobis"


class CalibrationError(ValueError):
    """The calibration file is missing, malformed, tampered with or made for another bundle."""


@dataclasses.dataclass(frozen=True)
class Scope:
    """Calibration of one label set (or of the bundle, for labels no scope covers)."""

    name: str
    template: str  # the prompt template it was fitted with ("{}" = the label alone)
    labels: tuple[str, ...]  # class names whose centroids define the in-distribution region
    temperature: float  # calibrated probabilities = softmax(logit_scale * cosine / temperature)
    ood_threshold: float  # a score above it is out of distribution
    min_probability: float  # abstain when the highest calibrated probability is below it
    fitted_on: int  # calibration images of these labels


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Everything the gateway needs to say when an answer should not be trusted."""

    bundle_id: str
    version: str  # when it was made (UTC, ISO 8601): two calibrations of one bundle differ by it
    data: str  # what it was fitted on, in words
    classes: tuple[str, ...]  # class names, the rows of `centroids`
    centroids: np.ndarray  # float32 [K, D], mean unit embedding of each class
    precision: np.ndarray  # float32 [D, D], inverse of the shared within-class covariance
    scopes: tuple[Scope, ...]  # the bundle-wide default (name DEFAULT_SCOPE) first
    report: dict[str, Any]  # figures measured when it was fitted (ECE before/after, flag rates)
    method: str = OOD_METHOD
    format_version: int = FORMAT_VERSION

    def payload(self) -> dict[str, Any]:
        """The hashed content: everything but the hash."""
        return {
            "format_version": self.format_version,
            "bundle_id": self.bundle_id,
            "version": self.version,
            "data": self.data,
            "method": self.method,
            "classes": list(self.classes),
            "centroids": np.asarray(self.centroids, np.float32).tolist(),
            "precision": np.asarray(self.precision, np.float32).tolist(),
            "scopes": [dataclasses.asdict(s) | {"labels": list(s.labels)} for s in self.scopes],
            "report": self.report,
        }

    @property
    def sha256(self) -> str:
        return _digest(self.payload())

    @property
    def calibration_id(self) -> str:
        """Short identity shown with every answer: bundle id, version and content hash."""
        return f"{self.bundle_id}/{self.version}+{self.sha256[:12]}"

    def default(self) -> Scope:
        return self.scopes[0]

    def scope_for(self, labels: list[str], template: str) -> Scope:
        """The scope fitted on exactly these labels (any order) and template, else the default."""
        wanted = set(labels)
        for scope in self.scopes[1:]:
            if scope.template == template and set(scope.labels) == wanted:
                return scope
        return self.default()

    def scope_named(self, name: str) -> Scope | None:
        """The scope of a named label set, if one was calibrated."""
        return next((s for s in self.scopes if s.name == name), None)

    def class_rows(self, labels: tuple[str, ...]) -> np.ndarray:
        """Row indices of `labels` in `centroids`."""
        return np.array([self.classes.index(label) for label in labels])

    def write(self, path: Path) -> Path:
        """Write atomically (temporary file, then rename) as JSON with the content hash."""
        path = Path(path)
        data = self.payload() | {"sha256": self.sha256}
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data, sort_keys=True) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, path: Path, bundle_id: str | None = None) -> Calibration:
        """Read and verify: format, content hash and, when given, the bundle it belongs to."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise CalibrationError(f"no calibration file at {path}") from exc
        except (OSError, json.JSONDecodeError) as exc:
            raise CalibrationError(f"calibration file {path.name} is not readable JSON") from exc
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            raise CalibrationError(f"calibration file {path.name}: unsupported format, expected version "
                                   f"{FORMAT_VERSION}")
        stated = data.pop("sha256", None)
        if stated != _digest(data):
            raise CalibrationError(f"calibration file {path.name} does not match its sha256")
        try:
            classes = tuple(data["classes"])
            centroids = np.asarray(data["centroids"], np.float32)
            precision = np.asarray(data["precision"], np.float32)
            scopes = tuple(Scope(**(s | {"labels": tuple(s["labels"])})) for s in data["scopes"])
            calibration = cls(bundle_id=data["bundle_id"], version=data["version"], data=data["data"],
                              classes=classes, centroids=centroids, precision=precision, scopes=scopes,
                              report=data["report"], method=data["method"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(f"calibration file {path.name} is malformed: {exc}") from exc
        if calibration.method != OOD_METHOD:
            raise CalibrationError(f"calibration file {path.name}: unknown method {calibration.method!r}")
        dim = centroids.shape[1] if centroids.ndim == 2 else -1
        if centroids.shape != (len(classes), dim) or precision.shape != (dim, dim) or not scopes \
                or scopes[0].name != DEFAULT_SCOPE or any(set(s.labels) - set(classes) for s in scopes):
            raise CalibrationError(f"calibration file {path.name} is inconsistent (shapes, scopes or classes)")
        if bundle_id is not None and calibration.bundle_id != bundle_id:
            raise CalibrationError(f"calibration was fitted for bundle {calibration.bundle_id}, not {bundle_id}; "
                                   "calibrate this bundle (make calibrate)")
        return calibration


def nearest_distance(vectors: np.ndarray, centroids: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """[N] Mahalanobis distance of each unit-length row of `vectors` [N, D] to its nearest row of
    `centroids` [K, D] under the shared `precision` matrix [D, D]: the out-of-distribution score."""
    diff = vectors[:, None, :] - centroids[None, :, :]  # [N, K, D]
    squared = np.einsum("nkd,de,nke->nk", diff, precision, diff)  # [N, K]
    return np.sqrt(np.maximum(squared.min(axis=1), 0.0))


def _digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
