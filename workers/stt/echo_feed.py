"""The echo gate's I/O in the STT worker: UE's play clock and the reply audio, from Redis.

The gateway writes a ``playing`` event per segment when UE says ``ready`` (stamped with the time
it came in); mic entries carry the time they came in. One XREAD takes the mic and the events
together, so every mic chunk that arrived after a ``ready`` is read with, or after, that ready:
the gate knows the reply plays before it judges the audio that could hold its echo. The reply
audio itself is read from the voice stream for as long as a turn UE started is still being
spoken by TTS.
"""

from __future__ import annotations

import numpy as np

from schemas.streams import EventEntry, VoiceEntry
from workers.stt.echo import EchoGate

LOOKBACK_MS = 10_000  # a reply may start playing just before its listening job is read
_MAX_SEQ = 2 ** 64 - 1


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else x


class EchoFeed:
    def __init__(self, ctx, gate: EchoGate):
        self.ctx = ctx
        self.gate = gate
        # the reply to the utterance before this one, and any later one, can play meanwhile
        self.min_turn = ctx.turn - 1
        self.events_cursor = f"{max(0, int(ctx.job.ts) - LOOKBACK_MS)}-0"
        self.voice_seq: dict[int, int] = {}  # turn -> last voice entry read

    async def read(self, mic_cursor: str, block_ms: int, count: int) -> list[tuple[str, dict]]:
        """Mic entries after ``mic_cursor`` (as JobContext.read), the gate brought up to date
        with everything UE started playing before the newest of them arrived."""
        ctx = self.ctx
        mic_key, ev_key = ctx.key("mic"), ctx.key("events")
        res = await ctx.redis.xread({mic_key: mic_cursor, ev_key: self.events_cursor},
                                    count=count, block=block_ms)
        mic: list[tuple[str, dict]] = []
        for key, entries in res or []:
            if _s(key) == ev_key:
                for eid, fields in entries:
                    self.events_cursor = _s(eid)
                    self._event(EventEntry.from_fields(fields))
            else:
                mic = [(_s(eid), fields) for eid, fields in entries]
        if self.gate.playing_turns:
            await self._voice()
        return mic

    def _event(self, ev: EventEntry) -> None:
        if ev.turn < self.min_turn:
            return
        if ev.kind == "playing" and ev.code.isdigit():
            self.gate.played(ev.turn, int(ev.code), ts_ms=ev.ts)
        elif ev.kind == "interrupt" and ev.turn < self.ctx.turn:
            self.gate.cut()  # UE stops the reply: no more of it will sound
        elif ev.kind == "error":
            self.gate.turn_end(ev.turn)  # a failed turn sends no more audio

    async def _voice(self) -> None:
        key = self.ctx.key("voice")
        for turn in self.gate.playing_turns:
            last = self.voice_seq.get(turn, 0)
            entries = await self.ctx.redis.xrange(key, min=f"{turn}-{last + 1}",
                                                  max=f"{turn}-{_MAX_SEQ}")
            for eid, fields in entries:
                self.voice_seq[turn] = int(_s(eid).partition("-")[2])
                v = VoiceEntry.from_fields(fields)
                if v.end:
                    self.gate.turn_end(turn)
                elif v.pcm:
                    self.gate.reference(turn, v.segment, v.sample,
                                        np.frombuffer(v.pcm, "<i2"), v.rate)
