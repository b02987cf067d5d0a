"""`parley status` in a second terminal: it finds the fleet `parley up` started (no
PARLEY_REDIS_URL), lists every process's metrics port, and is quiet when piped into `head`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parley import state as up_state
from parley.redis_server import free_port
from tests.conftest import FLEET_ENV, ROOT

pytestmark = pytest.mark.slow


def user_env(tmp_path: Path) -> dict[str, str]:
    """A terminal of a user with no PARLEY_REDIS_URL and their own runtime directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    env.update(FLEET_ENV)
    env["XDG_RUNTIME_DIR"] = str(tmp_path / "run")
    env["PYTHONPATH"] = str(ROOT)
    return env


def parley(*args: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parley", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_status_finds_the_fleet_parley_up_started(tmp_path):
    env = user_env(tmp_path)
    (tmp_path / "run").mkdir()
    log = open(tmp_path / "up.log", "w")  # noqa: SIM115
    up = subprocess.Popen([sys.executable, "-m", "parley", "up", "--port", str(free_port()),
                           "--workers", "1", "--ready-timeout", "150"],
                          env=env, cwd=ROOT, stdout=log, stderr=log)
    try:
        path = up_state.state_file(env)
        deadline = time.monotonic() + 170
        while up_state.read(env) is None:
            assert up.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "parley up wrote no state file"
            time.sleep(0.2)
        state = up_state.read(env)
        assert state["pid"] == up.pid and oct(path.stat().st_mode & 0o777) == "0o600"

        res = parley("status", "--json", env=env)
        assert res.returncode == 0, res.stderr
        status = json.loads(res.stdout)
        assert status["redis"] == state["redis_url"]  # not the default URL
        assert sorted(w["stage"] for w in status["workers"]) == ["lipsync", "llm", "stt", "tts"]
        ports = state["metrics_ports"]
        assert set(ports) == {"gateway", "stt-1", "llm-1", "tts-1", "lipsync-1"}
        assert {w["metrics_port"] for w in status["workers"]} == {
            p for name, p in ports.items() if name != "gateway"}
        assert status["up"]["metrics_ports"] == ports

        text = parley("status", env=env)
        assert text.returncode == 0, text.stderr
        assert f"metrics on port {ports['gateway']}" in text.stdout

        # an explicit URL still wins over the state file
        other = parley("status", env={**env, "PARLEY_REDIS_URL": "redis://127.0.0.1:1/0"})
        assert other.returncode == 1 and "redis://127.0.0.1:1/0" in other.stderr
        assert "Traceback" not in other.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(30)
        log.close()
    assert up.returncode == 0, (tmp_path / "up.log").read_text()[-3000:]
    assert not path.exists(), "parley up removes its state file when it stops"


def test_a_dead_parley_ups_state_file_is_ignored(tmp_path):
    env = user_env(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    up_state.write({"redis_url": "redis://127.0.0.1:1/0", "pid": int(dead.stdout)}, env)
    assert up_state.read(env) is None


def test_status_piped_into_a_closed_reader_prints_no_traceback(fleet, tmp_path):
    env = {**user_env(tmp_path), "PARLEY_REDIS_URL": fleet.redis_url}
    for args in (["status"], ["status", "--json"]):
        proc = subprocess.Popen([sys.executable, "-m", "parley", *args], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()  # what `| head -1` does once it has its line, here before any
        err = proc.stderr.read().decode()
        assert proc.wait(30) == 0, err
        assert "Traceback" not in err and "BrokenPipe" not in err, err
    # and through a real shell pipe into head
    res = subprocess.run(f"{sys.executable} -m parley status | head -1", shell=True, env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert res.stdout.startswith("redis ") and res.stderr == "", res.stderr
