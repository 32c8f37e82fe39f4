#!/usr/bin/env bash
# Installs sae-seeds with its test extra into .venv (CPU torch, pinned by constraints.txt) and runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q -c constraints.txt -e '.[test]'
exec python -m pytest -q "$@"
