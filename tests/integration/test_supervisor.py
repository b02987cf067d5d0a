"""`parley up`'s supervisor: a worker killed after it was ready is restarted, even in the first
seconds; only a process that never became ready stops the start. Real `parley up` processes
on a private redis-server, a real kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from parley.redis_server import RedisServer, free_port
from tests.conftest import FLEET_ENV

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _up(redis_url: str, tmp_path: Path, **env) -> tuple[subprocess.Popen, Path, Path]:
    out, err = tmp_path / "up.out", tmp_path / "up.err"
    proc = subprocess.Popen(
        [sys.executable, "-m", "parley", "up", "--port", str(free_port()), "--workers", "1"],
        cwd=ROOT, stdout=out.open("wb"), stderr=err.open("wb"),
        env={**os.environ, **FLEET_ENV, "PARLEY_REDIS_URL": redis_url, **env})
    return proc, out, err


def _registered_pid(r: redis.Redis, stage: str, timeout: float, not_pid: int = 0) -> int:
    """The pid of a worker of ``stage`` that has registered (that is when it is ready)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for key in r.scan_iter(f"parley:worker:{stage}@*"):
            pid = int(key.decode().rsplit(":", 2)[1])
            if pid != not_pid:
                return pid
        time.sleep(0.02)
    raise TimeoutError(f"no {stage} worker registered in {timeout}s")


def _wait_text(path: Path, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = path.read_text(errors="replace")
        if text in got:
            return got
        time.sleep(0.1)
    raise TimeoutError(f"{text!r} not in {path.name}: {path.read_text(errors='replace')[-2000:]}")


def test_worker_killed_soon_after_it_was_ready_is_restarted(tmp_path):
    server = RedisServer(appendonly=False).start()
    r = redis.from_url(server.url)
    proc, out, err = _up(server.url, tmp_path)
    try:
        # the LLM worker is ready long before the STT has warmed up: kill it right then
        pid = _registered_pid(r, "llm", 60)
        os.kill(pid, signal.SIGKILL)
        _wait_text(err, "restarted llm-1", 60)
        _wait_text(out, "parley up: gateway", 90)
        time.sleep(1.0)
        assert proc.poll() is None, err.read_text()[-3000:]
        _registered_pid(r, "llm", 30, not_pid=pid)  # its successor is serving
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        r.close()
        server.stop()
    assert code == 0, err.read_text()[-3000:]
    assert "at start" not in err.read_text()


def test_worker_that_never_becomes_ready_stops_the_start_and_says_which(tmp_path):
    server = RedisServer(appendonly=False).start()
    proc, _, err = _up(server.url, tmp_path, PARLEY_STT_BACKENDS="no-such-backend")
    try:
        code = proc.wait(90)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    assert code == 1
    assert "stt-1 exited with" in err.read_text() and "before it was ready" in err.read_text()
