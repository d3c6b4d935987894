"""`medvlm evaluate`: a labelled folder through Classify into a clinical metrics report.

Metrics come from scikit-learn, plots from matplotlib; intervals are percentile intervals over
stratified bootstrap resamples (each class keeps its size, so every resample has every class).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medvlm.client._batch import discover
from medvlm.client._convert import check_labels
from medvlm.client._errors import MedvlmError, NotSupported
from medvlm.client._sync import Client
from medvlm.client._types import ItemError, ModelInfo, Priority

PER_CLASS = ("sensitivity", "specificity", "ppv", "npv", "auc")
TITLES = {"sensitivity": "Sensitivity", "specificity": "Specificity", "ppv": "PPV", "npv": "NPV", "auc": "ROC AUC"}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Labelled images: paths, the class of each (index into classes), and where they came from."""

    paths: list[Path]
    targets: np.ndarray  # int64 [N]
    classes: list[str]
    source: str


def load_dataset(source: Path) -> Dataset:
    """A folder with one subfolder per class (the folder name is the label), or a CSV of
    path,label rows (paths relative to the CSV's folder; a header row path,label is allowed)."""
    if source.is_dir():
        classes = sorted(d.name for d in source.iterdir() if d.is_dir() and not d.name.startswith("."))
        if len(classes) < 2:
            raise ValueError(f"{source}: needs at least two class folders")
        paths, targets = [], []
        for index, name in enumerate(classes):
            files = discover(source / name)
            paths += files
            targets += [index] * len(files)
        return Dataset(paths, np.array(targets, dtype=np.int64), classes, f"{source} (one folder per class)")
    with open(source, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and any(cell.strip() for cell in r)]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    bad = [i + 1 for i, r in enumerate(rows) if len(r) < 2 or not r[0].strip() or not r[1].strip()]
    if bad:
        raise ValueError(f"{source}: rows {bad[:5]} are not path,label")
    classes = sorted({r[1].strip() for r in rows})
    if len(classes) < 2:
        raise ValueError(f"{source}: needs at least two classes")
    index = {name: i for i, name in enumerate(classes)}
    paths = [(source.parent / r[0].strip()) for r in rows]
    targets = np.array([index[r[1].strip()] for r in rows], dtype=np.int64)
    return Dataset(paths, targets, classes, f"{source} (CSV of path,label)")


@dataclasses.dataclass
class Predictions:
    """What the gateway answered: probabilities over the classes per answered image."""

    probabilities: np.ndarray  # float32 [N, C], rows of failed items are NaN
    failures: dict[int, ItemError]
    bundle_ids: set[str]
    seconds: float
    # answers the gateway withheld, by reason (they are still scored in the metrics)
    abstained: dict[str, int] = dataclasses.field(default_factory=dict)
    calibrated: bool = False  # whether any answer came with a calibration's trust assessment


def classify_dataset(client: Client, data: Dataset, label_set: str | None, template: str,
                     priority: Priority, window: int, advance=None) -> Predictions:
    """Every image through one ClassifyStream; classes map to labels by name (or a set's codes)."""
    labels = None if label_set else data.classes
    check_labels(labels, label_set)
    count, num_classes = len(data.paths), len(data.classes)
    probabilities = np.full((count, num_classes), np.nan, dtype=np.float32)
    failures: dict[int, ItemError] = {}
    bundle_ids: set[str] = set()
    abstained: dict[str, int] = {}
    calibrated = False
    started = time.monotonic()
    items = ((str(i), path) for i, path in enumerate(data.paths))
    columns: np.ndarray | None = None
    try:
        for item in client.classify_worklist(items, labels, label_set=label_set, template=template,
                                             priority=priority, window=window):
            i = int(item.id)
            if item.result is None:
                failures[i] = item.error or ItemError("UNKNOWN", "no result")
            else:
                if columns is None:
                    columns = _class_columns(data.classes, item.result.scores)
                probabilities[i] = item.result.probabilities[columns]
                bundle_ids.add(item.result.bundle_id)
                calibrated = calibrated or item.result.calibrated
                if item.result.abstain:
                    reason = item.result.abstain_reason.value
                    abstained[reason] = abstained.get(reason, 0) + 1
            if advance is not None:
                advance()
    except MedvlmError as exc:
        for i in range(count):
            if np.isnan(probabilities[i]).any() and i not in failures:
                failures[i] = ItemError(exc.code, f"not processed: the stream failed ({exc.message})")
    return Predictions(probabilities, failures, bundle_ids, time.monotonic() - started, abstained, calibrated)


