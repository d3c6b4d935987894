"""Prometheus metrics of every service, and their HTTP endpoint. Labels never carry clinical data."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUESTS = Counter("medvlm_requests_total", "RPCs served, by method and status code", ["method", "code"])
REQUEST_SECONDS = Histogram(
    "medvlm_request_seconds", "RPC latency as the server sees it", ["method"], buckets=LATENCY_BUCKETS
)
INFLIGHT = Gauge("medvlm_inflight_requests", "RPCs being served now", ["method"])

QUEUE_DEPTH = Gauge("medvlm_queue_depth", "Items waiting for the engine", ["tower"])
QUEUE_CAPACITY = Gauge(
    "medvlm_queue_capacity", "Most items admitted at once (--max-queue); medvlm_queue_depth stays below it", ["tower"]
)
QUEUE_WAIT = Histogram(
    "medvlm_queue_wait_seconds", "Time an item waited for its batch", ["tower"], buckets=LATENCY_BUCKETS
)
BATCH_SIZE = Histogram(
    "medvlm_batch_size", "Items per engine call", ["tower"], buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)
ENGINE_SECONDS = Histogram(
    "medvlm_engine_seconds", "Time of one engine call", ["tower"], buckets=LATENCY_BUCKETS
)
ADMISSION_REJECTED = Counter(
    "medvlm_admission_rejected_total", "Calls refused at once because the server was at its in-flight bound"
)
CALLER_REQUESTS = Counter(
    "medvlm_caller_requests_total", "RPCs by caller identity (never a credential) and status code", ["caller", "code"]
)
QUOTA_REJECTED = Counter("medvlm_quota_rejected_total", "Calls refused over a caller's quota", ["caller", "quota"])
AUTH_REFUSED = Counter("medvlm_auth_refused_total", "Calls refused by authentication or authorisation", ["code"])
REJECTED = Counter("medvlm_queue_rejected_total", "Requests refused because the queue was full", ["tower"])
EXPIRED = Counter("medvlm_deadline_dropped_total", "Requests dropped before compute: deadline passed", ["tower"])
ENGINE_INFO = Gauge(
    "medvlm_engine_info", "The engine serving a tower (value 1)", ["tower", "engine", "precision", "bundle_id"]
)

ENCODER_UP = Gauge("medvlm_encoder_up", "Gateway: the encoder answers health checks as SERVING", ["encoder"])
TEXT_CACHE = Counter("medvlm_text_cache_total", "Gateway text-embedding cache lookups", ["result"])


def serve_metrics(host: str, port: int) -> int:
    """Start the /metrics HTTP endpoint in a background thread; returns its port."""
    addr = "::" if host in ("[::]", "::") else host
    server, _thread = start_http_server(port, addr=addr)
    return server.server_port

# Gateway label embeddings: cache "adhoc" (labels sent in requests) or a label set "name@version".
LABEL_CACHE = Counter(
    "medvlm_label_cache_total",
    "Gateway label-embedding lookups by cache: hit (ready) or miss (had to be encoded)", ["cache", "result"],
)
LABEL_CACHE_ENTRIES = Gauge("medvlm_label_cache_entries", "Gateway label embeddings held, by cache", ["cache"])
LABEL_CACHE_BYTES = Gauge("medvlm_label_cache_bytes", "Gateway memory of label embeddings, by cache", ["cache"])
LABEL_CACHE_EVICTIONS = Counter(
    "medvlm_label_cache_evictions_total", "Gateway label embeddings evicted (least recently used)", ["cache"]
)
LABEL_SET_LOADS = Counter(
    "medvlm_label_set_loads_total",
    "Gateway label set embeddings made ready, by source: disk (stored) or encoder (computed)", ["source"],
)
LABEL_SET_FILES_REFUSED = Gauge(
    "medvlm_label_set_files_refused", "Gateway label set files refused at the last reading of the directory"
)
