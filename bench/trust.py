"""Figures of the abstention feature on the demo bundle: ECE before and after calibration, top-1,
and how often in-distribution and foreign images are flagged out of distribution.

    python -m bench.trust [--bundle bundles/demo-synthetic-1] [--per-class 50] [--out FILE.json]

Images take the vision encoder's own decoding and preprocessing (medvlm.imaging) and
the fp32 ONNX graph in process; each answer is judged by the gateway's own code
(services.gateway.trust) with the bundle's calibration.json (`make calibrate` first).
Held-out images: generator seed 1000 (the demo's evaluation set), never used for training or
calibration. Foreign images: every other demo modality against each modality's label set;
noise, flat colours, stripes and the two photographs scikit-learn ships; the pixel data of
pydicom's bundled CT, MR, US and NM files.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import platform
import re
from pathlib import Path

import numpy as np
from PIL import Image

from engines.build import synthetic
from engines.build.calibrate import expected_calibration_error, softmax_rows
from engines.runtime import manifest as mf
from engines.runtime.bundle import TOWER_TENSORS, load_bundle
from engines.runtime.calibration import CALIBRATION_NAME, DEFAULT_SCOPE, nearest_distance
from engines.runtime.onnx import OnnxRuntimeEngine
from engines.runtime.text import TextTokenizer
from medvlm.imaging.preprocess import preprocess
from services.gateway.labels import transient_set
from services.gateway.trust import OUT_OF_DISTRIBUTION, Trust

EVAL_SEED = 1000
MEDICAL_MODALITIES = ("CT", "MR", "US", "NM")


def _png_roundtrip(image: Image.Image) -> Image.Image:
    """As a client sends it: PNG bytes, decoded again."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue()))


