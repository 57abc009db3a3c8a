#!/usr/bin/env bash
# Peak memory of a long recording through /v1/jobs: a 20-minute (or longer)
# 16 kHz mono WAV made of the shared speech clips with pauses and low noise
# between them, submitted to `triage serve` over its unix socket. Reports
# the server's RSS when idle (model loaded), its peak RSS while the job ran
# (VmHWM, and the highest VmRSS sampled every 0.2 s) and the difference,
# the wall time and the words transcribed.
#   scripts/bench/long-audio.sh [MINUTES] [debug|release]
# MINUTES defaults to 20 (120 for two hours); the build profile to debug.
# Needs TRIAGE_SHARED (clips and the ggml Whisper tiny.en), python3, curl;
# uses the Silero VAD model when scripts/fetch-silero-vad has cached it
# (TRIAGE_NO_VAD=1 runs without). TRIAGE_BIN=PATH times that triage binary
# instead of building one.
set -euo pipefail
cd "$(dirname "$0")/../.."
minutes="${1:-20}"
profile="${2:-debug}"
shared="${TRIAGE_SHARED:-../shared}"
model="${TRIAGE_WHISPER_MODEL:-$shared/models/whisper-tiny.en/ggml-model-f16.bin}"
# shellcheck source=scripts/bench/lib.sh
. scripts/bench/lib.sh
bin="$(triage_bin "$profile")"
dir="$(mktemp -d)"
sock="$dir/triage.sock"
wav="$dir/long.wav"
python3 - "$shared/data/speech" "$wav" "$minutes" <<'PY'
import random, struct, sys, wave
from pathlib import Path
src, out, minutes = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
clips = []
for p in sorted(src.glob("*.wav")):
    with wave.open(str(p)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2), p
        clips.append(w.readframes(w.getnframes()))
rng = random.Random(7)
total = int(minutes * 60 * 16000)
with wave.open(out, "wb") as w:
    w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000)
    written, i = 0, 0
    while written < total:
        clip = clips[i % len(clips)]; i += 1
        w.writeframes(clip); written += len(clip) // 2
        # A pause of 1-6 s of low noise (about -50 dBFS) between utterances.
        n = int(rng.uniform(1, 6) * 16000)
        w.writeframes(struct.pack(f"<{n}h", *(rng.randint(-100, 100) for _ in range(n))))
        written += n
print(f"long-audio: {written / 16000 / 60:.1f} min, {Path(out).stat().st_size / 1e6:.0f} MB WAV", file=sys.stderr)
PY
vad_env=()
if [ "${TRIAGE_NO_VAD:-}" = 1 ]; then
  vad_env=(-u TRIAGE_VAD_MODEL TRIAGE_CACHE="$dir/no-cache")
fi
start_serve "$dir" "$sock" env "${vad_env[@]}" TRIAGE_DATA_DIR="$dir" "$bin" serve \
  --whisper-model "$model" --socket "$sock" --max-audio-s 10800
sleep 1
idle=$(rss VmRSS)
started=$(date +%s.%N)
id=$(curl -sf --unix-socket "$sock" http://t/v1/jobs -F "file=@$wav" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
peak_sampled=$idle
last_report=$(date +%s)
while :; do
  now=$(rss VmRSS)
  [ "$now" -gt "$peak_sampled" ] && peak_sampled=$now
  # A line a minute on stderr, so a two-hour run shows that it moves.
  if [ $(($(date +%s) - last_report)) -ge 60 ]; then
    last_report=$(date +%s)
    echo "long-audio: $(seconds_since "$started") s, RSS $((now / 1024)) MB, highest $((peak_sampled / 1024)) MB" >&2
  fi
  status=$(curl -sf --unix-socket "$sock" "http://t/v1/jobs/$id" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
  case "$status" in succeeded | failed) break ;; esac
  sleep 0.2
done
elapsed=$(seconds_since "$started")
hwm=$(rss VmHWM)
words=$(curl -s --unix-socket "$sock" "http://t/v1/jobs/$id/result" | python3 -c 'import json,sys; v=json.load(sys.stdin); print(len(v.get("text","").split()) if "text" in v else v)')
echo "long-audio: ${minutes} min through /v1/jobs, $profile build, job $status in ${elapsed} s, ${words} words"
echo "long-audio: RSS idle $((idle / 1024)) MB; peak VmHWM $((hwm / 1024)) MB (above idle: $(((hwm - idle) / 1024)) MB); highest sampled VmRSS $((peak_sampled / 1024)) MB (above idle: $(((peak_sampled - idle) / 1024)) MB)"
