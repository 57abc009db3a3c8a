#!/usr/bin/env bash
# Speaker labels on a mono recording: accuracy per word and the time they
# add (scripts/bench/speakers.py says what is measured).
#
#   scripts/bench/speakers.sh [REPEAT] [THREADS]     (defaults 2 and 2)
#
# Environment: TRIAGE_BIN (default: builds and uses target/release/triage),
# WHISPER_GGML (default: shared tiny.en f16); the VAD and speaker models come
# from scripts/fetch-silero-vad and scripts/fetch-speaker-model.
set -euo pipefail
cd "$(dirname "$0")/../.."
repeat="${1:-2}"
threads="${2:-2}"
shared="${TRIAGE_SHARED:-../shared}"
ggml="${WHISPER_GGML:-$shared/models/whisper-tiny.en/ggml-model-f16.bin}"
export TRIAGE_VAD_MODEL="${TRIAGE_VAD_MODEL:-$(scripts/fetch-silero-vad)}"
export TRIAGE_SPEAKER_MODEL="${TRIAGE_SPEAKER_MODEL:-$(scripts/fetch-speaker-model)}"
if [ -z "${TRIAGE_BIN:-}" ]; then
  cargo build --release --quiet -p triage-cli --bin triage --features postgres
  TRIAGE_BIN=target/release/triage
fi
exec python3 scripts/bench/speakers.py --triage "$TRIAGE_BIN" --model "$ggml" \
  --data "$shared/data/speech" --threads "$threads" --repeat "$repeat"
