"""`parley up`: Redis (unless one is given), the gateway and N workers per stage, supervised.

Every part is its own OS process, as in a real deployment, so a crash is contained and a
worker that dies is restarted (its job is taken over by a sibling meanwhile).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from parley.redis_server import RedisServer
from schemas.streams import STAGES


@dataclass
class Child:
    name: str
    args: list[str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started: float = 0.0


@dataclass
class Fleet:
    port: int = 8765
    host: str = "127.0.0.1"
    workers: int = 1
    redis_url: str | None = None
    config_path: str | None = None
    livelink: str | None = None
    log_path: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)
    redis: RedisServer | None = None

    def start(self) -> Fleet:
        if not self.redis_url:
            self.redis = RedisServer().start()
            self.redis_url = self.redis.url
        base = [sys.executable, "-m", "parley"]
        if self.config_path:
            base += ["--config", self.config_path]
        self.children.append(Child("gateway", [*base, "gateway", "--host", self.host,
                                                 "--port", str(self.port)]))
        for stage in STAGES:
            for i in range(self.workers):
                self.children.append(Child(f"{stage}-{i + 1}", [*base, "worker", stage]))
        for child in self.children:
            self._spawn(child)
        return self

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env["PARLEY_REDIS_URL"] = self.redis_url or ""
        if self.livelink:
            env["PARLEY_LIPSYNC_LIVELINK"] = self.livelink
        return env

    def _spawn(self, child: Child) -> None:
        stderr = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        child.proc = subprocess.Popen(child.args, env=self.child_env(), stderr=stderr,
                                      stdout=stderr)
        if stderr:
            stderr.close()
        child.started = time.monotonic()

    def supervise_once(self) -> list[str]:
        """Restart children that died; returns their names."""
        restarted = []
        for child in self.children:
            if child.proc is not None and child.proc.poll() is not None:
                child.restarts += 1
                # Back off a child that dies at once, so a bad config does not spin.
                if time.monotonic() - child.started < 1.0 and child.restarts > 3:
                    time.sleep(min(5.0, 0.2 * child.restarts))
                self._spawn(child)
                restarted.append(child.name)
        return restarted

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the gateway accepts connections and every worker has registered in Redis."""
        import redis as syncredis

        from schemas.streams import Keys

        r = syncredis.from_url(self.redis_url)
        keys = Keys(self.env.get("PARLEY_REDIS_PREFIX", "parley"))
        deadline = time.monotonic() + timeout
        want = self.workers * len(STAGES)
        while time.monotonic() < deadline:
            for child in self.children:
                if child.proc is not None and child.proc.poll() is not None:
                    raise RuntimeError(f"{child.name} exited with {child.proc.returncode} at start")
            n = sum(1 for _ in r.scan_iter(keys.worker_pattern()))
            if n >= want and _port_open(self.host, self.port):
                r.close()
                return
            time.sleep(0.1)
        r.close()
        raise RuntimeError(f"fleet not ready in {timeout}s")

    def pids(self) -> dict[str, int]:
        return {c.name: c.proc.pid for c in self.children if c.proc is not None}

    def stop(self, timeout: float = 10.0) -> dict[str, int]:
        """SIGTERM everything, wait, SIGKILL stragglers; returns exit codes."""
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes = {}
        for child in self.children:
            if child.proc is None:
                continue
            try:
                codes[child.name] = child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                codes[child.name] = child.proc.wait()
        if self.redis is not None:
            self.redis.stop()
        return codes

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _port_open(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False
