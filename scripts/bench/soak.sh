#!/usr/bin/env bash
# Soak: saturation over the unix socket for MINUTES (default 10), release
# build, scripts/bench/rule.toml with its ledger on: 64 clients on the rule
# task and 8 on local moderation (the toxicity specialist) at once. Prints
# the server's RSS every 30 s, per minute each load's statuses and p50/p99,
# then SIGTERMs the server and compares the ledger's rows with the requests
# answered. A 503 is the documented answer of a full ledger queue.
# Needs the default weights (scripts/serve installs them).
#   scripts/bench/soak.sh [MINUTES]
set -euo pipefail
cd "$(dirname "$0")/../.."
minutes="${1:-10}"
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
dir="$(mktemp -d)"
pid=
trap '[ -n "$pid" ] && kill -9 $pid 2>/dev/null; rm -rf "$dir"' EXIT
TRIAGE_DATA_DIR="$dir" "$triage" serve --config scripts/bench/rule.toml --socket "$dir/t.sock" >"$dir/log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do
  curl -sf --unix-socket "$dir/t.sock" http://t/ready >/dev/null 2>&1 && break
  sleep 0.2
done
rule='{"task": "faq", "input": "when are you open on friday?"}'
moderation='{"input": "thanks for the update, see you at the meeting tomorrow"}'
(
  s=0
  while kill -0 $pid 2>/dev/null; do
    echo "t=${s}s rss_mb=$(awk '/VmRSS/ {printf "%.0f", $2 / 1024}' /proc/$pid/status 2>/dev/null)"
    sleep 30; s=$((s + 30))
  done
) &
sampler=$!
answered=0
errors=0
for m in $(seq 1 "$minutes"); do
  "$load" "$dir/t.sock" /v1/execute "$rule" 64 60 >"$dir/rule.json" &
  a=$!
  "$load" "$dir/t.sock" /v1/moderations "$moderation" 8 60 >"$dir/mod.json"
  wait $a
  for f in rule mod; do
    echo "minute $m $f: $(jq -c '{rps: (.rps|floor), answered, statuses, p50_ms, p99_ms}' "$dir/$f.json")"
    answered=$((answered + $(jq .answered "$dir/$f.json")))
    errors=$((errors + $(jq '.errors' "$dir/$f.json")))
  done
done
t0=$(date +%s.%N)
kill -TERM $pid
wait $pid || true
t1=$(date +%s.%N)
pid=
kill $sampler 2>/dev/null || true
rows=$("$triage" costs --ledger "sqlite://$dir/ledger.db" --json | jq '[.[].requests] | add // 0')
echo "SIGTERM to exit: $(echo "$t1 - $t0" | bc) s"
echo "answered $answered, non-200 $errors, ledger rows $rows"
