"""Admission control: say "busy" before the player speaks, never drop a turn after.

When the fleet cannot keep up, the only honest moment to say so is before a conversation
starts: a turn the player has already spoken is answered, late if need be. So the gateway
refuses new sessions (``open`` gets ``error`` ``overloaded`` with a retry hint, which the game
can show as "the NPC is busy") while either holds:

* **STT is behind real time**: the worst listening job is more than ``admit_max_lag_ms``
  behind the newest mic audio it has taken (each worker reports its jobs' lag every heartbeat);
* **a stage's queue waits**: a job of any stage has waited more than ``admit_max_queue_ms``
  to be picked up (every worker of that stage is full);
* **a stage has no live worker** (none registered within its heartbeat TTL: all crashed,
  stopped, or not started yet).

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
        if load.workers == 0:
            return Verdict(False, f"no {stage} worker is running", retry_after_ms=1000,
                           loads=loads)
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

    def __init__(self, redis, keys: Keys):
        self.redis = redis
        self.keys = keys

    async def read(self) -> dict[str, StageLoad]:
        now = now_ms()
        loads = {stage: StageLoad() for stage in STAGES}
        r = self.redis
        await r.zremrangebyscore(self.keys.workers(), "-inf", now - STALE_WORKER_MS)
        consumers = await r.zrange(self.keys.workers(), 0, -1)
        async with r.pipeline(transaction=False) as p:
            for c in consumers:
                p.hmget(self.keys.worker(c.decode() if isinstance(c, bytes) else c),
                        ["stage", "jobs", "max_jobs", "lag_ms", "cpu"])
            rows = await p.execute() if consumers else []
        for stage, jobs, max_jobs, lag, cpu in rows:
            load = loads.get(stage.decode() if stage else "")
            if load is None:
                continue
            load.workers += 1
            load.jobs += len(json.loads(jobs or b"[]"))
            load.slots += int(max_jobs or 0)
            load.lag_ms = max(load.lag_ms, float(lag or 0))
            load.cpu += float(cpu or 0)
        for stage in STAGES:
            loads[stage].oldest_queued_ms = await self._oldest_queued(stage, now)
        return loads

    async def _oldest_queued(self, stage: str, now: float) -> float:
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
