#!/usr/bin/env bash
# Runs tests/backends/test_stt_whisper.py with the real whisperX on a CPU, in its own venv
# (.venv-whisperx): the whisperX tests there are skipped wherever whisperX is not installed.
# whisperX 3.8.6 pins torch~=2.8.0, torchaudio~=2.8.0, torchvision~=0.23.0, torchcodec<0.8 and
# pyannote.audio>=4, so neither the project's CPU torch 2.13 nor the local torch 2.14.1 fits:
# pip takes PyPI's torch 2.8.0, the CUDA 12.8 build, with its NVIDIA libraries and triton. It
# runs on a CPU; the price is ~4.0 GB downloaded and ~7.7 GB in the venv. No model or VAD
# weights are downloaded: the tests build a tiny Whisper, and the backend loads no whisperX VAD.
# Safe to run again: it reinstalls only when the pins below, this script or pyproject.toml
# change. Usage: scripts/test-whisperx-cpu.sh [PYTEST ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."

pins=(whisperx==3.8.6)
venv=.venv-whisperx

if ! python3 -c "import ensurepip, venv" >/dev/null 2>&1; then
  echo "test-whisperx-cpu: installing python3-venv (Debian package)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "test-whisperx-cpu: creating $venv"
  python3 -m venv "$venv"
fi
stamp="$venv/.parley-installed-$(printf '%s ' "${pins[@]}" | md5sum | cut -c1-12)"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] ||
   [ scripts/test-whisperx-cpu.sh -nt "$stamp" ]; then
  # Fail before a long download rather than in the middle of unpacking.
  free_gb=$(df -P --block-size=1G . | awk 'NR == 2 {print $4}')
  if [ "$free_gb" -lt 12 ]; then
    echo "test-whisperx-cpu: needs ~12 GB free here (4 GB of wheels, 7.7 GB venv); $free_gb GB" >&2
    exit 1
  fi
  echo "test-whisperx-cpu: installing ${pins[*]} and parley[dev,stt-whisperx] into $venv" \
       "(~4 GB of wheels, several minutes)"
  start=$SECONDS
  # (the filter drops pip's notes about local package indexes that lack a package)
  pip_install() {
    "$venv/bin/python" -m pip install -q "$@" \
      2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  }
  pip_install --upgrade pip >/dev/null
  pip_install "${pins[@]}" -e ".[dev,stt-whisperx]"
  rm -f "$venv"/.parley-installed-*
  touch "$stamp"
  echo "test-whisperx-cpu: installed in $((SECONDS - start)) s, $(du -sh "$venv" | cut -f1) in $venv"
fi

# Models load from local directories only; the tests build theirs.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# A broken whisperX install would only skip its tests: fail loudly instead. (pyannote.audio
# warns on import that torchcodec finds no FFmpeg; only audio-file decoding needs it.)
"$venv/bin/python" -W ignore -c "import torch, whisperx.asr; from importlib.metadata import version
print('test-whisperx-cpu: whisperx', version('whisperx'), 'torch', torch.__version__)"
started=$SECONDS
status=0
# -s shows the load and decode timings the real-model tests print
"$venv/bin/python" -m pytest tests/backends/test_stt_whisper.py -q -s "$@" || status=$?
echo "test-whisperx-cpu: tests ran in $((SECONDS - started)) s"
exit $status
