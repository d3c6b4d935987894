"""Settings of every service: flags and MEDVLM_* variables, parsed once into a frozen dataclass
(declared and parsed with medvlm.settings, as the client's and the page's are)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from medvlm.settings import SettingError, add_flags, read, setting

GATEWAY, VISION, TEXT = "gateway", "vision", "text"
ENCODERS = (VISION, TEXT)
ALL = (GATEWAY, VISION, TEXT)

DEFAULT_PORTS = {GATEWAY: 50050, VISION: 50051, TEXT: 50052}
DEFAULT_METRICS_PORTS = {GATEWAY: 9100, VISION: 9101, TEXT: 9102}
MiB = 1 << 20
EVENT_LOOPS = ("uvloop", "asyncio")


def _opt(default: Any, help: str, services: Sequence[str] = ALL) -> Any:
    return setting(default, help, scope=tuple(services))


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a service can be told. Each field is a flag (--max-images) and a
    variable (MEDVLM_MAX_IMAGES); the flag wins over the variable."""

    service: str = GATEWAY
    host: str = _opt("[::]", "Address to listen on. '[::]' listens on every interface.")
    port: int = _opt(
        -1,
        "Port to listen on; 0 picks a free one. Default: gateway 50050, vision 50051, text 50052.",
    )
    log_level: str = _opt("info", "debug, info, warning or error. debug logs every health probe.")
    metrics: bool = _opt(True, "Serve Prometheus metrics over HTTP on --metrics-port.")
    metrics_port: int = _opt(
        -1,
        "Port of the Prometheus metrics endpoint; 0 picks a free one. Default: gateway 9100, "
        "vision 9101, text 9102.",
    )
    event_loop: str = _opt(
        "uvloop",
        "uvloop or asyncio: the event loop every call is handled on. uvloop (libuv) spends less time "
        "per call than asyncio, Python's own loop (docs/bench-compare.md); asyncio is there for "
        "comparison or if uvloop misbehaves.",
    )
    grace_s: float = _opt(
        20.0,
        "Seconds in-flight calls get to finish after SIGTERM before they are cancelled. Longer is "
        "gentler on clients but delays exit; keep it below the pod's termination grace period.",
    )
    drain_s: float = _opt(
        0.0,
        "Seconds between reporting NOT_SERVING and refusing new calls at shutdown, so load "
        "balancers stop sending first. 5-10 on Kubernetes; 0 locally.",
    )
    max_connection_age_s: float = _opt(
        1800.0,
        "Clients are asked to reconnect after a connection has lived this long (they re-resolve "
        "DNS then), so callers balancing over DNS reach replicas added since. Short (60) on "
        "encoders behind a headless Service; keep it long where clients hold long streams.",
    )
    max_message_mb: int = _opt(
        0,
        "Largest request message in MiB. Larger images need more; every byte allowed is memory a "
        "caller can make the server hold. 0: gateway 64, encoders 32.",
    )
    max_inflight: int = _opt(
        0,
        "Calls processed at once; more get RESOURCE_EXHAUSTED at once instead of queueing. "
        "Higher absorbs bursts, lower bounds memory and latency. 0: gateway 64; encoders "
        "--max-queue plus the items being computed, so there --max-queue, which bounds the work "
        "itself in images or texts, is the one bound that refuses (a gateway sends one call per "
        "stream item: --stream-window calls per stream).",
    )
    workers: int = _opt(
        2,
        "Threads that decode, tokenize and run the engine off the event loop. More than the "
        "cores the engine uses only adds contention.",
    )
    max_images: int = _opt(
        16,
        "Most images in one request. Each costs decode time and memory.",
        (GATEWAY, VISION),
    )
    max_image_bytes: int = _opt(
        20 * MiB, "Largest encoded image in bytes.", (GATEWAY, VISION)
    )
    max_image_pixels: int = _opt(
        40_000_000,
        "Largest decoded image in pixels (width x height); larger ones are refused as "
        "decompression bombs before they are decoded.",
        (VISION,),
    )
    max_texts: int = _opt(
        256,
        "Most texts (or labels) in one request. Each uncached one costs a text-encoder pass.",
        (GATEWAY, TEXT),
    )
    max_text_chars: int = _opt(
        1024,
        "Longest text or label in characters. The model reads at most its context length in "
        "tokens anyway; this bounds tokenizer work.",
        (GATEWAY, TEXT),
    )
    bundle: str = _opt("", "Bundle directory to serve (holds manifest.json).", ENCODERS)
    max_batch: int = _opt(
        32,
        "Most items (images or texts) in one engine call; 1 turns batching off. Larger batches "
        "raise throughput under load; each call then takes longer.",
        ENCODERS,
    )
    measure_batch_limit: bool = _opt(
        True,
        "At start, time the engine at batch sizes 1, 2, 4, ... up to --max-batch and never form "
        "batches of the first size whose time per item is over 10 % above a smaller size's, or larger: "
        "on a compute-bound CPU a big batch can be slower per item than small ones, and filling it "
        "lowers throughput. Costs up to 20 s of engine calls at start; off trusts --max-batch as given.",
        ENCODERS,
    )
    engine_calls: int = _opt(
        1,
        "Batches the engine computes at once, each in its own thread. On a CPU node, "
        "--intra-op-threads 1 with one call per core serves the most images per second under "
        "load (one call's threads wait for each other between operators) but a lone request "
        "takes about as long as one core needs; the default, one call on every core, answers a "
        "lone request fastest. Keep 1 on a GPU: one full batch at a time uses it best (TensorRT runs "
        "one call at a time anyway).",
        ENCODERS,
    )
    max_delay_ms: float = _opt(
        5.0,
        "How long a batch may wait for more items, and only while other requests are being "
        "decoded or tokenized. Higher merges more under load and adds up to this to latency.",
        ENCODERS,
    )
    max_queue: int = _opt(
        512,
        "Items (images or texts) an encoder admits at once: being decoded or tokenized, or waiting "
        "for the engine; a request that would exceed it gets RESOURCE_EXHAUSTED with a retry hint "
        "before any of its work is done. Higher absorbs bursts; lower bounds waiting time and memory.",
        ENCODERS,
    )
    priority_aging_ms: float = _opt(
        1000.0,
        "Work that has waited this long is served before fresher work of any priority, so STAT "
        "goes first but ROUTINE is never starved. Lower is fairer, higher favours urgency.",
        ENCODERS,
    )
    engine: str = _opt(
        "auto",
        "auto, tensorrt, onnxruntime-cuda, openvino, onnxruntime-cpu, torch-cpu or torch-cuda. auto "
        "takes a TensorRT plan built for this GPU, then ONNX Runtime CUDA, then on the CPU the fastest "
        "precision OpenVINO or ONNX Runtime can run (int8, then bf16 where the CPU has it, then fp32 on "
        "ONNX Runtime), "
        "and logs why it skipped the others; torch-* is the slow reference and needs the build "
        "requirements.",
        ENCODERS,
    )
    precision: str = _opt(
        "auto",
        "auto, fp32, bf16, fp16 or int8. auto takes the fastest precision the bundle holds for the chosen engine; "
        "int8 and fp16 engines are in a bundle only if their zero-shot answers agreed with fp32 on >= 99 % "
        "of held-out images at build time, so they trade that last percent for speed. fp32 is the "
        "reference: slowest, and what the others are judged against.",
        ENCODERS,
    )
    openvino_cache_dir: str = _opt(
        "",
        "Folder where OpenVINO keeps compiled models; a restart then loads in a fraction of the "
        "compile time (biomedclip-arch vision: measured in the README). Empty: compile at every start. "
        "Must be writable; one per CPU model and OpenVINO version is safe (the cache is keyed by both).",
        ENCODERS,
    )
    intra_op_threads: int = _opt(
        0,
        "Threads one engine call may use; 0 lets the engine choose (all cores). Lower it when "
        "several processes share a node.",
        ENCODERS,
    )
    allow_benchmark: bool = _opt(
        False,
        "Serve a benchmark bundle (random weights with real shapes). Its answers mean nothing; "
        "never enable this where clinicians can reach the service.",
        ENCODERS,
    )
    liveness_stall_s: float = _opt(
        60.0,
        "Liveness fails when one engine call has run this long (a wedged engine or device), so "
        "the orchestrator restarts the process. Must exceed the slowest legitimate batch.",
        ENCODERS,
    )
    probe_interval_s: float = _opt(
        30.0,
        "Every this many seconds an idle encoder runs one golden input through its engine, so a "
        "wedged or failing engine is found without traffic. 0 turns the probe off.",
        ENCODERS,
    )
    vision_target: str = _opt(
        "127.0.0.1:50051",
        "gRPC target of the vision encoder. dns:///name:port with a headless Service spreads "
        "calls over every replica.",
        (GATEWAY,),
    )
    text_target: str = _opt("127.0.0.1:50052", "gRPC target of the text encoder.", (GATEWAY,))
    downstream_timeout_s: float = _opt(
        10.0,
        "Deadline of one encoder call when the caller sent none (a caller's shorter deadline "
        "always wins). Shorter fails faster when an encoder hangs.",
        (GATEWAY,),
    )
    stream_window: int = _opt(
        16,
        "Items of one ClassifyStream processed at once; the client is held back beyond it. "
        "Higher keeps the encoders busier, lower bounds memory per stream.",
        (GATEWAY,),
    )
    label_sets_dir: str = _opt(
        "",
        "Directory of label set files (YAML or JSON, one set each; a ConfigMap mount on "
        "Kubernetes). Read at start and whenever it changes. Empty: no label sets, only labels "
        "sent in requests.",
        (GATEWAY,),
    )
    label_sets_poll_s: float = _opt(
        5.0,
        "How often the label set directory is checked for changes, in seconds. Shorter picks up "
        "a new version sooner; each check only stats the files.",
        (GATEWAY,),
    )
    data_dir: str = _opt(
        "",
        "Directory where label set embeddings are kept (FAISS index files and SQLite metadata), "
        "one gateway process per directory, so a restart serves them without the text encoder. "
        "Empty: kept in memory only and recomputed at every start.",
        (GATEWAY,),
    )
    label_cache_mb: int = _opt(
        64,
        "Memory bound of the cache of labels sent in requests, in MiB (about 1,300 labels per "
        "MiB at 128 dimensions, 450 at 512); the least recently used are evicted "
        "beyond it. Larger saves text-encoder calls for varied labels.",
        (GATEWAY,),
    )
    calibration: str = _opt(
        "",
        "Calibration file of the served bundle (calibration.json, made by `make calibrate`). With it, "
        "Classify answers carry calibrated probabilities, an out-of-distribution score and an abstain "
        "flag; a file made for another bundle keeps the gateway NOT_SERVING. Empty: answers carry no "
        "trust assessment.",
        (GATEWAY,),
    )
    verify_retry_max_s: float = _opt(
        5.0,
        "Longest pause between checks of the encoders while the gateway is not yet serving "
        "(both must answer and serve the same bundle). Shorter becomes ready sooner.",
        (GATEWAY,),
    )

    tls_cert: str = _opt(
        "",
        "PEM certificate chain this server presents; with --tls-key it turns TLS on. Both files are "
        "re-read when they change, so a renewed certificate reaches new connections without a restart.",
    )
    tls_key: str = _opt("", "PEM private key of --tls-cert.")
    tls_client_ca: str = _opt(
        "",
        "PEM CA certificates that client certificates must chain to. Set: every connection must "
        "present one (mutual TLS) and its identity authenticates the caller; on the encoders, which "
        "only the gateway calls. gRPC Python cannot ask for an optional certificate, so a gateway "
        "whose callers use tokens or API keys leaves it empty.",
    )
    allowed_clients: str = _opt(
        "",
        "Comma-separated certificate identities (SAN URI or DNS name, or subject CN) allowed to call. "
        "Empty allows any certificate from --tls-client-ca; on the encoders, naming the gateway's "
        "identity also refuses certificates the CA issued to other workloads.",
    )
    insecure: bool = _opt(
        False,
        "Allow plaintext on an address other than loopback. Anyone on that network can then read and "
        "forge calls, clinical data included: only for isolated test networks.",
    )
    auth: bool = _opt(
        False,
        "Require a credential (client certificate, bearer token or API key) on every call but health, "
        "and the role its RPC needs. Off: every caller is anonymous and may call everything; for "
        "loopback only.",
    )
    health_port: int = _opt(
        -1,
        "Also answer grpc.health.v1 alone, in plaintext, on this port (-1: off; 0 picks one), for "
        "probes that cannot speak TLS such as the kubelet's native gRPC probe. It reveals only "
        "whether the server is serving.",
    )
    reflection: bool = _opt(
        True,
        "Serve gRPC reflection, so grpcurl works without .proto files. Off hides the API from "
        "unauthenticated scanners; clients then need the .proto files.",
    )
    jwt_keys: str = _opt(
        "",
        "Comma-separated JWKS files or PEM public keys that verify bearer tokens (RS256, ES256). Re-read "
        "when they change, so the identity provider's key rotation needs no restart.",
        (GATEWAY,),
    )
    jwt_issuer: str = _opt("", "Required 'iss' of bearer tokens (the identity provider's URL).", (GATEWAY,))
    jwt_audience: str = _opt("medvlm", "Required 'aud' of bearer tokens.", (GATEWAY,))
    jwt_leeway_s: float = _opt(
        30.0,
        "Clock skew tolerated on 'exp' and 'nbf' in seconds. Larger forgives unsynchronised clocks and "
        "keeps an expired token usable that much longer.",
        (GATEWAY,),
    )
    jwt_roles_claim: str = _opt(
        "roles", "Claim of bearer tokens listing the caller's roles (a list, or a space-separated string).",
        (GATEWAY,),
    )
    api_keys: str = _opt(
        "",
        "JSON file of API keys for systems without an identity provider, stored as sha256 hashes with "
        "an id and roles; re-read when it changes, so removing a key revokes it without a restart.",
        (GATEWAY,),
    )
    access: str = _opt(
        "",
        "JSON file: roles of client-certificate identities, and per-caller quotas (requests and images "
        "per second) with a default. Re-read when it changes. Without quotas one caller can starve "
        "the others.",
        (GATEWAY,),
    )
    encoder_tls_ca: str = _opt(
        "",
        "PEM CA certificates the encoders' certificates must chain to. Set: the gateway calls the "
        "encoders over TLS, checking the target's host name against their certificates.",
        (GATEWAY,),
    )
    encoder_tls_cert: str = _opt(
        "", "PEM client certificate the gateway presents to the encoders (mutual TLS).", (GATEWAY,)
    )
    encoder_tls_key: str = _opt("", "PEM private key of --encoder-tls-cert.", (GATEWAY,))
    trusted_bundle_keys: str = _opt(
        "",
        "Comma-separated Ed25519 public keys (PEM) of bundle signers. Set: a bundle must carry a valid "
        "signature of its manifest by one of them or it is not served. Empty: signatures are not "
        "checked (local builds).",
        ENCODERS,
    )

    def __post_init__(self) -> None:
        if self.port < 0:
            object.__setattr__(self, "port", DEFAULT_PORTS[self.service])
        if self.metrics_port < 0:
            object.__setattr__(self, "metrics_port", DEFAULT_METRICS_PORTS[self.service])

    @property
    def inflight_limit(self) -> int:
        """Calls admitted at once (--max-inflight, or its default for this service)."""
        if self.max_inflight:
            return self.max_inflight
        if self.service == GATEWAY:
            return 64
        # every embed call holds at least one item admitted by the batcher or being computed
        return self.max_queue + self.engine_calls * self.max_batch

    @property
    def max_message_bytes(self) -> int:
        mb = self.max_message_mb or (64 if self.service == GATEWAY else 32)
        return mb * MiB


