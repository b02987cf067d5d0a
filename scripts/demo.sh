#!/usr/bin/env bash
# One command from a bare machine to the fleet talking to the sample client.
# --playground: the fleet alone, for the browser playground at http://127.0.0.1:8765/
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if [ "${1:-}" = "--playground" ]; then
  shift
  exec .venv/bin/parley up "$@"
fi
exec .venv/bin/parley demo "$@"
