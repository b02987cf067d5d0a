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


class WorkerObserver:
    def __init__(self, worker):
        self.worker = worker
        self.stage = worker.stage.name
        self.loaded = False  # the stage's backends are loaded: it can take jobs
        self.redis_ok_at = 0.0
        self.server: M.MetricsServer | None = None
        self._task: asyncio.Task | None = None
        M.JOBS_IN_FLIGHT.labels(self.stage).set_function(lambda: len(worker.inflight))
        M.INPUT_LAG.labels(self.stage).set_function(self._input_lag)

    @property
    def port(self) -> int:
        return self.server.port if self.server is not None else 0

    def start(self) -> None:
        """Before the model loads: liveness answers at once, readiness once it is loaded."""
        self.server = M.serve(self.worker.config, M.Probe(ready=self.not_ready), self.worker.log)
        self._task = asyncio.create_task(self._refresh_loop())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.server is not None:
            self.server.stop()

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
