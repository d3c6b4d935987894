"""Mutation check of the serving path: do the tests notice when a behaviour breaks?

Each mutation below is one deliberate bug, named, in one file. They are applied one at a time to
a temporary copy of the checkout, and the tests that guard the behaviour run against the copy. A
mutation the tests catch is good; one that survives is a gap in the tests. Not part of CI (it
takes several minutes): run `make mutate`, or `python scripts/mutate.py NAME...` for some.

Exit status: 0 when every mutation was caught, 1 when one survived, 2 when the unmutated copy
fails its own tests or a mutation no longer applies (the code it names has changed).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
C = "tests/test_contracts.py::"


@dataclasses.dataclass(frozen=True)
class Mutation:
    """Replace `old` (which must occur exactly once in `path`) by `new`; `tests` must then fail."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str


MUTATIONS = (
    Mutation(
        "gateway-ignores-bundle-of-reply", "services/gateway/zeroshot.py",
        "        if result.bundle_id != self.model.bundle_id:", "        if False:",
        (C + "test_a_reply_of_another_bundle_is_refused_per_call",),
        "an encoder reply of another bundle is used as if it were the verified one",
    ),
    Mutation(
        "vision-replicas-mixed", "services/gateway/clients.py",
        "        if len({d.bundle_id for d in done}) != 1:", "        if False:",
        (C + "test_one_request_split_over_replicas_of_different_bundles_is_never_mixed",),
        "one request's images embedded by replicas of different bundles, mixed into one answer",
    ),
    Mutation(
        "benchmark-served-without-flag", "services/encoder/app.py",
        "    if manifest.kind == KIND_BENCHMARK and not settings.allow_benchmark:", "    if False:",
        (C + "test_a_benchmark_bundle_is_served_only_when_allowed",),
        "a random-weight benchmark bundle served without --allow-benchmark",
    ),
    Mutation(
        "engine-error-not-delivered", "services/encoder/batching.py",
        '                        item.request.settle(error=MedvlmError("the engine failed on this batch"))',
        "                        pass",
        (C + "test_an_engine_failure_reaches_every_waiting_caller_and_the_server_recovers",),
        "an engine exception never reaches its callers (they wait until their deadline)",
    ),
    Mutation(
        "image-digest-of-first-16-bytes", "services/vision/servicer.py",
        "        digests = [convert.sha256_hex(item.data) for item in items]",
        "        digests = [convert.sha256_hex(item.data[:16]) for item in items]",
        (C + "test_digests_are_the_sha256_of_each_input",),
        "image_sha256 computed over the first 16 bytes only",
    ),
    Mutation(
        "priority-dropped-to-vision", "services/gateway/clients.py",
        "types_pb2.EmbedImagesRequest(images=chunk, priority=priority)",
        "types_pb2.EmbedImagesRequest(images=chunk)",
        (C + "test_priority_reaches_both_encoders", C + "test_stream_items_carry_their_own_priority"),
        "the request's priority dropped between the gateway and the vision encoder",
    ),
    Mutation(
        "priority-dropped-to-text", "services/gateway/clients.py",
        "types_pb2.EmbedTextsRequest(texts=texts, priority=priority)",
        "types_pb2.EmbedTextsRequest(texts=texts)",
        (C + "test_priority_reaches_both_encoders",),
        "the request's priority dropped between the gateway and the text encoder",
    ),
    Mutation(
        "golden-check-plain-only", "engines/runtime/bundle.py",
        "    return float(min(row_cosines(got, expected).min(), row_cosines(got - centre, expected - centre).min()))",
        "    return float(row_cosines(got, expected).min())",
        (C + "test_golden_outputs_of_other_inputs_are_refused_even_under_a_loose_bound",),
        "the centred half of the golden check removed",
    ),
    Mutation(
        "gateway-image-count-unchecked", "services/plumbing/limits.py",
        "    if len(images) > max_images:", "    if False:",
        (C + "test_the_gateway_enforces_its_own_image_count_limit",),
        "the image-count limit removed (the gateway's and the vision encoder's one check)",
    ),
    Mutation(
        "stream-drops-template-and-top-k", "services/gateway/stream.py",
        "        question = asked if asked.labels or asked.label_set else question",
        "        question = asked if asked.labels or asked.label_set else Question(question.labels, question.label_set)",
        (C + "test_stream_items_use_the_first_items_template_and_top_k_and_answer_for_their_image",),
        "ClassifyStream no longer carries the template and top_k forward",
    ),
    Mutation(
        "gateway-retries-disabled", "services/gateway/clients.py",
        '        ("grpc.enable_retries", 1),', '        ("grpc.enable_retries", 0),',
        (C + "test_a_replica_answering_unavailable_costs_no_failed_call",),
        "the gateway's retry policy switched off",
    ),
    Mutation(
        "headers-before-work", "services/plumbing/interceptors.py",
        "                call.admit()\n                response = await behavior(",
        "                call.admit()\n                await call.send_headers()\n                response = await behavior(",
        (C + "test_a_replica_answering_unavailable_costs_no_failed_call",),
        "headers sent before the work, so no failed call can be retried",
    ),
    Mutation(
        "embeddings-not-normalised", "engines/runtime/engine.py",
        "        return l2_normalize(self.infer(batch))",
        "        return self.infer(batch)",
        (C + "test_embeddings_are_unit_length_from_the_encoders_and_the_gateway",),
        "embeddings left un-normalised",
    ),
    Mutation(
        "logit-scale-ignored", "services/gateway/labels/search.py",
        "softmax(logit_scale * cosine.astype(np.float64))", "softmax(cosine.astype(np.float64))",
        ("tests/test_end_to_end.py",),
        "probabilities computed without the model's logit scale",
    ),
    Mutation(
        "top-k-ignored", "services/gateway/questions.py",
        "    return top_k if 0 < top_k <= count else count", "    return count",
        ("tests/test_gateway.py::test_classify_probabilities_and_top_k",),
        "Classify's top_k ignored",
    ),
    Mutation(
        "ties-at-the-cut-not-in-label-order", "services/gateway/labels/search.py",
        "        tied = np.flatnonzero(scores == kth)[: k - len(above)]",
        "        tied = np.flatnonzero(scores == kth)[::-1][: k - len(above)]",
        ("tests/test_scoring.py::test_best_is_the_k_highest_with_ties_in_label_order_at_every_place",
         "tests/test_scoring.py::test_tied_labels_are_listed_in_request_order_at_the_top_k_cut_too"),
        "equal scores at the top_k cut: a later label listed instead of an earlier one",
    ),
    Mutation(
        "calibration-scope-ignores-template", "services/gateway/trust.py",
        "scope_for([label.name for label in label_set.labels], label_set.templates[0])",
        'scope_for([label.name for label in label_set.labels], "{}")',
        ("tests/test_scoring.py::test_the_calibration_scope_is_chosen_by_the_labels_and_the_template",),
        "labels sent with another template judged by the scope fitted on the plain one",
    ),
    Mutation(
        "expired-deadline-computed", "services/encoder/batching.py",
        "            if self._dropped_expired(request, now):", "            if False:",
        ("tests/test_batching.py::test_an_expired_deadline_never_reaches_the_engine",),
        "work whose deadline passed still reaches the engine",
    ),
    Mutation(
        "routine-never-ages", "services/encoder/batching.py",
        "        aged = [p for p, h in heads.items() if now - h.enqueued >= self._aging_s]",
        "        aged = []",
        ("tests/test_batching.py::test_routine_work_is_not_starved_by_a_stream_of_stat",),
        "routine work starved by a stream of STAT (priority aging removed)",
    ),
    Mutation(
        "queue-unbounded", "services/encoder/batching.py",
        "            if self._admitted + ticket.count > self._max_admitted:", "            if False:",
        ("tests/test_batching.py::test_full_queue_is_resource_exhausted_in_waves_and_the_server_keeps_serving",),
        "the batcher's queue bound removed",
    ),
    Mutation(
        "text-cache-bypassed", "services/gateway/cache.py",
        "            row = self._rows.get(key)", "            row = None",
        ("tests/test_gateway.py::test_a_repeated_label_is_never_encoded_twice",),
        "every label re-encoded on every call",
    ),
)


