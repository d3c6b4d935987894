"""What the benchmark ran on: CPU, memory, versions, date, code revision, and what else was busy."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path

CPU_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
BUSY_PERCENT = 10.0  # a process using more than this share of one core counts as background load


def cpu_info() -> dict[str, object]:
    """Model name, family/model numbers and the SIMD flags that matter for inference speed."""
    info: dict[str, str] = {}
    flags: list[str] = []
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "cpu family", "model") and key not in info:
            info[key] = value.strip()
        elif key == "flags" and not flags:
            present = set(value.split())
            flags = [f for f in CPU_FLAGS_OF_INTEREST if f in present]
            if "hypervisor" in present:
                flags.append("hypervisor")
    return {
        "cpu_model": info.get("model name") or platform.processor() or "unknown",
        "cpu_family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
        "cpu_flags": flags,
    }


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_revision(root: Path) -> dict[str, object]:
    """Commit and whether tracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        changed = [line for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line]
        return {"commit": git("rev-parse", "--short=12", "HEAD"), "uncommitted_changes": len(changed)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "uncommitted_changes": None}


def describe(root: Path) -> dict[str, object]:
    """The machine and software the run used (Triton's version is added by the Triton system)."""
    return {
        **cpu_info(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _mem_total_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in
                     ("torch", "open_clip_torch", "onnxruntime", "grpcio", "numpy", "pillow")},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git_revision(root),
    }


def _proc_times() -> dict[int, tuple[float, str]]:
    """pid -> (user + system CPU seconds, short command) of every process we can read."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[float, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            cpu = (int(fields[11]) + int(fields[12])) / ticks
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        out[int(entry.name)] = (cpu, _short_command([a.decode(errors="replace") for a in argv if a]))
    return out


def _short_command(argv: list[str]) -> str:
    """The program and, for Python, the module or script it runs: enough to tell what the load was."""
    if not argv:
        return "?"
    program = os.path.basename(argv[0])
    if "python" in program:
        for i, arg in enumerate(argv[1:], start=1):
            if arg == "-m" and i + 1 < len(argv):
                return f"python -m {argv[i + 1]}"
            if not arg.startswith("-"):
                return f"python {os.path.basename(arg)}"
    return program


def busy_processes(exclude: set[int], sample_s: float = 1.0) -> dict[str, object]:
    """Load average and the other processes that used more than BUSY_PERCENT of a core over `sample_s`."""
    before = _proc_times()
    time.sleep(sample_s)
    after = _proc_times()
    busy = []
    for pid, (cpu, command) in after.items():
        if pid in exclude or pid not in before:
            continue
        percent = 100.0 * (cpu - before[pid][0]) / sample_s
        if percent >= BUSY_PERCENT:
            busy.append({"command": command, "cpu_percent": round(percent)})
    busy.sort(key=lambda b: -b["cpu_percent"])
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = []
    return {"loadavg": load, "busy": busy}


def own_pids() -> set[int]:
    """This process and its descendants (servers the harness started)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


# One projection of a ViT-B/16 block (197 tokens x 768 -> 3072); the whole image tower is ~17.6 G
# multiply-adds of mostly such products, so this machine's rate on it bounds the tower's latency.
GEMM_SHAPE = (197, 768, 3072)
VIT_B16_GMAC = 17.6


def gemm_rates(threads: int, repeats: int = 100) -> dict[str, object]:
    """ONNX Runtime's fp32 MatMul and int8 MatMulInteger on GEMM_SHAPE with `threads` threads: the
    multiply-adds per second this machine reaches, and the ViT-B/16 latency floor that implies."""
    import statistics

    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    m, k, n = GEMM_SHAPE
    rng = np.random.default_rng(0)
    cases = {
        "fp32": ("MatMul", TensorProto.FLOAT, TensorProto.FLOAT, rng.normal(size=(k, n)).astype(np.float32),
                 rng.normal(size=(m, k)).astype(np.float32)),
        "int8": ("MatMulInteger", TensorProto.UINT8, TensorProto.INT32,
                 rng.integers(-127, 128, (k, n)).astype(np.int8), rng.integers(0, 256, (m, k)).astype(np.uint8)),
    }
    out: dict[str, object] = {"shape": list(GEMM_SHAPE), "threads": threads}
    for name, (op, in_type, out_type, weights, example) in cases.items():
        graph = helper.make_graph([helper.make_node(op, ["a", "w"], ["y"])], name,
                                  [helper.make_tensor_value_info("a", in_type, [m, k])],
                                  [helper.make_tensor_value_info("y", out_type, [m, n])],
                                  [numpy_helper.from_array(weights, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for _ in range(10):
            session.run(None, {"a": example})
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, {"a": example})
            times.append(time.perf_counter() - start)
        gmac_s = m * k * n / statistics.median(times) / 1e9
        out[name] = {"gmac_per_s": round(gmac_s, 1), "vit_b16_floor_ms": round(VIT_B16_GMAC / gmac_s * 1000)}
    return out
