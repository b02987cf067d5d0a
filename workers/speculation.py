"""Speculative replies: start the LLM and TTS at a likely end of turn, let the client hear them
only once the end is confirmed with the same words (docs/endpointing.md).

A speculation is numbered per session (``n``) and lives in the session's own keys, which the
gateway never reads:

* ``spec`` (hash): ``n`` (the last number given), ``live`` (the one STT has not settled yet),
  and per speculation ``<n>:state`` (live, adopted, cancelled, abandoned), ``<n>:turn``,
  ``<n>:text``, ``<n>:<stage>`` (the worker that runs its job) and ``<n>:<stage>_end`` (how
  that job ended);
* ``spec_reply``, ``spec_voice`` (streams): its outputs, entry IDs ``<n>-<seq>``, so the turn's
  own IDs and sequence numbers are untouched until it is adopted.

STT starts one on ``Likely`` (the LLM job carries ``spec=n``; it enqueues its TTS job with the
same ``spec``), cancels it on ``Resumed`` or a final transcript with other words, and adopts it
when the words match: the turn's real LLM and TTS jobs then carry ``adopt=n`` and copy its
entries into the turn's streams through their turn writers instead of running the models,
following them until they end. A speculative job runs once (a dead one is simply lost), writes
only while its speculation is live or adopted (a Lua check, so a cancelled one cannot add
anything after it was dropped), and is cancelled when its speculation is. An adopter whose
speculation is incomplete and no longer going anywhere (cancelled, its worker gone, its job
ended without the end entry) marks it abandoned and runs the model itself after what it copied.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from core.redisconn import RETRYABLE
from schemas.streams import parse_id

# The speculative streams expire this long after their last write, the record this long
# after the last speculation began (longer: its counter must outlive any entry it numbered).
STREAM_TTL_S = 120
RECORD_TTL_S = 24 * 3600
KEEP = 4  # records of this many recent speculations are kept (an adoption may still follow)
WATCH_S = 0.05  # how often a speculative job looks whether it was cancelled
START_WAIT_S = 5.0  # an adopter waits this long for a speculative job nobody has started
STREAMS = ("reply", "voice")

# KEYS: spec hash, spec_reply, spec_voice; ARGV: turn, text, record ttl s, keep
_START_LUA = """
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
local live = redis.call('HGET', KEYS[1], 'live')
if live and redis.call('HGET', KEYS[1], live .. ':state') == 'live' then
  redis.call('HSET', KEYS[1], live .. ':state', 'cancelled')
end
redis.call('HSET', KEYS[1], 'live', n, n .. ':state', 'live', n .. ':turn', ARGV[1],
           n .. ':text', ARGV[2])
local old = n - tonumber(ARGV[4])
if old > 0 then
  redis.call('HDEL', KEYS[1], old .. ':state', old .. ':turn', old .. ':text', old .. ':llm',
             old .. ':tts', old .. ':llm_end', old .. ':tts_end')
end
if n > 2 then
  redis.call('XTRIM', KEYS[2], 'MINID', (n - 2) .. '-0')
  redis.call('XTRIM', KEYS[3], 'MINID', (n - 2) .. '-0')
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return n
"""

# KEYS: spec hash, spec_reply, spec_voice; ARGV: n, to ("adopted" | "cancelled" |
# "abandoned"). Adopt and cancel only a live one, abandon only an adopted one; a cancelled
# one's entries go at once. Returns 1 when the state changed.
_SETTLE_LUA = """
local n, to = ARGV[1], ARGV[2]
local st = redis.call('HGET', KEYS[1], n .. ':state')
local from = (to == 'abandoned') and 'adopted' or 'live'
if st ~= from then
  return 0
end
redis.call('HSET', KEYS[1], n .. ':state', to)
if redis.call('HGET', KEYS[1], 'live') == n then
  redis.call('HDEL', KEYS[1], 'live')
