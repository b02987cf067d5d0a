#!/usr/bin/env bash
# Runs the coqui TTS backend tests against the real coqui-tts package on a CPU, in their own
# venv (.venv-coqui): coqui-tts needs torchaudio, which the project's CPU torch 2.13 build has
# no match for. torchaudio 2.11.1 is the last torchaudio release and declares torch>=2.11; it
# and PyPI's x86_64 torch are CUDA builds, which run on a CPU too (6.4 GB in the venv, about
# 3.3 GB downloaded where pip has nothing cached). Safe to run again: it reinstalls only
# when the pins below, this script or pyproject.toml change.
# Usage: scripts/test-coqui-cpu.sh [PYTEST ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."

# torch/torchaudio/torchcodec must agree on ABI and CUDA major version; coqui-tts 0.28
# imports six without declaring it (python-dateutil 4 no longer brings it in).
pins=(torch==2.14.1 torchaudio==2.11.1 torchcodec==0.17.0 "coqui-tts[codec]==0.28.0" six)
venv=.venv-coqui

if ! python3 -c "import ensurepip, venv" >/dev/null 2>&1; then
  echo "test-coqui-cpu: installing python3-venv (Debian package)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "test-coqui-cpu: creating $venv"
  python3 -m venv "$venv"
fi
stamp="$venv/.parley-installed-$(printf '%s ' "${pins[@]}" | md5sum | cut -c1-12)"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/test-coqui-cpu.sh -nt "$stamp" ]; then
  echo "test-coqui-cpu: installing ${pins[*]} and parley[dev] into $venv (several minutes)"
  start=$SECONDS
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  # (the filter drops pip's notes about local package indexes that lack a package)
  "$venv/bin/python" -m pip install -q "${pins[@]}" -e ".[dev]" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  rm -f "$venv"/.parley-installed-*
  touch "$stamp"
  echo "test-coqui-cpu: installed in $((SECONDS - start)) s, $(du -sh "$venv" | cut -f1) in $venv"
fi
# -s shows the load times and real-time factors the real-model tests print
exec "$venv/bin/python" -m pytest tests/backends/test_tts_coqui.py -q -s "$@"
