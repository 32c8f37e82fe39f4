#!/usr/bin/env bash
# Installs sae-seeds with its test and interop extras into .venv (CPU torch, pinned by constraints.txt) and runs
# the tests; interop brings the real sparsify and SAELens that tests/test_export.py loads exports with.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q -c constraints.txt -e '.[test,interop]'
exec python -m pytest -q "$@"
