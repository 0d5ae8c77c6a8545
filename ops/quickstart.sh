#!/usr/bin/env bash
# Set up a virtualenv and run the daemon for N cycles (default 2) on the embedded default:
# SQLite lineage in ./kaizen-data, a local Celery worker over an SQLite broker, the built-in tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
cycles="${1:-2}"
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/pip install --quiet --disable-pip-version-check -e .
exec .venv/bin/kaizen run --cycles "$cycles"
