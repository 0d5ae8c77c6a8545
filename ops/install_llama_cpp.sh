#!/usr/bin/env bash
# llama.cpp's OpenAI server for the serving benchmark's comparison (python -m ops.bench.serve --llama-cpp ...).
# llama-cpp-python ships only an sdist, which compiles llama.cpp (needs gcc, g++ and cmake; several
# minutes on 2 cores), so it gets a virtualenv of its own, beside kaizen's, and nothing of kaizen's.
# Prints the interpreter to pass as --llama-cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-llama
CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}" \
  .venv-llama/bin/pip install --quiet --disable-pip-version-check "llama-cpp-python[server]==0.3.36"
echo "$(pwd)/.venv-llama/bin/python"
