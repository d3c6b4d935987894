"""The `medvlm` command: classify, similarity, embed, info, health, batch and evaluate against a gateway.

Connection settings are flags or MEDVLM_* variables (the flag wins), as for the servers.
Human output is tables; --json prints JSON for machines. Exit status: 0 when everything
succeeded, 1 when any item or call failed (the failures are listed), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from medvlm.client._errors import MedvlmError
from medvlm.client._images import WINDOW_PRESETS, Window, load_image
from medvlm.client._settings import add_connection_flags, settings_from
from medvlm.client._sync import DEFAULT_WINDOW, Client
from medvlm.client._types import ClassifyResult, Priority

# Piped output gets wide tables rather than rich's 80 columns, so rows stay one line for grep.
_out = Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 200)
_err = Console(stderr=True, highlight=False)


def _error(message: str) -> None:
    """One line on stderr, never wrapped (file names and server messages stay greppable)."""
    print(message, file=sys.stderr, flush=True)


def _table(*columns: str) -> Table:
    table = Table()
    for name in columns:
        table.add_column(name, overflow="fold")
    return table


def _labels(args: argparse.Namespace) -> tuple[list[str] | None, str | None]:
    return (args.labels or None), (args.label_set or None)


def _add_label_flags(p: argparse.ArgumentParser, top_k: int) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--labels", nargs="+", metavar="LABEL", help="candidate labels (at least two)")
    which.add_argument("--label-set", metavar="NAME", help="a label set the gateway serves, e.g. chest-findings@1")
    p.add_argument("--template", default="", help='prompt template with one "{}" for the label (default: the label)')
    p.add_argument("--top-k", type=int, default=top_k, help=f"labels to report per image (default {top_k}; 0: all)")


def _window(text: str) -> Window:
    try:
        return Window.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_image_flags(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group()
    which.add_argument("--window", type=_window, metavar="C,W",
                       help="display window for greyscale images: center,width in the image's units "
                            "(Hounsfield units for CT), overriding the file's own; a negative center "
                            "needs the = form, --window=-600,1500")
    which.add_argument("--window-preset", choices=WINDOW_PRESETS, metavar="NAME",
                       help=f"a named CT window (DICOM CT only): {', '.join(WINDOW_PRESETS)}")
    p.add_argument("--frame", type=int, metavar="N", help="frame of a multi-frame DICOM object, from 0")


def _image_options(args: argparse.Namespace) -> dict:
    """load_image's display options from the flags (only those given)."""
    options = {"window": args.window, "window_preset": args.window_preset, "frame": args.frame}
    if args.frame is not None and args.frame < 0:
        raise ValueError("--frame counts from 0")
    return {k: v for k, v in options.items() if v is not None}


