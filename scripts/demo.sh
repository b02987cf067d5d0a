#!/usr/bin/env bash
# One command from a bare machine to the fleet talking to the sample client.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/parley demo "$@"
