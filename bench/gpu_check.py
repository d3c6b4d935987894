"""`make gpu-check`: a one-shot check of the GPU path, in a bounded time, on a machine with an NVIDIA GPU
and PyTorch but possibly without TensorRT or onnxruntime-gpu.

Steps, each skipped with its reason when what it needs is missing or the time left is too short:
  1. environment: torch, CUDA device, TensorRT, ONNX Runtime providers, CPU flags;
  2. the biomedclip-arch bundle (built here if missing: ONNX export on the CPU, about 2 min);
  3. the torch reference engine on CUDA, vision tower, fp32 and fp16: images/s at batch 1, 8 and 32,
     and the cosine of fp16 outputs to fp32's;
  4. the stack served on it (vision and text encoders --engine torch-cuda, gateway): Classify p50 at
     concurrency 1 and images/s at concurrency 16;
  5. where TensorRT imports: plans built and gated for this GPU (engines.build plans), then served
     (--engine tensorrt) and measured as in 4.
It writes gpu-check.json and gpu-check.md into --out. `--device cpu` runs the same steps on the CPU
with the tiny model to check the script itself: its report says, in its title and in every table,
that it is a CPU dry run and measures no GPU.

The packages the serving path needs beyond PyTorch are listed in requirements/gpu-check.txt; `make
gpu-wheels` collects them as wheels (at most 60 MiB together) to carry to a machine that cannot
reach a package index.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import importlib.util
import io
import json
import logging
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUDGET_S = 480.0  # the bound: 8 minutes for the whole check
GPU_MODEL = "biomedclip-arch"
DRY_MODEL = "tiny"
BATCHES = (1, 8, 32)
LABELS = ("normal chest radiograph", "left pleural effusion", "cardiomegaly", "dermoscopy of a naevus")
TEMPLATE = "a medical image showing {}"
# Seconds each step is expected to need at most on a GPU node; a step starts only if this fits in
# the time left (the bundle build is estimated from the CPU export time measured on 2 cores).
ESTIMATES_S = {"bundle": 180.0, "torch": 60.0, "served": 90.0, "tensorrt": 150.0}
DRY_RUN_NOTE = "CPU DRY RUN: the script's own check on the CPU with the tiny model; it measures no GPU"

log = logging.getLogger("bench.gpu_check")


@dataclasses.dataclass
class Report:
    """What the check found, step by step; written as JSON and markdown."""

    device: str  # "cuda" or "cpu" (dry run)
    model: str
    budget_s: float
    started: str = dataclasses.field(default_factory=lambda: datetime.datetime.now(datetime.UTC)
                                     .isoformat(timespec="seconds"))
    environment: dict[str, Any] = dataclasses.field(default_factory=dict)
    steps: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    @property
    def dry_run(self) -> bool:
        return self.device != "cuda"

    def step(self, name: str, status: str, **fields: Any) -> dict[str, Any]:
        self.steps[name] = {"status": status, **fields}
        log.info("step %s: %s %s", name, status, fields.get("reason", ""))
        return self.steps[name]

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["dry_run"] = self.dry_run
        if self.dry_run:
            data["note"] = DRY_RUN_NOTE
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def to_markdown(self) -> str:
        title = "GPU check" + (f" — {DRY_RUN_NOTE}" if self.dry_run else "")
        lines = [f"# {title}", "", f"Started {self.started}, {self.seconds:.0f} s of a {self.budget_s:.0f} s budget; "
                 f"model {self.model}, device {self.device}.", "", "## Environment", ""]
        lines += [f"- {k}: {v}" for k, v in sorted(self.environment.items())]
        for name, step in self.steps.items():
            lines += ["", f"## {name}" + (" (CPU dry run, not a GPU figure)" if self.dry_run else ""), "",
                      f"status: {step['status']}" + (f" — {step['reason']}" if step.get("reason") else "")]
            for key, value in step.items():
                if key in ("status", "reason"):
                    continue
                if isinstance(value, list) and value and isinstance(value[0], dict):
                    columns = list(value[0])
                    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in value]
                else:
                    lines.append(f"- {key}: {_cell(value)}")
        return "\n".join(lines) + "\n"

    def write(self, out: Path) -> tuple[Path, Path]:
        out.mkdir(parents=True, exist_ok=True)
        paths = (out / "gpu-check.json", out / "gpu-check.md")
        paths[0].write_text(self.to_json())
        paths[1].write_text(self.to_markdown())
        return paths


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


class Budget:
    """The time left of the check's bound; a step that would not fit is skipped, not started."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._deadline = clock() + seconds

    def left(self) -> float:
        return self._deadline - self._clock()

    def fits(self, estimate_s: float) -> bool:
        return self.left() >= estimate_s


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (the check); cpu: a dry run of the script on the tiny model, labelled as such")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"the whole check's time bound; steps that would not fit are skipped (default {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--bundles", type=Path, default=ROOT / "bundles", help="folder of bundles (built into if missing)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gpu-check", help="report folder")
    p.add_argument("--batches", default=",".join(str(b) for b in BATCHES), help="torch throughput batch sizes")
    p.add_argument("--calls", type=int, default=20, help="timed calls per batch size and per served point")
    p.add_argument("--skip", default="", help="comma-separated steps to skip: torch, served, tensorrt")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    try:
        args.batches = tuple(int(b) for b in args.batches.split(",") if b)
    except ValueError as exc:
        raise SystemExit(f"--batches: comma-separated integers expected ({exc})") from exc
    if not args.batches or min(args.batches) < 1:
        raise SystemExit("--batches: at least one batch size >= 1")
    args.skip = {s for s in args.skip.split(",") if s}
    unknown = args.skip - {"torch", "served", "tensorrt"}
    if unknown:
        raise SystemExit(f"--skip: unknown step(s) {', '.join(sorted(unknown))}")
    if args.budget_s <= 0 or args.calls < 1:
        raise SystemExit("--budget-s and --calls must be positive")
    return args


