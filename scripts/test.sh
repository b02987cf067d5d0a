#!/usr/bin/env bash
# One command from a bare machine to the full test suite (unit and end-to-end, real Redis).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
