"""`medvlm batch`: a folder of studies through Classify into a results file, resumable."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from medvlm.client._convert import check_labels
from medvlm.client._errors import MedvlmError
from medvlm.client._images import LoadedImage, load_image
from medvlm.client._sync import Client
from medvlm.client._types import ItemResult, Priority

CSV_FIELDS = ("path", "sha256", "status", "abstain", "abstain_reason", "label", "probability",
              "calibrated_probability", "top", "bundle_id", "calibration_id", "error_code", "error_message")
OK, FAILED = "ok", "failed"


def discover(root: Path, exclude: Sequence[Path] = ()) -> list[Path]:
    """Every regular file under `root`, recursively, sorted; hidden files and folders and `exclude`
    left out. Types are decided by content later, so a non-image file is reported, not skipped."""
    skip = {p.resolve() for p in exclude}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or not path.is_file() or path.resolve() in skip:
                continue
            found.append(path)
    return found


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the results file."""

    path: str
    sha256: str
    status: str
    bundle_id: str = ""
    top: tuple[tuple[str, float, float, str], ...] = ()  # (label, probability, cosine, code), best first
    calibrated: tuple[float, ...] = ()  # calibrated probability of each of `top`; () when not calibrated
    abstain: bool = False
    abstain_reason: str = ""
    calibration_id: str = ""  # "" when the gateway served without a calibration
    error_code: str = ""
    error_message: str = ""

    @staticmethod
    def of(path: str, item: ItemResult) -> Row:
        if item.error is not None:
            return Row(path, item.sha256, FAILED, error_code=item.error.code, error_message=item.error.message)
        result = item.result
        assert result is not None
        top = tuple((s.label, s.probability, s.cosine, s.code) for s in result.top)
        calibrated = tuple(s.calibrated_probability for s in result.top
                           if s.calibrated_probability is not None) if result.calibrated else ()
        return Row(path, item.sha256, OK, bundle_id=result.bundle_id, top=top, calibrated=calibrated,
                   abstain=result.abstain, abstain_reason=result.abstain_reason.value,
                   calibration_id=result.trust.calibration_id if result.trust else "")

    def to_json(self) -> str:
        record: dict[str, object] = {"path": self.path, "sha256": self.sha256, "status": self.status}
        if self.status == OK:
            record["abstain"] = self.abstain
            record["abstain_reason"] = self.abstain_reason
            record["bundle_id"] = self.bundle_id
            record["calibration_id"] = self.calibration_id
            record["top"] = [{"label": label, "probability": p, "cosine": c, **({"code": code} if code else {}),
                              **({"calibrated_probability": self.calibrated[i]} if self.calibrated else {})}
                             for i, (label, p, c, code) in enumerate(self.top)]
        else:
            record["error"] = {"code": self.error_code, "message": self.error_message}
        return json.dumps(record, ensure_ascii=False)

    def to_csv(self) -> dict[str, str]:
        best = self.top[0] if self.top else None
        return {
            "path": self.path, "sha256": self.sha256, "status": self.status,
            "abstain": ("yes" if self.abstain else "no") if self.status == OK else "",
            "abstain_reason": self.abstain_reason,
            "label": best[0] if best else "", "probability": f"{best[1]:.6f}" if best else "",
            "calibrated_probability": f"{self.calibrated[0]:.6f}" if self.calibrated else "",
            "top": "; ".join(f"{label}={p:.6f}" for label, p, _, _ in self.top),
            "bundle_id": self.bundle_id, "calibration_id": self.calibration_id,
            "error_code": self.error_code, "error_message": self.error_message,
        }