def build_parser(service: str) -> argparse.ArgumentParser:
    """The command line of one service, with the variable name in every help line."""
    parser = argparse.ArgumentParser(
        prog=f"python -m services.{service}",
        description=f"medvlm {service} server. Every flag can also be set by the variable shown.",
    )
    add_flags(parser, Settings, scope=service)
    return parser


def parse_settings(
    service: str, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Parse flags, then MEDVLM_* variables, then defaults, once, at start."""
    args = build_parser(service).parse_args(argv)
    try:
        settings = Settings(service=service, **read(Settings, args, environ, scope=service))
    except SettingError as exc:
        raise SystemExit(str(exc)) from exc
    if settings.event_loop not in EVENT_LOOPS:
        raise SystemExit(f"--event-loop: {settings.event_loop!r} is not one of {', '.join(EVENT_LOOPS)}")
    if settings.engine_calls < 1:
        raise SystemExit(f"--engine-calls: {settings.engine_calls} is less than 1")
    if settings.max_inflight < 0:
        raise SystemExit(f"--max-inflight: {settings.max_inflight} is negative (0 takes the service's default)")
    if service in ENCODERS and not settings.bundle:
        raise SystemExit(f"{service}: no bundle given (--bundle or MEDVLM_BUNDLE)")
    _check_security(settings)
    return settings


def _check_security(settings: Settings) -> None:
    """Refuse combinations of the TLS and auth settings that cannot work."""
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise SystemExit("--tls-cert and --tls-key go together")
    if settings.tls_client_ca and not settings.tls_cert:
        raise SystemExit("--tls-client-ca needs TLS (--tls-cert, --tls-key)")
    if bool(settings.encoder_tls_cert) != bool(settings.encoder_tls_key):
        raise SystemExit("--encoder-tls-cert and --encoder-tls-key go together")
    if settings.encoder_tls_cert and not settings.encoder_tls_ca:
        raise SystemExit("--encoder-tls-cert needs --encoder-tls-ca")
    if settings.jwt_keys and not settings.jwt_issuer:
        raise SystemExit("--jwt-keys needs --jwt-issuer")
    if settings.auth and not (settings.tls_client_ca or settings.jwt_keys or settings.api_keys):
        raise SystemExit("--auth needs a way to authenticate: --tls-client-ca, --jwt-keys or --api-keys")