def foreign_images(seed: int = 0) -> list[Image.Image]:
    """Noise, flat colours, stripes and photographs: nothing a medical label set describes."""
    rng = np.random.default_rng(seed)
    out = [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(20)]
    out += [Image.fromarray(np.full((224, 224, 3), rng.integers(0, 256, 3), np.uint8)) for _ in range(10)]
    xx = np.mgrid[0:224, 0:224][1] / 224.0
    out += [Image.fromarray((255 * (0.5 + 0.5 * np.sin(xx[..., None] * rng.uniform(2, 40, 3))))
                            .astype(np.uint8)) for _ in range(10)]
    from sklearn.datasets import load_sample_images

    for photo in load_sample_images().images:  # china.jpg, flower.jpg: 427 x 640 photographs
        h, w = photo.shape[:2]
        out += [Image.fromarray(photo)] + [Image.fromarray(photo[y:y + h // 2, x:x + w // 2])
                                           for y in (0, h // 2) for x in (0, w // 2)]
    return out


def medical_images() -> list[tuple[str, Image.Image]]:
    """(modality:file, image) of pydicom's bundled files with pixel data, one frame each, windowed to
    the 1st-99th percentile, duplicates (the same pixels in another encoding) left out."""
    import warnings

    import pydicom

    logging.getLogger("pydicom").setLevel(logging.CRITICAL)  # files it has no codec for are skipped below
    warnings.filterwarnings("ignore", module="pydicom")
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    out, seen = [], set()
    for path in sorted(folder.rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path)
            if ds.get("Modality") not in MEDICAL_MODALITIES:
                continue
            pixels = ds.pixel_array
        except Exception:  # noqa: BLE001 - files pydicom cannot decode here (no codec) are skipped
            continue
        if pixels.ndim == 4 or (pixels.ndim == 3 and pixels.shape[-1] != 3):
            pixels = pixels[0]
        lo, hi = np.percentile(pixels, [1, 99])
        pixels = np.clip((pixels.astype(np.float64) - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
        digest = hashlib.sha256(pixels.tobytes()).hexdigest()
        if digest in seen or min(pixels.shape[:2]) < 32:
            continue
        seen.add(digest)
        out.append((f"{ds.Modality}:{path.name}", Image.fromarray(pixels)))
    return out


class Embedder:
    """Unit embeddings from the bundle's fp32 graphs, images preprocessed as the vision encoder does."""

    def __init__(self, bundle_dir: Path) -> None:
        self.bundle = load_bundle(bundle_dir)
        self.engines = {t: OnnxRuntimeEngine(self.bundle.engine_file(t), input_name=TOWER_TENSORS[t][0],
                                             output_name=TOWER_TENSORS[t][1], precision=mf.FP32, intra_op_threads=2)
                        for t in mf.TOWERS}
        self.tokenizer = TextTokenizer(self.bundle.path, self.bundle.manifest.text)

    @staticmethod
    def _unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def images(self, images: list[Image.Image]) -> np.ndarray:
        spec = self.bundle.manifest.image
        rows = [preprocess(_png_roundtrip(im), spec) for im in images]
        return self._unit(np.concatenate([self.engines["vision"].infer(np.stack(rows[i:i + 32]))
                                          for i in range(0, len(rows), 32)]))

    def texts(self, texts: list[str]) -> np.ndarray:
        return self._unit(self.engines["text"].infer(self.tokenizer.ids(texts)))


def measure(bundle_dir: Path, per_class: int) -> dict:
    embedder = Embedder(bundle_dir)
    manifest = embedder.bundle.manifest
    trust = Trust.load(bundle_dir / CALIBRATION_NAME, manifest.bundle_id)
    images, labels = synthetic.generate(EVAL_SEED, per_class * synthetic.NUM_CLASSES)
    held = embedder.images([Image.fromarray(im) for im in images])
    foreign = embedder.images(foreign_images())
    medical = medical_images()
    real = embedder.images([im for _, im in medical])
    prompts = embedder.texts(list(synthetic.CLASS_LABELS))
    results = {}
    for scope in trust.calibration.scopes:
        rows = np.array([synthetic.CLASS_LABELS.index(c) for c in scope.labels])
        mine = np.isin(labels, rows)
        targets = np.array([list(rows).index(y) for y in labels[mine]])

        def verdicts(vectors: np.ndarray, scope=scope, rows=rows):
            return [trust.judge(v @ prompts[rows].T, v, transient_set(scope.labels, "{}"), manifest.logit_scale)
                    for v in vectors]

        inside = verdicts(held[mine])
        raw = softmax_rows(manifest.logit_scale * held[mine] @ prompts[rows].T)
        calibrated = np.stack([v.calibrated for v in inside])
        assert all(v.scope == scope.name for v in inside), "the scope found must be the one measured"

        def flagged(vs):
            return round(float(np.mean([v.reason == OUT_OF_DISTRIBUTION for v in vs])), 4) if vs else None

        medical_verdicts = verdicts(real)
        results[scope.name] = {
            "labels": len(scope.labels), "held_out_images": int(mine.sum()),
            "top1_raw": round(float((raw.argmax(1) == targets).mean()), 4),
            "top1_calibrated": round(float((calibrated.argmax(1) == targets).mean()), 4),
            "ece_before": round(expected_calibration_error(raw, targets), 4),
            "ece_after": round(expected_calibration_error(calibrated, targets), 4),
            "temperature": round(scope.temperature, 4),
            "in_distribution_flagged_ood": flagged(inside),
            "in_distribution_low_confidence": round(float(np.mean([v.reason == "low_confidence" for v in inside])), 4),
            "other_modalities_flagged": flagged(verdicts(held[~mine])) if scope.name != DEFAULT_SCOPE else None,
            "other_modality_images": int((~mine).sum()),
            "noise_and_photos_flagged": flagged(verdicts(foreign)), "noise_and_photo_images": len(foreign),
            "medical_flagged": flagged(medical_verdicts), "medical_images": len(medical),
            "medical_not_flagged": [name for (name, _), v in zip(medical, medical_verdicts, strict=True)
                                    if v.reason != OUT_OF_DISTRIBUTION],
        }
    comparison = compare_scores(bundle_dir, trust, held, labels, prompts, foreign, real)
    cpu = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    return {"bundle_id": manifest.bundle_id, "calibration_id": trust.calibration.calibration_id,
            "held_out": f"generator seed {EVAL_SEED}, {per_class} per class",
            "cpu_flags": sorted(set(re.findall(r"avx512[a-z_0-9]*|avx2", cpu))), "machine": platform.machine(),
            "scopes": results, "score_comparison": comparison}


def compare_scores(bundle_dir: Path, trust: Trust, held: np.ndarray, labels: np.ndarray, prompts: np.ndarray,
                   foreign: np.ndarray, real: np.ndarray) -> dict:
    """The candidate out-of-distribution scores side by side, each thresholded so that
    `OOD_QUANTILE` of in-distribution calibration images pass: the best cosine to the labels, the
    Mahalanobis distance to the mean of all calibration images, and the served score (distance to
    the nearest class centroid of the label set). Distances are thresholded on out-of-fold scores."""
    from sklearn.covariance import LedoitWolf

    from engines.build import calibrate as cal

    bundle = load_bundle(bundle_dir)
    report = trust.calibration.report[DEFAULT_SCOPE]
    data = cal.demo_images(bundle, per_class=report["images"] // synthetic.NUM_CLASSES)
    vectors, _ = cal.embed(bundle, data)
    folds = np.arange(len(vectors)) % cal.FOLDS

    def mean_distance(train: np.ndarray, x: np.ndarray) -> np.ndarray:
        mean = train.mean(axis=0)
        return nearest_distance(x, mean[None, :], LedoitWolf().fit(train - mean).precision_)

    oof_mean = np.zeros(len(vectors))
    for k in range(cal.FOLDS):
        oof_mean[folds == k] = mean_distance(vectors[folds != k], vectors[folds == k])
    out = {}
    for scope in trust.calibration.scopes[1:]:
        rows = np.array([synthetic.CLASS_LABELS.index(c) for c in scope.labels])
        mine_cal, mine = np.isin(data.labels, rows), np.isin(labels, rows)
        sets = {"in_distribution": held[mine], "other_modalities": held[~mine], "noise_and_photos": foreign,
                "medical": real}
        cosine_threshold = np.quantile((vectors[mine_cal] @ prompts[rows].T).max(1), 1 - cal.OOD_QUANTILE)
        mean_threshold = np.quantile(oof_mean[mine_cal], cal.OOD_QUANTILE)
        centroids = trust.calibration.centroids[trust.calibration.class_rows(scope.labels)]
        candidates = {
            "best cosine to the labels": lambda x: (x @ prompts[rows].T).max(1) < cosine_threshold,
            "distance to the mean of all images": lambda x: mean_distance(vectors, x) > mean_threshold,
            "distance to the nearest class centroid (served)":
                lambda x: nearest_distance(x, centroids, trust.calibration.precision) > scope.ood_threshold,
        }
        out[scope.name] = {name: {k: round(float(flag(x).mean()), 4) for k, x in sets.items()}
                           for name, flag in candidates.items()}
    return out


def table(result: dict) -> str:
    head = ("| label set | images | top-1 raw / calibrated | ECE before -> after | ID flagged OOD | "
            "other modalities flagged | noise+photos flagged | pydicom CT/MR/US/NM flagged |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in result["scopes"].items():
        other = "n/a" if r["other_modalities_flagged"] is None else \
            f"{100 * r['other_modalities_flagged']:.1f} % of {r['other_modality_images']}"
        lines.append(f"| {name} | {r['held_out_images']} | {100 * r['top1_raw']:.1f} / {100 * r['top1_calibrated']:.1f} % "
                     f"| {r['ece_before']:.4f} -> {r['ece_after']:.4f} | {100 * r['in_distribution_flagged_ood']:.1f} % "
                     f"| {other} | {100 * r['noise_and_photos_flagged']:.1f} % of {r['noise_and_photo_images']} "
                     f"| {100 * r['medical_flagged']:.1f} % of {r['medical_images']} |")
    lines += ["", "| score (flag rate) | label set | in-distribution | other modalities | noise+photos | pydicom |",
              "|---|---|---:|---:|---:|---:|"]
    for scope, candidates in result["score_comparison"].items():
        for name, r in candidates.items():
            lines.append(f"| {name} | {scope} | {100 * r['in_distribution']:.1f} % | {100 * r['other_modalities']:.1f} % "
                         f"| {100 * r['noise_and_photos']:.1f} % | {100 * r['medical']:.1f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("bundles/demo-synthetic-1"))
    parser.add_argument("--per-class", type=int, default=50, help="held-out images per class")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = measure(args.bundle.resolve(), args.per_class)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nbundle {result['bundle_id']}, calibration {result['calibration_id']}, CPU flags {result['cpu_flags']}")
    for name, r in result["scopes"].items():
        print(f"{name}: medical images not flagged: {r['medical_not_flagged']}; "
              f"in-distribution low-confidence abstentions {100 * r['in_distribution_low_confidence']:.1f} %")


if __name__ == "__main__":
    main()