def _images(args: argparse.Namespace) -> list:
    options = _image_options(args)
    return [load_image(p, **options) if options else p for p in args.files]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--priority", choices=[p.name.lower() for p in Priority], default="routine",
                   help="scheduling priority of the work on the encoders (default routine)")
    add_connection_flags(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medvlm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("classify", help="zero-shot classification of image files")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="PNG, JPEG or DICOM files")
    _add_image_flags(p)
    _add_label_flags(p, top_k=3)
    _add_common(p)

    p = sub.add_parser("similarity", help="cosine similarity of images x texts")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    _add_image_flags(p)
    p.add_argument("--texts", nargs="+", required=True, metavar="TEXT")
    p.add_argument("--template", default="", help='prompt template with one "{}" (default: the text)')
    _add_common(p)

    p = sub.add_parser("embed", help="embeddings of image files or texts")
    p.add_argument("files", nargs="*", type=Path, metavar="FILE")
    _add_image_flags(p)
    p.add_argument("--texts", nargs="+", metavar="TEXT", help="embed these texts instead of files")
    _add_common(p)

    p = sub.add_parser("info", help="the model the gateway serves")
    _add_common(p)

    p = sub.add_parser("health", help="the gateway's health; exit status 0 only when SERVING")
    _add_common(p)

    p = sub.add_parser("batch", help="classify every file under a folder into a results file, resumably")
    p.add_argument("folder", type=Path, metavar="DIR", help="searched recursively; types sniffed by content")
    _add_image_flags(p)
    p.add_argument("--out", type=Path, required=True, help="results.csv or results.jsonl; rows of files "
                   "already there with the same sha256 are kept and not recomputed")
    _add_label_flags(p, top_k=3)
    p.add_argument("--concurrency", type=int, default=DEFAULT_WINDOW,
                   help=f"items in flight on the stream (default {DEFAULT_WINDOW}, the gateway's default window)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_common(p)

    p = sub.add_parser("evaluate", help="metrics of a labelled folder: sensitivity, specificity, PPV, NPV, AUC")
    p.add_argument("source", type=Path, metavar="DIR|CSV",
                   help="a folder with one subfolder per class (named by its label), or a CSV of path,label")
    p.add_argument("--out", type=Path, default=Path("evaluation"),
                   help="folder for report.md, report.html, roc.png, confusion.png, metrics.json, predictions.csv")
    p.add_argument("--label-set", metavar="NAME", help="score against a label set (classes match its labels or codes)")
    p.add_argument("--template", default="", help='prompt template with one "{}" (default: the label)')
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95 %% intervals (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--concurrency", type=int, default=DEFAULT_WINDOW, help="items in flight on the stream")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_common(p)
    return parser


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=1, ensure_ascii=False, default=_jsonable))


def _jsonable(value: object) -> object:
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)  # type: ignore[arg-type]
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(type(value).__name__)


def _progress(enabled: bool, what: str):
    """A factory: total -> a callable that advances a bar with rate and ETA on stderr (or None)."""
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.1f}/s" if task.speed else "-/s")

    state: dict[str, object] = {}

    def start(total: int):
        if not enabled or total == 0:
            return None
        bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), Rate(), TimeElapsedColumn(),
                       TextColumn("ETA"), TimeRemainingColumn(), console=_err, transient=False)
        bar.start()
        task = bar.add_task(what, total=total)
        state["bar"] = bar
        return lambda: bar.advance(task)

    def stop() -> None:
        bar = state.get("bar")
        if bar is not None:
            bar.stop()  # type: ignore[attr-defined]

    return start, stop


def cmd_classify(client: Client, args: argparse.Namespace) -> int:
    labels, label_set = _labels(args)
    results, failed = [], []
    options = _image_options(args)
    for path in args.files:
        try:
            image = load_image(path, **options) if options else path
            result = client.classify(image, labels, label_set=label_set, template=args.template,
                                     top_k=args.top_k, priority=Priority[args.priority.upper()])
            results.append((path, result))
        except MedvlmError as exc:
            failed.append((path, exc))
    if args.json:
        _print_json({"results": [{"file": str(p), **dataclasses.asdict(r)} for p, r in results],
                     "failed": [{"file": str(p), "code": e.code, "message": e.message} for p, e in failed]})
    else:
        calibrated = any(r.calibrated for _, r in results)
        table = _table("file", "label", "calibrated probability" if calibrated else "probability", "cosine")
        for path, result in results:
            first = str(path)
            if result.abstain:  # before any label: the answer is not to be acted on
                table.add_row(first, f"[bold red]ABSTAIN: {_reason(result)}[/]", "", "")
                first = ""
            for rank, score in enumerate(result.top):
                table.add_row(first if rank == 0 else "", score.label, f"{score.shown_probability:.4f}",
                              f"{score.cosine:.4f}")
        if results:
            _out.print(table)
            for line in sorted({_trust_line(r) for _, r in results}):
                _out.print(line)
    _report_failures(failed)
    return 1 if failed else 0


_REASONS = {"out_of_distribution": "out of distribution (unlike the images these labels were calibrated on)",
            "low_confidence": "low confidence (no label reaches the calibrated threshold)"}


