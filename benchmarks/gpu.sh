#!/usr/bin/env bash
# The prepared accelerator benchmark (benchmarks/gpu.py): ./benchmarks/gpu.sh [--smoke] [--out FILE.json]
# Uses the project's .venv when there is one (a lent GPU machine brings its own torch: python3 there).
set -euo pipefail
cd "$(dirname "$0")/.."
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
exec "$py" benchmarks/gpu.py "$@"
