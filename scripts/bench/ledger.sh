#!/usr/bin/env bash
# The ledger's acceptance figures, release build, over the unix socket with
# scripts/bench/rule.toml (a task answered by a rule, ledger on) and the
# project's load generator at 64 clients:
#  1. memory: server RSS after 10 s and after 40 s at saturation;
#  2. SIGTERM at the end of that load: seconds to exit, ledger rows versus
#     requests answered;
#  3. kill -9 after 5 s of load: rows lost of those answered.
#   scripts/bench/ledger.sh [CLIENTS]
set -euo pipefail
cd "$(dirname "$0")/../.."
clients="${1:-64}"
target="${CARGO_TARGET_DIR:-target}"
# PROFILE=debug measures the debug build (for a machine without time for a
# release build); the figures in docs/benchmarks.md say which they are.
profile="${PROFILE:-release}"
if [ -n "${NO_BUILD:-}" ]; then
  :
elif [ "$profile" = release ]; then
  cargo build --release --quiet -p triage-cli --bin triage --features postgres
  cargo build --release --quiet -p triage-server --example load
else
  cargo build --quiet -p triage-cli --bin triage
  cargo build --quiet -p triage-server --example load
fi
triage="$target/$profile/triage"
load="$target/$profile/examples/load"
rule='{"task": "faq", "input": "when are you open on friday?"}'
dir="$(mktemp -d)"
pid=
trap '[ -n "$pid" ] && kill -9 $pid 2>/dev/null; rm -rf "$dir"' EXIT

start() {
  rm -f "$dir/ledger.db"*
  TRIAGE_DATA_DIR="$dir" "$triage" serve --config scripts/bench/rule.toml --socket "$dir/t.sock" >"$dir/log" 2>&1 &
  pid=$!
  for _ in $(seq 1 300); do
    curl -sf --unix-socket "$dir/t.sock" http://t/health >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "the server did not start"; cat "$dir/log"; exit 1
}
rss_mb() { awk '/VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
rows() { "$triage" costs --ledger "sqlite://$dir/ledger.db" --json | jq '[.[].requests] | add // 0'; }

echo "== RSS at saturation, then SIGTERM ($clients clients)"
start
"$load" "$dir/t.sock" /v1/execute "$rule" "$clients" 40 >"$dir/run1.json" &
lpid=$!
sleep 10; r10=$(rss_mb $pid)
sleep 30; r40=$(rss_mb $pid)
t0=$(date +%s.%N)
kill -TERM $pid
wait $lpid || true
wait $pid || true
t1=$(date +%s.%N)
pid=
answered=$(jq .answered "$dir/run1.json")
echo "load: $(cat "$dir/run1.json")"
echo "RSS after 10 s: ${r10} MB; after 40 s: ${r40} MB; ratio $(echo "scale=2; $r40 / $r10" | bc)"
echo "SIGTERM to exit: $(echo "$t1 - $t0" | bc) s; answered $answered; ledger rows $(rows)"

echo "== kill -9 after 5 s of load ($clients clients)"
start
"$load" "$dir/t.sock" /v1/execute "$rule" "$clients" 30 >"$dir/run2.json" &
lpid=$!
sleep 5
kill -9 $pid
wait $pid 2>/dev/null || true
pid=
wait $lpid || true
answered=$(jq .answered "$dir/run2.json")
stored=$(rows)
lost=$((answered > stored ? answered - stored : 0))
allowed=$((answered / 40 > 2000 ? answered / 40 : 2000))
echo "load: $(cat "$dir/run2.json")"
echo "answered $answered; ledger rows $stored; lost $lost (allowed max(2000, 2.5%) = $allowed)"
