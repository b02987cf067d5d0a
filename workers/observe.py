"""A worker's metrics and probes: what it counts (core/metrics.py defines the series) and when
it is ready. Kept apart from runtime.py so the runtime only calls one-line hooks."""

from __future__ import annotations

import asyncio
import time

from redis.exceptions import ResponseError

from core import metrics as M
from core.redisconn import RETRYABLE

REFRESH_S = 2.0
REDIS_STALE_S = 10.0
# Liveness: an event loop that ran nothing for this long is wedged, not busy (a decode holds it
# for seconds at most; a stuck job is taken over after worker.stall_ms anyway). Not checked
# while the backends load, which may block the loop for minutes.
LOOP_STALL_S = 300.0


class WorkerObserver:
    def __init__(self, worker):
        self.worker = worker
        self.stage = worker.stage.name
        self.loaded = False  # the stage's backends are loaded: it can take jobs
        self.redis_ok_at = 0.0
        self.loop_ok_at = time.monotonic()
        self.stall_s = LOOP_STALL_S
        self.server: M.MetricsServer | None = None
        self._task: asyncio.Task | None = None
        self._tick_task: asyncio.Task | None = None
        M.JOBS_IN_FLIGHT.labels(self.stage).set_function(lambda: len(worker.inflight))
        M.INPUT_LAG.labels(self.stage).set_function(self._input_lag)

    @property
    def port(self) -> int:
        return self.server.port if self.server is not None else 0

    def start(self) -> None:
        """Before the model loads: liveness answers at once, readiness once it is loaded."""
        self.server = M.serve(self.worker.config,
                              M.Probe(ready=self.not_ready, alive=self.not_alive),
                              self.worker.log)
        self._task = asyncio.create_task(self._refresh_loop())
        self._tick_task = asyncio.create_task(self._tick())

    def close(self) -> None:
        for t in (self._task, self._tick_task):
            if t is not None:
                t.cancel()
        if self.server is not None:
            self.server.stop()

    def mark_loaded(self) -> None:
        self.loop_ok_at = time.monotonic()  # a load that held the loop is not a stall
        self.loaded = True

    def not_ready(self) -> str:
        """Why this worker should not count as serving ("" when it does). A draining worker
        (SIGTERM) is not ready: it takes no new jobs."""
        if self.worker.stopping.is_set():
            return "draining"
        if not self.loaded:
            return "loading its backends"
        if time.monotonic() - self.redis_ok_at > REDIS_STALE_S:
            return "redis unreachable"
        return ""

    def not_alive(self) -> str:
        """Why the kubelet should restart this process ("" when it should not)."""
        stalled = time.monotonic() - self.loop_ok_at
        if self.loaded and stalled > self.stall_s:
            return f"event loop ran nothing for {stalled:.0f} s"
        return ""

    def _input_lag(self) -> float:
        lags = [f.ctx.lag_ms for f in list(self.worker.inflight.values()) if f.ctx is not None]
        return max(lags, default=0.0) / 1000.0

    def job_ended(self, outcome: str, seconds: float) -> None:
        M.JOBS.labels(self.stage, outcome).inc()
        M.JOB_SECONDS.labels(self.stage).observe(max(0.0, seconds))

    def taken_over(self, why: str) -> None:
        M.TAKEOVERS.labels(self.stage, why).inc()

    def dead_lettered(self) -> None:
        M.DEAD_LETTERS.labels(self.stage).inc()

    async def _tick(self) -> None:
        """Proof that the event loop runs (a Redis call that hangs is not a wedged loop)."""
        while True:
            self.loop_ok_at = time.monotonic()
            await asyncio.sleep(1.0)

    async def _refresh_loop(self) -> None:
        w = self.worker
        while True:
            try:
                for g in await w.redis.xinfo_groups(w.stream):
                    name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
                    if name == w.group:
                        M.QUEUE_LAG.labels(self.stage).set(int(g.get("lag") or 0))
                        M.QUEUE_PENDING.labels(self.stage).set(int(g.get("pending") or 0))
                self.redis_ok_at = time.monotonic()
            except RETRYABLE:
                pass  # the read loop logs the outage; readiness lapses meanwhile
            except ResponseError:
                self.redis_ok_at = time.monotonic()  # no group yet: Redis answers, no queue
            await asyncio.sleep(REFRESH_S)
