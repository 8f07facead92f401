#!/usr/bin/env bash
# Installs llama-cpp-python (which builds llama.cpp from source) into a venv,
# for the quantized-numerics oracle and the speed comparison
# (scripts/llama_cpp_oracle.py). The source package and the build directory
# are cached under $LLAMA_HOME, so a second run on one machine is quick.
#
#   scripts/llama_cpp_setup.sh            # venv at $LLAMA_HOME/venv
#   LLAMA_HOME=/somewhere scripts/llama_cpp_setup.sh
set -euo pipefail
LLAMA_HOME=${LLAMA_HOME:-$HOME/.cache/longwriter/llama-cpp}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
mkdir -p "$LLAMA_HOME"
LLAMA_HOME=$(realpath "$LLAMA_HOME")
cd "$LLAMA_HOME"
if [ ! -f "llama_cpp_python-$VERSION.tar.gz" ]; then
    pip download "llama-cpp-python==$VERSION" --no-deps -d .
fi
if [ ! -d "llama_cpp_python-$VERSION" ]; then
    tar xzf "llama_cpp_python-$VERSION.tar.gz"
fi
if [ ! -x venv/bin/python ]; then
    python3 -m venv venv
fi
if venv/bin/python -c 'import llama_cpp' 2>/dev/null; then
    echo "llama-cpp-python is installed in $LLAMA_HOME/venv"
    exit 0
fi
venv/bin/pip install --quiet numpy
# The real path of the unpacked source (llama.cpp's cmake files do not
# follow symlinks), a native build, and a kept build directory.
CMAKE_ARGS="-DGGML_NATIVE=ON" \
CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    venv/bin/pip install -v "$LLAMA_HOME/llama_cpp_python-$VERSION" \
    --config-settings=build-dir="$LLAMA_HOME/build"
echo "llama-cpp-python is installed in $LLAMA_HOME/venv"
