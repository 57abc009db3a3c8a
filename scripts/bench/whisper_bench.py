#!/usr/bin/env python3
"""Real-time factor and WER of triage, whisper.cpp's whisper-cli and openai-whisper.

Driven by scripts/bench/whisper.sh, which builds what this needs. All three run the same
Whisper weights (the ggml file, and the openai-whisper checkpoint converted from it), the
same clips, the same thread count and the same decoding: greedy (one candidate), with
timestamp tokens, temperature fallback in steps of 0.2, no-speech threshold 0.6.

How processing time is measured (processing_s; rtf = processing_s / audio_s):

* triage and whisper-cli: one process transcribes all clips; processing_s is that
  process's wall time minus the median wall time of the same command on a file that is
  not audio (3 runs), which loads the model and stops. So process start-up and model
  load are excluded, while reading the WAVs, the first-use allocations (triage creates
  its decoding state lazily; whisper-cli creates it with the model, so it sits in the
  subtracted part), and writing the output are included.
* openai-whisper: in one Python process, after `load_model`, the sum over clips of the
  time `model.transcribe(samples)` takes. The audio is decoded (ffmpeg) before the clock
  starts, which, if anything, favours openai-whisper.

No warm-up run for any of them: each transcribes every clip once, right after loading.

Prints one JSON line per implementation:
  {"impl", "threads", "audio_s", "processing_s", "rtf", "wer"}
then a table with the ratios triage/whisper.cpp and openai-whisper/triage (of the rtf).
WER is corpus WER (word edits / reference words) after a simple normaliser (lowercase,
no punctuation, numbers up to 999 spelt out, "mr"/"mrs" spelt out).
"""

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

# ---------------------------------------------------------------- normaliser and WER

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
         "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
         "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_WORDS = {"mr": "mister", "mrs": "missus"}


def number_words(n: int) -> str:
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


def normalise(text: str) -> list[str]:
    text = text.lower().replace("\u2019", "'")
    text = re.sub(r"[-\u2013\u2014]", " ", text)
    text = text.replace("'", "")
    text = re.sub(r"[^a-z0-9 ]+", " ", text)
    words = []
    for w in text.split():
        if w.isdigit() and int(w) < 1000:
            words.extend(number_words(int(w)).split())
        else:
            words.append(_WORDS.get(w, w))
    return words


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1]


def corpus_wer(refs: dict[str, str], hyps: dict[str, str]) -> float:
    edits = words = 0
    for name, ref in refs.items():
        r = normalise(ref)
        edits += edit_distance(r, normalise(hyps.get(name, "")))
        words += len(r)
    return edits / max(words, 1)


# ---------------------------------------------------------------- runners


def timed(cmd: list[str], ok=(0,), **kw) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    elapsed = time.perf_counter() - t0
    if proc.returncode not in ok:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return elapsed, proc


def load_only_s(cmd: list[str], ok) -> float:
    return statistics.median(timed(cmd, ok)[0] for _ in range(3))


def run_triage(args, clips: list[Path], probe: Path, extra: list[str] = (),
               ggml: str | None = None) -> tuple[float, dict[str, str], float]:
    base = [args.triage, "transcribe", "--model", ggml or args.ggml, "--threads",
            str(args.threads), "--format", "json", *extra]
    # The probe is not audio: triage loads the model, reports the file and exits with 3.
    load = load_only_s(base + [str(probe)], ok=(3,))
    wall, proc = timed(base + [str(c) for c in clips])
    texts = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            obj = json.loads(line)
            if "error" in obj:
                raise SystemExit(f"triage: {obj}")
            texts[Path(obj["file"]).name] = obj["text"]
    return wall - load, texts, load


def run_whisper_cli(args, clips: list[Path], probe: Path, flash_attn: bool):
    base = [args.whisper_cli, "-m", args.ggml, "-t", str(args.threads),
            # triage's settings (whisper-rs defaults + greedy best_of 1): greedy rather
            # than whisper-cli's beam search of 5; flash attention as whisper-rs (off) unless
            # asked for; timestamps decoded (-nt would decode without them, which is faster
            # and not what triage does), so the text comes from -otxt files.
            "-bs", "1", "-bo", "1", "-fa" if flash_attn else "-nfa", "-np"]
    # whisper-cli skips a file it cannot read and goes on: model load only.
    load = load_only_s(base + [str(probe)], ok=(0,))
    with tempfile.TemporaryDirectory() as out:
        cmd = base + ["-otxt"]
        for c in clips:
            cmd += ["-of", os.path.join(out, c.stem)]
        wall, _ = timed(cmd + [str(c) for c in clips])
        texts = {}
        for c in clips:
            p = Path(out, c.stem + ".txt")
            texts[c.name] = " ".join(line.strip() for line in p.read_text().splitlines())
    return wall - load, texts, load


