#!/usr/bin/env bash
# The web UI's dashboard on a big ledger: generates an SQLite ledger of
# ROWS raw rows (default 5,000,000: half `requests`, half `attempts`, spread
# over the last 24 h, 3 tasks, 4 tiers) at schema step 3, as a ledger from
# before the per-minute totals existed; then starts `triage serve` on it,
# which adds `minute_stats` (timed: until /ready) and sums the old rows into
# it in the background, newest first (timed: until the dashboard says
# nothing is left), and times GET /ui/api/dashboard (hour and day windows)
# over the unix socket, next to the raw-row query the totals replace.
#   scripts/bench/ui-dashboard.sh [ROWS]
# PROFILE=debug (default) or release; NO_BUILD=1 uses the binary as it is;
# FROM=FILE starts from a copy of a ledger this script generated before
# (FILE keeps the generated one; generating 5M rows takes about 2 minutes).
set -euo pipefail
cd "$(dirname "$0")/../.."
rows="${1:-5000000}"
profile="${PROFILE:-debug}"
target="${CARGO_TARGET_DIR:-target}"
if [ -z "${NO_BUILD:-}" ]; then
  if [ "$profile" = release ]; then
    cargo build --release --quiet -p triage-cli --bin triage --features postgres
  else
    cargo build --quiet -p triage-cli --bin triage
  fi
fi
triage="$target/$profile/triage"
dir="$(mktemp -d)"
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT

if [ -n "${FROM:-}" ] && [ -f "$FROM" ]; then
  cp "$FROM" "$dir/ledger.db"
  rows=$(sqlite3 "$dir/ledger.db" 'SELECT (SELECT COUNT(*) FROM requests) + (SELECT COUNT(*) FROM attempts)')
  echo "copied $rows ledger rows from $FROM" >&2
else
echo "generating $rows ledger rows in $dir/ledger.db" >&2
start=$(date +%s.%N)
python3 - "$dir/ledger.db" "$rows" <<'PY'
import random, sqlite3, sys, time
path, rows = sys.argv[1], int(sys.argv[2])
db = sqlite3.connect(path)
db.executescript("""
PRAGMA journal_mode = WAL;
PRAGMA synchronous = OFF;
CREATE TABLE triage_migrations (version BIGINT PRIMARY KEY, ts_ms BIGINT NOT NULL);
CREATE TABLE attempts (request_id TEXT NOT NULL, seq BIGINT NOT NULL, ts_ms BIGINT NOT NULL, task TEXT NOT NULL,
  tier TEXT NOT NULL, provider TEXT NOT NULL, model TEXT NOT NULL, operation TEXT NOT NULL, input_tokens BIGINT NOT NULL,
  output_tokens BIGINT NOT NULL, cached_input_tokens BIGINT NOT NULL, reasoning_tokens BIGINT NOT NULL,
  audio_seconds DOUBLE PRECISION NOT NULL, latency_ms DOUBLE PRECISION NOT NULL, cost_usd DOUBLE PRECISION NOT NULL,
  outcome TEXT NOT NULL, error TEXT, PRIMARY KEY (request_id, seq));
CREATE INDEX attempts_ts ON attempts (ts_ms);
CREATE TABLE requests (request_id TEXT PRIMARY KEY, ts_ms BIGINT NOT NULL, task TEXT NOT NULL, answered_by TEXT NOT NULL,
  model TEXT NOT NULL, outcome TEXT NOT NULL, latency_ms DOUBLE PRECISION NOT NULL, cost_usd DOUBLE PRECISION NOT NULL,
  all_llm_cost_usd DOUBLE PRECISION NOT NULL, caller_id TEXT, key_name TEXT);
CREATE INDEX requests_ts ON requests (ts_ms);
CREATE TABLE shadow (request_id TEXT NOT NULL, ts_ms BIGINT NOT NULL, task TEXT NOT NULL, tier TEXT NOT NULL,
  shadow_tier TEXT NOT NULL, agree BIGINT NOT NULL, score DOUBLE PRECISION, shadow_score DOUBLE PRECISION);
""")
now = int(time.time() * 1000)
db.executemany("INSERT INTO triage_migrations VALUES (?, ?)", [(v, now) for v in (1, 2, 3)])
tiers = [("local", "local", "toxicity", 0.0000004), ("hosted", "openai", "omni-moderation-latest", 0.0),
         ("llm", "openai", "gpt-4o-mini", 0.00004), ("route:faq", "local", "", 0.0)]
