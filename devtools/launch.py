"""Local stack: build the bundle if missing, start vision, text, gateway and the web page, wait for health,
print a grpcurl line and the page's URL, stop them all on Ctrl-C. With --tls: a local CA, certificates
and a token, TLS on every port, mTLS to the encoders and callers authenticated (the page uses the token).
`python -m devtools.launch --help`."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from engines.runtime.bundle import find_bundle
from engines.runtime.calibration import CALIBRATION_NAME, Calibration, CalibrationError
from engines.runtime.manifest import Manifest
from services.plumbing.health import wait_for_health

ROOT = Path(__file__).resolve().parent.parent
LABEL_SETS = ROOT / "labelsets"  # the sample sets: chest, skin and fundus findings of the demo model
DATA_DIR = ROOT / ".cache" / "gateway"  # label set embeddings, kept across runs (one folder per gateway port)
TLS_DIR = ROOT / ".cache" / "tls"
GATEWAY_ID = "spiffe://medvlm.local/gateway"
LOCAL_USER = "local-user"
TOKEN_ISSUER = "https://medvlm.local/issuer"


def ensure_bundle(bundles: Path, model: str) -> Path:
    bundle = find_bundle(bundles, model)
    if bundle is None:
        print(f"building bundle {model!r} into {bundles}/ (first run only)", flush=True)
        subprocess.run([sys.executable, "-m", "engines.build", "--model", model, "--out", str(bundles)], check=True)
        bundle = find_bundle(bundles, model)
        if bundle is None:
            raise SystemExit(f"bundle build for {model!r} produced nothing in {bundles}")
    return bundle


@dataclasses.dataclass(frozen=True)
class LocalTLS:
    """Files of a local TLS setup: the CA, the servers' certificate, the gateway's client
    certificate for the encoders, and a caller's token with the public half of its signing key."""

    folder: Path

    def path(self, name: str) -> str:
        return str(self.folder / name)

    @property
    def token(self) -> str:
        return (self.folder / "token").read_text().strip()

    def encoder_flags(self) -> list[str]:
        return ["--tls-cert", self.path("server.crt"), "--tls-key", self.path("server.key"),
                "--tls-client-ca", self.path("ca.crt"), "--allowed-clients", GATEWAY_ID]

    def gateway_flags(self) -> list[str]:
        # Callers authenticate with the token (or API keys); no client certificate is asked for.
        return ["--tls-cert", self.path("server.crt"), "--tls-key", self.path("server.key"),
                "--auth", "--jwt-keys", self.path("token-signer.pub"), "--jwt-issuer", TOKEN_ISSUER,
                "--encoder-tls-ca", self.path("ca.crt"), "--encoder-tls-cert", self.path("gateway.crt"),
                "--encoder-tls-key", self.path("gateway.key")]

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials((self.folder / "ca.crt").read_bytes())


def make_local_tls(folder: Path, hosts: list[str], token_hours: float = 12) -> LocalTLS:
    """A fresh local CA and everything the stack and a caller need, written to `folder`."""
    import jwt

    from devtools.localca import LocalCA, token_key

    ca = LocalCA("medvlm local CA (make run TLS=1)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.crt").write_bytes(ca.cert_pem)
    names = sorted({"localhost", "127.0.0.1", "::1", *hosts})
    ca.issue("medvlm-server", names, client=False).write(folder, "server")
    ca.issue("gateway", [GATEWAY_ID], server=False).write(folder, "gateway")
    signer, public = token_key()
    (folder / "token-signer.pub").write_bytes(public)
    now = datetime.datetime.now(datetime.timezone.utc)
    token = jwt.encode({"sub": LOCAL_USER, "iss": TOKEN_ISSUER, "aud": "medvlm", "iat": now, "nbf": now,
                        "exp": now + datetime.timedelta(hours=token_hours), "roles": ["classify", "embed"]},
                       signer, algorithm="ES256")
    fd = os.open(folder / "token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return LocalTLS(folder)


def how_it_ended(returncode: int) -> str:
    """'exited with status N' or 'was killed by SIGNAME' for a Popen return code."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def grpcurl_line(target: str, sample: Path | None, security: str = "-plaintext") -> str:
    """A grpcurl command that classifies `sample` (or asks for the model without one); `security`
    is grpcurl's transport and credential flags."""
    grpcurl = ROOT / ".venv" / "bin" / "grpcurl"
    exe = str(grpcurl.relative_to(ROOT)) if grpcurl.exists() else "grpcurl"
    if sample is None:
        return f"{exe} {security} {target} medvlm.v1.GatewayService/GetModelInfo"
    body = (f'{{\\"image\\": {{\\"data\\": \\"$(base64 -w0 {shlex.quote(str(sample.relative_to(ROOT)))})\\"}}, '
            f'\\"labelSet\\": \\"chest-findings\\", \\"topK\\": 2}}')
    return f'{exe} {security} -d "{body}" {target} medvlm.v1.GatewayService/Classify'


def tls_grpcurl_flags(tls: LocalTLS) -> str:
    """grpcurl's flags for the local TLS stack: the local CA and the caller's token."""
    def rel(name: str) -> str:
        path = Path(tls.path(name))
        return shlex.quote(str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path))

    return f"-cacert {rel('ca.crt')} -H \"authorization: Bearer $(cat {rel('token')})\""


