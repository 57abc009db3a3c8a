#!/usr/bin/env python3
"""How well `triage transcribe --speakers` tells the voices of a mono recording apart,
and what it costs. Standard library only; driven by scripts/bench/speakers.sh.

The recording: the 13 development clips of ../shared/data/speech, which hold four
sources (LibriVox: a man reading Austen; LJ Speech: a woman; and two pocketsphinx test
recordings, `cards_*` and `goforward`), interleaved so that the source changes at almost
every clip, `--repeat` times over, with `--pause` seconds of silence between clips. Each
word of the transcript is given the source of the clip its middle falls in.

Reported (one JSON line):
  sources, speakers_found   voices in the recording / speaker labels triage gave
  word_accuracy             share of words whose label is their source's, after mapping
                            each label to the source most of its words come from
                            (several labels may map to one source: a voice split in two)
  purity, coverage          per label: share of its words from its main source; per source:
                            share of its words under its main label (a diarisation error
                            of one kind each; both 1.0 when perfect)
  seconds_plain, seconds_speakers, overhead
                            wall time of the same command without and with --speakers
                            (model load included in both)
"""

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

ORDER = ["librivox_ss01_0870.wav", "ljspeech_LJ001-0001.wav", "cards_001.wav",
         "librivox_ss01_0880.wav", "ljspeech_LJ001-0002.wav", "goforward.wav",
         "librivox_ss01_0890.wav", "cards_002.wav", "ljspeech_LJ001-0003.wav",
         "librivox_ss01_0920.wav", "cards_003.wav", "ljspeech_LJ001-0004.wav",
         "librivox_ss01_0930.wav"]


def source(name):
    return "goforward" if name.startswith("goforward") else name.split("_")[0]


def build(data: Path, out: Path, repeat: int, pause: float):
    frames, spans, t = [], [], 0.0
    silence = b"\0\0" * int(16000 * pause)
    for _ in range(repeat):
        for name in ORDER:
            with wave.open(str(data / name)) as w:
                assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
                n = w.getnframes()
                frames.append(w.readframes(n))
            spans.append((t, t + n / 16000, source(name)))
            t += n / 16000 + pause
            frames.append(silence)
    with wave.open(str(out), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"".join(frames))
    return spans


def run(cmd):
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, proc.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--triage", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--pause", type=float, default=0.7)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp, "conversation.wav")
        spans = build(Path(a.data), wav, a.repeat, a.pause)
        base = [a.triage, "transcribe", "--model", a.model, "--threads", str(a.threads),
                "--format", "json", "--word-timestamps"]
        plain_s, _ = run(base + [str(wav)])
        speakers_s, out = run(base + ["--speakers", str(wav)])
    t = json.loads(out.strip().splitlines()[-1])
    pairs = []  # (label, source) per word
    for seg in t["segments"]:
        for w in seg.get("words") or []:
            mid = (w["start"] + w["end"]) / 2
            src = min(spans, key=lambda s: 0 if s[0] <= mid <= s[1]
                      else min(abs(mid - s[0]), abs(mid - s[1])))[2]
            pairs.append((seg.get("speaker") or "none", src))
    by_label = collections.defaultdict(collections.Counter)
    by_source = collections.defaultdict(collections.Counter)
    for label, src in pairs:
        by_label[label][src] += 1
        by_source[src][label] += 1
    main_source = {l: c.most_common(1)[0][0] for l, c in by_label.items()}
    right = sum(1 for l, s in pairs if main_source[l] == s)
    print(json.dumps({
        "audio_s": round(spans[-1][1], 1),
        "words": len(pairs),
        "sources": len(by_source),
        "speakers_found": len(by_label),
        "word_accuracy": round(right / max(1, len(pairs)), 3),
        "purity": {l: round(c.most_common(1)[0][1] / sum(c.values()), 3) for l, c in sorted(by_label.items())},
        "coverage": {s: round(c.most_common(1)[0][1] / sum(c.values()), 3) for s, c in sorted(by_source.items())},
        "labels_per_source": {s: dict(c) for s, c in sorted(by_source.items())},
        "seconds_plain": round(plain_s, 2),
        "seconds_speakers": round(speakers_s, 2),
        "overhead": round(speakers_s / plain_s - 1, 3),
    }))


if __name__ == "__main__":
    sys.exit(main())
