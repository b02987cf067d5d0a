"""A session's life in Redis, in one place: open, detached, resumed, closed, swept.

Every session not yet swept is in the sorted set ``Keys.sessions()``, scored by when it expires
(ms since the epoch):

* attached to a connection: now + ``redis.detached_grace_s``, pushed forward every
  ``refresh_s`` by the gateway that holds it, so the sessions of a gateway that dies (kill -9,
  a lost node) expire one grace period later as if their client had left;
* detached (client gone without ``close``): now + grace, the window to resume it;
* closed: now (it ends at the next sweep).

When its time is up, the sweep (any gateway, every ``sweep_s``) ends the live session: it can no
longer be resumed (state ``ended``), its listening state, cancel marker and once-per-turn job
guards go, and jobs still queued for it end on their own (``SessionGone``). Its recording (every
stream, the meta, history and timings: what replay, record, trace and export read) stays
``redis.retention_s`` longer, in the sorted set ``Keys.sessions() + ":recordings"``, scored by when
it goes; then every key of the session goes (``Keys.session_keys``). Retention 0 deletes it all
at once. A worker that was mid-turn may write a last entry after a deletion, so each deleted
session is swept a second time a little later. ``forget`` deletes a session at once (``parley
forget SID``: players' voices are personal data).
"""

from __future__ import annotations

import asyncio

import structlog

from core.config import Config
from core.redisconn import RETRYABLE
from schemas.streams import STAGES, Keys, ListenState, now_ms, parse_id

RESWEEP_MS = 60_000  # stragglers: a job that was mid-turn at the sweep is long done by then
SWEEP_BATCH = 500


def _unlink(pipeline, key: str) -> None:
    """Queue one UNLINK. Not ``pipeline.unlink``: on redis-py's async Cluster pipeline that is
    a coroutine, so unawaited it queued nothing and swept sessions kept their keys there."""
    pipeline.execute_command("UNLINK", key)


