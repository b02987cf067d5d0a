#!/usr/bin/env bash
# Sets up a bare Debian/Ubuntu machine for Parley: redis-server and Python venv support from
# Debian packages when missing, then a project venv (.venv) with Parley and its test tools.
# Safe to run again: it only installs what is missing.
# Usage: bootstrap.sh [EXTRAS]   e.g. "dev,test-backends" (default: none, the offline install)
set -euo pipefail
extras="${1:-}"
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
if command -v python3 >/dev/null 2>&1 && ! python3 -c "import ensurepip, venv" >/dev/null 2>&1; then
  need_apt+=(python3-venv)
fi
# the test suite compiles the C++ conformance kit (clients/cpp/) with the system compiler
if [[ ",$extras," == *",dev,"* ]] && ! command -v c++ >/dev/null 2>&1 \
    && ! command -v g++ >/dev/null 2>&1; then
  need_apt+=(g++)
fi
# the playground's tests: node runs the JavaScript codec's tests, and a headless chromium the
# page itself (Playwright drives this system browser; it downloads none)
if [[ ",$extras," == *",dev,"* ]]; then
  command -v node >/dev/null 2>&1 || command -v nodejs >/dev/null 2>&1 || need_apt+=(nodejs)
  command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "bootstrap: installing ${need_apt[*]} (Debian packages)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
  # The Debian package may start a system redis on 6379; Parley never uses it (own port).
fi

# tests/integration/test_metrics.py scrapes the fleet with a real Prometheus (Debian's; without
# its recommends, which would add node exporters)
if [[ ",$extras," == *",dev,"* ]] && ! command -v prometheus >/dev/null 2>&1; then
  echo "bootstrap: installing prometheus (Debian package)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  python3 -m venv .venv
fi
stamp=".venv/.parley-installed-${extras:-base}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing parley${extras:+[$extras]} into .venv"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
  if [[ ",$extras," == *",turn,"* ]]; then
    # only the Smart Turn weights file is used: none of pipecat's own dependencies
    .venv/bin/python -m pip install -q --no-deps "pipecat-ai==1.14.0"
  fi
  touch "$stamp"
fi