def ensure_calibration(bundle: Path, model: str) -> Path | None:
    """The bundle's calibration file if it belongs to this bundle; the demo model's is made when
    missing or stale (about a minute). None for other models that have none."""
    path = bundle / CALIBRATION_NAME
    try:
        Calibration.read(path, Manifest.read(bundle).bundle_id)
        return path
    except CalibrationError as exc:
        if model != "demo":
            print(f"serving without calibration (answers carry no abstain flag): {exc}", flush=True)
            return None
    print(f"calibrating {bundle.name} on generated images (first run only)", flush=True)
    subprocess.run([sys.executable, "-m", "engines.build", "calibrate", "--bundle", str(bundle)], check=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=os.environ.get("MEDVLM_MODEL", "demo"), help="registry model of the bundle")
    parser.add_argument("--bundles", type=Path, default=ROOT / "bundles", help="directory of built bundles")
    parser.add_argument("--host", default="127.0.0.1", help="address the three servers listen on")
    parser.add_argument("--gateway-port", type=int, default=50050)
    parser.add_argument("--vision-port", type=int, default=50051)
    parser.add_argument("--text-port", type=int, default=50052)
    parser.add_argument("--web-port", type=int, default=8050, help="port of the web page")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="how long to wait for health")
    parser.add_argument("--tls", action="store_true",
                        help="TLS on every port, mTLS to the encoders, callers authenticated; a fresh local CA, "
                             "certificates and a token are written to --tls-dir")
    parser.add_argument("--tls-dir", type=Path, default=TLS_DIR, help="folder of the local CA's files")
    args = parser.parse_args(argv)

    bundle = ensure_bundle(args.bundles.resolve(), args.model)
    calibration = ensure_calibration(bundle, args.model)
    vision = f"{args.host}:{args.vision_port}"
    text = f"{args.host}:{args.text_port}"
    gateway = f"{args.host}:{args.gateway_port}"
    python = [sys.executable, "-m"]
    tls = make_local_tls(args.tls_dir.resolve(), [args.host]) if args.tls else None
    commands = {
        "vision": python + ["services.vision", "--host", args.host, "--port", str(args.vision_port), "--bundle", str(bundle)],
        "text": python + ["services.text", "--host", args.host, "--port", str(args.text_port), "--bundle", str(bundle)],
        "gateway": python + ["services.gateway", "--host", args.host, "--port", str(args.gateway_port),
                             "--vision-target", vision, "--text-target", text,
                             "--label-sets-dir", str(LABEL_SETS), "--data-dir", str(DATA_DIR / str(args.gateway_port))]
                   + (["--calibration", str(calibration)] if calibration else []),
        "web": python + ["medvlm.web", "--host", args.host, "--port", str(args.web_port),
                         "--target", gateway],
    }
    if tls is not None:
        for name in ("vision", "text"):
            commands[name] += tls.encoder_flags()
        commands["gateway"] += tls.gateway_flags()
        commands["web"] += ["--ca-cert", tls.path("ca.crt"), "--token-file", tls.path("token")]
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    procs = {name: subprocess.Popen(cmd, cwd=ROOT) for name, cmd in commands.items()}

    def all_running() -> bool:
        return not stopping and all(p.poll() is None for p in procs.values())

    try:
        if not wait_for_health(gateway, args.timeout_s, keep_waiting=all_running, interval_s=0.5,
                               credentials=tls.channel_credentials() if tls else None):
            if not stopping:
                print("the stack did not become healthy; see the logs above", file=sys.stderr)
            return 0 if stopping else 1
        samples = sorted((ROOT / "samples").glob("chest*.png"))
        print(f"\nmedvlm is serving bundle {bundle.name} on {gateway} (Ctrl-C stops it). Try:\n", flush=True)
        sample = samples[0] if samples else None
        flags = "-plaintext" if tls is None else tls_grpcurl_flags(tls)
        print("  " + grpcurl_line(gateway, sample, flags) + "\n", flush=True)
        print(f"or open the web page: http://{args.host}:{args.web_port}/\n", flush=True)
        while all_running():
            time.sleep(0.5)
        dead = [f"{n} {how_it_ended(p.returncode)}" for n, p in procs.items() if p.poll() is not None]
        if dead and not stopping:
            print(f"stopped because {', '.join(dead)}", file=sys.stderr)
            return 1
        return 0
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
