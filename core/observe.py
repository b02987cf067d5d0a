"""What every process's metrics server asks of it: readiness, liveness (an event loop that
ticks) and a loop that refreshes its gauges. The gateway and the workers say the rest
(gateway/observe.py, workers/observe.py)."""

from __future__ import annotations

import asyncio
import time

from core import metrics as M

REFRESH_S = 2.0
# Readiness needs Redis answering: a process that cannot reach it serves nobody.
REDIS_STALE_S = 10.0


class ProcessObserver:
    def __init__(self, stall_s: float):
        self.redis_ok_at = 0.0
        self.loop_ok_at = time.monotonic()
        self.stall_s = stall_s  # liveness: the event loop ran nothing this long
        self.server: M.MetricsServer | None = None
        self._tasks: list[asyncio.Task] = []

    @property
    def port(self) -> int:
        return self.server.port if self.server is not None else 0

    def serve(self, config, log) -> None:
        self.server = M.serve(config, M.Probe(ready=self.not_ready, alive=self.not_alive), log)
        self._tasks = [asyncio.create_task(self._refresh_loop()),
                       asyncio.create_task(self._tick())]

    async def stop_tasks(self, timeout: float = 3.0) -> None:
        """Cancel the refresh and tick loops and wait for them, ``timeout`` at most: the
        refresh asks Redis, and a call that swallows its cancellation (redis-py's Cluster
        client on Python 3.11) kept a SIGTERMed gateway waiting here for over an hour."""
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.server is not None:
            self.server.stop()

    def redis_stale(self) -> bool:
        return time.monotonic() - self.redis_ok_at > REDIS_STALE_S

    def loop_stalled(self) -> str:
        stalled = time.monotonic() - self.loop_ok_at
        return f"event loop ran nothing for {stalled:.0f} s" if stalled > self.stall_s else ""

    def not_ready(self) -> str:
        """Why this process should get no new work ("" when it should)."""
        raise NotImplementedError

    def not_alive(self) -> str:
        """Why the kubelet should restart this process ("" when it should not)."""
        return self.loop_stalled()

    async def _refresh_loop(self) -> None:
        raise NotImplementedError

    async def _tick(self) -> None:
        """Proof that the event loop runs (a Redis call that hangs is not a wedged loop)."""
        while True:
            self.loop_ok_at = time.monotonic()
            await asyncio.sleep(1.0)
