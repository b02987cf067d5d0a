"""Per-turn watchdog: re-issues the job of a stage whose output stopped short with no job left.

Replication is asynchronous. On a Redis Cluster a session's streams and the job streams live
on different masters, so a stage can write its last output entries (session's master), ack
its job (the ``{jobs}`` master, replicated), and then lose those entries when the session's
master dies within its replication lag. Nothing is pending any more and nothing will write the
turn's end: without this the client would wait for ``turn_done`` for ever.

:class:`TurnWatchdog` (Sans-I/O) decides from what IS published, never from acks: a turn is in
flight while its face stream lacks the turn's end marker; the stalled stage is the first of
llm, tts, lipsync whose end marker for the turn is missing; it is suspect once the tops of the
turn's reply, voice and face streams have not moved for ``gateway.turn_stall_s``. The I/O part
(:class:`TurnWatch`) then runs :data:`REISSUE_LUA` in the ``{jobs}`` slot, which re-issues that
stage's job only if no job of the turn is queued or pending there for that stage or any stage
before it (a slow fleet, a job being taken over, an upstream job whose ack is still to come),
and in the same atomic step. The re-issued job's turn writer continues after what survived,
so the player gets no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog

from core import metrics as M
from core.redisconn import RETRYABLE
from schemas.streams import STAGES, Job, Keys, TranscriptEntry, parse_id

# The stages the watchdog repairs, each with the session stream it writes. STT is left out:
# until its final transcript the turn is the player's (still speaking), and a listening job is
# re-woken by the next mic append.
OUTPUTS = (("llm", "reply"), ("tts", "voice"), ("lipsync", "face"))
MAX_REISSUES = 2  # per turn and stage: a stage that keeps stopping short is not run for ever
RECENT_EVENTS = 16  # the events looked at for a turn that failed or had nothing to answer
MAX_SCAN = 10_000  # job entries the re-issue script looks at before it calls the fleet busy

# The top entry of a session's transcript, reply, voice and face streams (ID and end flag: the
# field that marks a final transcript or an end marker), the cancel marker, and the turns of
# recent error / no_speech events. Small answers: the PCM of a voice entry stays in Redis.
# KEYS: transcript, reply, voice, face, events, cancel; ARGV: events to look at.
SESSION_TOPS_LUA = """
local flag = {'final', 'end', 'flags', 'end'}
local out = {}
for i = 1, 4 do
  local top = redis.call('XREVRANGE', KEYS[i], '+', '-', 'COUNT', 1)
  local id, f = '', '0'
  if top[1] then
    id = top[1][1]
    local fields = top[1][2]
    for j = 1, #fields, 2 do
      if fields[j] == flag[i] then f = fields[j + 1] end
    end
  end
  out[#out + 1] = id
  out[#out + 1] = f
end
out[#out + 1] = redis.call('GET', KEYS[6]) or '0'
local ended = {}
for _, e in ipairs(redis.call('XREVRANGE', KEYS[5], '+', '-', 'COUNT', tonumber(ARGV[1]))) do
  local kind, turn = nil, nil
  for j = 1, #e[2], 2 do
    if e[2][j] == 'kind' then kind = e[2][j + 1] end
    if e[2][j] == 'turn' then turn = e[2][j + 1] end
  end
  if turn and (kind == 'error' or kind == 'no_speech') then ended[#ended + 1] = turn end
end
out[#out + 1] = ended
return out
"""

# Re-issue a stage's job for (sid, turn) unless a job of that turn is queued or pending for it
# or for a stage before it; one atomic step in the {jobs} slot, so no enqueue slips in between.
# KEYS[1..n]: job streams, the stalled stage's last; KEYS[n+1]: its once-per-turn guard.
# ARGV: sid, turn, guard TTL (s), n, max entries to scan, n group names, the job's fields.
# Returns {1, stage} when re-issued, {0, stage} when that stage has a job of the turn, {-1, why}
# when it cannot tell (too much to scan, a stream or group missing): then nothing is done.
REISSUE_LUA = """
local sid, turn, n, cap = ARGV[1], ARGV[2], tonumber(ARGV[4]), tonumber(ARGV[5])
local function ours(fields)
  local s, t
  for j = 1, #fields, 2 do
    if fields[j] == 'sid' then s = fields[j + 1] end
    if fields[j] == 'turn' then t = fields[j + 1] end
  end
  return s == sid and t == turn
end
for k = 1, n do
  local group = ARGV[5 + k]
  local info = redis.pcall('XINFO', 'GROUPS', KEYS[k])
  if info.err then return {-1, group} end
  local last = nil
  for _, g in ipairs(info) do
    for j = 1, #g, 2 do
      if g[j] == 'name' and g[j + 1] == group then
        for i = 1, #g, 2 do
          if g[i] == 'last-delivered-id' then last = g[i + 1] end
        end
      end
    end
  end
  if not last then return {-1, group} end
  local pending = redis.call('XPENDING', KEYS[k], group, '-', '+', cap)
  if #pending >= cap then return {-1, group} end
  for _, p in ipairs(pending) do
    local e = redis.call('XRANGE', KEYS[k], p[1], p[1])
    if e[1] and ours(e[1][2]) then return {0, group} end
  end
  local queued = redis.call('XRANGE', KEYS[k], '(' .. last, '+', 'COUNT', cap)
  if #queued >= cap then return {-1, group} end
  for _, e in ipairs(queued) do
    if ours(e[2]) then return {0, group} end
  end
end
redis.call('XADD', KEYS[n], '*', unpack(ARGV, 6 + n))
redis.call('SET', KEYS[n + 1], '1', 'EX', ARGV[3])
return {1, ARGV[5 + n]}
"""


@dataclass(frozen=True)
class Top:
    """A stream's newest entry: ``turn``-``seq`` (0-0: empty stream) and its end flag."""

    turn: int = 0
    seq: int = 0
    end: bool = False


@dataclass(frozen=True)
class SessionView:
    """What a session's streams hold now, as far as the watchdog needs it."""

    transcript: Top = Top()  # end: a final transcript
    reply: Top = Top()
    voice: Top = Top()
    face: Top = Top()
    cancelled: int = 0  # the latest interrupted turn
    ended: frozenset[int] = frozenset()  # turns with an error (turn_failed) or no_speech

    def output(self, stream: str) -> Top:
        return getattr(self, stream)


@dataclass(frozen=True)
class Reissue:
    """Re-issue ``stage``'s job of ``turn`` unless a job of that turn is still in the queues
    of ``stages`` (the stage and those before it)."""

    sid: str
    turn: int
    stage: str
    stages: tuple[str, ...]
    published: dict[str, int]  # stream -> last seq of the turn that survived
    reissues: int  # earlier re-issues of this stage for this turn


@dataclass(frozen=True)
class GiveUp:
    """``stage`` stopped short again after MAX_REISSUES re-issues: said once, then left."""

    sid: str
    turn: int
    stage: str


def in_flight(view: SessionView) -> int:
    """The session's newest turn that owes the player a reply (0: none)."""
    turns = [view.output(s).turn for _, s in OUTPUTS]
    if view.transcript.end:
        turns.append(view.transcript.turn)
    return max(turns)


def stalled_stage(view: SessionView, turn: int) -> str | None:
    """The first stage whose end marker for ``turn`` is not published (None: all are)."""
    for stage, stream in OUTPUTS:
        top = view.output(stream)
        if top.turn != turn or not top.end:
            return stage
    return None


@dataclass
class _Watch:
    turn: int
    progress: tuple
    since: float
    reissues: Counter = field(default_factory=Counter)
    gave_up: bool = False


class TurnWatchdog:
    """Sans-I/O: session views in, at most one decision per session and look out."""

    def __init__(self, stall_s: float, max_reissues: int = MAX_REISSUES):
        self.stall_s = stall_s
        self.max_reissues = max_reissues
        self.watches: dict[str, _Watch] = {}

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the sessions not in ``keep`` (no longer held here)."""
        keep = set(keep)
        for sid in [s for s in self.watches if s not in keep]:
            del self.watches[sid]

    def observe(self, sid: str, view: SessionView, now: float) -> Reissue | GiveUp | None:
        turn = in_flight(view)
        stage = stalled_stage(view, turn) if turn else None
        if stage is None or view.cancelled >= turn or turn in view.ended:
            self.watches.pop(sid, None)  # nothing owed: done, interrupted, failed, or idle
            return None
        progress = tuple(view.output(s) for _, s in OUTPUTS)
        w = self.watches.get(sid)
        if w is None or w.turn != turn:
            self.watches[sid] = _Watch(turn, progress, now)
            return None
        if w.progress != progress:
            w.progress, w.since = progress, now
            return None
        if now - w.since < self.stall_s:
            return None
        w.since = now  # looked at now: the next look is another stall_s away
        if w.reissues[stage] >= self.max_reissues:
            if w.gave_up:
                return None
            w.gave_up = True
            return GiveUp(sid, turn, stage)
        published = {s: (t.seq if t.turn == turn else 0) for s, t in
                     zip((s for _, s in OUTPUTS), progress, strict=True)}
        return Reissue(sid, turn, stage, STAGES[:STAGES.index(stage) + 1], published,
                       w.reissues[stage])

    def reissued(self, sid: str, stage: str) -> None:
        """The I/O re-issued the job ``observe`` asked for (not when the fleet still had one)."""
        w = self.watches.get(sid)
        if w is not None:
            w.reissues[stage] += 1


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _top(raw_id, flag, end_bits: int = 0) -> Top:
    rid = _s(raw_id)
    if not rid:
        return Top()
    turn, seq = parse_id(rid)
    f = _s(flag or "0")
    end = bool(int(f) & end_bits) if end_bits else f == "1"
    return Top(turn, seq, end)


def parse_tops(raw: list) -> SessionView:
    """SESSION_TOPS_LUA's answer as a SessionView."""
    tr, rp, vo, fa = (raw[i:i + 2] for i in range(0, 8, 2))
    return SessionView(
        transcript=_top(*tr), reply=_top(*rp), voice=_top(*vo, end_bits=2), face=_top(*fa),
        cancelled=int(_s(raw[8]) or 0), ended=frozenset(int(_s(t)) for t in raw[9]))


class TurnWatch:
    """The watchdog's I/O at the gateway: looks at the sessions this gateway holds every
    ``tick_s`` and carries out what :class:`TurnWatchdog` decides."""

    def __init__(self, redis, keys: Keys, stall_s: float, guard_ttl_s: int):
        self.redis = redis
        self.keys = keys
        self.core = TurnWatchdog(stall_s)
        self.tick_s = max(0.05, min(1.0, stall_s / 4))
        self.guard_ttl_s = guard_ttl_s
        self._tops = redis.register_script(SESSION_TOPS_LUA)
        self._reissue = redis.register_script(REISSUE_LUA)
        self._limit = asyncio.Semaphore(64)  # views read at once
        self.log = structlog.get_logger().bind(component="watchdog")

    async def run(self, held: Callable[[], Iterable[str]]) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                await self.check(list(held()), time.monotonic())
            except RETRYABLE as exc:
                self.log.warning("redis_unavailable", during="turn_watch", error=str(exc))
            except Exception:  # a bad reading must not end the watch for good
                self.log.exception("turn_watch_failed")

    async def view(self, sid: str) -> SessionView:
        k = self.keys
        async with self._limit:
            raw = await self._tops(
                keys=[*(k.session(sid, n) for n in ("transcript", "reply", "voice", "face",
                                                     "events", "cancel"))],
                args=[RECENT_EVENTS])
        return parse_tops(raw)

    async def check(self, sids: list[str], now: float) -> None:
        self.core.forget(sids)
        views = await asyncio.gather(*(self.view(sid) for sid in sids), return_exceptions=True)
        for sid, view in zip(sids, views, strict=True):
            if isinstance(view, BaseException):
                if not isinstance(view, RETRYABLE):  # an outage of one node: next tick
                    self.log.warning("turn_watch_read_failed", session=sid, error=str(view))
                continue
            decision = self.core.observe(sid, view, now)
            if isinstance(decision, Reissue):
                try:
                    await self.reissue(decision)
                except RETRYABLE as exc:  # the {jobs} slot in a failover: asked again later
                    self.log.warning("redis_unavailable", during="turn_reissue", session=sid,
                                     error=str(exc))
            elif isinstance(decision, GiveUp):
                self.log.error("turn_stalled_gave_up", session=sid, turn=decision.turn,
                               stage=decision.stage, reissues=MAX_REISSUES)

    async def reissue(self, d: Reissue) -> bool:
        """Re-issue ``d.stage``'s job if the fleet has none of the turn; True when it did."""
        log = self.log.bind(session=d.sid, turn=d.turn, stage=d.stage)
        text = ""
        if d.stage == "llm":
            text = await self._final_text(d.sid, d.turn)
            if text is None:  # lost too: counted as a try, so the watchdog gives up in time
                self.core.reissued(d.sid, d.stage)
                log.error("turn_stalled_no_transcript", published=d.published)
                return False
        job = Job(stage=d.stage, sid=d.sid, turn=d.turn, text=text)
        flat = [x for kv in job.to_fields().items() for x in kv]
        k = self.keys
        got = await self._reissue(
            keys=[*(k.jobs(s) for s in d.stages), k.started(d.stage, d.sid, d.turn)],
            args=[d.sid, d.turn, self.guard_ttl_s, len(d.stages), MAX_SCAN,
                  *(k.group(s) for s in d.stages), *flat])
        done, which = int(got[0]), _s(got[1])
        if done == 1:
            self.core.reissued(d.sid, d.stage)
            M.TURN_REISSUES.labels(d.stage).inc()
            log.warning("turn_stalled_job_reissued", published=d.published,
                        reissues=d.reissues + 1)
            return True
        # a job of the turn is still queued or pending: the fleet is slow, not the turn lost
        log.info("turn_slow_job_in_fleet", job_stage=which, published=d.published,
                 unsure=done < 0)
        return False

    async def _final_text(self, sid: str, turn: int) -> str | None:
        """The player's words of ``turn``: its final transcript, the last entry of the turn."""
        got = await self.redis.xrevrange(self.keys.session(sid, "transcript"),
                                         f"{turn}-{2**64 - 1}", f"{turn}-0", count=1)
        if not got:
            return None
        entry = TranscriptEntry.from_fields(got[0][1])
        return entry.text if entry.final else None


def start_turn_watch(gw) -> asyncio.Task | None:
    """The gateway's watch over the sessions it holds (``gw.held_sessions``); None when
    ``gateway.turn_stall_s`` is 0."""
    cfg = gw.config
    if cfg.gateway.turn_stall_s <= 0:
        return None
    watch = TurnWatch(gw.redis, gw.keys, cfg.gateway.turn_stall_s, cfg.redis.session_ttl_s)
    return asyncio.create_task(watch.run(gw.held_sessions), name="turn-watch")
