#!/usr/bin/env bash
# Build llama.cpp's `llama-server` once into a cache folder, from the llama.cpp
# vendored in PyPI's llama-cpp-python sdist (see /work/shared/PEERS.md), and
# prove that it serves: one real request on the embedded GGUF
# (bench/peers/llama_probe.py). Takes ~15-18 min on 2 idle cores (25 min on
# a busy 2-core Sapphire Rapids on 2026-12-04, plus 1.5 min for the no-AMX
# rebuild of ggml-cpu it needed there). Never run this in CI: bench compare
# only uses the cached binary and skips llama.cpp when it is absent.
#
# 1. Build for this CPU (GGML_NATIVE) and probe it.
# 2. Where it faults (a CPU that lists AMX, where llama.cpp's AMX path can die
#    at `ldtilecfg` when the OS does not grant the tile state), rebuild with
#    GGML_NATIVE=OFF and the AVX-512 / VNNI / BF16 flags this CPU lists but
#    AMX off (only ggml-cpu recompiles), and probe that.
# 3. Where that faults too, probe the native build with `--no-repack` and
#    record that the server needs it.
# The binary that served goes to <cache>/llama-server; beside it,
# llama-server.build.json: cmake flags, server args (--no-repack or none),
# CPU, and every probe attempt (exit / signal, log tail). bench compare reads
# that file, passes the server args and copies the record into its JSON.
#
#   bench/peers/install_llama_cpp.sh            # -> <tokenmill cache>/peers/llama-server (~/.cache/tokenmill)
#   TOKENMILL_PEERS_DIR=/path NICE=19 bench/peers/install_llama_cpp.sh
#   LLAMA_GGUF=/path/model.gguf FORCE=1 bench/peers/install_llama_cpp.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
# bench compare looks there too: $TOKENMILL_PEERS_DIR, else tokenmill's cache folder (cache_dir()) / peers
CACHE="${TOKENMILL_PEERS_DIR:-${TOKENMILL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tokenmill}/peers}"
JOBS="${JOBS:-2}"
NICE="${NICE:-19}"
PY="$(command -v "${PYTHON:-python3}")"
# the probe and the GGUF lookup need tokenmill's packages: the repo's venv where there is one
TPY="${TOKENMILL_PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$TPY" ]] || TPY="$PY"
BIN="$CACHE/llama-server"
INFO="$BIN.build.json"

if [[ -x "$BIN" && -f "$INFO" && "${FORCE:-0}" != 1 ]]; then
  echo "llama-server already built: $BIN (build record: $INFO)"; exit 0
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

GGUF="${LLAMA_GGUF:-$(cd "$ROOT" && "$TPY" -c \
  'from services.common.model_loader import embedded_gguf; print(embedded_gguf("smollm2-135m"))')}"
[[ -f "$GGUF" ]] || { echo "no GGUF to probe with at '$GGUF' (set LLAMA_GGUF)" >&2; exit 1; }

COMMON=(-DCMAKE_BUILD_TYPE=Release
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF
  -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF)

# build <copy-to> <cmake flags...>: configure + build the server, copy the binary to <copy-to>
build() {
  local dest="$1"; shift
  nice -n "$NICE" cmake -S "$SRC" -B "$WORK/build" "${COMMON[@]}" "$@"
  nice -n "$NICE" cmake --build "$WORK/build" --target llama-server -j"$JOBS"
  local out
  out="$(find "$WORK/build" -type f -name llama-server -perm -u+x | head -n1)"
  [[ -n "$out" ]] || { echo "build produced no llama-server" >&2; exit 1; }
  cp "$out" "$dest"
}

ATTEMPTS="$WORK/probe-attempts.jsonl"
: > "$ATTEMPTS"
# probe <binary> <server args> <cmake flags...>: one real request; appends the attempt to $ATTEMPTS
probe() {
  local bin="$1" sargs="$2"; shift 2
  (cd "$ROOT" && "$TPY" -m bench.peers.llama_probe probe --binary "$bin" --gguf "$GGUF" \
    --server-args="$sargs" --cmake-flags="$*" --attempts "$ATTEMPTS")
}

# the x86 ISA flags this CPU lists, as ggml options, AMX never among them
no_amx_flags() {
  local flags
  flags="$(grep -m1 '^flags' /proc/cpuinfo || true)"
  local out=(-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
  local pair
  for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
              avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    if grep -qw "${pair%%:*}" <<<"$flags"; then out+=("-DGGML_${pair##*:}=ON"); else out+=("-DGGML_${pair##*:}=OFF"); fi
  done
  echo "${out[@]}"
}

NATIVE_FLAGS=(-DGGML_NATIVE=ON)
build "$WORK/llama-server.native" "${NATIVE_FLAGS[@]}"
CHOSEN="" SERVER_ARGS=""
if probe "$WORK/llama-server.native" "" "${COMMON[*]} ${NATIVE_FLAGS[*]}"; then
  CHOSEN="$WORK/llama-server.native"
else
  echo "native build failed its probe: rebuilding without AMX" >&2
  read -r -a PORTABLE <<<"$(no_amx_flags)"
  build "$WORK/llama-server.no-amx" "${PORTABLE[@]}"
  if probe "$WORK/llama-server.no-amx" "" "${COMMON[*]} ${PORTABLE[*]}"; then
    CHOSEN="$WORK/llama-server.no-amx"
  elif probe "$WORK/llama-server.native" "--no-repack" "${COMMON[*]} ${NATIVE_FLAGS[*]}"; then
    CHOSEN="$WORK/llama-server.native" SERVER_ARGS="--no-repack"
  else
    echo "no build of llama-server serves on this machine; attempts: $ATTEMPTS" >&2; exit 1
  fi
fi

cp "$CHOSEN" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
(cd "$ROOT" && "$TPY" -m bench.peers.llama_probe record --binary "$BIN" --attempts "$ATTEMPTS" \
  --source "llama-cpp-python $VERSION sdist, vendor/llama.cpp")
"$BIN" --version 2>&1 | head -n 3 || true
echo "llama-server installed: $BIN${SERVER_ARGS:+ (needs $SERVER_ARGS)}; build record: $INFO"
