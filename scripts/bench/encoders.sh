#!/usr/bin/env bash
# Texts/s of triage (f32, and with int8 dense layers) and of PyTorch
# transformers (f32) on the same models, the same texts and the same thread
# count, side by side in one run (each triage measurement is followed at once
# by PyTorch's, so all see the same machine load). Prints JSON lines, then a ratio table. Needs the fixtures venv
# (scripts/fixtures/make.sh) and the shared data (TRIAGE_SHARED, default
# ../shared) for the tweet and CoNLL text sets.
#
#   scripts/bench/encoders.sh [THREADS] [SECONDS]
#
# Models: all-MiniLM-L6-v2 (mean-pooled embeddings), a DistilBERT-base-sized
# sequence classifier with random weights, and the two committed specialists
# (toxicity: MiniLM sequence classification; ner: MiniLM token
# classification), written as full folders for PyTorch. Text sets:
# `sentences` (scripts/bench/sentences.txt, 20-40 words each), `tweets` (the
# first 512 tweets of tweeteval-offensive val, natural lengths) and `conll`
# (the first 512 sentences of CoNLL-2003 validation).
set -euo pipefail
cd "$(dirname "$0")/../.."
threads="${1:-2}"
seconds="${2:-10}"
shared="${TRIAGE_SHARED:-../shared}"
py=.venv-fixtures/bin/python
[ -x "$py" ] || { echo "run scripts/fixtures/make.sh first (it creates $py)" >&2; exit 2; }
target="${CARGO_TARGET_DIR:-target}"
models=target/bench-models
texts=target/bench-texts
minilm="$(scripts/fetch-minilm)"
distil="$models/distilbert-base-random"
[ -f "$distil/model.safetensors" ] || "$py" scripts/bench/make_distilbert_base.py "$distil" >&2
for s in toxicity ner; do
  [ -f "$models/$s/model.safetensors" ] || "$py" scripts/bench/make_specialist_folder.py "models/$s" "$minilm" "$models/$s" >&2
done
mkdir -p "$texts"
cp scripts/bench/sentences.txt "$texts/sentences.txt"
python3 - "$shared/data" "$texts" <<'PY'
import json, sys
data, out = sys.argv[1:]
def first(path, n, text):
    rows = []
    for line in open(path, encoding="utf-8"):
        t = " ".join(text(json.loads(line)).split())
        if t:
            rows.append(t)
        if len(rows) == n:
            break
    return rows
tweets = first(f"{data}/toxicity/tweeteval-offensive/val.jsonl", 512, lambda r: r["text"])
conll = first(f"{data}/ner/conll2003/validation.jsonl", 512, lambda r: " ".join(r["tokens"]))
open(f"{out}/tweets.txt", "w", encoding="utf-8").write("\n".join(tweets) + "\n")
open(f"{out}/conll.txt", "w", encoding="utf-8").write("\n".join(conll) + "\n")
PY
cargo build --release --quiet -p triage-local --example bench_encoder
out="$(mktemp)"
echo "load before: $(uptime)" >&2
for pair in "$minilm sentences" "$minilm tweets" "$distil sentences" "$distil tweets" \
            "$models/toxicity tweets" "$models/ner conll"; do
  read -r model set <<<"$pair"
  RAYON_NUM_THREADS="$threads" "$target/release/examples/bench_encoder" "$model" "$texts/$set.txt" "$seconds" 1,8,32 | tee -a "$out"
  TRIAGE_BENCH_INT8=1 RAYON_NUM_THREADS="$threads" "$target/release/examples/bench_encoder" "$model" "$texts/$set.txt" "$seconds" 1,8,32 | tee -a "$out"
  OMP_NUM_THREADS="$threads" "$py" scripts/bench/pytorch_bench.py --model "$model" --threads "$threads" \
    --batches 1,8,32 --seconds "$seconds" --texts-file "$texts/$set.txt" --max-length 512 | tee -a "$out"
done
echo "load after: $(uptime)" >&2
python3 - "$out" <<'PY'
import json, sys, os
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
by = {}
for r in rows:
    key = (os.path.basename(r["model"].rstrip("/")), r["set"], r["batch"])
    by.setdefault(key, {})[r["impl"]] = (r["texts_per_s"], r.get("texts_per_cpu_s", 0.0))
# ratio: texts/s over the wall clock; cpu ratio: texts per CPU-second (user +
# system of each process), which a busy machine distorts less.
print(f"{'model':24} {'texts':9} {'batch':>5} {'f32/s':>7} {'int8/s':>7} {'torch/s':>8} {'f32 ×':>6} {'int8 ×':>6} {'cpu f32':>7} {'cpu int8':>8}")
for (m, s, b), v in sorted(by.items()):
    t, q, p = v.get("triage"), v.get("triage-int8"), v.get("pytorch")
    if t and q and p:
        cpu = lambda x: f"{x[1] / p[1]:.2f}" if x[1] and p[1] else "-"
        print(f"{m:24} {s:9} {b:>5} {t[0]:>7.1f} {q[0]:>7.1f} {p[0]:>8.1f} {t[0] / p[0]:>6.2f} {q[0] / p[0]:>6.2f} {cpu(t):>7} {cpu(q):>8}")
PY