def _reason(result: ClassifyResult) -> str:
    return _REASONS.get(result.abstain_reason.value, result.abstain_reason.value or "withheld")


def _trust_line(result: ClassifyResult) -> str:
    """Which bundle answered and with which calibration, or that nothing says whether to trust it."""
    if result.trust is None:
        return f"bundle {result.bundle_id}; not calibrated: nothing says whether to trust these answers"
    return (f"bundle {result.bundle_id}; calibration {result.trust.calibration_id}, scope {result.trust.scope}")


def _report_failures(failed: Sequence[tuple[object, MedvlmError]]) -> None:
    for path, exc in failed:
        _error(f"medvlm: {path}: {exc}")


def cmd_similarity(client: Client, args: argparse.Namespace) -> int:
    result = client.similarity(_images(args), args.texts, template=args.template,
                               priority=Priority[args.priority.upper()])
    if args.json:
        _print_json({"files": [str(p) for p in args.files], "texts": args.texts, **dataclasses.asdict(result)})
        return 0
    table = _table("file \\ cosine (probability)", *args.texts)
    for path, cos, prob in zip(args.files, result.cosine, result.probabilities):
        table.add_row(str(path), *[f"{c:.4f} ({p:.3f})" for c, p in zip(cos, prob)])
    _out.print(table)
    _out.print(f"bundle {result.bundle_id}")
    return 0


def cmd_embed(client: Client, args: argparse.Namespace) -> int:
    if bool(args.files) == bool(args.texts):
        raise ValueError("give FILEs or --texts, one of them")
    priority = Priority[args.priority.upper()]
    if args.texts:
        names, result = list(args.texts), client.embed_texts(args.texts, priority=priority)
    else:
        names, result = [str(p) for p in args.files], client.embed_images(_images(args), priority=priority)
    if args.json:
        _print_json({"bundle_id": result.bundle_id, "embeddings": [
            {"input": n, "sha256": e.input_sha256, "vector": e.vector} for n, e in zip(names, result.items)]})
        return 0
    table = _table("input", "sha256", "dim", "first values")
    for name, e in zip(names, result.items):
        table.add_row(name, e.input_sha256[:16], str(e.vector.shape[0]), " ".join(f"{v:+.3f}" for v in e.vector[:4]))
    _out.print(table)
    _out.print(f"bundle {result.bundle_id} (--json prints the vectors)")
    return 0


def cmd_info(client: Client, args: argparse.Namespace) -> int:
    info = client.model_info()
    if args.json:
        _print_json(dataclasses.asdict(info))
        return 0
    table = Table("", "", show_header=False)
    for key in ("bundle_id", "model", "version", "kind", "embed_dim", "image_size", "context_length", "logit_scale"):
        table.add_row(key, str(getattr(info, key)))
    for e in info.engines:
        table.add_row(f"{e.tower} engine", f"{e.engine} {e.precision}, max batch {e.max_batch}")
    table.add_row("description", info.description)
    _out.print(table)
    return 0


def cmd_health(client: Client, args: argparse.Namespace) -> int:
    status = client.health()
    if args.json:
        _print_json({"target": client.settings.target, "status": status})
    else:
        _out.print(f"{client.settings.target}: {status}")
    return 0 if status == "SERVING" else 1


