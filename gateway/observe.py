"""The gateway's metrics and probes: what it counts (core/metrics.py defines the series) and
when it is ready. Kept apart from server.py so the hot path only calls one-line hooks."""

from __future__ import annotations

import asyncio
import time

from core import metrics as M
from core.redisconn import RETRYABLE
from schemas import protocol as P

REFRESH_S = 2.0
# Readiness needs Redis answering: a gateway that cannot reach it can only refuse sessions.
REDIS_STALE_S = 10.0


class GatewayObserver:
    def __init__(self, gw):
        self.gw = gw
        self.stopping = False
        self.redis_ok_at = 0.0
        self.server: M.MetricsServer | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.server = M.serve(self.gw.config, M.Probe(ready=self.not_ready), self.gw.log)
        self._task = asyncio.create_task(self._refresh_loop())

    async def stop(self) -> None:
        self.stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()

    def not_ready(self) -> str:
        """Why a load balancer should not send new clients here ("" when it should)."""
        if self.stopping:
            return "stopping"
        if self.gw.server is None or not self.gw.server.is_serving():
            return "not listening"
        if time.monotonic() - self.redis_ok_at > REDIS_STALE_S:
            return "redis unreachable"
        return ""

    def local_gauges(self) -> None:
        open_, talking = 0, 0
        for conn in list(self.gw.connections):
            open_ += len(conn.core.sessions)
            for relay, _ in list(conn.relays.values()):
                talking += any(not ts.done for ts in list(relay.turns.values()))
        M.SESSIONS.labels("open").set(open_)
        M.SESSIONS.labels("talking").set(talking)
        M.CONNECTIONS.set(len(self.gw.connections))

    async def _refresh_loop(self) -> None:
        while True:
            self.local_gauges()
            try:
                detached = await self.gw.redis.scard(self.gw.lifecycle.detached_key())
                M.SESSIONS.labels("detached").set(detached)
                self.redis_ok_at = time.monotonic()
            except RETRYABLE:
                pass  # not ready until Redis answers again; the relays log the outage
            await asyncio.sleep(REFRESH_S)


def sent(message) -> None:
    """Counts what the gateway sends a client: errors by code, and how turns ended."""
    if isinstance(message, P.ErrorEvent):
        M.ERRORS.labels(message.code).inc()
        if message.code == P.ErrorCode.TURN_FAILED:
            M.TURNS.labels("failed").inc()
    elif isinstance(message, P.TurnDone):
        M.TURNS.labels("interrupted" if message.interrupted else "done").inc()
        if not message.interrupted and message.timings:
            M.observe_turn(message.timings)
