#!/usr/bin/env bash
# Requests/s and latency over the unix socket, release build:
#  - /health: no model, what the server itself adds;
#  - /v1/moderations: the local toxicity specialist (one short text);
# at concurrency 1, 8 and 64. Needs the default weights (scripts/serve installs them).
#   scripts/bench/server.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds="${1:-5}"
cargo build --release --quiet -p triage-cli -p triage-server --example load
sock="$(mktemp -d)/triage.sock"
target/release/triage serve --socket "$sock" >/dev/null 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  curl -sf --unix-socket "$sock" http://t/ready >/dev/null 2>&1 && break
  sleep 0.2
done
body='{"input": "thanks for the update, see you at the meeting tomorrow"}'
for c in 1 8 64; do
  target/release/examples/load "$sock" /health - "$c" "$seconds"
done
for c in 1 8 64; do
  target/release/examples/load "$sock" /v1/moderations "$body" "$c" "$seconds"
done
