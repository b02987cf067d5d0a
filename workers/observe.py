"""A worker's metrics and probes: what it counts (core/metrics.py defines the series) and when
it is ready. Kept apart from runtime.py so the runtime only calls one-line hooks."""

from __future__ import annotations

import asyncio
import time

from redis.exceptions import ResponseError

from core import metrics as M
from core.observe import REFRESH_S, ProcessObserver
from core.redisconn import RETRYABLE

# Liveness: an event loop that ran nothing for this long is wedged, not busy (a decode holds it
# for seconds at most; a stuck job is taken over after worker.stall_ms anyway). Not checked
# while the backends load, which may block the loop for minutes.
LOOP_STALL_S = 300.0


class WorkerObserver(ProcessObserver):
    def __init__(self, worker):
        super().__init__(LOOP_STALL_S)
        self.worker = worker
        self.stage = worker.stage.name
        self.loaded = False  # the stage's backends are loaded: it can take jobs
        M.JOBS_IN_FLIGHT.labels(self.stage).set_function(lambda: len(worker.inflight))
        M.INPUT_LAG.labels(self.stage).set_function(self._input_lag)

    def start(self) -> None:
        """Before the model loads: liveness answers at once, readiness once it is loaded."""
        self.serve(self.worker.config, self.worker.log)

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
        if self.redis_stale():
            return "redis unreachable"
        return ""

    def not_alive(self) -> str:
        return self.loop_stalled() if self.loaded else ""

    def _input_lag(self) -> float:
        return self.worker.input_lag_ms() / 1000.0

    def job_ended(self, outcome: str, seconds: float) -> None:
        M.JOBS.labels(self.stage, outcome).inc()
        M.JOB_SECONDS.labels(self.stage).observe(max(0.0, seconds))

    def taken_over(self, why: str) -> None:
        M.TAKEOVERS.labels(self.stage, why).inc()

    def dead_lettered(self) -> None:
        M.DEAD_LETTERS.labels(self.stage).inc()

    def speculation(self, outcome: str) -> None:
        M.SPECULATIONS.labels(self.stage, outcome).inc()

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
