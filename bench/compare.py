"""`python -m bench.compare --old REV`: the served systems of an earlier commit beside this checkout's.

A change to the serving path must not make it slower. Separate benchmark runs drift apart on a
shared machine by more than such a change moves, so the two commits run side by side in one run:
the earlier commit from a git worktree (its own code, the same bundles, Python environment and
images), this checkout as it is. For the vision encoder and the gateway (Classify, labels cached):

* concurrency 1: requests to the old and the new system alternate, in pairs, alternating which
  goes first; the median of the per-pair differences (new - old) is the change, its p25..p75 the
  spread of the pairs;
* concurrency 16: closed-loop windows of old and new alternate `--rounds` times; the change is
  the ratio of the medians, the noise the spread of each system's own windows around its median.

Writes compare.json and compare.md (default bench/out/compare, which git ignores).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

log = logging.getLogger("bench.compare")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True, help="the earlier commit (any git revision), checked out in a worktree")
    p.add_argument("--models", default="demo,biomedclip-arch", help="comma-separated registry models")
    p.add_argument("--pairs", type=int, default=200, help="alternating pairs at concurrency 1 per system")
    p.add_argument("--rounds", type=int, default=4, help="windows of each commit at --concurrency, alternating")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop callers of the throughput windows")
    p.add_argument("--seconds", type=float, default=5.0, help="length of one throughput window")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="engine threads of every system")
    p.add_argument("--bundles", type=Path, default=ROOT / "bundles", help="folder of bundles (missing ones are built)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "compare", help="output folder")
    return p


def checkout(revision: str, into: Path) -> Path:
    """A worktree of `revision` with its generated protobuf code; the commit it resolved to is its name."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{revision}^{{commit}}"],
                            check=True, capture_output=True, text=True).stdout.strip()
    tree = into / commit[:12]
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit],
                   check=True, capture_output=True)
    # its own generated code, by its own Makefile, with this environment's Python
    subprocess.run(["make", "-C", str(tree), "protos", f"VENV={sys.prefix}"], check=True, capture_output=True)
    return tree


def spread(values: list[float]) -> float:
    """Largest relative distance of a window from the median of its system's windows."""
    middle = statistics.median(values)
    return max(abs(v - middle) for v in values) / middle if middle else float("nan")


def compare_system(cls, ctx, old_root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from bench.paired import measure_pair, side_by_side

    old_ctx = copy.copy(ctx)  # the same bundle, images and reference; its server logs apart
    old_ctx.workdir = ctx.workdir / "old"
    old_ctx.workdir.mkdir(exist_ok=True)
    new, old = cls(ctx), cls(old_ctx)
    old.root = old_root
    out: dict[str, Any] = {"title": cls.title}
    try:
        for system in (old, new):
            system.start()
            system.check()
        pair = measure_pair(old, new, args.pairs, budget_s=120.0)
        out["concurrency_1"] = {"old_p50_ms": pair["in_process_p50_ms"], "new_p50_ms": pair["served_p50_ms"],
                                "change_p50_ms": pair["overhead_p50_ms"], "change_p25_ms": pair["overhead_p25_ms"],
                                "change_p75_ms": pair["overhead_p75_ms"], "pairs": pair["pairs"]}
        both = side_by_side(old, args.concurrency, new, args.concurrency, args.rounds, args.seconds, 1.0)
        windows = {"old": both["base_img_s"], "new": both["other_img_s"]}
        old_median, new_median = statistics.median(windows["old"]), statistics.median(windows["new"])
        out[f"concurrency_{args.concurrency}"] = {
            "old_img_s": windows["old"], "new_img_s": windows["new"],
            "old_median": round(old_median, 2), "new_median": round(new_median, 2),
            "ratio_new_to_old": round(new_median / old_median, 3),
            "noise": round(max(spread(windows["old"]), spread(windows["new"])), 3),
        }
    except Exception as exc:  # recorded, like a failed benchmark system
        log.exception("comparing %s failed", cls.key)
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for system in (new, old):
            system.stop()
    return out


def markdown(results: dict[str, Any]) -> str:
    c = results["config"]["concurrency"]
    lines = [f"# Old {results['old']} vs new {results['new']}", "",
             f"CPU: {results['machine']['cpu_model']} (family/model {results['machine']['cpu_family_model']}), "
             f"flags {', '.join(results['machine']['cpu_flags'])}, {results['machine']['cores']} cores", "",
             f"| model | system | p50 at 1, old | new | change (p25..p75) | img/s at {c}, old | new | new/old | noise |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model, systems in results["models"].items():
        for key, r in systems.items():
            if "error" in r:
                lines.append(f"| {model} | {key} | failed: {r['error']} |||||||")
                continue
            one, many = r["concurrency_1"], r[f"concurrency_{c}"]
            lines.append(
                f"| {model} | {key} | {one['old_p50_ms']:.1f} ms | {one['new_p50_ms']:.1f} ms | "
                f"{one['change_p50_ms']:+.2f} ms ({one['change_p25_ms']:+.2f}..{one['change_p75_ms']:+.2f}) | "
                f"{many['old_median']:.2f} | {many['new_median']:.2f} | {many['ratio_new_to_old']:.3f} | "
                f"±{100 * many['noise']:.1f} % |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bench").setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from bench import bundles, machine
    from bench.images import load_images
    from bench.systems import Context, GatewayClassify, VisionGrpc, setting_default
    from engines.runtime.bundle import load_bundle

    scratch = Path(tempfile.mkdtemp(prefix="medvlm-compare-"))
    old_root = checkout(args.old, scratch)
    results: dict[str, Any] = {
        "old": old_root.name, "new": machine.git_revision(ROOT).get("commit", "?")[:12], "machine": machine.describe(ROOT),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "models": {},
    }
    images = load_images(ROOT)
    choices, left_out = bundles.choose(args.bundles.resolve(), [m for m in args.models.split(",") if m], ROOT)
    results["models_left_out"] = left_out
    began = time.perf_counter()
    try:
        for choice in choices:
            ctx = Context(root=ROOT, model=choice.model, bundle=load_bundle(choice.bundle), images=images,
                          threads=args.threads, max_batch=setting_default("max_batch"),
                          max_delay_ms=setting_default("max_delay_ms"), batch_flags=[],
                          workdir=scratch / "logs" / choice.model)
            ctx.workdir.mkdir(parents=True)
            results["models"][choice.model] = {
                cls.key: compare_system(cls, ctx, old_root, args) for cls in (VisionGrpc, GatewayClassify)}
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_root)], check=False)
        shutil.rmtree(scratch, ignore_errors=True)
    results["duration_s"] = round(time.perf_counter() - began, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "compare.md").write_text(markdown(results))
    sys.stdout.write(markdown(results))
    return 0 if all("error" not in r for m in results["models"].values() for r in m.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
