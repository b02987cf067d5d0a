"""The gateway's metrics and probes: what it counts (core/metrics.py defines the series) and
when it is ready. Kept apart from server.py so the hot path only calls one-line hooks."""

from __future__ import annotations

import asyncio
import time

from core import metrics as M
from core.observe import REFRESH_S, ProcessObserver
from core.redisconn import RETRYABLE
from schemas import protocol as P

# Liveness: the gateway runs no model, so a loop that ran nothing this long is wedged.
LOOP_STALL_S = 60.0


class GatewayObserver(ProcessObserver):
    def __init__(self, gw):
        super().__init__(LOOP_STALL_S)
        self.gw = gw
        self.stopping = False

    def start(self) -> None:
        self.serve(self.gw.config, self.gw.log)

    async def stop(self) -> None:
        self.stopping = True
        await self.stop_tasks()

    def not_ready(self) -> str:
        """Why a load balancer should not send new clients here ("" when it should)."""
        if self.stopping:
            return "stopping"
        if self.gw.server is None or not self.gw.server.is_serving():
            return "not listening"
        if self.redis_stale():
            return "redis unreachable"
        return ""

    def local_gauges(self) -> None:
        open_, talking = 0, 0
        for conn in list(self.gw.connections):
            for session in conn.core.live_sessions():
                open_ += 1
                turns = dict(session.relay.turns)
                # the newest turn only: an older one that never finished is not talk
                talking += bool(turns) and not turns[max(turns)].done
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
