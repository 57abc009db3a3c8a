#!/usr/bin/env bash
# The gateway at wire speed with its ledger on (issue 34's check), release
# build: scripts/bench/rule.toml (a task answered by a rule, no model; the
# default SQLite ledger), CLIENTS clients on the unix socket for SECONDS
# through the project's load generator; then SIGTERM, and every answered
# request must be a row in the ledger. Prints the load generator's line, the
# WAL's size near the end, the rows, and PASS when requests/s >= 50,000,
# p99 <= 5 ms and rows = answered (FAIL otherwise, exit status 1).
# LEDGER_URL=postgres://... runs the same against a PostgreSQL ledger.
#   scripts/bench/wire-speed.sh [SECONDS] [CLIENTS]
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds="${1:-15}"
clients="${2:-64}"
target="${CARGO_TARGET_DIR:-target}"
scripts/system-deps bench
if [ -z "${NO_BUILD:-}" ]; then
  cargo build --release --quiet -p triage-cli --bin triage --features postgres
  cargo build --release --quiet -p triage-server --example load
fi
triage="$target/release/triage"
load="$target/release/examples/load"
dir="$(mktemp -d)"
pid=
trap '[ -n "$pid" ] && kill -9 $pid 2>/dev/null; rm -rf "$dir"' EXIT
config=scripts/bench/rule.toml
ledger="sqlite://$dir/ledger.db"
if [ -n "${LEDGER_URL:-}" ]; then
  config="$dir/rule.toml"
  cp scripts/bench/rule.toml "$config"
  printf '\n[ledger]\nurl = "%s"\n' "$LEDGER_URL" >>"$config"
  ledger="$LEDGER_URL"
fi
TRIAGE_DATA_DIR="$dir" "$triage" serve --config "$config" --socket "$dir/t.sock" >"$dir/log" 2>&1 &
pid=$!
for _ in $(seq 1 300); do
  curl -sf --unix-socket "$dir/t.sock" http://t/ready >/dev/null 2>&1 && break
  sleep 0.1
done
before=$("$triage" costs --ledger "$ledger" --json | jq '[.[].requests] | add // 0')
rule='{"task": "faq", "input": "when are you open on friday?"}'
"$load" "$dir/t.sock" /v1/execute "$rule" "$clients" "$seconds" >"$dir/load.json" &
lpid=$!
sleep "$((seconds - 1))"
wal=$(stat -c %s "$dir/ledger.db-wal" 2>/dev/null || echo 0)
wait $lpid
kill -TERM $pid
wait $pid || true
pid=
cat "$dir/load.json"
answered=$(jq .answered "$dir/load.json")
rows=$(("$("$triage" costs --ledger "$ledger" --json | jq '[.[].requests] | add // 0')" - before))
echo "WAL near the end: $((wal / 1048576)) MB; ledger rows after SIGTERM: $rows for $answered answered"
if jq -e --argjson rows "$rows" '.rps >= 50000 and .p99_ms <= 5 and .answered == $rows' "$dir/load.json" >/dev/null; then
  echo PASS
else
  echo "FAIL (wanted: at least 50,000 requests/s, p99 at most 5 ms, a row for every answer)"
  exit 1
fi
