"""The worker runtime shared by every stage.

A :class:`Worker` runs one :class:`Stage` against the stage's job stream through a consumer
group: blocking reads, several jobs in flight, ack only when the job's output is complete,
takeover of jobs whose worker died (XAUTOCLAIM after ``claim_idle_ms``), a heartbeat that keeps a
live worker's long job its own, retries and a dead-letter stream, graceful SIGTERM (finish or
hand back), and reconnect with backoff. Stages only say what a job does.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from redis.exceptions import ResponseError

from core.config import Config
from core.redisconn import RETRYABLE, connect, is_group_exists, is_no_group, is_stale_id
from core.retry import Backoff, retrying
from schemas.streams import EventEntry, Job, Keys, SessionMeta, entry_id, now_ms, parse_id
from workers import speculation
from workers.liveness import Sidecar
from workers.observe import WorkerObserver

# Refreshes the claim of each job this consumer still owns and reports the ones it lost.
# One key (the job stream), so it runs on Redis Cluster too.
_HEARTBEAT_LUA = """
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""


# Enqueue a job once per (stage, session, turn): the guard key and the job stream share the
# {jobs} slot, so the check and the XADD are one atomic step even on Redis Cluster.
_ENQUEUE_ONCE_LUA = """
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then
  return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
end
return false
"""

# Ack a job and enqueue its follow-ups only while this consumer still owns it: a worker that
# stalled past claim_idle_ms and lost the job to a takeover must not complete it as well.
_COMPLETE_LUA = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not p[1] or p[1][2] ~= ARGV[2] then
  return 0