def copy_checkout(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files as they are in the working tree, and gen/."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    shutil.copytree(ROOT / "gen", dest / "gen")


def run_tests(copy: Path, tests: tuple[str, ...], env: dict[str, str], timeout_s: float) -> tuple[bool, str]:
    """True when the tests pass in `copy`; the tail of their output."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "no:randomly", "-p", "no:cacheprovider",
               "--timeout", str(int(timeout_s)), *tests]
    try:
        proc = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout_s + 60)
    except subprocess.TimeoutExpired:
        return False, "timed out"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    failed = [line[:220] for line in lines if line.startswith("FAILED ")]
    return proc.returncode == 0, " | ".join(failed or lines[-1:]) or proc.stderr[-300:]


def apply(copy: Path, mutation: Mutation) -> str:
    """Write the mutated file into the copy; returns the original text to restore."""
    target = copy / mutation.path
    text = target.read_text()
    if text.count(mutation.old) != 1:
        raise LookupError(f"{mutation.path}: the code this mutation changes occurs {text.count(mutation.old)} times")
    target.write_text(text.replace(mutation.old, mutation.new))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per test run")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:34} {m.path:34} {m.why}")
        return 0
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutations: {', '.join(sorted(unknown))}")

    with tempfile.TemporaryDirectory(prefix="medvlm-mutate-") as tmp:
        copy, bundles = Path(tmp) / "src", Path(tmp) / "bundles"
        copy_checkout(copy)
        env = dict(os.environ, PYTHONPATH=f"{copy}:{copy / 'gen'}", HF_HUB_OFFLINE="1", TEST_BUNDLES=str(bundles))
        print("building the tiny bundle once for every run ...", flush=True)
        subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                        "from engines.build.bundle import build_bundle; build_bundle('tiny', Path(sys.argv[1]))",
                        str(bundles)], cwd=copy, env=env, check=True, capture_output=True)

        every_test = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        passed, tail = run_tests(copy, every_test, env, args.timeout * 2)
        print(f"baseline (no mutation): {'pass' if passed else 'FAIL'}: {tail}", flush=True)
        if not passed:
            print("the unmutated code fails its own tests; fix that first")
            return 2

        survived, stale = [], []
        for mutation in chosen:
            started = time.monotonic()
            try:
                original = apply(copy, mutation)
            except LookupError as exc:
                stale.append(mutation.name)
                print(f"STALE     {mutation.name}: {exc}", flush=True)
                continue
            try:
                passed, tail = run_tests(copy, mutation.tests, env, args.timeout)
            finally:
                (copy / mutation.path).write_text(original)
            verdict = "SURVIVED" if passed else "caught"
            if passed:
                survived.append(mutation.name)
            print(f"{verdict:9} {mutation.name} ({time.monotonic() - started:.0f} s): {mutation.why}; "
                  f"tests: {tail}", flush=True)

    print(f"\n{len(chosen) - len(survived) - len(stale)} caught, {len(survived)} survived, {len(stale)} stale "
          f"of {len(chosen)} mutations")
    for name in survived:
        print(f"  survived: {name}")
    return 2 if stale else 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
