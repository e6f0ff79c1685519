#!/usr/bin/env bash
# Build llama.cpp's `llama-server` once into a cache folder, from the llama.cpp
# vendored in PyPI's llama-cpp-python sdist (see /work/shared/PEERS.md).
# Takes ~15-18 min on 2 idle cores. Never run this in CI: bench compare only
# uses the cached binary and skips llama.cpp when it is absent.
#
#   bench/peers/install_llama_cpp.sh            # -> ~/.cache/tokenmill/peers/llama-server
#   TOKENMILL_PEERS_DIR=/path NICE=19 bench/peers/install_llama_cpp.sh
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${TOKENMILL_PEERS_DIR:-$HOME/.cache/tokenmill/peers}"
JOBS="${JOBS:-2}"
NICE="${NICE:-19}"
PY="$(command -v "${PYTHON:-python3}")"
BIN="$CACHE/llama-server"

if [[ -x "$BIN" && "${FORCE:-0}" != 1 ]]; then
  echo "llama-server already built: $BIN"; exit 0
fi
mkdir -p "$CACHE"
WORK="$CACHE/build-llama-cpp-$VERSION"
mkdir -p "$WORK"
cd "$WORK"

if ! ls llama_cpp_python-"$VERSION".tar.gz >/dev/null 2>&1; then
  "$PY" -m pip download --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$VERSION" -d . 
fi
if [[ ! -d "llama_cpp_python-$VERSION" ]]; then
  tar xzf "llama_cpp_python-$VERSION.tar.gz"
fi
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
[[ -f "$SRC/CMakeLists.txt" ]] || { echo "no vendored llama.cpp at $SRC" >&2; exit 1; }

nice -n "$NICE" cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
nice -n "$NICE" cmake --build "$WORK/build" --target llama-server -j"$JOBS"

OUT="$(find "$WORK/build" -type f -name llama-server -perm -u+x | head -n1)"
[[ -n "$OUT" ]] || { echo "build produced no llama-server" >&2; exit 1; }
cp "$OUT" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
"$BIN" --version 2>&1 | head -n 3 || true
echo "llama-server installed: $BIN"
