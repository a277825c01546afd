#!/usr/bin/env bash
# Build llama.cpp's own programs from the llama.cpp copy vendored in the llama-cpp-python sdist
# of the installed version, so that they and our Python bindings run the same llama.cpp commit.
#
# Usage: runtimes/build_llama_cpp.sh [--arm ARCH] [OUT_DIR]
#   (default)   this machine's CPU (-march=native): llama-bench, llama-imatrix, llama-quantize,
#               llama-perplexity and ggml-rpc-server, with the RPC backend compiled in.
#   --arm ARCH  cross-compiled for aarch64 Linux with Debian's gcc-aarch64-linux-gnu, static, for
#               the ISA ARCH (armv8.2-a+fp16+dotprod for a Raspberry Pi 5 or a Jetson Orin,
#               armv8.2-a+fp16+dotprod+i8mm for recent phones, armv8-a for a Pi 4):
#               llama-perplexity, llama-bench and ggml-rpc-server.
# OUT_DIR defaults to the edgequant cache (~/.cache/edgequant/llama.cpp). The folder of the
# binaries is printed as the last (and only) line on stdout; build logs go to stderr. Re-running
# is a no-op once every binary exists. Env: JOBS (default 2) parallel compile jobs; PYTHON
# (default python3): the interpreter whose llama-cpp-python version is built.
set -euo pipefail

ARM=""
if [[ "${1:-}" == "--arm" ]]; then ARM="${2:?--arm takes an ISA, e.g. armv8.2-a+fp16+dotprod}"; shift 2; fi
CACHE="${EDGEQUANT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgequant}"
OUT="${1:-$CACHE/llama.cpp}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
JOBS="${JOBS:-2}"

# Ask the installed package for its version. Run from / so a llama_cpp source tree in the
# current directory cannot shadow the installed one.
VER="$(cd / && "${PYTHON:-python3}" -c 'import llama_cpp; print(llama_cpp.__version__)')"
SRC="$OUT/llama_cpp_python-$VER"

COMMON=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_RPC=ON -DGGML_RPC_RDMA=OFF
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
        -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF)
if [[ -z "$ARM" ]]; then
  BUILD="$OUT/build-$VER"
  TOOLS=(llama-bench llama-imatrix llama-quantize llama-perplexity ggml-rpc-server)
  FLAGS=(-DGGML_NATIVE=ON)  # as pip compiled the installed package (its default on x86)
else
  # One cross build folder for every ISA: the ISA reaches only ggml's CPU backend, so switching
  # recompiles that alone; each ISA's programs are then copied to their own folder.
  BUILD="$OUT/build-$VER-aarch64"
  BIN="$OUT/build-$VER-aarch64-${ARM//+/-}/bin"
  TOOLS=(llama-perplexity llama-bench ggml-rpc-server)
  TOOLCHAIN="$OUT/aarch64-linux-gnu.cmake"
  cat > "$TOOLCHAIN" <<'CMAKE'
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
CMAKE
  # Static (glibc included; ggml's own thread pool, as cmake finds only the shared libgomp), so
  # one file runs on any aarch64 Linux board; the ISA is fixed at compile time: a board without
  # ARCH's features stops with SIGILL.
  FLAGS=(-DCMAKE_TOOLCHAIN_FILE="$TOOLCHAIN" -DCMAKE_EXE_LINKER_FLAGS=-static -DGGML_NATIVE=OFF
         -DGGML_OPENMP=OFF -DGGML_CPU_ARM_ARCH="$ARM")
fi

BIN="${BIN:-$BUILD/bin}"
# llama.cpp's logger is left running at exit (it is never freed: common/log.cpp), so the last lines
# a program prints - llama-perplexity's KL divergence summary among them - are sometimes lost.
# One line drains it at exit; nothing else in llama.cpp is changed. The stamp marks builds with it.
PATCHED="drain the log at exit (edgequant)"
STAMP="$BIN/.log-drained"
missing=0
for tool in "${TOOLS[@]}"; do [[ -x "$BIN/$tool" ]] || missing=1; done
[[ -f "$STAMP" ]] || missing=1
if (( missing )); then
  {
    if [[ ! -d "$SRC/vendor/llama.cpp" ]]; then  # the source distribution: the wheel has no C++ sources
      "${PYTHON:-python3}" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VER" -d "$OUT/sdist"
      tar -xzf "$OUT/sdist/llama_cpp_python-$VER.tar.gz" -C "$OUT"
    fi
    LOG_CPP="$SRC/vendor/llama.cpp/common/log.cpp"
    if ! grep -q "$PATCHED" "$LOG_CPP"; then
      sed -i "s|^\( *\)log = new common_log;|&\n\1std::atexit([] { common_log_pause(common_log_main()); });  // $PATCHED|" "$LOG_CPP"
      sed -i "0,/^#include/s//#include <cstdlib>\n#include/" "$LOG_CPP"
      grep -q "$PATCHED" "$LOG_CPP" || { echo "cannot patch $LOG_CPP" >&2; exit 1; }
    fi
    GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
    cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" "${GEN[@]}" "${COMMON[@]}" "${FLAGS[@]}"
    cmake --build "$BUILD" --target "${TOOLS[@]}" -j "$JOBS"
    if [[ "$BIN" != "$BUILD/bin" ]]; then
      mkdir -p "$BIN.part" && for tool in "${TOOLS[@]}"; do cp "$BUILD/bin/$tool" "$BIN.part/"; done
      rm -rf "$BIN" && mv "$BIN.part" "$BIN"
    fi
    touch "$STAMP"
  } >&2
fi

echo "$BIN"
