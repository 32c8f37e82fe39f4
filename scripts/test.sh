#!/usr/bin/env bash
# Installs sae-seeds with its test and interop extras into .venv (CPU torch, pinned by constraints.txt) and runs
# the tests; interop brings the real sparsify and SAELens that tests/test_export.py loads exports with.
# Without arguments: the default suite (everything but the multi-minute cluster tests marked `slow`, ~10 min on
# 2 cores); arguments go to pytest instead, e.g. `-m slow` for those, or a test file.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q -c constraints.txt -e '.[test,interop]'
if [ $# -eq 0 ]; then
    set -- -m "not slow"
fi
exec python -m pytest -q --durations=15 "$@"
