#!/usr/bin/env python3
"""Convert a whisper.cpp ggml model file into the `.pt` checkpoint that openai-whisper loads.

openai-whisper downloads its checkpoints from a host these machines cannot reach, so the
benchmark (scripts/bench/whisper.sh) builds one from the same ggml file triage and
whisper.cpp run. The ggml layout (see shared/docs/ctranslate2-whisper.md): i32 magic, eleven
i32 hyper-parameters, the mel filterbank, the vocabulary, then tensors under their OpenAI
names (i32 rank, i32 name length, i32 type 0=f32/1=f16, dims innermost first, name, data).
The output is `{"dims": {...}, "model_state_dict": {...}}`, as `whisper.load_model(path)`
expects. Tensors keep their stored precision (f16 weights, f32 biases/norms/positional
tables, like the official checkpoints); load_model copies them into f32 parameters.

  .venv-fixtures/bin/python scripts/bench/ggml_to_openai_whisper.py GGML_FILE OUT.pt [--check WAV]

--check loads the result with openai-whisper and prints the transcript of WAV.
"""

import argparse
import struct
import sys
from pathlib import Path

import numpy as np
import torch

MAGIC = 0x67676D6C
HPARAMS = ["n_vocab", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer",
           "n_text_ctx", "n_text_state", "n_text_head", "n_text_layer", "n_mels", "ftype"]
DTYPES = {0: np.float32, 1: np.float16}


class Reader:
    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.pos = 0

    def i32s(self, n: int) -> tuple:
        out = struct.unpack_from(f"<{n}i", self.data, self.pos)
        self.pos += 4 * n
        return out

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise ValueError(f"truncated ggml file: need {n} bytes at offset {self.pos}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def done(self) -> bool:
        return self.pos >= len(self.data)


def read_ggml(path: Path) -> tuple[dict, dict]:
    r = Reader(path.read_bytes())
    (magic,) = r.i32s(1)
    if magic != MAGIC:
        raise ValueError(f"{path}: not a ggml file (magic {magic:#x})")
    hp = dict(zip(HPARAMS, r.i32s(len(HPARAMS))))
    rows, cols = r.i32s(2)
    r.take(4 * rows * cols)  # mel filters: openai-whisper ships its own (same values)
    (n_tokens,) = r.i32s(1)
    for _ in range(n_tokens):  # vocabulary: openai-whisper uses its bundled gpt2.tiktoken
        (n,) = r.i32s(1)
        r.take(n)
    tensors = {}
    while not r.done():
        n_dims, name_len, ttype = r.i32s(3)
        if ttype not in DTYPES:
            raise ValueError(f"tensor type {ttype} not supported (only f32/f16 files)")
        dims = r.i32s(n_dims)
        name = bytes(r.take(name_len)).decode()
        dtype = DTYPES[ttype]
        count = int(np.prod(dims))
        arr = np.frombuffer(r.take(count * np.dtype(dtype).itemsize), dtype=dtype)
        # ggml lists dims innermost first; numpy/torch shape is the reverse.
        arr = arr.reshape(tuple(reversed(dims)))
        if name in ("encoder.conv1.bias", "encoder.conv2.bias"):
            arr = arr.reshape(-1)  # stored as (n, 1) for ggml's broadcasting; torch wants (n,)
        tensors[name] = torch.from_numpy(arr.copy())
    return hp, tensors


def convert(ggml: Path, out: Path) -> dict:
    hp, tensors = read_ggml(ggml)
    dims = {k: hp[k] for k in HPARAMS if k != "ftype"}
    emb = tensors["decoder.token_embedding.weight"]
    if emb.shape[0] != dims["n_vocab"]:
        raise ValueError(f"n_vocab {dims['n_vocab']} != embedding rows {emb.shape[0]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    torch.save({"dims": dims, "model_state_dict": tensors}, tmp)
    tmp.replace(out)
    return dims


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ggml", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--check", type=Path, help="transcribe this audio file with the result")
    args = ap.parse_args()
    dims = convert(args.ggml, args.out)
    print(f"wrote {args.out} {dims}", file=sys.stderr)
    if args.check:
        import whisper  # openai-whisper

        model = whisper.load_model(str(args.out), device="cpu")  # strict load_state_dict
        result = model.transcribe(str(args.check), fp16=False, language="en",
                                  temperature=0.0, beam_size=None)
        print(result["text"].strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
