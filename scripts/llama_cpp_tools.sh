#!/usr/bin/env bash
# Builds llama.cpp's command-line tools (llama-quantize, llama-server,
# llama-bench, llama-imatrix, llama-tokenize, llama-simple) from the vendored
# tree of the `llama-cpp-python` source package: the oracles of the
# real-model tests and the speed comparisons.
#
# The build is cached outside the clone, under $LLAMA_HOME, keyed by the
# instruction sets it uses, so CI on one machine builds it once. It is built
# without GGML_NATIVE: on some of these VMs the CPU advertises AMX, which
# the hypervisor refuses, and a native build dies on its first batched
# prefill. The x86 sets are chosen from /proc/cpuinfo instead.
#
#   scripts/llama_cpp_tools.sh        # prints the bin directory on its last line
set -euo pipefail
LLAMA_HOME=${LLAMA_HOME:-$HOME/.cache/longwriter/llama-cpp}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
if ! command -v cmake >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    echo "installing cmake (Debian package)" >&2
    $SUDO apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q cmake g++ >&2
fi
mkdir -p "$LLAMA_HOME"
LLAMA_HOME=$(realpath "$LLAMA_HOME")
cd "$LLAMA_HOME"
if [ ! -f "llama_cpp_python-$VERSION.tar.gz" ]; then
    pip download "llama-cpp-python==$VERSION" --no-deps -d . >&2
fi
if [ ! -d "llama_cpp_python-$VERSION" ]; then
    tar xzf "llama_cpp_python-$VERSION.tar.gz"
fi
SRC="$LLAMA_HOME/llama_cpp_python-$VERSION/vendor/llama.cpp"

flags=(-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=Release)
key=generic
if [ "$(uname -m)" = x86_64 ]; then
    cpu=$(grep -m1 '^flags' /proc/cpuinfo || true)
    has() { [[ " $cpu " == *" $1 "* ]]; }
    key=""
    for pair in avx:GGML_AVX avx2:GGML_AVX2 fma:GGML_FMA f16c:GGML_F16C \
        avx_vnni:GGML_AVX_VNNI avx512f:GGML_AVX512 avx512_vnni:GGML_AVX512_VNNI \
        avx512vbmi:GGML_AVX512_VBMI avx512_bf16:GGML_AVX512_BF16; do
        if has "${pair%%:*}"; then
            flags+=("-D${pair#*:}=ON")
            key+="${pair%%:*}-"
        else
            flags+=("-D${pair#*:}=OFF")
        fi
    done
    key=${key%-}
fi
BUILD="$LLAMA_HOME/tools-$VERSION-$key"
BIN="$BUILD/bin"
targets=(llama-quantize llama-server llama-bench llama-imatrix llama-tokenize llama-simple)
missing=0
for t in "${targets[@]}"; do [ -x "$BIN/$t" ] || missing=1; done
if [ "$missing" = 1 ]; then
    cmake -S "$SRC" -B "$BUILD" "${flags[@]}" >&2
    cmake --build "$BUILD" -j "$(nproc)" --target "${targets[@]}" >&2
fi
echo "$BIN"
