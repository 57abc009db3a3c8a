#!/usr/bin/env python3
"""Write a committed specialist (an f16 delta over all-MiniLM-L6-v2, e.g. models/ner) as a full
Hugging Face folder that PyTorch transformers loads: the base's tensors with the delta's laid over
them (in f32, under BERT's `bert.` prefix; heads keep their own names), the specialist's
config.json, and the base's tokenizer without its baked-in truncation. For the benchmarks only:
triage itself loads the delta. Usage:

  .venv-fixtures/bin/python scripts/bench/make_specialist_folder.py models/ner BASE_DIR OUT_DIR
"""

import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

HEADS = ("classifier.", "pre_classifier.")


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    spec, base, out = (Path(a) for a in sys.argv[1:])
    tensors = {}
    for name, t in load_file(str(base / "model.safetensors")).items():
        tensors[name] = t.float()
    for name, t in load_file(str(spec / "delta.safetensors")).items():
        tensors[name] = t.float()
    merged = {(n if n.startswith(HEADS) or n.startswith("bert.") else "bert." + n): t.contiguous()
              for n, t in tensors.items()}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(spec / "config.json", out / "config.json")
    tj = json.loads((base / "tokenizer.json").read_text(encoding="utf-8"))
    tj["truncation"] = None
    tj["padding"] = None
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    for f in ("vocab.txt", "special_tokens_map.json", "tokenizer_config.json"):
        if (base / f).exists():
            shutil.copy(base / f, out / f)
    print(f"wrote {out} ({len(merged)} tensors)")


if __name__ == "__main__":
    main()