end
if to == 'cancelled' then
  for k = 2, 3 do
    for _, e in ipairs(redis.call('XRANGE', KEYS[k], n .. '-0', n .. '-18446744073709551615')) do
      redis.call('XDEL', KEYS[k], e[1])
    end
  end
end
return 1
"""

# KEYS: spec hash, spec_reply, spec_voice, transcript, reply, voice; ARGV: n, turn, most,
# the final transcript's entry id ("": a previous run published it), field, value, ...
# The final transcript goes in, and a live speculation is adopted with what it has made so far
# copied into the turn's reply and voice (IDs <turn>-<seq>, as its adopters would): all at
# once, so the gateway reads the transcript and the first audio in one read. Returns
# {adopted (0/1), reply entries copied, voice entries copied}.
_ADOPT_LUA = """
if ARGV[4] ~= '' then
  local ok = redis.pcall('XADD', KEYS[4], ARGV[4], unpack(ARGV, 5))
  if type(ok) == 'table' and ok.err and not string.find(ok.err, 'equal or smaller') then
    return ok
  end
end
local n, turn = ARGV[1], ARGV[2]
if redis.call('HGET', KEYS[1], n .. ':state') ~= 'live' then
  return {0, 0, 0}
end
redis.call('HSET', KEYS[1], n .. ':state', 'adopted')
if redis.call('HGET', KEYS[1], 'live') == n then
  redis.call('HDEL', KEYS[1], 'live')
end
local out = {1, 0, 0}
for k = 2, 3 do
  local dst = KEYS[k + 3]
  local top = redis.call('XREVRANGE', dst, '+', '-', 'COUNT', 1)
  if #top == 0 or tonumber(string.match(top[1][1], '^(%d+)')) < tonumber(turn) then
    local entries = redis.call('XRANGE', KEYS[k], n .. '-1', n .. '-' .. ARGV[3])
    for i, e in ipairs(entries) do
      if tonumber(string.match(e[1], '(%d+)$')) ~= i then
        break
      end
      redis.call('XADD', dst, turn .. '-' .. i, unpack(e[2]))
      out[k] = i
    end
  end
end
return out
"""

# KEYS: spec hash, stream; ARGV: n, entry id, stream ttl ms, field, value, ...
# 1: written; 0: the ID is taken (a newer speculation wrote); -1: the speculation is off.
_WRITE_LUA = """
local st = redis.call('HGET', KEYS[1], ARGV[1] .. ':state')
if st ~= 'live' and st ~= 'adopted' then
  return -1
end
local ok = redis.pcall('XADD', KEYS[2], ARGV[2], unpack(ARGV, 4))
if type(ok) == 'table' and ok.err then
  return 0
end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""

# KEYS: spec hash; ARGV: n, stage, consumer. The job's first run claims it; any later run
# (a takeover, a rerun after a Redis outage) finds it claimed, as it does a settled one.
_CLAIM_LUA = """
local st = redis.call('HGET', KEYS[1], ARGV[1] .. ':state')
if st ~= 'live' and st ~= 'adopted' then
  return 0
end
return redis.call('HSETNX', KEYS[1], ARGV[1] .. ':' .. ARGV[2], ARGV[3])
"""


class SpeculationOff(Exception):
    """The speculation this job works for was cancelled, abandoned or superseded."""


def _script(redis, source: str):
    """A script object (cheap: a SHA1 of the source; EVALSHA, loaded on first use)."""
    return redis.register_script(source)


def _keys(keys, sid: str) -> list[str]:
    return [keys.session(sid, "spec"), *(keys.session(sid, f"spec_{s}") for s in STREAMS)]


def norm(text: str) -> str:
    """Words as the comparison of the early and the final transcript sees them."""
    return " ".join(text.lower().split())


# ------------------------------------------------------------------ STT: start and settle

