"""Fault matrix: faults injected into a loaded local stack of real processes, each with counts.

python -m bench.faults   (make faults)

For each fault: calls sent, ok, failed by code, hung past their deadline, stream results lost
or duplicated, and the time to recover; then whether that is what the fault should cause.
Every fault gets a fresh stack on a hard-linked copy of the bundle. Needs no gateway restart to
recover from any encoder fault: that is part of what is checked.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench.machine import cpu_info
from bench.stress import CHEST, ROOT, MixedLoad, Stack, Tally, sample_images
from devtools.launch import ensure_bundle
from medvlm.v1 import gateway_pb2, gateway_pb2_grpc, types_pb2

STEADY = (("classify", 70), ("stream", 30))
# The loads the faults run under besides the flood; each stays within the stack's default bounds
# (tests/test_faults.py), so RESOURCE_EXHAUSTED is expected in the flood row only.
STEADY_LOAD = dict(mix=STEADY)
CACHED_LOAD = dict(mix=(("classify", 100),))
STREAMS_LOAD = dict(mix=(("stream", 100),), stream_items=40)
FLOOD_CALLS = 256  # concurrent Classify calls per wave of the flood, on one connection


@dataclasses.dataclass
class Row:
    fault: str
    tally: Tally
    recovery_s: float | None
    allowed: set[str]
    note: str = ""
    problem: str = ""  # a scenario-specific expectation that failed

    def passed(self) -> tuple[bool, str]:
        bad = set(self.tally.codes) - self.allowed - {"OK"}
        bad_items = set(self.tally.item_codes) - self.allowed
        reasons = [self.problem] if self.problem else []
        if bad:
            reasons.append(f"unexpected codes {sorted(bad)}")
        if bad_items:
            reasons.append(f"unexpected stream item codes {sorted(bad_items)}")
        if self.tally.hung:
            reasons.append(f"{self.tally.hung} hung")
        if self.tally.stream_results_lost or self.tally.stream_results_duplicated:
            reasons.append("stream results lost or duplicated")
        if self.recovery_s is None:
            reasons.append("did not recover")
        if not self.tally.codes.get("OK"):
            reasons.append("no call succeeded")
        return not reasons, "; ".join(reasons)


async def _first_ok_after(target: str, labels: list[str], since: float, within_s: float = 30.0) -> float | None:
    """Seconds from `since` until a Classify with `labels` succeeds (polling), or None."""
    image = types_pb2.Image(data=sample_images()[0])
    async with grpc.aio.insecure_channel(target) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        while time.monotonic() - since < within_s:
            try:
                await stub.Classify(gateway_pb2.ClassifyRequest(image=image, labels=labels), timeout=2)
                return time.monotonic() - since
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
    return None


async def _with_load(stack: Stack, fault, seconds_before: float, seconds_after: float, **load_args) -> tuple[Tally, float | None]:
    load = MixedLoad(stack.target, **load_args)
    running = asyncio.ensure_future(load.run())
    await asyncio.sleep(seconds_before)
    recovery = await fault()
    await asyncio.sleep(seconds_after)
    load.stop()
    return await running, recovery


def _signal(server, sig) -> None:
    os.kill(server.proc.pid, sig)


async def vision_replica_killed(bundle: Path, logs: Path, encoder_env: dict[str, str]) -> Row:
    stack = Stack(bundle, logs / "kill", encoder_env=encoder_env, vision_replicas=2)
    try:
        async def fault():
            killed = time.monotonic()
            _signal(stack.vision[0], signal.SIGKILL)
            return await _first_ok_after(stack.target, CHEST, killed)

        tally, recovery = await _with_load(stack, fault, 4, 8, **STEADY_LOAD, deadline_s=5)
    finally:
        stack.stop()
    return Row("vision replica SIGKILL (1 of 2)", tally, recovery, {"UNAVAILABLE"})


async def vision_frozen(bundle: Path, logs: Path, encoder_env: dict[str, str]) -> Row:
    stack = Stack(bundle, logs / "freeze", encoder_env=encoder_env)
    try:
        async def fault():
            _signal(stack.vision[0], signal.SIGSTOP)
            await asyncio.sleep(5)  # past every deadline (2 s; streams 6 s)
            _signal(stack.vision[0], signal.SIGCONT)
            return await _first_ok_after(stack.target, CHEST, time.monotonic())

        tally, recovery = await _with_load(stack, fault, 3, 6, **STEADY_LOAD, deadline_s=2)
    finally:
        stack.stop()
    return Row("vision frozen 5 s (SIGSTOP), then SIGCONT", tally, recovery,
               {"DEADLINE_EXCEEDED", "UNAVAILABLE"}, "recovery: from SIGCONT to the first answer")


async def text_down(bundle: Path, logs: Path, encoder_env: dict[str, str]) -> Row:
    stack = Stack(bundle, logs / "text", encoder_env=encoder_env)
    uncached_codes: dict[str, int] = {}
    try:
        async def fault():
            _signal(stack.text, signal.SIGKILL)
            stack.text.proc.wait(10)
            image = types_pb2.Image(data=sample_images()[1])
            async with grpc.aio.insecure_channel(stack.target) as channel:
                stub = gateway_pb2_grpc.GatewayServiceStub(channel)
                for i in range(10):  # labels never seen: they need the text encoder
                    try:
                        await stub.Classify(gateway_pb2.ClassifyRequest(
                            image=image, labels=[f"uncached finding {i}", f"another {i}"]), timeout=3)
                        uncached_codes["OK"] = uncached_codes.get("OK", 0) + 1
                    except grpc.aio.AioRpcError as exc:
                        uncached_codes[exc.code().name] = uncached_codes.get(exc.code().name, 0) + 1
            stack.text = stack.restart(stack.text, "text", stack.text_port)
            return await _first_ok_after(stack.target, ["after restart a", "after restart b"], time.monotonic())

        tally, recovery = await _with_load(stack, fault, 3, 3, **CACHED_LOAD, deadline_s=5)
    finally:
        stack.stop()
    row = Row("text encoder killed, cached labels under load", tally, recovery, set(),
              f"uncached labels meanwhile: {uncached_codes}; recovery: restart to first uncached answer")
    if not uncached_codes or set(uncached_codes) - {"UNAVAILABLE", "DEADLINE_EXCEEDED"}:
        row.problem = f"uncached labels with the text encoder down gave {uncached_codes}"
    return row


async def flood(bundle: Path, logs: Path, encoder_env: dict[str, str]) -> Row:
    stack = Stack(bundle, logs / "flood", encoder_env=encoder_env)
    tally = Tally()
    try:
        images = sample_images()
        async with grpc.aio.insecure_channel(stack.target) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)

            async def one(i: int) -> None:
                started = time.monotonic()
                tally.sent += 1
                try:
                    await stub.Classify(gateway_pb2.ClassifyRequest(
                        image=types_pb2.Image(data=images[i % len(images)]), labels=CHEST), timeout=30)
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                    if code == "RESOURCE_EXHAUSTED" and not dict(exc.trailing_metadata() or ()).get("retry-after-ms"):
                        code = "RESOURCE_EXHAUSTED without retry-after-ms"
                tally.record(code, started, 30)

            for _ in range(3):
                await asyncio.gather(*[one(i) for i in range(FLOOD_CALLS)])
        recovery = await _first_ok_after(stack.target, CHEST, time.monotonic())
    finally:
        stack.stop()
    return Row(f"flood: 3 waves of {FLOOD_CALLS} concurrent calls, one connection", tally, recovery, {"RESOURCE_EXHAUSTED"})


async def gateway_sigterm(bundle: Path, logs: Path, encoder_env: dict[str, str]) -> Row:
    stack = Stack(bundle, logs / "sigterm", encoder_env=encoder_env)
    exit_info = {}
    try:
        async def fault():
            stopped = time.monotonic()
            _signal(stack.gateway, signal.SIGTERM)
            load.stop()  # no new calls after the signal: the in-flight streams are what is checked
            code = await asyncio.to_thread(stack.gateway.proc.wait, 30)
            exit_info.update(code=code, seconds=round(time.monotonic() - stopped, 2))
            return time.monotonic() - stopped

        load = MixedLoad(stack.target, **STREAMS_LOAD, deadline_s=20)
        running = asyncio.ensure_future(load.run())
        await asyncio.sleep(3)
        recovery = await fault()
        tally = await running
    finally:
        stack.stop()
    row = Row("gateway SIGTERM with streams in flight", tally, recovery, set(),
              f"gateway exit status {exit_info.get('code')} after {exit_info.get('seconds')} s (recovery: time to exit)")
    if exit_info.get("code") != 0:
        row.problem = f"gateway exit status {exit_info.get('code')}"
    return row


async def bundle_moved(bundle: Path, logs: Path, encoder_env: dict[str, str]) -> Row:
    away = bundle.with_name(bundle.name + ".away")
    stack = Stack(bundle, logs / "bundle", encoder_env=encoder_env)
    try:
        async def fault():
            bundle.rename(away)  # root ignores file modes, so "unreadable" is made by taking it away
            await asyncio.sleep(6)
            away.rename(bundle)
            return 0.0

        tally, recovery = await _with_load(stack, fault, 2, 2, **STEADY_LOAD, deadline_s=5)
    finally:
        if away.exists():
            away.rename(bundle)
        stack.stop()
    return Row("bundle directory taken away while serving (6 s)", tally, recovery, set(),
               "loaded engines keep serving; nothing re-reads the bundle")


FAULTS = (vision_replica_killed, vision_frozen, text_down, flood, gateway_sigterm, bundle_moved)


def table(rows: list[Row]) -> str:
    lines = ["| fault | sent | ok | failed (by code) | hung | stream lost / dup | recovery | verdict |",
             "|---|---:|---:|---|---:|---|---:|---|"]
    for row in rows:
        t = row.tally.summary()
        ok, why = row.passed()
        failed = ", ".join([f"{k} {v}" for k, v in t["failed"].items()]
                           + [f"{k} {v} (stream items)" for k, v in t["stream_items_failed"].items()]) or "0"
        recovery = "-" if row.recovery_s is None else f"{row.recovery_s:.2f} s"
        lines.append(f"| {row.fault} | {t['sent']} | {t['ok']} | {failed} | {t['hung']} | "
                     f"{t['stream_lost']} / {t['stream_duplicated']} | {recovery} | "
                     f"{'PASS' if ok else 'FAIL: ' + why} |")
    notes = [f"* {r.fault}: {r.note}" for r in rows if r.note]
    return "\n".join(lines + [""] + notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--bundles", type=Path, default=ROOT / "bundles")
    parser.add_argument("--only", nargs="*", help="names of fault functions to run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "faults")
    parser.add_argument("--engine", default="auto",
                        help="engine of every encoder (their --engine), e.g. openvino or onnxruntime-cpu; "
                             "auto: what the encoders choose on this machine")
    args = parser.parse_args(argv)
    encoder_env = {} if args.engine == "auto" else {"MEDVLM_ENGINE": args.engine}
    source = ensure_bundle(args.bundles.resolve(), args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for fault in FAULTS:
            if args.only and fault.__name__ not in args.only:
                continue
            bundle = Path(tmp) / source.name
            if not bundle.exists():
                shutil.copytree(source, bundle, copy_function=os.link)
            print(f"fault: {fault.__name__} ...", flush=True)
            rows.append(asyncio.run(fault(bundle, args.out / "logs", encoder_env)))
            print(table(rows[-1:]).splitlines()[2], flush=True)
    text = table(rows)
    (args.out / "faults.md").write_text(text + "\n")
    (args.out / "faults.json").write_text(json.dumps({
        "machine": cpu_info(), "bundle": source.name, "engine": args.engine,
        "rows": [{"fault": r.fault, **r.tally.summary(), "recovery_s": r.recovery_s, "passed": r.passed()[0],
                  "note": r.note} for r in rows]}, indent=1))
    print(text)
    return 0 if all(r.passed()[0] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
