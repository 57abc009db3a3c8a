# shellcheck shell=bash
# Helpers for the bench scripts that time one `triage serve` on a unix
# socket (long-input.sh, long-audio.sh). Source it from the repository root.

# The triage binary to time: TRIAGE_BIN when set, else one built now in
# PROFILE (debug or release).
triage_bin() {
  local profile="$1"
  if [ -n "${TRIAGE_BIN:-}" ]; then
    echo "$TRIAGE_BIN"
    return
  fi
  if [ "$profile" = release ]; then
    cargo build --release --quiet -p triage-cli --bin triage --features postgres >&2
  else
    cargo build --quiet -p triage-cli --bin triage >&2
  fi
  echo "${CARGO_TARGET_DIR:-target}/$profile/triage"
}

# start_serve DIR SOCK COMMAND...: run COMMAND (a `triage serve` on SOCK) in
# the background with its output in DIR/log, stop it and remove DIR when the
# script exits, and wait until SOCK answers /ready. Sets serve_pid.
start_serve() {
  serve_dir="$1"
  local sock="$2"
  shift 2
  "$@" >"$serve_dir/log" 2>&1 &
  serve_pid=$!
  trap 'kill $serve_pid 2>/dev/null; wait $serve_pid 2>/dev/null || true; rm -rf "$serve_dir"' EXIT
  for _ in $(seq 1 600); do
    curl -sf --unix-socket "$sock" http://t/ready >/dev/null 2>&1 && return
    sleep 0.2
  done
  echo "triage serve did not become ready; its log:" >&2
  cat "$serve_dir/log" >&2
  return 1
}

# rss VmRSS|VmHWM: the server's memory in kB.
rss() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$serve_pid/status"; }

# seconds_since START: seconds from START (`date +%s.%N`) to now, one decimal.
seconds_since() {
  python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(date +%s.%N)"
}