async def start(redis, keys, sid: str, turn: int, text: str) -> int:
    """A new speculation on ``text`` for ``turn`` (a live one left by a dead listener is
    cancelled); returns its number. The caller enqueues its LLM job."""
    fn = _script(redis, _START_LUA)
    return int(await fn(keys=_keys(keys, sid), args=[turn, text, RECORD_TTL_S, KEEP]))


async def settle(redis, keys, sid: str, n: int, to: str) -> bool:
    """Adopt or cancel a live speculation, or abandon an adopted one (see _SETTLE_LUA)."""
    fn = _script(redis, _SETTLE_LUA)
    return bool(await fn(keys=_keys(keys, sid), args=[n, to]))


async def adopt_final(redis, keys, sid: str, n: int, turn: int, transcript_id: str | None,
                      fields: dict[str, Any], most: int = 8) -> tuple[bool, int, int]:
    """STT's confirmed end with the same words: the final transcript (entry ``transcript_id``,
    None when published already) and the adoption of live speculation ``n``, with up to
    ``most`` entries of each of its streams copied into the turn's (see _ADOPT_LUA). Returns
    (adopted, reply entries copied, voice entries copied); the adopters copy the rest. A few
    entries, not the whole reply: the gateway's first read stays small (65 voice entries,
    3 s of audio, took it 2-5 ms to read and relay before the first audio went out)."""
    fn = _script(redis, _ADOPT_LUA)
    flat = [x for kv in fields.items() for x in kv]
    ks = [*_keys(keys, sid), *(keys.session(sid, s) for s in ("transcript", *STREAMS))]
    got = await fn(keys=ks, args=[n, turn, most, transcript_id or "", *flat])
    return bool(got[0]), int(got[1]), int(got[2])


# ------------------------------------------------------------------ speculative jobs

async def claim(ctx, consumer: str) -> bool:
    """This speculative job's first and only run: False when it ran before or is off."""
    fn = _script(ctx.redis, _CLAIM_LUA)
    return bool(await fn(keys=[ctx.key("spec")], args=[ctx.job.spec, ctx.worker.stage.name,
                                                       consumer]))


async def ended(ctx, how: str) -> None:
    """Record how the speculative job ended; one that did not finish abandons an adopted
    speculation, so that its adopters stop waiting for it."""
    n, stage = ctx.job.spec, ctx.worker.stage.name
    await ctx.redis.hset(ctx.key("spec"), f"{n}:{stage}_end", how)
    if how != "done":
        await settle(ctx.redis, ctx.keys, ctx.sid, n, "abandoned")


async def write(ctx, stream: str, entry: str, fields: dict[str, Any]) -> bool:
    """Append a speculative entry while the speculation is on (else SpeculationOff)."""
    fn = _script(ctx.redis, _WRITE_LUA)
    flat = [x for kv in fields.items() for x in kv]
    got = await fn(keys=[ctx.key("spec"), ctx.key(f"spec_{stream}")],
                   args=[ctx.job.spec, entry, STREAM_TTL_S * 1000, *flat])
    if got == -1:
        raise SpeculationOff(f"speculation {ctx.job.spec} is off")
    if got == 0:  # a newer speculation's entries are above ours: this one can never complete
        raise SpeculationOff(f"speculation {ctx.job.spec} was overtaken by a newer one")
    return True


async def watch(ctx, task: asyncio.Task) -> None:
    """Cancel ``task`` (a speculative job) once its speculation is no longer live or adopted,
    or its turn was interrupted (a barge-in on the adopted reply: nothing more of it is
    wanted, and its adopters stopped already)."""
    key, field = ctx.key("spec"), f"{ctx.job.spec}:state"
    while True:
        try:
            async with ctx.redis.pipeline(transaction=False) as p:
                p.hget(key, field)
                p.get(ctx.key("cancel"))
                state, cancelled = await p.execute()
        except RETRYABLE:
            state, cancelled = b"live", None  # an outage: the job's own writes will tell
        if state not in (b"live", b"adopted", "live", "adopted"):
            break
        if cancelled is not None and int(cancelled) >= ctx.job.turn:
            break
        await asyncio.sleep(WATCH_S)
    ctx.interrupted = True
    task.cancel()