# ----------------------------------------------------------------------------- steps


def environment(device: str) -> dict[str, Any]:
    """Versions and what this machine can run; nothing here fails the check."""
    from engines.runtime import openvino as ov_engine
    from engines.runtime import tensorrt as trt_engine
    from engines.runtime.engine import EngineError

    found: dict[str, Any] = {"python": sys.version.split()[0]}
    try:
        import torch

        found["torch"] = torch.__version__
        found["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            found["gpu"] = torch.cuda.get_device_name(0)
            found["compute_capability"] = ".".join(str(x) for x in torch.cuda.get_device_capability(0))
            found["cuda"] = torch.version.cuda
    except ImportError as exc:
        found["torch"] = f"not importable: {exc}"
    try:
        found["tensorrt"] = trt_engine.import_tensorrt().__version__
    except EngineError as exc:
        found["tensorrt"] = f"unavailable: {exc}"
    try:
        import onnxruntime

        found["onnxruntime"] = f"{onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})"
    except ImportError as exc:
        found["onnxruntime"] = f"not importable: {exc}"
    flags = ov_engine.cpu_flags()
    found["cpu_flags"] = ", ".join(f for f in ov_engine.REPORTED_FLAGS if f in flags) or "none of interest"
    found["device_asked"] = device
    return found


def ensure_bundle(args: argparse.Namespace, report: Report, budget: Budget) -> Path | None:
    from bench.bundles import BundleUnavailable
    from bench.bundles import ensure_bundle as build
    from engines.runtime.bundle import find_bundle

    existing = find_bundle(args.bundles, report.model)
    if existing is not None:
        report.step("bundle", "ok", path=existing.name, built=False)
        return existing
    if not budget.fits(ESTIMATES_S["bundle"] if report.model == GPU_MODEL else 30.0):
        report.step("bundle", "skipped", reason=f"no {report.model} bundle and {budget.left():.0f} s left")
        return None
    try:
        path, took = build(args.bundles, report.model, ROOT)
    except BundleUnavailable as exc:
        report.step("bundle", "failed", reason=str(exc))
        return None
    report.step("bundle", "ok", path=path.name, built=True, build_s=round(took, 1))
    return path


def _timed(fn: Callable[[], Any], calls: int, sync: Callable[[], None]) -> list[float]:
    fn()  # warm-up: kernels chosen, memory allocated
    sync()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return times


def torch_step(args: argparse.Namespace, report: Report, bundle_dir: Path, budget: Budget) -> None:
    """The torch reference vision tower on the device, fp32 and fp16: images/s per batch, fp16 vs fp32."""
    import torch

    from engines.build.torch_engine import load_source
    from engines.runtime.bundle import load_bundle, row_cosines
    from engines.runtime.manifest import VISION_INPUT

    if args.device == "cuda" and not torch.cuda.is_available():
        report.step("torch", "skipped", reason="torch reports no usable CUDA device")
        return
    bundle = load_bundle(bundle_dir)
    model = load_source(bundle).model.eval().to(args.device)
    golden = torch.from_numpy(bundle.golden()[VISION_INPUT]).to(args.device)  # [G, 3, S, S]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    rows, outputs = [], {}
    for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        if args.device == "cpu" and dtype == torch.float16:
            rows.append({"precision": precision, "batch": "-", "images_per_s": None, "ms_per_call_p50": None,
                         "note": "fp16 is not measured on the CPU"})
            continue
        tower = model.to(dtype)
        with torch.inference_mode():
            outputs[precision] = tower.encode_image(golden.to(dtype)).float().cpu().numpy()  # [G, D]
            for size in args.batches:
                if not budget.fits(10.0):
                    rows.append({"precision": precision, "batch": size, "images_per_s": None,
                                 "ms_per_call_p50": None, "note": f"skipped: {budget.left():.0f} s left"})
                    continue
                batch = golden[torch.arange(size, device=args.device) % len(golden)].to(dtype)
                times = _timed(lambda b=batch: tower.encode_image(b), args.calls, sync)
                p50 = statistics.median(times)
                rows.append({"precision": precision, "batch": size, "images_per_s": round(size / p50, 1),
                             "ms_per_call_p50": round(1000 * p50, 2), "note": ""})
    fields: dict[str, Any] = {"throughput": rows}
    if "fp16" in outputs:
        cos = row_cosines(outputs["fp16"], outputs["fp32"])
        fields["fp16_vs_fp32_cosine_min"] = float(cos.min())
    model.to("cpu")
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    report.step("torch", "ok", **fields)


def _png(seed: int, size: int = 512) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def served_step(args: argparse.Namespace, report: Report, bundle_dir: Path, budget: Budget, name: str,
                engine: str) -> None:
    """The three services on `engine`; Classify p50 at concurrency 1 and images/s at 16."""
    import grpc

    from bench.procs import HOST, Server, ServerFailed, free_port, service_env
    from medvlm.v1 import gateway_pb2, gateway_pb2_grpc, types_pb2

    if not budget.fits(ESTIMATES_S["served"]):
        report.step(name, "skipped", reason=f"{budget.left():.0f} s left, needs about {ESTIMATES_S['served']:.0f}")
        return
    work = args.out / f"{name}-logs"
    work.mkdir(parents=True, exist_ok=True)
    servers: list[Server] = []
    # uvloop is left out of the carried wheels (they would exceed 60 MiB): asyncio's loop where it is absent
    event_loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"

    def launch(service: str, argv: list[str]) -> str:
        port = free_port()
        server = Server(service, [sys.executable, "-m", f"services.{service}", "--host", HOST, "--port", str(port),
                                  "--no-metrics", "--event-loop", event_loop, *argv], cwd=ROOT, env=service_env(ROOT),
                        log_dir=work)
        servers.append(server)
        server.wait_serving(f"{HOST}:{port}", max(30.0, budget.left() - 30.0))
        return f"{HOST}:{port}"

    try:
        encoder = ["--bundle", str(bundle_dir), "--allow-benchmark", "--engine", engine]
        vision = launch("vision", encoder)
        text = launch("text", encoder)
        target = launch("gateway", ["--vision-target", vision, "--text-target", text])
        pngs = [_png(i) for i in range(8)]
        with grpc.insecure_channel(target) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            engines = [f"{types_pb2.Tower.Name(e.tower)}: {e.engine} {types_pb2.Precision.Name(e.precision)}"
                       for e in stub.GetModelInfo(types_pb2.GetModelInfoRequest(), timeout=30).model.engines]

            def classify(n: int) -> float:
                started = time.perf_counter()
                stub.Classify(gateway_pb2.ClassifyRequest(image=types_pb2.Image(data=pngs[n % len(pngs)]),
                                                          labels=list(LABELS), template=TEMPLATE, top_k=1),
                              timeout=60)
                return time.perf_counter() - started

            classify(0)  # fills the label cache
            single = [classify(n) for n in range(args.calls)]
            total = max(16, 2 * args.calls)
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                started = time.perf_counter()
                list(pool.map(classify, range(total)))
                wall = time.perf_counter() - started
        report.step(name, "ok", engine=engine, served_engines="; ".join(engines), event_loop=event_loop, points=[
            {"concurrency": 1, "requests": len(single), "p50_ms": round(1000 * statistics.median(single), 2),
             "images_per_s": round(len(single) / sum(single), 2)},
            {"concurrency": 16, "requests": total, "p50_ms": None, "images_per_s": round(total / wall, 2)}])
    except (ServerFailed, grpc.RpcError) as exc:
        report.step(name, "failed", engine=engine, reason=str(exc)[:600])
    finally:
        for server in reversed(servers):
            server.stop()


def tensorrt_step(args: argparse.Namespace, report: Report, bundle_dir: Path, budget: Budget) -> None:
    """Plans for this GPU built and gated on a copy of the bundle, then served."""
    from engines.runtime import tensorrt as trt_engine
    from engines.runtime.engine import EngineError

    try:
        trt_engine.import_tensorrt()
    except EngineError as exc:
        report.step("tensorrt", "skipped", reason=str(exc))
        return
    if args.device != "cuda":
        report.step("tensorrt", "skipped", reason="TensorRT needs the CUDA device (dry run on the CPU)")
        return
    if not budget.fits(ESTIMATES_S["tensorrt"]):
        report.step("tensorrt", "skipped", reason=f"{budget.left():.0f} s left, needs about {ESTIMATES_S['tensorrt']:.0f}")
        return
    copy = args.out / "tensorrt-bundle" / bundle_dir.name
    if copy.exists():
        shutil.rmtree(copy)
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundle_dir, copy, copy_function=_link_or_copy)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "engines.build", "plans", "--bundle", str(copy),
                           "--precision", "fp32,fp16"], cwd=ROOT, capture_output=True, text=True,
                          timeout=max(30.0, budget.left() - ESTIMATES_S["served"]), check=False)
    tail = " | ".join(line for line in proc.stderr.splitlines()[-6:] if line.strip())
    if proc.returncode != 0:
        report.step("tensorrt", "failed", reason=f"plans exited {proc.returncode}: {tail}"[:800])
        return
    from engines.runtime.bundle import load_bundle

    plans = {n: {"precision": e.precision, "gpu": e.gpu, "tensorrt": e.tensorrt}
             for n, e in load_bundle(copy).manifest.files.items() if e.role == "plan"}  # derived.json's too
    report.step("tensorrt", "ok", build_s=round(time.perf_counter() - started, 1), plans=json.dumps(plans),
                build_log=tail[:400])
    served_step(args, report, copy, budget, "served-tensorrt", "tensorrt")