def _class_columns(classes: Sequence[str], scores) -> np.ndarray:
    """Which score of a reply belongs to each class: by label, or by code for a label set."""
    where = {}
    for position, score in enumerate(scores):
        where.setdefault(score.label, position)
        if score.code:
            where.setdefault(score.code, position)
    missing = [c for c in classes if c not in where]
    if missing:
        raise NotSupported(f"classes not among the labels the server scored: {missing[:5]}")
    return np.array([where[c] for c in classes], dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def cell(self, percent: bool = True) -> str:
        if np.isnan(self.value):
            return "n/a"
        scale, unit = (100.0, " %") if percent else (1.0, "")
        if np.isnan(self.low):
            return f"{scale * self.value:.1f}{unit}" if percent else f"{self.value:.3f}"
        if percent:
            return f"{scale * self.value:.1f} % ({scale * self.low:.1f}-{scale * self.high:.1f})"
        return f"{self.value:.3f} ({self.low:.3f}-{self.high:.3f})"

    def as_dict(self) -> dict[str, float | None]:
        def f(x: float) -> float | None:
            return None if np.isnan(x) else round(float(x), 6)
        return {"value": f(self.value), "ci95_low": f(self.low), "ci95_high": f(self.high)}


def _point_metrics(targets: np.ndarray, probabilities: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Per class (one vs rest) sensitivity, specificity, PPV, NPV, ROC AUC [C] and accuracy [1]."""
    from sklearn.metrics import accuracy_score, multilabel_confusion_matrix, roc_auc_score
    from sklearn.preprocessing import label_binarize

    classes = np.arange(num_classes)
    predicted = probabilities.argmax(axis=1)
    mcm = multilabel_confusion_matrix(targets, predicted, labels=classes)  # [C, 2, 2]: [[tn, fp], [fn, tp]]
    tn, fp, fn, tp = (mcm[:, 0, 0], mcm[:, 0, 1], mcm[:, 1, 0], mcm[:, 1, 1])

    def ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(b > 0, a / np.maximum(b, 1), np.nan)

    truth = label_binarize(targets, classes=classes)  # [N, C]
    if num_classes == 2:
        truth = np.column_stack([1 - truth[:, 0], truth[:, 0]])
    present = (truth.sum(axis=0) > 0) & (truth.sum(axis=0) < len(targets))
    auc = np.full(num_classes, np.nan)
    if present.any():
        auc[present] = roc_auc_score(truth[:, present], probabilities[:, present], average=None)
    return {
        "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn), "auc": auc,
        "accuracy": np.array([accuracy_score(targets, predicted)]),
    }


@dataclasses.dataclass
class Metrics:
    """Per class and macro-averaged metrics with 95 % bootstrap intervals, and the confusion matrix."""

    classes: list[str]
    support: list[int]
    per_class: dict[str, list[Interval]]
    macro: dict[str, Interval]
    accuracy: Interval
    confusion: np.ndarray  # int [C, C], rows true, columns predicted
    bootstrap: int


def compute_metrics(targets: np.ndarray, probabilities: np.ndarray, classes: list[str],
                    bootstrap: int = 1000, seed: int = 0, advance=None) -> Metrics:
    """Point estimates on the answered items and percentile intervals over `bootstrap` stratified
    resamples; `advance()` is called after each resample."""
    from sklearn.metrics import confusion_matrix
    from sklearn.utils import resample

    num_classes = len(classes)
    point = _point_metrics(targets, probabilities, num_classes)
    samples: dict[str, list[np.ndarray]] = {k: [] for k in point}
    rng = np.random.default_rng(seed)
    indices = np.arange(len(targets))
    for _ in range(bootstrap):
        pick = resample(indices, stratify=targets, random_state=int(rng.integers(2**31)))
        for key, value in _point_metrics(targets[pick], probabilities[pick], num_classes).items():
            samples[key].append(value)
        if advance is not None:
            advance()

    def interval(key: str, reduce=None) -> list[Interval]:
        value = point[key] if reduce is None else np.array([reduce(point[key])])
        if not bootstrap:
            return [Interval(float(v), np.nan, np.nan) for v in value]
        stack = np.stack(samples[key])  # [B, C]
        if reduce is not None:
            stack = np.array([[reduce(row)] for row in stack])
        with np.errstate(invalid="ignore"):
            low, high = np.nanpercentile(stack, [2.5, 97.5], axis=0) if np.isfinite(stack).any() else (
                np.full(stack.shape[1], np.nan), np.full(stack.shape[1], np.nan))
        return [Interval(float(v), float(lo), float(hi)) for v, lo, hi in zip(value, low, high)]

    def macro(values: np.ndarray) -> float:
        return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")

    return Metrics(
        classes=list(classes),
        support=[int((targets == c).sum()) for c in range(num_classes)],
        per_class={k: interval(k) for k in PER_CLASS},
        macro={k: interval(k, macro)[0] for k in PER_CLASS},
        accuracy=interval("accuracy")[0],
        confusion=confusion_matrix(targets, probabilities.argmax(axis=1), labels=np.arange(num_classes)),
        bootstrap=bootstrap,
    )


def plot_roc(path: Path, targets: np.ndarray, probabilities: np.ndarray, metrics: Metrics) -> None:
    """One-vs-rest ROC curve of every class in one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(7.5, 6.5), dpi=110)
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)  # distinct colours for up to 20 classes
    for c, name in enumerate(metrics.classes):
        positives = targets == c
        if positives.all() or not positives.any():
            continue
        fpr, tpr, _ = roc_curve(positives, probabilities[:, c])
        ax.plot(fpr, tpr, linewidth=1.2, label=f"{name} (AUC {metrics.per_class['auc'][c].value:.3f})")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=0.8)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title("ROC, one class vs the rest")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confusion(path: Path, metrics: Metrics) -> None:
    """The confusion matrix as a PNG (scikit-learn's display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(5.0, 0.55 * len(metrics.classes) + 3)
    fig, ax = plt.subplots(figsize=(size, size), dpi=110)
    ConfusionMatrixDisplay(metrics.confusion, display_labels=metrics.classes).plot(
        ax=ax, xticks_rotation="vertical", colorbar=False)
    ax.set_title("Confusion matrix (rows: truth, columns: top-1 answer)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown_report(data: Dataset, predictions: Predictions, metrics: Metrics, info: ModelInfo | None,
                    template: str, label_set: str | None) -> str:
    """The report as Markdown (the HTML report is rendered from it)."""
    answered = len(data.paths) - len(predictions.failures)
    lines = ["# medvlm evaluation", ""]
    if info is not None and info.kind != "clinical":
        lines += [f"> **Not clinical.** The bundle is a {info.kind} model: these figures say nothing about "
                  "real patients.", ""]
    lines += [
        "| | |", "|---|---|",
        f"| bundle | `{', '.join(sorted(predictions.bundle_ids)) or (info.bundle_id if info else '?')}` |",
        f"| model | {info.model} {info.version} ({info.kind}) |" if info else "| model | unknown |",
        f"| engines | {info.engine_summary} |" if info else "| engines | unknown |",
        f"| data | {data.source}: {len(data.paths)} images, {len(metrics.classes)} classes |",
        f"| answered | {answered} ({len(predictions.failures)} failed) |",
        f"| labels | {'label set `' + label_set + '`' if label_set else 'the class names'}, "
        f"template `{template or '{}'}` |",
        f"| intervals | 95 %, percentile, {metrics.bootstrap} stratified bootstrap resamples |"
        if metrics.bootstrap else "| intervals | none (--bootstrap 0) |",
        "",
        f"**Top-1 accuracy: {metrics.accuracy.cell()}**", "",
        "## Per class (one vs the rest)", "",
        "| class | n | " + " | ".join(TITLES[k] for k in PER_CLASS) + " |",
        "|---|---:|" + "---:|" * len(PER_CLASS),
    ]
    for c, name in enumerate(metrics.classes):
        cells = [metrics.per_class[k][c].cell(percent=k != "auc") for k in PER_CLASS]
        lines.append(f"| {name} | {metrics.support[c]} | " + " | ".join(cells) + " |")
    cells = [metrics.macro[k].cell(percent=k != "auc") for k in PER_CLASS]
    lines.append(f"| **macro average** | {sum(metrics.support)} | " + " | ".join(cells) + " |")
    lines += ["", "Percentages with their 95 % interval in brackets; AUC from the probabilities.", "",
              "## ROC curves", "", "![ROC curves](roc.png)", "",
              "## Confusion matrix", "", "Rows: truth; columns: top-1 answer.", "",
              "| truth \\ answer | " + " | ".join(str(i + 1) for i in range(len(metrics.classes))) + " |",
              "|---|" + "---:|" * len(metrics.classes)]
    for c, name in enumerate(metrics.classes):
        lines.append(f"| {c + 1}. {name} | " + " | ".join(str(v) for v in metrics.confusion[c]) + " |")
    lines += ["", "![Confusion matrix](confusion.png)", ""]
    if predictions.failures:
        lines += ["## Failed items", "", "| file | code | message |", "|---|---|---|"]
        for i, error in sorted(predictions.failures.items()):
            lines.append(f"| {data.paths[i]} | {error.code} | {error.message} |")
        lines.append("")
    return "\n".join(lines)


def html_report(markdown: str) -> str:
    """The Markdown report rendered to a standalone HTML page."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown)
    style = ("body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2rem .5rem}"
             "td{text-align:right}td:first-child{text-align:left}img{max-width:100%}")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>medvlm evaluation</title>'
            f"<style>{style}</style></head><body>\n{body}</body></html>\n")