end
local nf = tonumber(ARGV[4])
local i = 5
for k = 2, nf + 1 do
  local n = tonumber(ARGV[i])
  redis.call('XADD', KEYS[k], '*', unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
local nh = tonumber(ARGV[i])
if nh > 0 and redis.call('EXISTS', KEYS[nf + 2]) == 1 then
  redis.call('HSET', KEYS[nf + 2], unpack(ARGV, i + 1, i + nh))
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return 1
"""


@dataclass
class Outcome:
    """What a finished job leaves behind besides its output, written atomically with its ack.

    ``follow``: jobs to enqueue; ``state``: a hash in the ``{jobs}`` slot to update (only if it
    still exists: a swept session is not brought back); ``then``: run after the ack.
    """

    follow: list[Job] = field(default_factory=list)
    state: tuple[str, dict[str, str]] | None = None
    then: Callable[[], Awaitable[None]] | None = None


class HandBack(Exception):
    """Raised by a stage to give its job back to the stage's queue (e.g. when stopping).

    ``job`` is what to requeue: the same job, or one with an advanced cursor.
    """

    def __init__(self, job: Job):
        super().__init__("hand back")
        self.job = job


class SessionGone(LookupError):
    """The session's keys are gone (expired after its grace period, or never opened): nothing
    of this job is wanted any more."""


class Superseded(Exception):
    """The session has moved past this job's turn (a later turn already wrote its output)."""


class TurnWriter:
    """This turn's entries in one session stream, appended exactly once across takeovers.

    A job may run again (its worker died, Redis went away, it was handed back): entry IDs are
    ``<turn>-<seq>`` and ``published`` is the last seq a previous run already appended, so

    * a stage whose output is the same on every run (LLM fragments, face frames) calls
      :meth:`put` for everything it produces, and what is already published is skipped;
    * a stage whose output varies between runs (TTS audio lengths) reads what is published
      (:meth:`published_entries`), continues from that position itself, and calls
      :meth:`skip_published` so its next :meth:`put` appends after it.
    """

    def __init__(self, ctx: JobContext, stream: str, published: int):
        self.ctx = ctx
        self.stream = stream
        self.published = published
        self.seq = 0  # entries of this turn put so far, published or skipped

    @property
    def resuming(self) -> bool:
        return self.published > 0

    async def put(self, fields: dict[str, Any]) -> bool:
        """Entry ``seq + 1``; False when a previous run already published it."""
        self.seq += 1
        if self.seq <= self.published:
            return False
        return await self.ctx.emit(self.stream, self.seq, fields)

    async def put_many(self, batch: list[dict[str, Any]]) -> int:
        """Entries ``seq + 1`` on, in one round trip (adopting a speculation's output); those
        a previous run published are skipped. Returns how many were appended."""
        todo = []
        for fields in batch:
            self.seq += 1
            if self.seq > self.published:
                todo.append((self.seq, fields))
        return await self.ctx.emit_many(self.stream, todo) if todo else 0

    def claim(self) -> str | None:
        """The ID of entry ``seq + 1`` for a caller that appends it itself (in a script with
        other writes); None when a previous run published it."""
        self.seq += 1
        return entry_id(self.ctx.out_turn, self.seq) if self.seq > self.published else None

    def skip_published(self) -> None:
        self.seq = max(self.seq, self.published)

    async def published_entries(self) -> list[tuple[int, dict]]:
        """(seq, fields) of this turn's entries already in the stream, in order."""
        turn = self.ctx.out_turn
        entries = await self.ctx.redis.xrange(self.ctx.out_key(self.stream), f"{turn}-0",
                                              f"{turn}-{2**63 - 1}")
        return [(parse_id(eid)[1], fields) for eid, fields in entries]


class JobContext:
    """What a stage sees of one job: its session, its output streams and follow-up jobs."""

    def __init__(self, worker: Worker, job: Job):
        self.worker = worker
        self.job = job
        self.redis = worker.redis
        self.keys = worker.keys
        self.config = worker.config
        self.log = worker.log.bind(session=job.sid, turn=job.turn, job=job.id)
        self.stopping = worker.stopping
        # how far behind real time the job's input is (ms): the newest input entry it has
        # taken, against now; reported for admission control (gateway/admission.py)
        self.lag_ms = 0.0
        self._meta: SessionMeta | None = None
        self._marked: set[str] = set()
        self.interrupted = False

    @property
    def sid(self) -> str:
        return self.job.sid

    @property
    def turn(self) -> int:
        return self.job.turn

    def key(self, name: str) -> str:
        return self.keys.session(self.job.sid, name)

    @property
    def speculative(self) -> bool:
        """A head start on a reply (workers/speculation.py): its outputs go to the session's
        speculative streams, numbered by the speculation, and it marks no timings."""
        return self.job.spec > 0

    def out_key(self, stream: str) -> str:
        """The key this job's ``stream`` output goes to (and its input comes from)."""
        return self.key(f"spec_{stream}" if self.speculative else stream)

    @property
    def out_turn(self) -> int:
        """The first part of this job's output entry IDs: the turn, or the speculation."""
        return self.job.spec or self.job.turn

    async def meta(self) -> SessionMeta:
        if self._meta is None:
            raw = await self.redis.hgetall(self.key("meta"))
            if not raw:
                raise SessionGone(f"session {self.job.sid} has no metadata "
                                  "(expired or never opened)")
            self._meta = SessionMeta.from_fields(raw)
        return self._meta

    async def progress(self, stream: str) -> int:
        """Last seq this turn already has in ``stream`` (0: none), so a takeover resumes there."""
        top = await self.redis.xrevrange(self.out_key(stream), count=1)
        if not top:
            return 0
        turn, seq = parse_id(top[0][0])
        if turn > self.out_turn:
            raise Superseded(f"{stream} already holds turn {turn}")
        return seq if turn == self.out_turn else 0

    async def writer(self, stream: str) -> TurnWriter:
        """The idempotent writer of this turn's entries in ``stream`` (see :class:`TurnWriter`)."""
        return TurnWriter(self, stream, await self.progress(stream))

    async def emit(self, stream: str, seq: int, fields: dict[str, Any]) -> bool:
        """Append entry ``<turn>-<seq>``; False when it is already there (a re-run's duplicate)."""
        if self.speculative:
            return await speculation.write(self, stream, entry_id(self.out_turn, seq), fields)
        try:
            # no MAXLEN: session streams are trimmed by time (gateway/retention.py)
            await self.redis.xadd(self.key(stream), fields, id=entry_id(self.job.turn, seq))
            return True
        except ResponseError as exc:
            if is_stale_id(exc):
                return False
            raise

    async def emit_many(self, stream: str, entries: list[tuple[int, dict[str, Any]]]) -> int:
        """Append entries ``<turn>-<seq>`` in one round trip; returns how many were new."""
        async with self.redis.pipeline(transaction=False) as p:
            for seq, fields in entries:
                p.xadd(self.out_key(stream), fields, id=entry_id(self.out_turn, seq))
            got = await p.execute(raise_on_error=False)
        for r in got:
            if isinstance(r, Exception) and not (isinstance(r, ResponseError)
                                                 and is_stale_id(r)):
                raise r
        return sum(not isinstance(r, Exception) for r in got)

    async def read(self, stream: str, after: str, block_ms: int = 1000,
                   count: int = 256) -> list[tuple[str, dict]]:
        """Entries of a session stream after ID ``after``; blocks up to ``block_ms`` for more."""
        return await self._read_key(self.key(stream), after, block_ms, count)

    async def _read_key(self, key: str, after: str, block_ms: int,
                        count: int) -> list[tuple[str, dict]]:
        res = await self.redis.xread({key: after}, count=count, block=block_ms)
        if not res:
            return []
        return [(i.decode() if isinstance(i, bytes) else i, f) for i, f in res[0][1]]

    async def tail_turn(self, stream: str, wait_s: float = 60.0):
        """This turn's entries of ``stream`` as they arrive, in order.

        Raises Superseded once a later turn writes there, and TimeoutError when nothing comes
        for ``wait_s`` (the stage upstream is gone for good).
        """
        after = f"{self.out_turn}-0"
        waited = 0.0
        while True:
            entries = await self._read_key(self.out_key(stream), after, 500, 256)
            if not entries:
                waited += 0.5
                if waited >= wait_s:
                    raise TimeoutError(f"nothing on {stream} for turn {self.job.turn} "
                                       f"in {wait_s:.0f}s")
                continue
            waited = 0.0
            for eid, fields in entries:
                after = eid
                turn, _ = parse_id(eid)
                if turn > self.out_turn:
                    raise Superseded(f"{stream} stream moved on to turn {turn}")
                yield eid, fields

    async def mark(self, name: str, value: float | None = None) -> None:
        """Record when this turn first reached ``name`` (latency waterfall; first write wins).

        Written in the background: a Redis round trip (~0.2 ms) per mark on the critical path
        added up to ~1.5 ms of a turn's time to first audio.
        """
        if name in self._marked or self.speculative:
            return
        self._marked.add(name)
        self.background(self.redis.hsetnx(self.key("timing"), f"{self.job.turn}:{name}",
                                          now_ms() if value is None else round(value, 3)))

    def background(self, coro) -> None:
        """Run ``coro`` without waiting for it (bookkeeping off the critical path)."""
        task = asyncio.create_task(coro)
        self.worker.background.add(task)
        task.add_done_callback(self.worker._background_done)

    async def event(self, kind: str, code: str = "", message: str = "") -> None:
        entry = EventEntry(kind=kind, turn=self.job.turn, code=code, message=message)
        await self.redis.xadd(self.key("events"), entry.to_fields())

    async def enqueue(self, stage: str, turn: int | None = None, **fields: Any) -> bool:
        """Start a downstream job now (streaming: before this job's output is complete), once
        per turn: a takeover that cannot know whether the dead worker's enqueue landed simply
        asks again. Returns False when it had already been started."""
        job = Job(stage=stage, sid=self.job.sid, turn=self.job.turn if turn is None else turn,
                  spec=self.job.spec, **fields)
        guard, ttl = self.keys.started(stage, job.sid, job.turn), self.config.redis.session_ttl_s
        if job.spec:  # once per speculation, and short-lived: the sweep does not know them
            guard = self.keys.started(f"{stage}.spec{job.spec}", job.sid, job.turn)
            ttl = speculation.STREAM_TTL_S
        flat = [x for kv in job.to_fields().items() for x in kv]
        added = await self.worker._enqueue_once(keys=[self.keys.jobs(stage), guard],
                                                args=[ttl, *flat])
        return added is not None


class Stage:
    """One pipeline stage. Subclasses set ``name`` and implement :meth:`handle`."""

    name = ""

    def __init__(self, config: Config):
        self.config = config

    async def start(self, worker: Worker) -> None:
        """Load backends before the first job (a model load must not count against a turn)."""

    async def handle(self, ctx: JobContext) -> list[Job] | Outcome:
        """Do the job; return follow-up jobs (or an Outcome), written in the ack's transaction."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Release backends (threads, GPU memory) after the last job is done or handed back."""

    async def on_dead(self, worker: Worker, job: Job) -> Outcome:
        """What to leave behind when ``job`` goes to the dead-letter stream (STT listens on)."""
        return Outcome()

    # Jobs of an interrupted turn stop; STT's listening job belongs to the *next* turn and is
    # never interrupted by a barge-in on the current one.
    interruptible = True

    def describe(self) -> dict[str, Any]:
        return {}


@dataclass
class _InFlight:
    job: Job
    task: asyncio.Task
    since: float
    ctx: JobContext | None = None
    completing: bool = False


class Worker:
    def __init__(self, stage: Stage, config: Config, consumer: str | None = None):
        self.stage = stage
        self.config = config
        self.keys = Keys(config.redis.prefix)
        self.redis = connect(config.redis.url, max_connections=config.worker.max_jobs * 2 + 16)
        host = socket.gethostname()
        tag = f"{random.randrange(16**4):04x}"
        self.consumer = consumer or f"{stage.name}@{host}:{os.getpid()}:{tag}"
        self.host = host
        self.stream = self.keys.jobs(stage.name)
        self.group = self.keys.group(stage.name)
        self.stopping = asyncio.Event()
        self.inflight: dict[str, _InFlight] = {}
        self.slots = asyncio.Semaphore(config.worker.max_jobs)
        self.log = structlog.get_logger().bind(stage=stage.name, consumer=self.consumer)
        self.done = 0
        self.failed = 0
        self._heartbeat = self.redis.register_script(_HEARTBEAT_LUA)
        self._enqueue_once = self.redis.register_script(_ENQUEUE_ONCE_LUA)
        self._complete_script = self.redis.register_script(_COMPLETE_LUA)
        self.started = now_ms()
        self.background: set[asyncio.Task] = set()
        cfg = config.worker
        # refreshed every heartbeat, lapses after claim_idle_ms: a dead worker's jobs are taken
        # over about as fast as before, a busy one's never
        self._cpu = (time.process_time(), time.monotonic())
        self.liveness = Sidecar(config.redis.url, self.keys.alive(self.consumer),
                                every_ms=cfg.heartbeat_ms, ttl_ms=cfg.claim_idle_ms)
        self.observer = WorkerObserver(self)

    def _background_done(self, task: asyncio.Task) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.warning("background_write_failed", error=str(task.exception()))

    # ------------------------------------------------------------------ lifecycle

    def request_stop(self) -> None:
        if not self.stopping.is_set():
            self.log.info("worker_stopping", in_flight=len(self.inflight))
            self.stopping.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    async def run(self) -> None:
        self.liveness.ensure()
        self.observer.start()
        try:
            await self._run()
        finally:
            self.liveness.stop()
            self.observer.close()

    async def _run(self) -> None:
        await self._retrying(self._ensure_group, "ensure_group")
        await self.stage.start(self)
        self.observer.mark_loaded()
        self.log.info("worker_started", stage=self.stage.name, **self.stage.describe())
        loops = [
            asyncio.create_task(self._read_loop(), name="read"),
            asyncio.create_task(self._reclaim_loop(), name="reclaim"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
        ]
        await self.stopping.wait()
        for t in loops[:2]:
            t.cancel()
        await asyncio.gather(*loops[:2], return_exceptions=True)
        await self._drain()
        await self.stage.stop()
        loops[2].cancel()
        await asyncio.gather(loops[2], return_exceptions=True)
        self.liveness.stop()
        try:
            await self.redis.delete(self.keys.worker(self.consumer), self.keys.alive(self.consumer))
            await self.redis.zrem(self.keys.workers(self.stage.name), self.consumer)
        except RETRYABLE:
            pass
        await self.redis.aclose()
        self.log.info("worker_stopped", done=self.done, failed=self.failed)

    async def _drain(self) -> None:
        """Finish in-flight jobs for up to drain_timeout_s, then hand the rest back."""
        tasks = [f.task for f in self.inflight.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=self.config.worker.drain_timeout_s)
        for f in list(self.inflight.values()):
            f.task.cancel()
        await asyncio.gather(*(f.task for f in list(self.inflight.values())),
                             return_exceptions=True)
        # Entries delivered to us that no task took (a read cancelled mid-flight) go back too.
        try:
            pending = await self.redis.xpending_range(self.stream, self.group, "-", "+", 1000,
                                                      consumername=self.consumer)
            for p in pending:
                got = await self.redis.xrange(self.stream, p["message_id"], p["message_id"])
                if got:
                    await self._hand_back(Job.from_fields(got[0][0], got[0][1]))
        except (*RETRYABLE, ResponseError) as exc:
            # Redis gone or emptied (NOGROUP): nothing of ours is pending there to hand back.
            self.log.warning("drain_redis_unavailable", error=str(exc))

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if not is_group_exists(exc):
                raise

    async def _retrying(self, fn, what: str):
        return await retrying(fn, self.log, what, self.config.worker.reconnect_max_s)

    # ------------------------------------------------------------------ loops

    async def _read_loop(self) -> None:
        backoff = Backoff(self.config.worker.reconnect_max_s)
        while not self.stopping.is_set():
            await self.slots.acquire()
            free = 1 + self.slots._value  # what else is free right now
            try:
                res = await self.redis.xreadgroup(
                    self.group, self.consumer, {self.stream: ">"}, count=free,
                    block=self.config.worker.block_ms,
                )
                backoff.reset()
            except RETRYABLE as exc:
                self.slots.release()
                self.log.warning("redis_unavailable", during="read", error=str(exc),
                                 retry_s=backoff.delay)
                await backoff.wait()
                continue
            except ResponseError as exc:
                self.slots.release()
                if is_no_group(exc):  # Redis lost its data (restart without AOF)
                    await self._retrying(self._ensure_group, "ensure_group")
                    continue
                raise
            entries = res[0][1] if res else []
            if not entries:
                self.slots.release()
                continue
            for i, (eid, fields) in enumerate(entries):
                if i > 0:
                    await self.slots.acquire()
                self._start(Job.from_fields(eid, fields))

    async def _reclaim_loop(self) -> None:
        cfg = self.config.worker
        while not self.stopping.is_set():
            await asyncio.sleep(cfg.claim_idle_ms / 2000)
            try:
                await self._reclaim_once()
            except RETRYABLE as exc:
                self.log.warning("redis_unavailable", during="reclaim", error=str(exc))
            except ResponseError as exc:
                if is_no_group(exc):
                    await self._retrying(self._ensure_group, "ensure_group")
                else:
                    self.log.error("reclaim_failed", error=str(exc))

    async def _reclaim_once(self) -> None:
        """Take over the jobs of workers that are gone, or alive but stuck on a job.

        Idle time alone cannot tell busy from dead: a decode that holds the GIL starves the
        owner's heartbeat. A job idle past ``claim_idle_ms`` is taken only when its owner's
        liveness key (written by a sidecar process, see workers/liveness.py) has lapsed, or when
        it has made no progress for ``stall_ms`` (a wedged worker still loses its job).
        """
        cfg = self.config.worker
        free = self.slots._value
        if free <= 0:
            return
        idle = await self.redis.xpending_range(self.stream, self.group, "-", "+", 100,
                                               idle=cfg.claim_idle_ms)
        # Our own pending jobs that no task of ours runs are orphans: a failover brought back a
        # job whose ack the old primary never replicated (or a rerun is waiting): run them.
        idle = [p for p in idle if _s(p["consumer"]) != self.consumer
                or _s(p["message_id"]) not in self.inflight]
        if not idle:
            return
        owners = sorted({_s(p["consumer"]) for p in idle})
        async with self.redis.pipeline(transaction=False) as pipe:
            for owner in owners:
                pipe.exists(self.keys.alive(owner))
            live = {o for o, n in zip(owners, await pipe.execute(), strict=True) if n}
        for p in idle:
            if free <= 0:
                break
            owner = _s(p["consumer"])
            stalled = p["time_since_delivered"] >= cfg.stall_ms
            if owner in live and not stalled and owner != self.consumer:
                continue  # busy, not dead
            # XCLAIM re-checks the idle time, so of two rescuers only one gets the job
            got = await self.redis.xclaim(self.stream, self.group, self.consumer,
                                          cfg.claim_idle_ms, [p["message_id"]])
            for eid, fields in got:
                if fields is None:
                    continue
                free -= 1
                await self._take_over(Job.from_fields(eid, fields), p, owner,
                                      "orphaned" if owner == self.consumer
                                      else "stalled" if owner in live else "gone")

    async def _take_over(self, job: Job, pending: dict, owner: str, why: str) -> None:
        cfg = self.config.worker
        if job.id in self.inflight:
            return
        attempts = job.attempt + pending["times_delivered"]
        if job.spec:  # only a head start: lost with its worker, never run again
            self.log.info("speculative_job_dropped", session=job.sid, turn=job.turn, job=job.id,
                          spec=job.spec, previous_owner=owner)
            await self._complete(job, Outcome())
            return
        self.observer.taken_over(why)
        self.log.warning("job_taken_over", session=job.sid, turn=job.turn, job=job.id,
                         attempts=attempts, previous_owner=owner, owner_was=why,
                         idle_ms=pending["time_since_delivered"])
        if attempts > cfg.max_deliveries:
            await self._dead_letter(job, f"worker died {attempts - 1} times on this job")
            return
        await self.slots.acquire()
        self._start(job)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.worker.heartbeat_ms / 1000)
            try:
                ids = list(self.inflight)
                if ids:
                    lost = await self._heartbeat(keys=[self.stream],
                                                 args=[self.group, self.consumer, *ids])
                    for raw in lost:
                        lid = raw.decode() if isinstance(raw, bytes) else raw
                        f = self.inflight.get(lid)
                        if f is not None and not f.completing:
                            # Another worker took it (we stalled past claim_idle_ms): its output
                            # is idempotent, so stop ours rather than race it.
                            self.log.warning("job_lost_to_takeover", job=lid, session=f.job.sid)
                            f.task.cancel()
                await self._register()
                if self.liveness.ensure():
                    self.log.warning("liveness_sidecar_restarted")
            except RETRYABLE as exc:
                self.log.warning("redis_unavailable", during="heartbeat", error=str(exc))
            except ResponseError as exc:
                if is_no_group(exc):  # Redis lost its data: recreate the group
                    await self._retrying(self._ensure_group, "ensure_group")
                else:
                    self.log.error("heartbeat_failed", error=str(exc))

    def input_lag_ms(self) -> float:
        """How far behind real time this worker reads its input: the most any job in flight
        is behind (a listening job's mic, JobContext.lag_ms)."""
        return max((f.ctx.lag_ms for f in list(self.inflight.values()) if f.ctx is not None),
                   default=0.0)

    async def _register(self) -> None:
        key = self.keys.worker(self.consumer)
        jobs = [{"job": f.job.id, "session": f.job.sid, "turn": f.job.turn, "since": f.since}
                for f in self.inflight.values()]
        ttl_ms = max(3 * self.config.worker.heartbeat_ms, 3000)
        lag = self.input_lag_ms()
        cpu, wall = time.process_time(), time.monotonic()
        load = (cpu - self._cpu[0]) / max(1e-3, wall - self._cpu[1])
        self._cpu = (cpu, wall)
        now = now_ms()
        async with self.redis.pipeline(transaction=False) as p:
            p.hset(key, mapping={
                "stage": self.stage.name, "consumer": self.consumer, "pid": os.getpid(),
                "host": self.host, "started": self.started, "heartbeat": now,
                "metrics_port": self.observer.port,
                "jobs": json.dumps(jobs), "done": self.done, "failed": self.failed,
                "max_jobs": self.config.worker.max_jobs,
                "stopping": int(self.stopping.is_set()),
                "lag_ms": round(lag, 1), "cpu": round(load, 3),
            })
            p.pexpire(key, ttl_ms)
            p.zadd(self.keys.workers(self.stage.name), {self.consumer: now})
            await p.execute()

    # ------------------------------------------------------------------ one job

    def _start(self, job: Job) -> None:
        run = self._run_speculative if job.spec else self._run_job
        task = asyncio.create_task(run(job), name=f"job:{job.id}")
        self.inflight[job.id] = _InFlight(job, task, now_ms())

    async def _watch_interrupts(self, ctx: JobContext, task: asyncio.Task) -> None:
        """Cancel ``task`` when the session's turn ``ctx.turn`` is interrupted.

        Reads the newest events ID first, then the cancel marker, then blocks on events after
        that ID: an interrupt written at any moment is seen by one of the two.
        """
        r = self.redis
        events = ctx.key("events")
        backoff = Backoff(self.config.worker.reconnect_max_s)
        while True:
            try:
                top = await r.xrevrange(events, count=1)
                after = top[0][0] if top else "0-0"
                cancelled = await r.get(ctx.key("cancel"))
                while cancelled is None or int(cancelled) < ctx.turn:
                    cancelled = None
                    res = await r.xread({events: after}, block=0)
                    for _, entries in res or []:
                        for eid, fields in entries:
                            after = eid
                            ev = EventEntry.from_fields(fields)
                            if ev.kind == "interrupt" and ev.turn >= ctx.turn:
                                cancelled = ev.turn
                break
            except RETRYABLE:
                await backoff.wait()
        ctx.interrupted = True
        task.cancel()

    async def _run_job(self, job: Job) -> None:
        log = self.log.bind(session=job.sid, turn=job.turn, job=job.id)
        ctx = JobContext(self, job)
        rerun = False
        if job.id in self.inflight:
            self.inflight[job.id].ctx = ctx
        watcher = None
        if self.stage.interruptible:
            watcher = asyncio.create_task(
                self._watch_interrupts(ctx, asyncio.current_task()), name=f"watch:{job.id}")
        t0, ended = time.monotonic(), "done"  # how the job left, for parley_jobs_total
        try:
            outcome = await self.stage.handle(ctx)
            if not isinstance(outcome, Outcome):
                outcome = Outcome(follow=outcome or [])
            if await self._complete(job, outcome) and outcome.then is not None:
                await outcome.then()
            self.done += 1
            log.debug("job_done", ms=round(now_ms() - job.ts, 1))
        except asyncio.CancelledError:
            ended = "interrupted" if ctx.interrupted else "handed_back"
            if ctx.interrupted:
                # The turn is over for the player: nothing more of it is wanted. Ack, done.
                asyncio.current_task().uncancel()
                await self._safe(ctx.mark(f"stopped_{self.stage.name}"), log)
                await self._safe(self._complete(job, Outcome()), log)
                log.info("job_interrupted")
            elif self.stopping.is_set():
                await self._safe(self._hand_back(job), log)
        except HandBack as hb:
            ended = "handed_back"
            # requeue what the stage gave (e.g. an advanced cursor), ack the entry we hold
            await self._safe(self._hand_back(replace(hb.job, id=job.id)), log)
        except Superseded as exc:
            ended = "superseded"
            log.info("job_superseded", reason=str(exc))
            await self._safe(self._complete(job, Outcome()), log)
        except SessionGone as exc:
            ended = "gone"
            log.info("session_gone", reason=str(exc))
            await self._safe(self._complete(job, Outcome()), log)
        except RETRYABLE as exc:
            # Redis went away mid-job (a restart, a failover): the entry stays pending in our
            # name, so no sibling takes it while we live; we run it again once Redis answers.
            # The turn writer re-reads what was published, so nothing doubles, and a write the
            # old primary acknowledged but never replicated is simply written again.
            ended = "redis_lost"
            log.warning("job_interrupted_by_redis", error=str(exc))
            rerun = True
        except Exception as exc:  # a bad job must not kill the worker
            self.failed += 1
            ended = "failed"
            log.error("job_failed", error=f"{type(exc).__name__}: {exc}", attempt=job.attempt,
                      exc_info=True)
            await self._safe(self._retry_or_dead(job, exc), log)
        finally:
            if watcher is not None:
                watcher.cancel()
            self.inflight.pop(job.id, None)
            self.slots.release()
            self.observer.job_ended(ended, time.monotonic() - t0)
        if rerun:
            task = asyncio.create_task(self._rerun_when_back(job, log), name=f"rerun:{job.id}")
            self.background.add(task)
            task.add_done_callback(self._background_done)

    async def _run_speculative(self, job: Job) -> None:
        """A speculative job (workers/speculation.py): runs once, is cancelled with its
        speculation, and is acked however it ends: never retried, never dead-lettered (a
        failure must not tell the client its turn failed; the adopter runs the model)."""
        log = self.log.bind(session=job.sid, turn=job.turn, job=job.id, spec=job.spec)
        ctx = JobContext(self, job)
        if job.id in self.inflight:
            self.inflight[job.id].ctx = ctx
        t0, how, watcher = time.monotonic(), "done", None
        try:
            if not await speculation.claim(ctx, self.consumer):
                how = "dropped"
            else:
                watcher = asyncio.create_task(speculation.watch(ctx, asyncio.current_task()),
                                              name=f"watch:{job.id}")
                await self.stage.handle(ctx)
        except asyncio.CancelledError:
            asyncio.current_task().uncancel()
            how = "cancelled" if ctx.interrupted else "stopped"
        except (speculation.SpeculationOff, Superseded, SessionGone) as exc:
            how = "cancelled"
            log.info("speculation_off", reason=str(exc))
        except Exception as exc:
            how = "failed"
            log.warning("speculative_job_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            if watcher is not None:
                watcher.cancel()
        try:
            if how != "dropped":
                await self._safe(speculation.ended(ctx, how), log)
            await self._safe(self._complete(job, Outcome()), log)
        finally:
            self.inflight.pop(job.id, None)
            self.slots.release()
            self.observer.job_ended(f"speculative_{how}", time.monotonic() - t0)
        log.debug("speculative_job_ended", how=how)

    async def _rerun_when_back(self, job: Job, log) -> None:
        """Start ``job`` again once Redis answers, if it is still pending in our name (not
        taken over, not acked, not lost with a failed primary: a watchdog re-issues that)."""
        backoff = Backoff(self.config.worker.reconnect_max_s)
        while not self.stopping.is_set():
            await backoff.wait()
            try:
                got = await self.redis.xpending_range(self.stream, self.group, job.id, job.id, 1)
            except RETRYABLE:
                continue
            if got and _s(got[0]["consumer"]) == self.consumer and job.id not in self.inflight:
                await self.slots.acquire()
                log.info("job_rerun_after_redis_outage")
                self._start(job)
            return

    async def _safe(self, coro, log) -> None:
        try:
            await coro
        except RETRYABLE as exc:
            log.warning("redis_unavailable", during="finish", error=str(exc))

    async def _complete(self, job: Job, outcome: Outcome) -> bool:
        """Ack ``job`` with its outcome, if it is still ours; False when it was taken over."""
        f = self.inflight.get(job.id)
        if f is not None:
            f.completing = True  # the heartbeat must not read our own ack as a takeover
        keys = [self.stream]
        args: list[Any] = [self.group, self.consumer, job.id, len(outcome.follow)]
        for nxt in outcome.follow:
            flat = [x for kv in nxt.to_fields().items() for x in kv]
            keys.append(self.keys.jobs(nxt.stage))
            args += [len(flat), *flat]
        if outcome.state is not None:
            key, mapping = outcome.state
            keys.append(key)
            args += [2 * len(mapping), *(x for kv in mapping.items() for x in kv)]
        else:
            args.append(0)
        owned = await self._complete_script(keys=keys, args=args)
        if not owned:
            self.log.warning("job_completed_elsewhere", session=job.sid, turn=job.turn,
                             job=job.id)
        return bool(owned)

    async def _hand_back(self, job: Job) -> None:
        """Requeue a copy and ack the original in one transaction: another worker (or this one,
        later) picks it up at once instead of after claim_idle_ms."""
        copy = replace(job, id="")
        f = self.inflight.get(job.id)
        if f is not None:
            f.completing = True  # as in _complete: our own ack is not a takeover
        async with self.redis.pipeline(transaction=True) as p:
            p.xadd(self.stream, copy.to_fields())
            p.xack(self.stream, self.group, job.id)
            await p.execute()
        self.log.info("job_handed_back", session=job.sid, turn=job.turn, job=job.id)

    async def _retry_or_dead(self, job: Job, exc: Exception) -> None:
        if job.attempt >= self.config.worker.max_deliveries:
            await self._dead_letter(job, f"{type(exc).__name__}: {exc}")
            return
        await self._hand_back(replace(job, attempt=job.attempt + 1))

    async def _dead_letter(self, job: Job, reason: str) -> None:
        outcome = await self.stage.on_dead(self, job)
        async with self.redis.pipeline(transaction=True) as p:
            p.xadd(self.keys.dead(self.stage.name), {**job.to_fields(), "job": job.id,
                                                     "reason": reason, "dead_ts": str(now_ms())})
            for f in outcome.follow:
                p.xadd(self.keys.jobs(f.stage), f.to_fields())
            if outcome.state is not None:
                p.hset(outcome.state[0], mapping=outcome.state[1])
            p.xack(self.stream, self.group, job.id)
            await p.execute()
        entry = EventEntry(kind="error", turn=job.turn, code="turn_failed",
                           message=f"{self.stage.name} failed on this turn: {reason}")
        await self.redis.xadd(self.keys.session(job.sid, "events"), entry.to_fields())
        self.observer.dead_lettered()
        self.log.error("job_dead_lettered", session=job.sid, turn=job.turn, job=job.id,
                       reason=reason)
        if outcome.then is not None:
            await outcome.then()


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


async def run_worker(stage: Stage, config: Config) -> None:
    worker = Worker(stage, config)
    worker.install_signal_handlers()
    await worker.run()


__all__ = ["HandBack", "JobContext", "Outcome", "SessionGone", "Stage", "Superseded", "TurnWriter",
           "Worker", "entry_id", "run_worker"]