def _link_or_copy(src: str, dst: str) -> None:
    """Hard links where the file system allows (the bundle's big ONNX files are never written to)."""
    try:
        Path(dst).hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)


def run(args: argparse.Namespace) -> Report:
    """Every step within the budget; the report is written whatever happens."""
    budget = Budget(args.budget_s)
    started = time.perf_counter()
    report = Report(device=args.device, model=GPU_MODEL if args.device == "cuda" else DRY_MODEL,
                    budget_s=args.budget_s)
    try:
        report.environment = environment(args.device)
        bundle_dir = ensure_bundle(args, report, budget)
        if bundle_dir is not None:
            if "torch" in args.skip:
                report.step("torch", "skipped", reason="--skip torch")
            else:
                torch_step(args, report, bundle_dir, budget)
            if "served" in args.skip:
                report.step("served-torch", "skipped", reason="--skip served")
            else:
                served_step(args, report, bundle_dir, budget, "served-torch",
                            "torch-cuda" if args.device == "cuda" else "torch-cpu")
            if "tensorrt" in args.skip:
                report.step("tensorrt", "skipped", reason="--skip tensorrt")
            else:
                tensorrt_step(args, report, bundle_dir, budget)
    finally:
        report.seconds = time.perf_counter() - started
        report.write(args.out)
    return report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    report = run(args)
    print(args.out / "gpu-check.md")
    failed = [n for n, s in report.steps.items() if s["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
