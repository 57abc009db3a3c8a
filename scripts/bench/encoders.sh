#!/usr/bin/env bash
# Texts/s of triage (candle) and PyTorch transformers on the same models, the
# same sentences and the same thread count, in one run. Prints JSON lines and
# a ratio table. Needs the fixtures venv (scripts/fixtures/make.sh).
#
#   scripts/bench/encoders.sh [THREADS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
threads="${1:-2}"
seconds="${2:-10}"
py=.venv-fixtures/bin/python
[ -x "$py" ] || { echo "run scripts/fixtures/make.sh first (it creates $py)" >&2; exit 2; }
minilm="$(scripts/fetch-minilm)"
distil=target/bench-models/distilbert-base-random
[ -f "$distil/model.safetensors" ] || "$py" scripts/bench/make_distilbert_base.py "$distil" >&2
cargo build --release --quiet -p triage-local --example bench_encoder
out="$(mktemp)"
for model in "$minilm" "$distil"; do
  RAYON_NUM_THREADS="$threads" target/release/examples/bench_encoder "$model" scripts/bench/sentences.txt "$seconds" 1,8,32 | tee -a "$out"
  "$py" scripts/bench/pytorch_bench.py --model "$model" --threads "$threads" --batches 1,8,32 --seconds "$seconds" | tee -a "$out"
done
python3 - "$out" <<'PY'
import json, sys, os
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
by = {}
for r in rows:
    by.setdefault((os.path.basename(r["model"].rstrip("/")), r["batch"]), {})[r["impl"]] = r["texts_per_s"]
print(f"{'model':32} {'batch':>5} {'triage':>10} {'pytorch':>10} {'ratio':>6}")
for (m, b), v in sorted(by.items()):
    t, p = v.get("triage-candle"), v.get("pytorch")
    if t and p:
        print(f"{m:32} {b:>5} {t:>10.1f} {p:>10.1f} {t / p:>6.2f}")
PY
