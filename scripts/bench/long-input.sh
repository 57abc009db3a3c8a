#!/usr/bin/env bash
# Time and peak memory of one very long text through the local moderation
# tier: `triage serve` (the default config: the toxicity specialist, which
# scores every window of a long input) on a unix socket, one POST to
# /v1/moderations with a text of SIZE_KB kilobytes (default 1000) built from
# the shared tweets, after one short warm-up request. Reports the server's
# RSS when idle, its peak (VmHWM) and the difference, the wall time and the
# HTTP status.
#   scripts/bench/long-input.sh [SIZE_KB] [debug|release]
# The max_input_tokens limit is raised for the run (--max-input-tokens) so
# that the whole text is scored, not refused with the 413 the default gives.
# Needs TRIAGE_SHARED (default ../shared), python3, curl. TRIAGE_BIN=PATH
# times that triage binary instead of building one; TRIAGE_ARGS adds serve
# arguments (e.g. "--config my.toml").
set -euo pipefail
cd "$(dirname "$0")/../.."
size_kb="${1:-1000}"
profile="${2:-release}"
shared="${TRIAGE_SHARED:-../shared}"
# shellcheck source=scripts/bench/lib.sh
. scripts/bench/lib.sh
bin="$(triage_bin "$profile")"
dir="$(mktemp -d)"
sock="$dir/triage.sock"
python3 - "$shared/data/toxicity/tweeteval-offensive/val.jsonl" "$dir/body.json" "$size_kb" <<'PY'
import json, sys
src, out, size_kb = sys.argv[1], sys.argv[2], int(sys.argv[3])
tweets = [json.loads(l)["text"] for l in open(src, encoding="utf-8") if l.strip()]
parts, n, i = [], 0, 0
while n < size_kb * 1000:
    t = tweets[i % len(tweets)]
    i += 1
    parts.append(t)
    n += len(t.encode()) + 1
text = " ".join(parts)
json.dump({"input": text}, open(out, "w", encoding="utf-8"))
print(f"long-input: {len(text.encode()) / 1e3:.0f} KB of text ({i} tweets)", file=sys.stderr)
PY
# shellcheck disable=SC2086 # TRIAGE_ARGS is a list of arguments
start_serve "$dir" "$sock" env TRIAGE_DATA_DIR="$dir" "$bin" serve --socket "$sock" \
  --max-input-tokens 1000000 --whisper-model "$shared/models/whisper-tiny.en/ggml-model-f16.bin" \
  ${TRIAGE_ARGS:-}
curl -sf --unix-socket "$sock" http://t/v1/moderations -H 'content-type: application/json' \
  -d '{"input": "warm-up: a short text"}' >/dev/null
sleep 1
idle=$(rss VmRSS)
started=$(date +%s.%N)
status=$(curl -s -o "$dir/answer.json" -w '%{http_code}' --unix-socket "$sock" \
  http://t/v1/moderations -H 'content-type: application/json' --data-binary "@$dir/body.json")
elapsed=$(seconds_since "$started")
hwm=$(rss VmHWM)
echo "long-input: ${size_kb} KB to /v1/moderations, $bin, HTTP $status in ${elapsed} s"
echo "long-input: RSS idle $((idle / 1024)) MB; peak VmHWM $((hwm / 1024)) MB (above idle: $(((hwm - idle) / 1024)) MB)"
head -c 300 "$dir/answer.json"
echo
