"""Admission control: say "busy" before the player speaks, never drop a turn after.

When the fleet cannot keep up, the only honest moment to say so is before a conversation
starts: a turn the player has already spoken is answered, late if need be. So the gateway
refuses new sessions (``open`` gets ``error`` ``overloaded`` with a retry hint, which the game
can show as "the NPC is busy") while either holds:

* **STT is behind real time**: the worst listening job is more than ``admit_max_lag_ms``
  behind the newest mic audio it has taken (each worker reports its jobs' lag every heartbeat);
* **a stage's queue waits**: a job of any stage has waited more than ``admit_max_queue_ms``,
  either to be picked up (every worker of that stage is full, or none is running) or with no
  heartbeat from its owner (a worker stopped, dead and not yet replaced, or starved).

Sessions already open go on; their turns keep their place in the queues. ``decide`` is the
policy (pure); :class:`FleetLoad` reads what it needs from Redis.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from redis.exceptions import ResponseError

from schemas.streams import STAGES, Keys, now_ms

STALE_WORKER_MS = 10_000  # a registry entry older than this is a worker that is gone


@dataclass
class StageLoad:
    workers: int = 0
    jobs: int = 0  # in flight, all workers of the stage
    slots: int = 0  # max_jobs, summed
    lag_ms: float = 0.0  # worst input lag of a job in flight
    cpu: float = 0.0  # CPU cores used, summed over the stage's processes
    oldest_queued_ms: float = 0.0  # age of the oldest job nobody has picked up


@dataclass
class Verdict:
    admit: bool
    reason: str = ""
    retry_after_ms: int = 0
    loads: dict[str, StageLoad] = field(default_factory=dict)


def decide(loads: dict[str, StageLoad], max_lag_ms: float, max_queue_ms: float) -> Verdict:
    """Admit a new session or not, from the fleet's load (a limit of 0 is switched off)."""
    stt = loads.get("stt", StageLoad())
    if max_lag_ms > 0 and stt.lag_ms > max_lag_ms:
        return Verdict(False, f"speech recognition is {stt.lag_ms:.0f} ms behind real time",
                       retry_after_ms=int(2 * stt.lag_ms), loads=loads)
    for stage in STAGES:
        load = loads.get(stage, StageLoad())
        if max_queue_ms > 0 and load.oldest_queued_ms > max_queue_ms:
            return Verdict(False, f"{stage} jobs wait {load.oldest_queued_ms:.0f} ms for a "
                                  "free worker", retry_after_ms=int(load.oldest_queued_ms),
                           loads=loads)
    return Verdict(True, loads=loads)


class Admission:
    """The gateway's current verdict. A refusal needs two polls in a row that say so: a client
    that uploads seconds of audio at once puts STT behind for a moment without overloading it."""

    def __init__(self, max_lag_ms: float, max_queue_ms: float):
        self.max_lag_ms = max_lag_ms
        self.max_queue_ms = max_queue_ms
        self.verdict = Verdict(True)
        self._refusing = 0

    def update(self, loads: dict[str, StageLoad]) -> Verdict:
        v = decide(loads, self.max_lag_ms, self.max_queue_ms)
        self._refusing = 0 if v.admit else self._refusing + 1
        self.verdict = v if v.admit or self._refusing >= 2 else Verdict(True, loads=loads)
        return self.verdict


class FleetLoad:
    """Reads each stage's load from the worker registry and the job streams."""

    def __init__(self, redis, keys: Keys, stuck_ms: float = 1000.0):
        self.redis = redis
        self.keys = keys
        self.stuck_ms = stuck_ms

    async def read(self) -> dict[str, StageLoad]:
        now = now_ms()
        loads = {}
        for stage in STAGES:
            loads[stage] = await self._stage(stage)
            loads[stage].oldest_queued_ms = await self._oldest_queued(stage, now)
        return loads

    async def _stage(self, stage: str) -> StageLoad:
        """Workers counted by their liveness keys (a starved worker's registry entry can lapse;
        its sidecar's key does not); load figures from the registry where present."""
        r, load = self.redis, StageLoad()
        await r.zremrangebyscore(self.keys.workers(stage), "-inf", now_ms() - STALE_WORKER_MS)
        consumers = [c.decode() if isinstance(c, bytes) else c
                     for c in await r.zrange(self.keys.workers(stage), 0, -1)]
        if not consumers:
            return load
        async with r.pipeline(transaction=False) as p:
            for c in consumers:
                p.exists(self.keys.alive(c))
                p.hmget(self.keys.worker(c), ["jobs", "max_jobs", "lag_ms", "cpu"])
            rows = await p.execute()
        for alive, (jobs, max_jobs, lag, cpu) in zip(rows[::2], rows[1::2], strict=True):
            if not alive:
                continue
            load.workers += 1
            load.jobs += len(json.loads(jobs or b"[]"))
            load.slots += int(max_jobs or 0)
            load.lag_ms = max(load.lag_ms, float(lag or 0))
            load.cpu += float(cpu or 0)
        return load

    async def _oldest_queued(self, stage: str, now: float) -> float:
        """How long a job of ``stage`` has waited: not yet delivered, or delivered to a worker
        whose heartbeat has not refreshed it for longer than the limit (the worst of both)."""
        stream = self.keys.jobs(stage)
        try:
            stuck = await self.redis.xpending_range(stream, self.keys.group(stage), "-", "+",
                                                    1, idle=int(self.stuck_ms))
        except ResponseError:
            return 0.0
        waited = float(stuck[0]["time_since_delivered"]) if stuck else 0.0
        return max(waited, await self._undelivered(stage, now))

    async def _undelivered(self, stage: str, now: float) -> float:
        """Age of the oldest job not yet delivered to any worker of ``stage``."""
        stream = self.keys.jobs(stage)
        try:
            groups = await self.redis.xinfo_groups(stream)
        except ResponseError:  # no stream yet: nothing queued
            return 0.0
        for g in groups:
            name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
            if name != self.keys.group(stage) or not g.get("lag"):
                continue
            last = g["last-delivered-id"]
            last = last.decode() if isinstance(last, bytes) else last
            nxt = await self.redis.xrange(stream, f"({last}", "+", count=1)
            if nxt:
                ms = int(nxt[0][0].decode().split("-")[0])  # entry IDs start with the ms
                return max(0.0, now - ms)
        return 0.0
