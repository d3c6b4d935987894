"""NVIDIA Triton as a system under test, driven from its own Python environment.

nvidia-pytriton 0.7.0 (which bundles tritonserver 2.51 and its Python backend) requires numpy < 2 and
tritonclient[grpc] requires protobuf < 7, while the project pins numpy 2.4.6 and protobuf 7: they cannot
share one environment. The Triton environment (bench/requirements-triton.txt, by default in
.cache/bench-triton) runs both the server (bench.triton_server) and the client (bench.triton_client),
and the client uses the same load generator, bench.load, as every other system.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np

from bench.load import Point
from bench.procs import HOST, Server, ServerFailed, free_port, log_tail
from bench.systems import Context, System, SystemUnavailable, check_cosine, log_point

log = logging.getLogger("bench.triton")

ENV_DIR = Path(".cache") / "bench-triton"  # relative to the repository root
REQUIREMENTS = Path("bench") / "requirements-triton.txt"
START_TIMEOUT_S = 180.0

_PROBE = """
import importlib.metadata as m, json, sysconfig
import numpy, onnxruntime, pytriton, tritonclient.grpc
print(json.dumps({"libdir": sysconfig.get_config_var("LIBDIR"),
                  "nvidia-pytriton": m.version("nvidia-pytriton"), "tritonclient": m.version("tritonclient"),
                  "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__}))
"""


def default_python(root: Path) -> Path:
    return root / ENV_DIR / "bin" / "python"


def how_to_create(root: Path) -> str:
    env = ENV_DIR
    return (f"create it with `python3.11 -m venv {env} && {env}/bin/pip install -r {REQUIREMENTS}` "
            f"(make bench does this)")


class TritonSystem(System):
    key = "triton"
    title = "NVIDIA Triton 2.51 (nvidia-pytriton), ONNX Runtime in its Python backend, dynamic batcher"
    request = "preprocessed float32 tensor [1, 3, S, S] over gRPC (tritonclient.grpc); no decoding"

    python: Path | None = None  # set by the harness from --triton-python

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.server: Server | None = None

    def _probe(self, python: Path) -> dict[str, str]:
        try:
            proc = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=120,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SystemUnavailable(f"the Triton environment's Python {python} does not run: {exc}") from exc
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            said = lines[-1] if lines else f"exit status {proc.returncode}"
            raise SystemUnavailable(f"the Triton environment {python} lacks a package ({said}); "
                                    f"{how_to_create(self.ctx.root)}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def start(self) -> None:
        python = self.python or default_python(self.ctx.root)
        if not python.exists():
            raise SystemUnavailable(
                f"no Triton environment at {python.parent.parent}: nvidia-pytriton 0.7.0 needs numpy < 2 and "
                f"cannot be installed next to the project's numpy 2.4.6; {how_to_create(self.ctx.root)}")
        probe = self._probe(python)
        self.python_path = python
        # The Python backend stub links libpython dynamically; without the lib folder of the Python that
        # runs the environment it may load the system's libpython and fail (`_recursion_count`).
        paths = (probe["libdir"], os.environ.get("LD_LIBRARY_PATH", ""))
        library_path = os.pathsep.join(p for p in paths if p)
        self.env = dict(os.environ, PYTHONPATH=str(self.ctx.root), LD_LIBRARY_PATH=library_path)
        self.grpc_port = free_port()
        delay_us = round(self.ctx.max_delay_ms * 1000)
        argv = [str(python), "-m", "bench.triton_server",
                "--onnx", str(self.ctx.bundle.engine_file("vision")),
                "--grpc-port", str(self.grpc_port), "--http-port", str(free_port()),
                "--metrics-port", str(free_port()), "--threads", str(self.ctx.threads),
                "--max-batch", str(self.ctx.max_batch), "--max-delay-us", str(delay_us), *self.server_flags()]
        self.server = Server("triton", argv, cwd=self.ctx.root, env=self.env, log_dir=self.ctx.workdir,
                             stdout_pipe=True)
        ready = self._read_ready(self.server)
        self.details = {
            "versions": {k: v for k, v in probe.items() if k != "libdir"},
            "model_config": {"max_batch_size": self.ctx.max_batch,
                             "dynamic_batching": {"max_queue_delay_microseconds": delay_us},
                             "instances": 1, "onnxruntime_intra_op_threads": self.ctx.threads},
            "server": ready,
        }

    def _read_ready(self, server: Server) -> dict[str, Any]:
        """The server's {"ready": ...} line on stdout (other lines are tritonserver's), else ServerFailed."""
        found: list[dict[str, Any]] = []
        other: list[str] = []

        def read() -> None:
            for raw in server.proc.stdout:
                line = raw.decode(errors="replace").strip()
                # tritonserver writes to the same stdout: its output can run into our line on either side
                at = line.find('{"ready"')
                if at >= 0:
                    try:
                        found.append(json.JSONDecoder().raw_decode(line[at:])[0])
                    except ValueError:
                        other.append(line[:200])
                        continue
                    return
                if line:
                    other.append(line[:200])

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(START_TIMEOUT_S)
        if not found:
            said = f"; stdout: {' | '.join(other[-3:])}" if other else ""
            if reader.is_alive():
                raise server.failure(f"was not ready after {START_TIMEOUT_S:.0f} s{said}")
            try:
                status = server.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                raise server.failure(f"closed its output without saying it was ready{said}") from None
            raise server.failure(f"exited with status {status} before it was ready{said}")
        if not found[0].get("ready"):
            raise server.failure(f"reported {found[0]}")
        # keep draining stdout so that tritonserver never blocks on a full pipe
        threading.Thread(target=lambda: [None for _ in server.proc.stdout], daemon=True).start()
        return found[0]

    def server_flags(self) -> list[str]:
        """What the model takes: preprocessed tensors here."""
        return []

    def client_inputs(self) -> list[str]:
        """The client's images: the preprocessed tensors, saved for the Triton environment."""
        tensors = self.ctx.workdir / "triton-images.npy"
        np.save(tensors, self.ctx.tensors)
        return ["--tensors", str(tensors)]

    def check(self) -> dict[str, Any]:
        return self.run([], 0.0, 0.0)[0]  # the client checks image 0, then measures no point

    def make_request(self, worker: int):  # the load runs in the Triton environment, see run()
        raise NotImplementedError

    def points(self, concurrency: list[int], seconds: float, warmup_s: float) -> list[Point]:
        return self.run(concurrency, seconds, warmup_s)[1]  # its client checks image 0 first, each time

    def run(self, concurrency: list[int], seconds: float,
            warmup_s: float) -> tuple[dict[str, Any], list[Point]]:
        out = self.ctx.workdir / f"{self.key}-client.json"
        client_log = self.ctx.workdir / f"{self.key}-client.log"
        budget = len(concurrency) * (seconds + 300.0) + 60.0
        argv = [str(self.python_path), "-m", "bench.triton_client", "--target", f"{HOST}:{self.grpc_port}",
                *self.client_inputs(), "--concurrency", ",".join(str(c) for c in concurrency),
                "--seconds", str(seconds), "--warmup-s", str(warmup_s),
                "--timeout-s", str(self.ctx.request_timeout_s), "--max-round-s", str(self.ctx.max_round_s),
                "--min-rounds", str(self.ctx.min_rounds),
                "--out", str(out)]
        with open(client_log, "wb") as log_file:
            try:
                proc = subprocess.run(argv, cwd=self.ctx.root, env=self.env, stdout=log_file,
                                      stderr=log_file, timeout=budget, check=False)
            except subprocess.TimeoutExpired as exc:
                raise ServerFailed(f"the Triton client ran longer than {budget:.0f} s") from exc
        if proc.returncode != 0:
            raise ServerFailed(f"the Triton client failed ({proc.returncode}); log: {log_tail(client_log)}")
        result = json.loads(out.read_text())
        self.details["versions"]["tritonserver"] = result["server"]["version"]
        checked = check_cosine(np.array(result["check_embedding"]), self.ctx.reference[0])
        points = [Point(**p) for p in result["points"]]
        for point in points:
            log_point(self.key, point)
        return checked, points

    def stop(self) -> None:
        if self.server is not None:
            self.details["memory_mib"] = {"triton": self.server.memory()}
            self.server.stop(grace_s=45.0)
            self.server = None


class TritonOpenVino(TritonSystem):
    key = "triton-openvino"
    title = ("NVIDIA Triton as above, OpenVINO instead of ONNX Runtime in its Python backend (the precision "
             "medvlm's OpenVINO engine picks on this CPU)")

    def server_flags(self) -> list[str]:
        from bench.systems import openvino_precision

        precision = openvino_precision()
        self.details["openvino_precision"] = precision
        return ["--backend", "openvino", "--openvino-precision", "f32" if precision == "fp32" else precision]


class TritonDecode(TritonSystem):
    key = "triton-decode"
    title = ("NVIDIA Triton as above, decoding and preprocessing PNGs in its Python backend with the vision "
             "encoder's code")
    request = "PNG bytes over gRPC (a BYTES tensor); the model decodes and preprocesses them, as ours does"

    def server_flags(self) -> list[str]:
        from bench.systems import setting_default

        return ["--decode-bundle", str(self.ctx.bundle.path),
                "--max-image-bytes", str(setting_default("max_image_bytes")),
                "--max-image-pixels", str(setting_default("max_image_pixels"))]

    def client_inputs(self) -> list[str]:
        folder = self.ctx.workdir / "triton-pngs"
        folder.mkdir(exist_ok=True)
        for i, png in enumerate(self.ctx.images.pngs):
            (folder / f"{i:03d}.png").write_bytes(png)
        return ["--pngs", str(folder)]