tasks = ["moderation", "support", "notes"]
rnd = random.Random(7)
n = rows // 2
def gen(start, count):
    reqs, atts = [], []
    for i in range(start, start + count):
        ts = now - rnd.randrange(86_400_000)
        task = tasks[i % 3]
        tier, provider, model, cost = tiers[rnd.randrange(4)]
        lat = rnd.expovariate(1 / 40.0)
        rid = f"req-{i:012d}"
        outcome = "failed" if rnd.random() < 0.01 else "answered"
        reqs.append((rid, ts, task, tier, model, outcome, lat, cost, 0.0004, None, None))
        atts.append((rid, i, ts, task, tier, provider, model, "chat", 10, 5, 0, 0, 0.0, lat, cost, outcome, None))
    return reqs, atts
batch = 200_000
for s in range(0, n, batch):
    r, a = gen(s, min(batch, n - s))
    db.executemany("INSERT INTO requests VALUES (?,?,?,?,?,?,?,?,?,?,?)", r)
    db.executemany("INSERT INTO attempts VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", a)
    db.commit()
db.close()
PY
echo "generated in $(echo "$(date +%s.%N) - $start" | bc) s; $(du -h "$dir/ledger.db" | cut -f1)" >&2
[ -n "${FROM:-}" ] && cp "$dir/ledger.db" "$FROM"
fi

cat > "$dir/triage.toml" <<TOML
[ledger]
url = "sqlite://$dir/ledger.db"

[tasks.faq]
strategy = "router"
[tasks.faq.intent]
kind = "rules"
default = "faq"
[tasks.faq.routes.faq]
handler = "template"
template = "We are open 9 to 5."
TOML

sock="$dir/t.sock"
start=$(date +%s.%N)
"$triage" serve --config "$dir/triage.toml" --socket "$sock" 2>"$dir/serve.log" &
pid=$!
until curl -sf --unix-socket "$sock" http://t/ready >/dev/null 2>&1; do
  kill -0 "$pid" 2>/dev/null || { cat "$dir/serve.log" >&2; exit 1; }
  sleep 0.2
done
echo "server ready (minute_stats migration over $rows rows included) in $(echo "$(date +%s.%N) - $start" | bc) s" >&2
first=$(curl -s --unix-socket "$sock" http://t/ui/api/dashboard |
  python3 -c "import json,sys; d=json.load(sys.stdin); print(d['windows'][1]['requests'], d['backfill_before_ms'])")
echo "dashboard at ready: day window requests, backfill cursor: $first" >&2
until curl -s --unix-socket "$sock" http://t/ui/api/dashboard |
  python3 -c "import json,sys; sys.exit(0 if json.load(sys.stdin)['backfill_before_ms'] is None else 1)"; do
  kill -0 "$pid" 2>/dev/null || { cat "$dir/serve.log" >&2; exit 1; }
  sleep 0.5
done
echo "old rows summed into minute_stats (background backfill) $(echo "$(date +%s.%N) - $start" | bc) s after start" >&2
echo "minute_stats rows: $(sqlite3 "$dir/ledger.db" 'SELECT COUNT(*) FROM minute_stats')" >&2
echo "requests counted in minute_stats / in the ledger: $(sqlite3 "$dir/ledger.db" "SELECT SUM(n) FROM minute_stats WHERE kind = 'request'") / $(sqlite3 "$dir/ledger.db" 'SELECT COUNT(*) FROM requests')" >&2

times=()
for i in $(seq 20); do
  t=$(curl -s -o "$dir/dash.json" -w '%{time_total}' --unix-socket "$sock" http://t/ui/api/dashboard)
  times+=("$t")
done
sorted=$(printf '%s\n' "${times[@]}" | sort -n)
echo "GET /ui/api/dashboard x20: median $(echo "$sorted" | sed -n 10p) s, max $(echo "$sorted" | tail -1) s" >&2
python3 -c "import json,sys; d=json.load(open('$dir/dash.json')); print('day window requests:', d['windows'][1]['requests'], 'hour:', d['windows'][0]['requests'])" >&2
# The query the totals replace: the day's requests summed from raw rows.
start=$(date +%s.%N)
sqlite3 "$dir/ledger.db" "SELECT task, answered_by, outcome, COUNT(*), SUM(cost_usd), SUM(all_llm_cost_usd) FROM requests WHERE ts_ms >= (strftime('%s','now') - 86400) * 1000 GROUP BY 1, 2, 3" >/dev/null
echo "the same day window from raw rows (sqlite3 CLI): $(echo "$(date +%s.%N) - $start" | bc) s" >&2
