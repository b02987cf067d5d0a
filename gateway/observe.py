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
# Liveness: the gateway runs no model, so a loop that ran nothing this long is wedged.
LOOP_STALL_S = 60.0


class GatewayObserver:
    def __init__(self, gw):
        self.gw = gw
        self.stopping = False
        self.redis_ok_at = 0.0
        self.loop_ok_at = time.monotonic()
        self.stall_s = LOOP_STALL_S
        self.server: M.MetricsServer | None = None
        self._task: asyncio.Task | None = None
        self._tick_task: asyncio.Task | None = None

    def start(self) -> None:
        self.server = M.serve(self.gw.config, M.Probe(ready=self.not_ready, alive=self.not_alive),
                              self.gw.log)
        self._task = asyncio.create_task(self._refresh_loop())
        self._tick_task = asyncio.create_task(self._tick())

    async def stop(self) -> None:
        self.stopping = True
        tasks = [t for t in (self._task, self._tick_task) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

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

    def not_alive(self) -> str:
        """Why the kubelet should restart this process ("" when it should not)."""
        stalled = time.monotonic() - self.loop_ok_at
        return f"event loop ran nothing for {stalled:.0f} s" if stalled > self.stall_s else ""

    def local_gauges(self) -> None:
        open_, talking = 0, 0
        for conn in list(self.gw.connections):
            open_ += len(conn.core.sessions)
            for relay, _ in list(conn.relays.values()):
                turns = dict(relay.turns)
                # the newest turn only: an older one that never finished is not talk
                talking += bool(turns) and not turns[max(turns)].done
        M.SESSIONS.labels("open").set(open_)
        M.SESSIONS.labels("talking").set(talking)
        M.CONNECTIONS.set(len(self.gw.connections))

    async def _tick(self) -> None:
        """Proof that the event loop runs (a Redis call that hangs is not a wedged loop)."""
        while True:
            self.loop_ok_at = time.monotonic()
            await asyncio.sleep(1.0)

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