class SessionLifecycle:
    def __init__(self, redis, keys: Keys, config: Config):
        self.redis = redis
        self.keys = keys
        self.grace_ms = config.redis.detached_grace_s * 1000
        self.retain_ms = config.redis.retention_s * 1000
        self.log = structlog.get_logger().bind(component="lifecycle")

    def _swept(self) -> str:
        return self.keys.sessions() + ":swept"

    def _recordings(self) -> str:
        return self.keys.sessions() + ":recordings"

    def detached_key(self) -> str:
        """Set of the sessions whose client left without `close` (resumable): counted for the
        `parley_sessions{state="detached"}` series."""
        return self.keys.sessions() + ":detached"

    async def attached(self, sids: list[str]) -> None:
        """Opened or resumed here, or still held: expires one grace period after we stop
        saying so."""
        if sids:
            when = now_ms() + self.grace_ms
            await self.redis.zadd(self.keys.sessions(), {sid: when for sid in sids})
            await self.redis.srem(self.detached_key(), *sids)

    async def left(self, sid: str, state: str) -> None:
        """The client closed the session (``closed``) or went away (``detached``)."""
        keep = 0 if state == "closed" else self.grace_ms
        async with self.redis.pipeline(transaction=False) as p:
            p.hset(self.keys.session(sid, "meta"), mapping={"state": state,
                                                            "state_ts": now_ms()})
            p.zadd(self.keys.sessions(), {sid: now_ms() + keep})
            if state == "detached":
                p.sadd(self.detached_key(), sid)
            else:
                p.srem(self.detached_key(), sid)
            await p.execute()

    async def count(self) -> int:
        return await self.redis.zcard(self.keys.sessions())

    async def sweep(self, now: float | None = None) -> int:
        """End the sessions whose time is up and delete the recordings whose time is up;
        returns how many sessions were ended now."""
        now = now_ms() if now is None else now
        swept = 0
        for sid in await self._due(self.keys.sessions(), now):
            await self.redis.srem(self.detached_key(), sid)
            if self.retain_ms > 0:
                await self._end(sid)
                await self.redis.zadd(self._recordings(), {sid: now + self.retain_ms})
            else:
                await self._delete(sid)
                await self.redis.zadd(self._swept(), {sid: now + RESWEEP_MS})
            swept += 1
            self.log.info("session_expired", session=sid)
        for sid in await self._due(self._recordings(), now):
            await self._delete(sid)
            await self.redis.zadd(self._swept(), {sid: now + RESWEEP_MS})
            self.log.info("recording_expired", session=sid)
        again = await self.redis.zrangebyscore(self._swept(), "-inf", now, start=0,
                                               num=SWEEP_BATCH)
        for raw in again:
            sid = raw.decode() if isinstance(raw, bytes) else raw
            if await self.redis.zrem(self._swept(), sid):
                await self._delete(sid)
        return swept

    async def _due(self, zkey: str, now: float) -> list[str]:
        """Members of ``zkey`` due by ``now`` that this gateway claimed (of several gateways
        sweeping at once, the one whose ZREM counts does the work)."""
        due = await self.redis.zrangebyscore(zkey, "-inf", now, start=0, num=SWEEP_BATCH)
        mine = []
        for raw in due:
            sid = raw.decode() if isinstance(raw, bytes) else raw
            if await self.redis.zrem(zkey, sid):
                mine.append(sid)
        return mine

    async def _end(self, sid: str) -> None:
        """The live part goes; the recording stays."""
        raw = await self.redis.hgetall(self.keys.listener(sid))
        turns = ListenState.from_fields(raw).turn if raw else 1
        async with self.redis.pipeline(transaction=False) as p:
            p.hset(self.keys.session(sid, "meta"), mapping={"state": "ended",
                                                            "state_ts": now_ms()})
            _unlink(p, self.keys.session(sid, "cancel"))
            _unlink(p, self.keys.listener(sid))
            await p.execute()
        await self._unlink_guards(sid, turns)

    async def _delete(self, sid: str) -> int:
        raw = await self.redis.hgetall(self.keys.listener(sid))
        turns = ListenState.from_fields(raw).turn if raw else 1
        if not raw:  # ended already: the turns are those the history or transcripts hold
            top = await self.redis.xrevrange(self.keys.session(sid, "transcript"), count=1)
            turns = parse_id(top[0][0])[0] if top else 1
        async with self.redis.pipeline(transaction=False) as p:
            for key in self.keys.session_keys(sid):
                _unlink(p, key)
            deleted = sum(await p.execute())
        return deleted + await self._unlink_guards(sid, turns)

    async def _unlink_guards(self, sid: str, turns: int) -> int:
        async with self.redis.pipeline(transaction=False) as p:
            for turn in range(1, turns + 2):
                for stage in STAGES:
                    _unlink(p, self.keys.started(stage, sid, turn))
            return sum(await p.execute())

    async def forget(self, sid: str) -> int:
        """Delete the session's recording and everything else of it now, live or not; returns
        the number of keys deleted. Swept again a little later (a worker mid-turn)."""
        async with self.redis.pipeline(transaction=False) as p:
            for zkey in (self.keys.sessions(), self._recordings()):
                p.zrem(zkey, sid)
            p.srem(self.detached_key(), sid)
            await p.execute()
        deleted = await self._delete(sid)
        await self.redis.zadd(self._swept(), {sid: now_ms() + RESWEEP_MS})
        self.log.info("session_forgotten", session=sid, keys=deleted)
        return deleted

    async def run(self, held, refresh_s: float, sweep_s: float) -> None:
        """Forever: keep ``held()``'s sessions alive and sweep the expired ones."""
        last_refresh = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                if loop.time() - last_refresh >= refresh_s:
                    await self.attached(list(held()))
                    last_refresh = loop.time()
                await self.sweep()
            except RETRYABLE as exc:
                self.log.warning("redis_unavailable", during="session_sweep", error=str(exc))
            await asyncio.sleep(sweep_s)
