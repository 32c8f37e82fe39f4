#!/usr/bin/env bash
# Installs sae-seeds into .venv (CPU torch, pinned by constraints.txt) and runs an experiment
# (default: configs/default.yaml). Extra arguments go to `sae-seeds run`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -c constraints.txt -e .
exec .venv/bin/sae-seeds run "$@"
