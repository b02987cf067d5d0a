"""One backoff for every loop that outlives a Redis outage.

redis-py already retries each command a few times (core/redisconn.py), which covers a blip;
a loop that must outlast a restart or a failover waits on :class:`Backoff` between attempts:
exponential from 50 ms to ``cap_s``, back to the start after a success.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from core.redisconn import RETRYABLE

T = TypeVar("T")
FIRST_S = 0.05


class Backoff:
    def __init__(self, cap_s: float = 2.0):
        self.cap_s = cap_s
        self.delay = FIRST_S

    def reset(self) -> None:
        self.delay = FIRST_S

    async def wait(self) -> float:
        """Sleep the current delay (returned), then double it up to the cap."""
        waited = self.delay
        await asyncio.sleep(waited)
        self.delay = min(self.delay * 2, self.cap_s)
        return waited


async def retrying(fn: Callable[[], Awaitable[T]], log, what: str, cap_s: float = 2.0) -> T:
    """``await fn()`` until Redis answers, logging each wait."""
    backoff = Backoff(cap_s)
    while True:
        try:
            return await fn()
        except RETRYABLE as exc:
            log.warning("redis_unavailable", during=what, error=str(exc), retry_s=backoff.delay)
            await backoff.wait()
