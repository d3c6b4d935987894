"""Server subprocesses of a benchmark: start, wait until healthy, stop; ports picked free on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import grpc

from services.plumbing.health import wait_for_health

HOST = "127.0.0.1"


class ServerFailed(RuntimeError):
    """A server process exited or never became healthy; the message ends with its last log lines."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def service_env(root: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a medvlm service: the repository and gen/ on PYTHONPATH, hub access off."""
    env = dict(os.environ)
    paths = [str(root), str(root / "gen")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra or {})
    return env


def log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip()[:300] for line in text[-lines:] if line.strip())


class Server:
    """One server process in its own process group, its output in a log file."""

    def __init__(self, name: str, argv: list[str], *, cwd: Path, env: dict[str, str], log_dir: Path,
                 stdout_pipe: bool = False) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._log, stderr=self._log,
            start_new_session=True,
        )

    def failure(self, what: str) -> ServerFailed:
        return ServerFailed(f"{self.name} {what}; log: {log_tail(self.log_path)}")

    def wait_serving(self, target: str, timeout_s: float, credentials: grpc.ChannelCredentials | None = None) -> None:
        """Poll grpc.health.v1 until SERVING; ServerFailed if the process exits or time runs out."""
        if wait_for_health(target, timeout_s, credentials=credentials, keep_waiting=lambda: self.proc.poll() is None):
            return
        if self.proc.poll() is not None:
            raise self.failure(f"exited with status {self.proc.returncode} before serving")
        raise self.failure(f"was not SERVING after {timeout_s:.0f} s")

    def memory(self) -> dict[str, float]:
        """Resident memory of the process group it leads (tritonserver and its stubs included), in
        MiB: `rss_mib` now, `peak_mib` the sum of each process's own peak (VmHWM)."""
        rss = peak = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.getpgid(int(entry.name)) != self.proc.pid:
                    continue
                fields = dict(line.split(":", 1) for line in (entry / "status").read_text().splitlines()
                              if ":" in line)
            except (OSError, ProcessLookupError):
                continue  # ended meanwhile
            rss += int(fields.get("VmRSS", "0 kB").split()[0])
            peak += int(fields.get("VmHWM", "0 kB").split()[0])
        return {"rss_mib": round(rss / 1024, 1), "peak_mib": round(peak / 1024, 1)}

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM, wait up to `grace_s`, then SIGKILL the process group it leads."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # children it left behind (tritonserver, stubs)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
