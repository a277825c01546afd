#!/usr/bin/env bash
# Build llama.cpp's own tools - llama-bench, llama-imatrix and llama-quantize -
# from the llama.cpp copy vendored in the llama-cpp-python sdist that matches
# the installed version, so their numbers and files and our Python-binding
# ones come from the same llama.cpp commit.
#
# Usage: bench/build_llama_tools.sh [OUT_DIR]   (default: bench-out/llama.cpp)
# Env:   JOBS (default 2) parallel compile jobs.
# The folder of the binaries is printed as the last (and only) line on stdout;
# build logs go to stderr. Re-running is a no-op once every binary exists.
set -euo pipefail

OUT="${1:-bench-out/llama.cpp}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
JOBS="${JOBS:-2}"

# Ask the installed package for its version. Run from / so a llama_cpp
# source tree in the current directory cannot shadow the installed one.
VER="$(cd / && python3 -c 'import llama_cpp; print(llama_cpp.__version__)')"

# One source/build dir per version: upgrading llama-cpp-python triggers a
# fresh build instead of silently reusing an old binary.
SRC="$OUT/llama_cpp_python-$VER"
BUILD="$OUT/build-$VER"
TOOLS=(llama-bench llama-imatrix llama-quantize)

missing=0
for tool in "${TOOLS[@]}"; do [[ -x "$BUILD/bin/$tool" ]] || missing=1; done
if (( missing )); then
  {
    # Source distribution only (never a wheel) - the wheel has no C++ sources.
    if [[ ! -d "$SRC/vendor/llama.cpp" ]]; then
      python3 -m pip download --no-deps --no-binary :all: \
        "llama-cpp-python==$VER" -d "$OUT/sdist"
      tar -xzf "$OUT/sdist/llama_cpp_python-$VER.tar.gz" -C "$OUT"
    fi

    # CPU-only, static libs so the binary is self-contained. GGML_NATIVE=ON
    # matches how pip compiled the installed package (its default on x86).
    # Server/tests/examples/HTTPS are off: not needed for these tools and
    # they only add build time. (LLAMA_CURL no longer exists in this tree.)
    GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
    cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" "${GEN[@]}" \
      -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF
    cmake --build "$BUILD" --target "${TOOLS[@]}" -j "$JOBS"
  } >&2
fi

echo "$BUILD/bin"
