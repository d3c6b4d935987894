"""Fit a bundle's calibration (temperature, abstention thresholds, image-embedding statistics) on
labelled images and write it beside the manifest.

`python -m engines.build calibrate --bundle bundles/demo-synthetic-1 [--calibration DIR]`

Data: the demo generator for demo and test bundles (one label set per modality), otherwise a
folder with one subfolder of images per class, named by the label (one label set: the folder).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.optimize import minimize_scalar
from sklearn.covariance import LedoitWolf

from engines.build import synthetic
from engines.build.quantize import IMAGE_SUFFIXES, _image_transform
from engines.runtime import manifest as mf
from engines.runtime.bundle import TOWER_TENSORS, Bundle, load_bundle
from engines.runtime.calibration import CALIBRATION_NAME, DEFAULT_SCOPE, Calibration, Scope, nearest_distance
from engines.runtime.onnx import OnnxRuntimeEngine
from engines.runtime.text import TextTokenizer

log = logging.getLogger(__name__)

CALIBRATION_SEED = 1002  # generator data set of the demo calibration; never used for training or evaluation
PER_CLASS = 40  # demo calibration images per class (14 classes -> 560)
TEMPLATE = "{}"  # the prompt template calibrated: the label alone
OOD_QUANTILE = 0.99  # in-distribution images scoring above the threshold: 1 % of them, by design
MIN_PROBABILITY = 0.5  # abstain unless the best calibrated probability says "more likely right than wrong"
FOLDS = 5  # thresholds are set on out-of-fold scores: images the statistics were not fitted on
ECE_BINS = 15


class CalibrateError(RuntimeError):
    """Calibration data is missing or unusable."""


@dataclasses.dataclass(frozen=True)
class LabelledImages:
    """Preprocessed images with labels, and the label sets to calibrate."""

    images: np.ndarray  # float32 [N, 3, H, W]
    labels: np.ndarray  # int [N], index into classes
    classes: tuple[str, ...]
    label_sets: dict[str, tuple[str, ...]]  # name -> class names
    description: str


def demo_images(bundle: Bundle, per_class: int = PER_CLASS, seed: int = CALIBRATION_SEED) -> LabelledImages:
    """Generator images of every class; one label set per modality."""
    transform = _image_transform(bundle.manifest.image)
    images, labels = synthetic.generate(seed, per_class * synthetic.NUM_CLASSES)
    sets: dict[str, list[str]] = {}
    for finding in synthetic.FINDINGS:
        sets.setdefault(finding.modality, []).append(finding.label)
    return LabelledImages(
        images=np.stack([transform(Image.fromarray(im)) for im in images]),
        labels=labels, classes=synthetic.CLASS_LABELS, label_sets={k: tuple(v) for k, v in sets.items()},
        description=f"synthetic generator seed {seed}, {per_class} images per class",
    )


def folder_images(bundle: Bundle, folder: Path) -> LabelledImages:
    """Images in one subfolder per class (the subfolder's name is the label)."""
    folder = Path(folder)
    paths = sorted(p for p in folder.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    classes = tuple(sorted({p.parent.name for p in paths}))
    counts = {c: sum(p.parent.name == c for p in paths) for c in classes}
    if len(classes) < 2 or min(counts.values()) < FOLDS:
        raise CalibrateError(f"calibration folder {folder} needs at least 2 class subfolders with at least "
                             f"{FOLDS} images each ({', '.join(IMAGE_SUFFIXES)}); found {counts or 'none'}")
    transform = _image_transform(bundle.manifest.image)
    return LabelledImages(
        images=np.stack([transform(Image.open(p).convert("RGB")) for p in paths]),
        labels=np.array([classes.index(p.parent.name) for p in paths]), classes=classes,
        label_sets={folder.name: classes},
        description=f"folder {folder.name}: {len(paths)} images in {len(classes)} classes",
    )


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def embed(bundle: Bundle, data: LabelledImages, threads: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Unit image embeddings [N, D] and unit class-prompt embeddings [K, D] from the fp32 graphs."""
    engines = {
        tower: OnnxRuntimeEngine(bundle.engine_file(tower), input_name=TOWER_TENSORS[tower][0],
                                 output_name=TOWER_TENSORS[tower][1], precision=mf.FP32, intra_op_threads=threads)
        for tower in mf.TOWERS
    }
    images = np.concatenate([engines["vision"].infer(data.images[i:i + 64]) for i in range(0, len(data.images), 64)])
    ids = TextTokenizer(bundle.path, bundle.manifest.text).ids([TEMPLATE.replace("{}", c) for c in data.classes])
    return _unit(images), _unit(engines["text"].infer(ids))


def fit_statistics(vectors: np.ndarray, labels: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Class centroids [K, D] and the precision matrix [D, D] of the shared within-class covariance."""
    centroids = np.stack([vectors[labels == c].mean(axis=0) for c in range(classes)])
    covariance = LedoitWolf(assume_centered=True).fit(vectors - centroids[labels])
    return centroids.astype(np.float32), covariance.precision_.astype(np.float32)


def out_of_fold_scores(vectors: np.ndarray, labels: np.ndarray, classes: int,
                       rows_per_set: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """For each label set, the scores of its own classes' images under statistics fitted without them."""
    folds = np.zeros(len(labels), int)
    for c in range(classes):  # stratified: every fold holds every class
        idx = np.flatnonzero(labels == c)
        folds[idx] = np.arange(len(idx)) % FOLDS
    scores = {name: np.zeros(len(labels)) for name in rows_per_set}
    for k in range(FOLDS):
        centroids, precision = fit_statistics(vectors[folds != k], labels[folds != k], classes)
        held = folds == k
        for name, rows in rows_per_set.items():
            scores[name][held] = nearest_distance(vectors[held], centroids[rows], precision)
    return {name: scores[name][np.isin(labels, rows)] for name, rows in rows_per_set.items()}


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """Temperature minimising the negative log-likelihood of softmax(logits / T) (Guo et al. 2017)."""
    def nll(log_t: float) -> float:
        z = logits / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        return float(-(z[np.arange(len(targets)), targets] - np.log(np.exp(z).sum(axis=1))).mean())

    return float(np.exp(minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded").x))


def expected_calibration_error(probabilities: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of the top-1 answer: confidence vs accuracy in equal-width confidence bins, weighted."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    return float(sum(abs(confidence[which == b].mean() - correct[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))


def calibrate(bundle: Bundle, data: LabelledImages, *, ood_quantile: float = OOD_QUANTILE,
              min_probability: float = MIN_PROBABILITY, threads: int = 2) -> Calibration:
    """Fit the calibration of `bundle` on `data`: per label set (and for the bundle as a whole) a
    temperature, an out-of-distribution threshold and the abstention probability."""
    vectors, prompts = embed(bundle, data, threads)
    k = len(data.classes)
    centroids, precision = fit_statistics(vectors, data.labels, k)
    sets = {DEFAULT_SCOPE: data.classes} | dict(data.label_sets)
    rows = {name: np.array([data.classes.index(c) for c in labels]) for name, labels in sets.items()}
    held_scores = out_of_fold_scores(vectors, data.labels, k, rows)
    scopes, report = [], {}
    for name, labels in sets.items():
        mine = np.isin(data.labels, rows[name])
        targets = np.array([list(rows[name]).index(y) for y in data.labels[mine]])  # label-set positions
        logits = bundle.manifest.logit_scale * vectors[mine] @ prompts[rows[name]].T  # [n, len(labels)]
        temperature = fit_temperature(logits, targets)
        before, after = softmax_rows(logits), softmax_rows(logits / temperature)
        threshold = float(np.quantile(held_scores[name], ood_quantile))
        scopes.append(Scope(name=name, template=TEMPLATE, labels=tuple(labels), temperature=temperature,
                            ood_threshold=threshold, min_probability=min_probability, fitted_on=int(mine.sum())))
        report[name] = {
            "images": int(mine.sum()),
            "top1": round(float((before.argmax(1) == targets).mean()), 4),
            "ece_before": round(expected_calibration_error(before, targets), 4),
            "ece_after": round(expected_calibration_error(after, targets), 4),
            "low_confidence_rate": round(float((after.max(1) < min_probability).mean()), 4),
        }
        log.info("calibrated %s: %s labels, temperature %.3f, ood threshold %.3f, %s", name, len(labels),
                 temperature, threshold, report[name])
    version = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Calibration(bundle_id=bundle.bundle_id, version=version,
                       data=f"{data.description}; out-of-distribution quantile {ood_quantile}",
                       classes=tuple(data.classes), centroids=centroids, precision=precision,
                       scopes=tuple(scopes), report=report)


def calibrate_bundle(bundle_dir: Path, folder: Path | None = None, *, ood_quantile: float = OOD_QUANTILE,
                     min_probability: float = MIN_PROBABILITY, per_class: int = PER_CLASS,
                     threads: int = 2) -> Path:
    """Calibrate a built bundle and write `calibration.json` beside its manifest."""
    bundle = load_bundle(bundle_dir)
    if folder is not None:
        data = folder_images(bundle, folder)
    elif bundle.manifest.kind in (mf.KIND_DEMO, mf.KIND_TEST):
        data = demo_images(bundle, per_class)
    else:
        raise CalibrateError(f"{bundle.manifest.model} needs labelled images of its own domain: pass "
                             "--calibration DIR (one subfolder of images per label)")
    calibration = calibrate(bundle, data, ood_quantile=ood_quantile, min_probability=min_probability,
                            threads=threads)
    return calibration.write(bundle.path / CALIBRATION_NAME)