def write_report(out: Path, data: Dataset, predictions: Predictions, metrics: Metrics, info: ModelInfo | None,
                 template: str, label_set: str | None) -> dict[str, Path]:
    """report.md, report.html, roc.png, confusion.png, metrics.json and predictions.csv in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    answered = ~np.isnan(predictions.probabilities).any(axis=1)
    targets, probabilities = data.targets[answered], predictions.probabilities[answered]
    files = {name: out / name for name in
             ("report.md", "report.html", "roc.png", "confusion.png", "metrics.json", "predictions.csv")}
    plot_roc(files["roc.png"], targets, probabilities, metrics)
    plot_confusion(files["confusion.png"], metrics)
    markdown = markdown_report(data, predictions, metrics, info, template, label_set)
    files["report.md"].write_text(markdown, encoding="utf-8")
    files["report.html"].write_text(html_report(markdown), encoding="utf-8")
    files["metrics.json"].write_text(json.dumps(metrics_dict(data, predictions, metrics, info), indent=1) + "\n",
                                     encoding="utf-8")
    with open(files["predictions.csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "truth", "answer", "probability", "error"])
        for i, path in enumerate(data.paths):
            if i in predictions.failures:
                e = predictions.failures[i]
                writer.writerow([path, data.classes[data.targets[i]], "", "", f"{e.code}: {e.message}"])
            else:
                p = predictions.probabilities[i]
                writer.writerow([path, data.classes[data.targets[i]], data.classes[int(p.argmax())],
                                 f"{float(p.max()):.6f}", ""])
    return files


def metrics_dict(data: Dataset, predictions: Predictions, metrics: Metrics, info: ModelInfo | None) -> dict:
    """Everything of the report, for machines."""
    return {
        "bundle_ids": sorted(predictions.bundle_ids),
        "model": dataclasses.asdict(info) if info else None,
        "images": len(data.paths), "answered": len(data.paths) - len(predictions.failures),
        "failed": [{"path": str(data.paths[i]), "code": e.code, "message": e.message}
                   for i, e in sorted(predictions.failures.items())],
        "calibrated": predictions.calibrated,
        "abstained": {"total": sum(predictions.abstained.values()), **predictions.abstained},
        "accuracy": metrics.accuracy.as_dict(),
        "classes": [
            {"class": name, "n": metrics.support[c], **{k: metrics.per_class[k][c].as_dict() for k in PER_CLASS}}
            for c, name in enumerate(metrics.classes)
        ],
        "macro": {k: metrics.macro[k].as_dict() for k in PER_CLASS},
        "confusion": metrics.confusion.tolist(),
        "bootstrap": metrics.bootstrap,
        "seconds": round(predictions.seconds, 3),
    }