def run_openai_whisper(args, clips: list[Path]):
    """Runs openai-whisper in a child process (its own thread settings), returns its result."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "openai-worker", "--pt", args.pt,
           "--threads", str(args.threads)] + [str(c) for c in clips]
    _, proc = timed(cmd, env=env)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return res["processing_s"], res["texts"], res["load_s"]


def openai_worker(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pt", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("clips", nargs="+")
    a = ap.parse_args(argv)
    import torch
    import whisper  # openai-whisper

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model = whisper.load_model(a.pt, device="cpu")
    load_s = time.perf_counter() - t0
    texts, total = {}, 0.0
    for clip in a.clips:
        samples = whisper.load_audio(clip)  # ffmpeg, outside the clock
        t0 = time.perf_counter()
        # Default temperature schedule (0.0, 0.2, ... 1.0) = whisper.cpp's fallback in 0.2
        # steps; beam_size=None/best_of=None = greedy, one sample per temperature.
        result = model.transcribe(samples, fp16=False, language="en", beam_size=None,
                                  best_of=None, verbose=None)
        total += time.perf_counter() - t0
        texts[Path(clip).name] = result["text"].strip()
    print(json.dumps({"processing_s": total, "texts": texts, "load_s": load_s}))
    return 0


# ---------------------------------------------------------------- main


def audio_seconds(path: Path) -> float:
    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


def long_recording(clips: list[Path], refs: dict[str, str], out: Path, repeat: int):
    """One 16 kHz mono WAV of the clips one after another, `repeat` times, with a
    second of silence between them (a meeting-length file that VAD cuts at its pauses),
    and its reference text."""
    frames, text = [], []
    silence = b"\0\0" * 16000
    for _ in range(repeat):
        for c in clips:
            with wave.open(str(c)) as w:
                if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (16000, 1, 2):
                    raise SystemExit(f"{c}: the long recording needs 16 kHz mono 16-bit clips")
                frames.append(w.readframes(w.getnframes()))
            frames.append(silence)
            text.append(refs[c.name])
    with wave.open(str(out), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"".join(frames))
    return {out.name: " ".join(text)}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "openai-worker":
        return openai_worker(sys.argv[2:])
    ap = argparse.ArgumentParser(description="Whisper RTF: triage vs whisper.cpp vs openai-whisper")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", type=Path, required=True, help="folder with manifest.jsonl")
    ap.add_argument("--only", action="append", help="run only these clips (file names)")
    ap.add_argument("--ggml", required=True)
    ap.add_argument("--pt", required=True, help="openai-whisper checkpoint of the same weights")
    ap.add_argument("--triage", required=True)
    ap.add_argument("--whisper-cli", required=True)
    ap.add_argument("--with-flash-attn", action="store_true",
                    help="also run whisper-cli with flash attention (its own default)")
    ap.add_argument("--show-texts", action="store_true", help="print every transcript to stderr")
    ap.add_argument("--triage-variant", action="append", default=[], metavar="NAME=ARGS",
                    help="also time triage with these extra `transcribe` arguments, e.g. "
                         "'parallel2=--parallel 2' (a `--model FILE` among them replaces the "
                         "model for that variant only)")
    ap.add_argument("--long", type=int, default=0, metavar="N",
                    help="time long recordings instead: the clips N times over, one file each")
    ap.add_argument("--arrangements", type=int, default=5, metavar="K",
                    help="with --long: K recordings (default 5), the first in the manifest's "
                         "order, the others each in its own fixed shuffle of the clips "
                         "(seeds 1..K-1)")
    args = ap.parse_args()

    manifest = [json.loads(l) for l in (args.data / "manifest.jsonl").read_text().splitlines() if l.strip()]
    if args.only:
        manifest = [m for m in manifest if m["audio"] in args.only]
        if len(manifest) != len(args.only):
            raise SystemExit(f"not all of {args.only} are in the manifest")
    clips = [args.data / m["audio"] for m in manifest]
    refs = {m["audio"]: m["text"] for m in manifest}
    keep = tempfile.TemporaryDirectory()
    if args.long:
        # One arrangement's WER moves by points with where a clip happens to fall
        # in a decoding window (the cards clips' "clubs" comes out as "Clovs" after
        # some neighbours and not after others), so several arrangements are pooled.
        long_refs, long_files = {}, []
        for k in range(max(args.arrangements, 1)):
            order = list(clips)
            if k:
                random.Random(k).shuffle(order)
            name = "long-recording.wav" if k == 0 else f"long-recording-{k}.wav"
            long_wav = Path(keep.name, name)
            long_refs.update(long_recording(order, refs, long_wav, args.long))
            long_files.append(long_wav)
        refs, clips = long_refs, long_files
    audio_s = sum(audio_seconds(c) for c in clips)

    def variant(spec: str):
        name, _, extra = spec.partition("=")
        words = extra.split()
        ggml = None
        if "--model" in words:
            i = words.index("--model")
            ggml = words[i + 1]
            words = words[:i] + words[i + 2:]
        return (f"triage-{name}", lambda p: run_triage(args, clips, p, words, ggml))

    runs = [("triage", lambda p: run_triage(args, clips, p))]
    runs += [variant(v) for v in args.triage_variant]
    runs.append(("whisper.cpp", lambda p: run_whisper_cli(args, clips, p, flash_attn=False)))
    if args.with_flash_attn:
        runs.append(("whisper.cpp-fa", lambda p: run_whisper_cli(args, clips, p, flash_attn=True)))
    runs.append(("openai-whisper", lambda p: run_openai_whisper(args, clips)))

    rows = []
    with keep, tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp, "not-audio.wav")
        probe.write_bytes(b"this is not a WAV file\n")
        for name, run in runs:
            processing_s, texts, load_s = run(probe)
            missing = [c.name for c in clips if c.name not in texts]
            if missing:
                raise SystemExit(f"{name}: no transcript for {missing}")
            row = {"impl": name, "threads": args.threads, "audio_s": round(audio_s, 3),
                   "processing_s": round(processing_s, 3),
                   "rtf": round(processing_s / audio_s, 4),
                   "wer": round(corpus_wer(refs, texts), 4)}
            if args.long and len(clips) > 1:
                row["wer_by_file"] = [round(corpus_wer({c.name: refs[c.name]}, texts), 4)
                                      for c in clips]
            print(json.dumps(row), flush=True)
            print(f"# {name}: model load {load_s:.3f} s (excluded)", file=sys.stderr)
            if args.show_texts:
                for c in clips:
                    print(f"#   {c.name}: {texts[c.name]}", file=sys.stderr)
            rows.append(row)

    by = {r["impl"]: r for r in rows}
    print(f"\n{'impl':16} {'rtf':>8} {'x realtime':>10} {'wer':>7}")
    for r in rows:
        print(f"{r['impl']:16} {r['rtf']:>8.4f} {1 / r['rtf'] if r['rtf'] else 0:>10.1f} {r['wer']:>7.3f}")
    w, o = by["whisper.cpp"]["rtf"], by["openai-whisper"]["rtf"]
    print(f"\nthreads {args.threads}, {len(clips)} file(s), {audio_s:.1f} s of audio")
    print("speed-up of each triage run (the other's rtf / triage's; >1 = triage faster),"
          " and its WER minus theirs (points)")
    print(f"{'impl':16} {'vs whisper.cpp':>14} {'vs openai-whisper':>17} {'WER Δ cpp':>9} {'WER Δ openai':>12}")
    for r in rows:
        if r["impl"].startswith("triage"):
            t = r["rtf"]
            dw = 100 * (r["wer"] - by["whisper.cpp"]["wer"])
            do = 100 * (r["wer"] - by["openai-whisper"]["wer"])
            print(f"{r['impl']:16} {w / t:>14.2f} {o / t:>17.2f} {dw:>+9.1f} {do:>+12.1f}")
    if "whisper.cpp-fa" in by:
        print(f"whisper.cpp-fa / whisper.cpp (rtf): {by['whisper.cpp-fa']['rtf'] / w:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