# ------------------------------------------------------------------ adopters

class _Follow:
    """Whether the speculation an adopter copies from can still complete; ``stages``: the
    jobs it depends on, the one whose stream is copied last."""

    def __init__(self, ctx, n: int, stages: tuple[str, ...]):
        self.ctx, self.n, self.stages = ctx, n, stages
        self.since = time.monotonic()

    async def going(self) -> bool:
        """The speculation can still deliver: adopted, and each of ``stages``' jobs either
        not started yet (for a while) or running on a live worker."""
        ctx, n = self.ctx, self.n
        names = ["state", *self.stages, *(f"{s}_end" for s in self.stages)]
        raw = await ctx.redis.hmget(ctx.key("spec"), [f"{n}:{x}" for x in names])
        vals = [v.decode() if isinstance(v, bytes) else v for v in raw]
        if vals[0] != "adopted":
            return False
        k = len(self.stages)
        for i, (owner, end) in enumerate(zip(vals[1:1 + k], vals[1 + k:], strict=True)):
            if end is not None:
                # upstream done is fine (the LLM ends before the TTS has spoken it all); the
                # job we copy from ended, and we have not seen its end entry: it never will
                if end != "done" or i == k - 1:
                    return False
                continue
            if owner is None:
                if time.monotonic() - self.since > START_WAIT_S:
                    return False
                continue
            if not await ctx.redis.exists(ctx.keys.alive(owner)):
                return False
        return True


async def adopt(ctx, stream: str, writer, is_end: Callable[[dict], bool],
                stages: tuple[str, ...], marks: tuple[str, ...] = ()) -> dict | None:
    """Copy speculation ``ctx.job.adopt``'s entries of ``stream`` into this turn's ``stream``
    through ``writer`` (one pipeline per batch), following them until the end entry, which it
    returns; ``marks`` are the turn's timing marks its first copy reaches. None (the
    speculation marked abandoned) when it cannot complete: the caller runs the model itself
    after what was copied."""
    end = await _copy(ctx, stream, writer, is_end, stages, marks)
    if end is not None:
        await ctx.mark(f"{stream}_adopted")
        ctx.log.info(f"{stream}_adopted", spec=ctx.job.adopt)
        return end
    ctx.worker.observer.speculation("abandoned")
    ctx.log.warning("speculation_abandoned", spec=ctx.job.adopt, stream=stream)
    return None


async def _copy(ctx, stream: str, writer, is_end: Callable[[dict], bool],
                stages: tuple[str, ...], marks: tuple[str, ...]) -> dict | None:
    n = ctx.job.adopt
    if await ctx.redis.hget(ctx.key("spec"), f"{n}:state") not in (b"adopted", "adopted"):
        # abandoned by an earlier run of this job (it may have written its own output since,
        # which the speculation's entries would not line up with), or forgotten
        return None
    key = ctx.key(f"spec_{stream}")
    after, expect = f"{n}-0", 1
    follow = _Follow(ctx, n, stages)
    last_try = False
    while True:
        res = await ctx.redis.xread({key: after}, count=512, block=50)
        entries = res[0][1] if res else []
        batch: list[dict] = []
        end = None
        broken = False
        for eid, fields in entries:
            major, seq = parse_id(eid)
            if major != n or seq != expect:  # overtaken by a newer one, or a gap
                broken = True
                break
            after, expect = eid, expect + 1
            batch.append(fields)
            if is_end(fields):
                end = fields
                break
        if batch:
            await writer.put_many(batch)
            for name in marks:
                await ctx.mark(name)  # once each: later calls return at once
        if end is not None:
            return end
        if broken or last_try:
            break
        if not entries and not await follow.going():
            last_try = True  # one more read: the end may have landed just before it ended
    await settle(ctx.redis, ctx.keys, ctx.sid, n, "abandoned")
    return None
