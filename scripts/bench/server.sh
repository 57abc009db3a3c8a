#!/usr/bin/env bash
# Requests/s and latency over the unix socket, release build, at concurrency
# 1, 8 and 64:
#  - /health: no model, what the HTTP layer itself adds;
#  - /v1/execute on a task answered by a local rule (rules → template, no
#    model; scripts/bench/rule.toml), ledger on: what the engine adds;
#  - /v1/moderations through the same config: the local toxicity specialist.
# Needs the default weights (scripts/serve installs them).
#   scripts/bench/server.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds="${1:-5}"
# Two commands: with --example, cargo would build only the example.
cargo build --release --quiet -p triage-cli --bin triage --features postgres
cargo build --release --quiet -p triage-server --example load
# shellcheck source=scripts/bench/lib.sh
. scripts/bench/lib.sh
dir="$(mktemp -d)"
sock="$dir/triage.sock"
start_serve "$dir" "$sock" env TRIAGE_DATA_DIR="$dir" target/release/triage serve \
  --config scripts/bench/rule.toml --socket "$sock"
for c in 1 8 64; do
  target/release/examples/load "$sock" /health - "$c" "$seconds"
done
rule='{"task": "faq", "input": "when are you open on friday?"}'
for c in 1 8 64; do
  target/release/examples/load "$sock" /v1/execute "$rule" "$c" "$seconds"
done
body='{"input": "thanks for the update, see you at the meeting tomorrow"}'
for c in 1 8 64; do
  target/release/examples/load "$sock" /v1/moderations "$body" "$c" "$seconds"
done
