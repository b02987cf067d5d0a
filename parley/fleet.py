"""`parley up`: Redis (unless one is given), the gateway and N workers per stage, supervised.

Every part is its own OS process, as in a real deployment, so a crash is contained and a
worker that dies is restarted (its job is taken over by a sibling meanwhile).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from parley.redis_server import RedisServer, free_port
from schemas.streams import STAGES


@dataclass
class Child:
    name: str
    args: list[str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started: float = 0.0
    ready: bool = False  # this incarnation registered (a worker) or listened (the gateway)
    metrics_port: int = 0  # /metrics, /healthz, /readyz; kept across restarts


def cpu_count() -> int:
    """The cores this process may run on (a container's CPU set, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_workers(cores: int) -> dict[str, int]:
    """Worker processes per stage for a machine with ``cores`` cores. The offline STT decodes
    on the CPU and holds the GIL while it does, so it gets one process per core; the offline
    LLM, TTS and lipsync cost a few ms per turn, so one each serves many players, plus one
    per 8 cores on big machines."""
    light = 1 + cores // 8
    return {"stt": max(1, cores), "llm": light, "tts": light, "lipsync": light}


def worker_counts(workers: int | str, cores: int | None = None) -> dict[str, int]:
    """``--workers``: a number for every stage, or "auto" (auto_workers)."""
    if str(workers).strip().lower() == "auto":
        return auto_workers(cores or cpu_count())
    n = int(workers)
    if n < 1:
        raise ValueError(f"--workers must be auto or at least 1, not {workers!r}")
    return dict.fromkeys(STAGES, n)


@dataclass
class Fleet:
    port: int = 8765
    host: str = "127.0.0.1"
    workers: int | str = 1  # per stage, or "auto" (see auto_workers)
    redis_url: str | None = None
    config_path: str | None = None
    livelink: str | None = None
    log_path: str | None = None
    bake_workers: int = 0  # `parley bake-worker` processes (rq, low priority)
    playground: bool = False  # the gateway serves the browser playground on its port
    env: dict[str, str] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)
    redis: RedisServer | None = None
    metrics: bool = True  # give every process a free metrics port

    def start(self) -> Fleet:
        if not self.redis_url:
            self.redis = RedisServer().start()
            self.redis_url = self.redis.url
        base = [sys.executable, "-m", "parley"]
        if self.config_path:
            base += ["--config", self.config_path]
        self.children.append(Child("gateway", [*base, "gateway", "--host", self.host,
                                                 "--port", str(self.port)]))
        for stage, count in worker_counts(self.workers).items():
            for i in range(count):
                self.children.append(Child(f"{stage}-{i + 1}", [*base, "worker", stage]))
        for i in range(self.bake_workers):
            self.children.append(Child(f"bake-{i + 1}", [*base, "bake-worker"]))
        for child in self.children:
            if self.metrics:
                child.metrics_port = free_port()
            self._spawn(child)
        return self

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env["PARLEY_REDIS_URL"] = self.redis_url or ""
        if self.livelink:
            env["PARLEY_LIPSYNC_LIVELINK"] = self.livelink
        if self.playground:
            env["PARLEY_GATEWAY_PLAYGROUND"] = "true"
        return env

    def _spawn(self, child: Child) -> None:
        stderr = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        env = self.child_env()
        if child.metrics_port:
            env["PARLEY_METRICS_PORT"] = str(child.metrics_port)
        child.proc = subprocess.Popen(child.args, env=env, stderr=stderr, stdout=stderr)
        if stderr:
            stderr.close()
        child.started = time.monotonic()
        child.ready = False

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

    def wait_ready(self, timeout: float = 30.0, on_restart=None) -> None:
        """Until the gateway accepts connections and every worker has registered in Redis.

        A process that exits before it was ever ready stops the start (a bad config must not
        spin); one that was ready and then died is restarted, as the supervisor would, and
        reported to ``on_restart(name)``."""
        from core.redisconn import connect_sync
        from schemas.streams import Keys

        r = connect_sync(self.redis_url)
        keys = Keys(self.env.get("PARLEY_REDIS_PREFIX", "parley"))
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self._note_ready(r, keys)
                for child in self.children:
                    if child.proc is None or child.proc.poll() is None:
                        continue
                    if not child.ready:
                        raise RuntimeError(f"{child.name} exited with {child.proc.returncode} "
                                           "at start, before it was ready")
                    child.restarts += 1
                    self._spawn(child)
                    if on_restart is not None:
                        on_restart(child.name)
                if all(c.ready for c in self.children):
                    return
                time.sleep(0.1)
        finally:
            r.close()
        waiting = [c.name for c in self.children if not c.ready]
        raise RuntimeError(f"fleet not ready in {timeout}s: waiting for {', '.join(waiting)}")

    def _note_ready(self, r, keys) -> None:
        """Marks the children that are ready: workers by their pid in their registration key
        (``stage@host:pid:tag``; it outlives a kill -9 by a few seconds, long enough to be
        seen), the gateway by its port."""
        registered = set()
        for key in r.scan_iter(keys.worker_pattern()):
            with contextlib.suppress(IndexError, ValueError):
                registered.add(int(key.decode().rsplit(":", 2)[1]))
        for child in self.children:
            if child.ready or child.proc is None:
                continue
            if child.name == "gateway":
                child.ready = child.proc.poll() is None and _port_open(self.host, self.port)
            else:
                child.ready = child.proc.pid in registered

    def pids(self) -> dict[str, int]:
        return {c.name: c.proc.pid for c in self.children if c.proc is not None}

    def metrics_ports(self) -> dict[str, int]:
        return {c.name: c.metrics_port for c in self.children if c.metrics_port}

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
