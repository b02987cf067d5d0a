"""Replay, the I/O: plays a recording's steps (parley/replay.py) into a gateway as a new session,
then reads that session back from the fleet's Redis and compares.

The client is the reference client (parley/client.py) with UE's own decisions taken away: it
neither answers ``ready`` nor ``stop`` by itself, the recording does, at the recorded moments and
with the recorded played positions.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from core.redisconn import connect
from parley import recording as R
from parley.client import Client
from parley.replay import PLAYBACK_SLACK_MS, Report, Step, compare, plan
from schemas import protocol as P
from schemas.streams import SPEAKER_FIELD, SPEAKER_START, Keys

NEED_TIMEOUT_S = 30.0


class ReplayClient(Client):
    """Says ``ready`` and ``interrupt`` only when told; records what arrived."""

    def __init__(self, ws, **kw):
        super().__init__(ws, **kw)
        self.flags: dict[tuple, asyncio.Event] = {}
        self.replay_ready: dict[int, float] = {}  # turn -> loop time of its first ready

    def flag(self, key: tuple) -> asyncio.Event:
        return self.flags.setdefault(key, asyncio.Event())

    async def _ready(self, session: str, turn: int, segment: int) -> None:
        self.flag(("audio", turn, segment)).set()
        self.flag(("audio", turn, None)).set()

    async def _on_stop(self, msg: P.StopPlayback) -> None:
        self.stopped.add((msg.session, msg.turn))
        self.flag(("stop", msg.turn)).set()

    def _on_turn_done(self, msg: P.TurnDone, now: float) -> None:
        super()._on_turn_done(msg, now)
        self.flag(("done", msg.turn)).set()


@dataclass
class ReplayResult:
    sid: str
    original: R.Recording
    replay: R.Recording
    report: Report
    waits: list[str] = field(default_factory=list)  # needs that never came


async def _need(client: ReplayClient, session: str, need: tuple) -> None:
    if need[0] == "played":  # the reply of that turn has played out in the replay too
        turn = need[1]
        await client.flag(("done", turn)).wait()
        start = client.replay_ready.get(turn)
        rate = client.reply_rates.get((session, turn))
        if start is None or not rate or (session, turn) in client.stopped:
            return
        end = start + (client.reply_end[(session, turn)] / rate) + PLAYBACK_SLACK_MS / 1000
        await asyncio.sleep(max(0.0, end + 0.1 - asyncio.get_running_loop().time()))
        return
    await client.flag(need).wait()


async def _send(client: ReplayClient, session: str, rec: R.Recording, e: dict) -> None:
    kind = e["kind"]
    if kind == "mic":
        channel = client.opened[session].channel
        await client.send(P.MicAudio(channel, e["seq"], rec.pcm(e)).encode())
        client.next_seq[session] = e["seq"] + 1
    elif kind == "end_of_utterance":
        await client.send(P.EndOfUtterance(session=session))
    elif kind == "ready":
        turn = e["turn"]
        loop = asyncio.get_running_loop()
        client.replay_ready.setdefault(turn, loop.time())
        client.first_ready.setdefault((session, turn), time.perf_counter())
        await client.send(P.Ready(session=session, turn=turn, segment=e["segment"]))
    elif kind == "interrupt":
        await client.send(P.Interrupt(session=session, played_samples=e.get("played")))
    elif kind == "close":
        await client.send(P.CloseSession(session=session))


async def play(client: ReplayClient, session: str, rec: R.Recording,
               steps: list[Step]) -> list[str]:
    """Send every step at its moment; returns the waits that timed out."""
    loop = asyncio.get_running_loop()
    missed: list[str] = []
    last = loop.time()
    for step in steps:
        for need in step.needs:
            try:
                await asyncio.wait_for(_need(client, session, need), NEED_TIMEOUT_S)
            except TimeoutError:
                missed.append(f"{step.event['kind']} waited {NEED_TIMEOUT_S:.0f} s for {need}")
        if step.anchor is not None and step.anchor in client.replay_ready:
            target = client.replay_ready[step.anchor] + step.delay_ms / 1000
        else:
            target = last + step.delay_ms / 1000
        delay = target - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        last = max(target, loop.time()) if delay > -0.05 else loop.time()
        await _send(client, session, rec, step.event)
    return missed


async def replay(url: str, rec: R.Recording, redis_url: str, prefix: str = "parley",
                 fast: bool = False, turns: set[int] | None = None, token: str | None = None,
                 token_name: str | None = None, session: str = "replay") -> ReplayResult:
    """Play ``rec`` into the gateway at ``url`` as a new session of the fleet whose Redis is
    ``redis_url``; read it back and compare."""
    steps = plan(rec, fast=fast, turns=turns)
    m = rec.meta
    client = await ReplayClient.connect(url, token=token, token_name=token_name)
    r = connect(redis_url)
    try:
        opened = await client.open(session, m["npc"], int(m["sample_rate"]), int(m["channels"]),
                                   fmt=m["format"], persona=m.get("persona") or None,
                                   endpoint=m.get("endpoint") or None)
        # the idle face's blinks come from the recorded session's seed, not the new sid
        await r.hset(Keys(prefix).session(opened.sid, "meta"), "seed",
                     m.get("seed") or rec.sid)
        if m.get(SPEAKER_START):  # the recognizer starts where the recorded session's did
            await r.hset(Keys(prefix).listener(opened.sid), SPEAKER_FIELD, m[SPEAKER_START])
        missed = await play(client, session, rec, steps)
        if not any(s.event["kind"] == "close" for s in steps):
            for turn in rec.turns:
                if turns is None or turn <= max(turns):
                    try:
                        await asyncio.wait_for(client.flag(("done", turn)).wait(),
                                               NEED_TIMEOUT_S)
                    except TimeoutError:
                        missed.append(f"turn {turn} never finished in the replay")
        else:
            with_close = [s for s in steps if s.event["kind"] == "close"]
            if with_close:
                await asyncio.sleep(0.2)  # the gateway's background control writes
        await asyncio.sleep(0.3)
        replayed = await R.load(r, opened.sid, prefix)
    finally:
        await client.close()
        await r.aclose()
    return ReplayResult(opened.sid, rec, replayed, compare(rec.turns, replayed.turns, turns),
                        missed)
