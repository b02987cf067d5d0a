#!/usr/bin/env bash
# One command from a bare machine to the full test suite (unit and end-to-end, real Redis).
set -euo pipefail
cd "$(dirname "$0")/.."
# test-backends: CPU torch and friends, so tests/backends runs the heavy backends' loading and
# inference paths on tiny models; PARLEY_TEST_BACKENDS=0 skips them (those tests then skip).
if [ "${PARLEY_TEST_BACKENDS:-1}" = "1" ]; then
  bash scripts/bootstrap.sh dev,test-backends
else
  bash scripts/bootstrap.sh dev
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