class ResultsFile:
    """The output, CSV or JSON lines by its suffix. Each row is flushed when written, so a run
    killed at any moment loses at most the rows in flight (and a half-written last line, which
    the next run drops)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        suffix = path.suffix.lower()
        if suffix not in (".csv", ".jsonl"):
            raise ValueError(f"{path}: the output must end in .csv or .jsonl")
        self.is_csv = suffix == ".csv"
        self._file: io.TextIOWrapper | None = None
        self._writer: csv.DictWriter | None = None

    def finished(self) -> tuple[dict[str, str], bool]:
        """Paths already classified (-> their sha256), and whether the file needs rewriting
        (failed rows to retry, or a half-written line)."""
        if not self.path.exists():
            return {}, False
        text = self.path.read_text(encoding="utf-8")
        rewrite = bool(text) and not text.endswith("\n")
        done: dict[str, str] = {}
        for record in self._records(text):
            if record is None:
                rewrite = True
            elif record.get("status") == OK and record.get("path") and record.get("sha256"):
                done[str(record["path"])] = str(record["sha256"])
            else:
                rewrite = True
        return done, rewrite

    def _records(self, text: str) -> Iterator[dict | None]:
        lines = text.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines.pop()  # cut off by a kill mid-write
        if self.is_csv:
            if not lines:
                return
            for row in csv.DictReader(lines):
                yield row if None not in row.values() and None not in row else None
        else:
            for line in lines:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    yield None

    def keep_only(self, keep: dict[str, str]) -> None:
        """Rewrite the file atomically with only the finished rows in `keep`."""
        text = self.path.read_text(encoding="utf-8")
        kept = [r for r in self._records(text)
                if r is not None and r.get("status") == OK and keep.get(str(r.get("path"))) == r.get("sha256")]
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            if self.is_csv:
                writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
                writer.writeheader()
                writer.writerows({k: row.get(k, "") for k in CSV_FIELDS} for row in kept)
            else:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def __enter__(self) -> ResultsFile:
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8", newline="")
        if self.is_csv:
            self._writer = csv.DictWriter(self._file, fieldnames=CSV_FIELDS)
            if new:
                self._writer.writeheader()
        return self

    def write(self, row: Row) -> None:
        assert self._file is not None
        if self._writer is not None:
            self._writer.writerow(row.to_csv())
        else:
            self._file.write(row.to_json() + "\n")
        self._file.flush()

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()


@dataclasses.dataclass
class Summary:
    """What a batch run did."""

    found: int = 0
    skipped: int = 0  # already in the output with the same sha256
    classified: int = 0
    failed: list[Row] = dataclasses.field(default_factory=list)
    not_processed: int = 0  # left when the stream itself failed
    stream_error: str = ""
    seconds: float = 0.0
    output: str = ""
    bundle_ids: set[str] = dataclasses.field(default_factory=set)
    abstained: int = 0  # classified, but the gateway says not to act on the answer

    @property
    def ok(self) -> bool:
        return not self.failed and not self.not_processed and not self.stream_error

    def as_dict(self) -> dict[str, object]:
        return {
            "found": self.found, "skipped": self.skipped, "classified": self.classified,
            "failed": [{"path": r.path, "code": r.error_code, "message": r.error_message} for r in self.failed],
            "not_processed": self.not_processed, "stream_error": self.stream_error,
            "seconds": round(self.seconds, 3),
            "items_per_s": round((self.classified + len(self.failed)) / self.seconds, 2) if self.seconds else 0.0,
            "abstained": self.abstained, "output": self.output, "bundle_ids": sorted(self.bundle_ids),
        }


def _with_options(path: Path, options: dict | None) -> Path | LoadedImage:
    """The file loaded with the display options, or the path itself when there are none or it cannot
    be read (the worklist then reads it again and reports the error as the item's)."""
    if not options:
        return path
    try:
        return load_image(path, **options)
    except MedvlmError:
        return path


def run_batch(client: Client, root: Path, output: Path, labels: Sequence[str] | None, label_set: str | None,
              template: str, top_k: int, priority: Priority, window: int, progress,
              image_options: dict | None = None) -> Summary:
    """Classify every file under `root` not already in `output`, appending a row per file.

    `progress(total)` returns a callable advanced once per finished item (or None for no bar);
    `image_options` (window, window_preset, frame) are load_image's, applied to every file.
    """
    check_labels(labels, label_set)
    results = ResultsFile(output)
    files = discover(root, exclude=[output])
    summary = Summary(found=len(files), output=str(output))
    rel = {path: path.relative_to(root).as_posix() for path in files}
    done, rewrite = results.finished()
    keep = {p: s for p, s in done.items() if p in rel.values()}
    todo: list[Path] = []
    for path in files:
        name = rel[path]
        if name in done:
            try:
                same = sha256_of(path) == done[name]
            except OSError:
                same = False
            if same:
                summary.skipped += 1
                continue
            keep.pop(name, None)
            rewrite = True
        todo.append(path)
    keep.update({p: s for p, s in done.items() if p not in rel.values()})  # rows of files gone since: kept
    if rewrite:
        results.keep_only(keep)

    advance = progress(len(todo))
    started = time.monotonic()
    seen = 0
    with results:
        items = ((rel[path], _with_options(path, image_options)) for path in todo)
        try:
            for item in client.classify_worklist(items, labels, label_set=label_set, template=template,
                                                 top_k=top_k, priority=priority, window=window):
                seen += 1
                row = Row.of(item.id, item)
                if row.status == OK and item.result is not None and item.result.image_sha256 != item.sha256:
                    row = dataclasses.replace(row, status=FAILED, error_code="DATA_LOSS",
                                              error_message="the server hashed other bytes than were read")
                results.write(row)
                if row.status == OK:
                    summary.classified += 1
                    summary.abstained += row.abstain
                    summary.bundle_ids.add(row.bundle_id)
                else:
                    summary.failed.append(row)
                if advance is not None:
                    advance()
        except MedvlmError as exc:
            summary.stream_error = str(exc)
            summary.not_processed = len(todo) - seen
    summary.seconds = time.monotonic() - started
    return summary