def cmd_batch(client: Client, args: argparse.Namespace) -> int:
    from medvlm.client._batch import run_batch

    if not args.folder.is_dir():
        raise ValueError(f"{args.folder}: not a folder")
    labels, label_set = _labels(args)
    start, stop = _progress(not args.no_progress and not args.json, "batch")
    try:
        summary = run_batch(client, args.folder, args.out, labels, label_set, args.template, args.top_k,
                            Priority[args.priority.upper()], args.concurrency, start, _image_options(args))
    finally:
        stop()
    if args.json:
        _print_json(summary.as_dict())
    else:
        rate = summary.as_dict()["items_per_s"]
        table = _table("files", "already done", "classified", "abstained", "failed", "not processed", "seconds",
                       "items/s")
        table.add_row(str(summary.found), str(summary.skipped), str(summary.classified), str(summary.abstained),
                      str(len(summary.failed)), str(summary.not_processed), f"{summary.seconds:.1f}", str(rate))
        _out.print(table)
        _out.print(f"results in {summary.output}" + (f", bundle {', '.join(sorted(summary.bundle_ids))}"
                                                      if summary.bundle_ids else ""))
    for row in summary.failed:
        _error(f"medvlm: {row.path}: {row.error_code}: {row.error_message}")
    if summary.stream_error:
        _error(f"medvlm: stopped: {summary.stream_error}; {summary.not_processed} files not processed "
                   "(run again to resume)")
    return 0 if summary.ok else 1


def cmd_evaluate(client: Client, args: argparse.Namespace) -> int:
    from medvlm.client import _evaluate as ev

    data = ev.load_dataset(args.source)
    ev.check_labels(None if args.label_set else data.classes, args.label_set)
    info = client.model_info()
    start, stop = _progress(not args.no_progress and not args.json, "evaluate")
    try:
        predictions = ev.classify_dataset(client, data, args.label_set, args.template,
                                          Priority[args.priority.upper()], args.concurrency, start(len(data.paths)))
    finally:
        stop()
    answered = ~(predictions.probabilities != predictions.probabilities).any(axis=1)  # not NaN
    if answered.sum() == 0:
        raise ValueError("no image was answered; nothing to evaluate")
    start, stop = _progress(not args.no_progress and not args.json, "bootstrap")
    try:
        metrics = ev.compute_metrics(data.targets[answered], predictions.probabilities[answered], data.classes,
                                     bootstrap=args.bootstrap, seed=args.seed, advance=start(args.bootstrap))
    finally:
        stop()
    files = ev.write_report(args.out, data, predictions, metrics, info, args.template, args.label_set)
    if args.json:
        _print_json({**ev.metrics_dict(data, predictions, metrics, info),
                     "report": {k: str(v) for k, v in files.items()}})
    else:
        table = _table("class", "n", *[ev.TITLES[k] for k in ev.PER_CLASS])
        for c, name in enumerate(metrics.classes):
            table.add_row(name, str(metrics.support[c]),
                          *[metrics.per_class[k][c].cell(percent=k != "auc") for k in ev.PER_CLASS])
        table.add_row("macro average", str(sum(metrics.support)),
                      *[metrics.macro[k].cell(percent=k != "auc") for k in ev.PER_CLASS])
        _out.print(table)
        _out.print(f"top-1 accuracy {metrics.accuracy.cell()} on {int(answered.sum())} images; "
                   f"bundle {', '.join(sorted(predictions.bundle_ids))} ({info.kind}); {info.engine_summary}")
        if predictions.calibrated:
            reasons = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in sorted(predictions.abstained.items()))
            _out.print(f"abstained on {sum(predictions.abstained.values())} images"
                       + (f" ({reasons})" if reasons else "") + "; they are scored above all the same")
        else:
            _out.print("not calibrated: the gateway did not say which answers to withhold")
        _out.print(f"report: {files['report.html']} and {files['report.md']}")
    for i, error in sorted(predictions.failures.items()):
        _error(f"medvlm: {data.paths[i]}: {error.code}: {error.message}")
    return 1 if predictions.failures else 0


COMMANDS = {
    "classify": cmd_classify, "similarity": cmd_similarity, "embed": cmd_embed, "info": cmd_info,
    "health": cmd_health, "batch": cmd_batch, "evaluate": cmd_evaluate,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `medvlm` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from(args)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    try:
        with Client(settings=settings) as client:
            return COMMANDS[args.command](client, args)
    except MedvlmError as exc:
        _error(f"medvlm {args.command}: {exc}")
        return 1
    except (ValueError, OSError) as exc:
        _error(f"medvlm {args.command}: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
