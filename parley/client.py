"""The reference client: plays Unreal's part of the protocol.

It streams a file in 20 ms chunks at real-time pace (as a microphone would), receives the reply,
answers ``ready`` for each segment once it has that segment's audio (as UE does when it is about
to play it), checks every sequence number, and writes reply.wav, face.csv and turn.json.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from websockets.asyncio.client import ClientConnection, connect

from parley.export import write_livelink_csv
from schemas import protocol as P


@dataclass
class SeqCheck:
    """Counts gaps and duplicates per (turn, channel)."""

    last: dict[tuple[int, str], int] = field(default_factory=dict)
    gaps: int = 0
    duplicates: int = 0
    where: list[str] = field(default_factory=list)  # "turn/channel: expected N, got M"

    def see(self, turn: int, channel: str, seq: int) -> bool:
        key = (turn, channel)
        prev = self.last.get(key, 0)
        if seq <= prev:
            self.duplicates += 1
            self.where.append(f"{turn}/{channel}: duplicate {seq} after {prev}")
            return False
        if seq > prev + 1:
            self.gaps += seq - prev - 1
            self.where.append(f"{turn}/{channel}: expected {prev + 1}, got {seq}")
        self.last[key] = seq
        return True


@dataclass
class TurnResult:
    session: str
    sid: str = ""
    turn: int = 0
    transcript: str = ""
    partials: list[str] = field(default_factory=list)
    reply: str = ""
    reply_rate: int = 0
    audio: list[np.ndarray] = field(default_factory=list)
    face_samples: list[np.ndarray] = field(default_factory=list)
    face_values: list[np.ndarray] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    done: dict | None = None
    seq: SeqCheck = field(default_factory=SeqCheck)
    segments_audio: set[tuple[int, int]] = field(default_factory=set)  # (turn, segment)
    ready_sent: dict[tuple[int, int], float] = field(default_factory=dict)
    face_before_ready: int = 0
    t_last_mic: float = 0.0
    t_first_audio: float = 0.0
    t_first_ready: float = 0.0
    t_first_face: float = 0.0
    t_final_transcript: float = 0.0
    t_done: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False
    played_samples: int | None = None

    @property
    def audio_samples(self) -> int:
        return sum(len(a) for a in self.audio)

    @property
    def face_frames(self) -> int:
        return sum(len(s) for s in self.face_samples)

    def latency_ms(self) -> dict[str, float | None]:
        def d(a: float, b: float) -> float | None:
            return round((b - a) * 1000, 1) if a and b else None

        return {
            "first_audio": d(self.t_last_mic, self.t_first_audio),
            "first_face": d(self.t_first_ready, self.t_first_face),
            "final_transcript": d(self.t_last_mic, self.t_final_transcript),
            "turn_done": d(self.t_last_mic, self.t_done),
        }

    def waterfall_ms(self) -> dict[str, float]:
        """Each step of the turn in ms after the end of the player's speech (server clocks)."""
        t = self.timings
        if "eos" not in t:
            return {}
        order = ["eos", "final_transcript", "llm_start", "first_token", "first_fragment",
                 "tts_first_chunk", "first_face", "gw_first_audio", "ready", "gw_first_face"]
        steps = {k: round(t[k] - t["eos"], 1) for k in order if k in t}
        steps.update({k: round(v, 1) for k, v in t.items() if k.endswith("_ms")})
        return steps

    def summary(self) -> dict:
        return {
            "session": self.session, "sid": self.sid, "turn": self.turn,
            "transcript": self.transcript, "reply": self.reply,
            "reply_sample_rate": self.reply_rate,
            "reply_audio_s": round(self.audio_samples / self.reply_rate, 3)
            if self.reply_rate else 0.0,
            "face_frames": self.face_frames,
            "latency_ms": self.latency_ms(),
            "seq_gaps": self.seq.gaps, "seq_duplicates": self.seq.duplicates,
            "seq_problems": self.seq.where,
            "face_before_ready": self.face_before_ready,
            "errors": self.errors, "turn_done": self.done,
            "waterfall_ms": self.waterfall_ms(),
            "interrupted": self.interrupted, "played_samples": self.played_samples,
        }

    def write(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        pcm = np.concatenate(self.audio) if self.audio else np.zeros(0, np.int16)
        sf.write(out / "reply.wav", pcm, self.reply_rate or 22050, subtype="PCM_16")
        write_livelink_csv(out / "face.csv", self.face_samples, self.face_values,
                           self.reply_rate or 22050)
        (out / "turn.json").write_text(json.dumps(self.summary(), indent=2) + "\n")


def load_mic(path: str | Path) -> tuple[np.ndarray, int]:
    """Any file soundfile reads, as int16 frames (n, channels) at its own rate."""
    data, rate = sf.read(str(path), dtype="int16", always_2d=True)
    return data, rate


class Client:
    """One WebSocket connection, any number of NPC sessions on it."""

    def __init__(self, ws: ClientConnection, ready_delay_s: float = 0.0):
        self.ws = ws
        self.ready_delay_s = ready_delay_s
        self.turns: dict[str, TurnResult] = {}
        self.opened: dict[str, P.SessionOpened] = {}
        self.by_channel: dict[int, str] = {}
        self.errors: list[P.ErrorEvent] = []
        self._waiters: dict[str, asyncio.Future] = {}
        self._done: dict[str, asyncio.Event] = {}
        self._reader: asyncio.Task | None = None
        self.welcome: P.Welcome | None = None
        self.messages: list[P.Message] = []  # every JSON message received, in order
        self.next_seq: dict[str, int] = {}  # mic chunk numbering runs on across utterances
        # every reply-audio chunk's place on the timeline: (turn, seq, sample, samples)
        self.chunks: dict[str, list[tuple[int, int, int, int]]] = {}
        self.done_turns: dict[tuple[str, int], P.TurnDone] = {}
        self._turn_events: dict[tuple[str, int], asyncio.Event] = {}

    @classmethod
    async def connect(cls, url: str, token: str | None = None, **kw) -> Client:
        ws = await connect(url, max_size=16 * 1024 * 1024, compression=None)
        client = cls(ws, **kw)
        client._reader = asyncio.create_task(client._read_loop())
        await client.send(P.Hello(client="parley-say", token=token))
        client.welcome = await client.wait_for("welcome")
        return client

    async def reconnect(self, url: str, token: str | None = None) -> None:
        """After the link (or the gateway) died: a new connection, then `resume` for every
        session with the last sequence number seen per channel, so nothing is missed and
        nothing comes twice."""
        if self._reader:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self.ws = await connect(url, max_size=16 * 1024 * 1024, compression=None)
        self._reader = asyncio.create_task(self._read_loop())
        self._waiters.pop("welcome", None)
        await self.send(P.Hello(client="parley-say", token=token))
        await self.wait_for("welcome")
        for session, opened in list(self.opened.items()):
            tr = self.turns[session]
            turn = max([t for t, _ in tr.seq.last] or [0])
            last = {ch: seq for (t, ch), seq in tr.seq.last.items() if t == turn}
            self._waiters.pop(f"opened:{session}", None)
            await self.send(P.Resume(session=session, sid=opened.sid,
                                     resume_secret=opened.resume_secret or "", turn=turn,
                                     last=last, mic_seq=self.next_seq.get(session)))
            again = await self.wait_for(f"opened:{session}")
            if isinstance(again, P.ErrorEvent):
                raise RuntimeError(f"resume {session}: {again.code}: {again.message}")
            self.by_channel.pop(opened.channel, None)
            again.resume_secret = opened.resume_secret  # sent only in answer to open
            self.opened[session] = again
            self.by_channel[again.channel] = session
            # a ready the dead gateway never stored would hold the face back: send them again
            for (t, segment) in list(tr.ready_sent):
                await self.send(P.Ready(session=session, turn=t, segment=segment))

    async def close(self) -> None:
        await self.ws.close()
        if self._reader:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def send(self, msg: P.Message | bytes) -> None:
        await self.ws.send(msg if isinstance(msg, bytes) else P.encode(msg))

    async def wait_for(self, key: str, timeout: float = 10.0):
        fut = self._waiters.setdefault(key, asyncio.get_running_loop().create_future())
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        finally:
            if fut.done():
                self._waiters.pop(key, None)

    def _resolve(self, key: str, value) -> None:
        fut = self._waiters.get(key)
        if fut is None:
            fut = self._waiters[key] = asyncio.get_running_loop().create_future()
        if not fut.done():
            fut.set_result(value)

    async def open(self, session: str, npc: str, rate: int, channels: int,
                   fmt: str = "s16le", persona: str | None = None,
                   endpoint: str | None = None) -> P.SessionOpened:
        self.turns[session] = TurnResult(session=session)
        self._done[session] = asyncio.Event()
        await self.send(P.OpenSession(session=session, npc=npc, sample_rate=rate,
                                      channels=channels, format=fmt, persona=persona,
                                      endpoint=endpoint))
        opened = await self.wait_for(f"opened:{session}")
        if isinstance(opened, P.ErrorEvent):
            raise RuntimeError(f"open {session}: {opened.code}: {opened.message}")
        self.opened[session] = opened
        self.next_seq[session] = opened.next_mic_seq
        self.by_channel[opened.channel] = session
        self.turns[session].sid = opened.sid
        return opened

    async def stream(self, session: str, frames: np.ndarray, rate: int, chunk_ms: int = 20,
                     realtime: bool = True, end_of_utterance: bool = True,
                     tail_silence_ms: int = 0) -> None:
        """Send int16 frames (n, channels) in chunk_ms pieces, paced like a microphone."""
        opened = self.opened[session]
        step = max(1, rate * chunk_ms // 1000)
        if tail_silence_ms:
            pad = np.zeros((rate * tail_silence_ms // 1000, frames.shape[1]), frames.dtype)
            frames = np.concatenate([frames, pad])
        seq = self.next_seq[session]
        t0 = time.perf_counter()
        for i, start in enumerate(range(0, len(frames), step)):
            chunk = frames[start:start + step]
            await self.send(P.MicAudio(opened.channel, seq, chunk.astype("<i2").tobytes())
                            .encode())
            seq += 1
            self.next_seq[session] = seq
            if realtime:
                due = t0 + (i + 1) * chunk_ms / 1000
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
        self.turns[session].t_last_mic = time.perf_counter()
        if end_of_utterance:
            await self.send(P.EndOfUtterance(session=session))

    async def wait_turn(self, session: str, turn: int, timeout: float = 60.0) -> P.TurnDone:
        """Until turn_done of that very turn (a session has many turns)."""
        ev = self._turn_events.setdefault((session, turn), asyncio.Event())
        await asyncio.wait_for(ev.wait(), timeout)
        return self.done_turns[(session, turn)]

    def played_samples(self, session: str) -> int:
        """What UE would have played by now: its audio clock starts at the first ready."""
        tr = self.turns[session]
        if not tr.t_first_ready or not tr.reply_rate:
            return 0
        elapsed = time.perf_counter() - tr.t_first_ready
        return min(tr.audio_samples, int(elapsed * tr.reply_rate))

    async def wait_done(self, session: str, timeout: float = 60.0) -> TurnResult:
        await asyncio.wait_for(self._done[session].wait(), timeout)
        return self.turns[session]

    async def _read_loop(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            await self._read(self.ws)
        except ConnectionClosed:
            pass  # reconnect() starts a new reader

    async def _read(self, ws) -> None:
        async for message in ws:
            now = time.perf_counter()
            if isinstance(message, bytes):
                await self._on_binary(P.decode_binary(message), now)
            else:
                await self._on_text(P.decode_text(message, P.SERVER_MESSAGES, strict=False), now)

    async def _on_text(self, msg: P.Message, now: float) -> None:
        self.messages.append(msg)
        if isinstance(msg, P.Welcome):
            self._resolve("welcome", msg)
        elif isinstance(msg, P.SessionOpened):
            self._resolve(f"opened:{msg.session}", msg)
        elif isinstance(msg, P.ErrorEvent):
            self.errors.append(msg)
            self._resolve(f"error:{msg.code}", msg)
            if msg.session and f"opened:{msg.session}" in self._waiters:
                self._resolve(f"opened:{msg.session}", msg)
            tr = self.turns.get(msg.session or "")
            if tr is not None:
                tr.errors.append(msg.to_dict())
                if msg.turn is not None:  # a failed turn ends the wait
                    self._done[msg.session].set()
        elif isinstance(msg, P.Transcript):
            tr = self.turns[msg.session]
            if tr.seq.see(msg.turn, "transcript", msg.seq):
                tr.turn = msg.turn
                if msg.final:
                    tr.transcript = msg.text
                    tr.t_final_transcript = now
                else:
                    tr.partials.append(msg.text)
        elif isinstance(msg, P.ReplyText):
            tr = self.turns[msg.session]
            if tr.seq.see(msg.turn, "reply", msg.seq) and msg.final:
                tr.reply = msg.text
        elif isinstance(msg, P.StopPlayback):
            # As UE does: stop the audio, say how far it got.
            tr = self.turns[msg.session]
            tr.interrupted = True
            tr.played_samples = self.played_samples(msg.session)
            await self.send(P.Interrupt(session=msg.session, played_samples=tr.played_samples))
        elif isinstance(msg, P.TurnDone):
            tr = self.turns[msg.session]
            tr.done = msg.to_dict()
            tr.t_done = now
            tr.timings = dict(msg.timings or {})
            tr.interrupted = tr.interrupted or msg.interrupted
            self.done_turns[(msg.session, msg.turn)] = msg
            self._turn_events.setdefault((msg.session, msg.turn), asyncio.Event()).set()
            self._done[msg.session].set()
        elif isinstance(msg, P.Pong):
            self._resolve(f"pong:{msg.id}", msg)

    async def _on_binary(self, frame, now: float) -> None:
        session = self.by_channel.get(frame.channel)
        if session is None:
            return
        tr = self.turns[session]
        if isinstance(frame, P.ReplyAudio):
            self.chunks.setdefault(session, []).append(
                (frame.turn, frame.seq, frame.sample, len(frame.pcm) // 2))
            if not tr.seq.see(frame.turn, "audio", frame.seq):
                return
            if not tr.t_first_audio:
                tr.t_first_audio = now
            tr.reply_rate = frame.sample_rate
            tr.audio.append(np.frombuffer(frame.pcm, dtype="<i2"))
            if (frame.turn, frame.segment) not in tr.segments_audio:
                tr.segments_audio.add((frame.turn, frame.segment))
                # UE buffers the first chunk of a segment, then says it is about to play it.
                asyncio.get_running_loop().call_later(
                    self.ready_delay_s, lambda s=frame.segment, t=frame.turn:
                    asyncio.ensure_future(self._ready(session, t, s)))
        elif isinstance(frame, P.FaceFrames):
            if not tr.seq.see(frame.turn, "face", frame.seq):
                return
            if (frame.turn, frame.segment) not in tr.ready_sent:
                tr.face_before_ready += len(frame.samples)
            if not tr.t_first_face:
                tr.t_first_face = now
            tr.face_samples.append(frame.samples)
            tr.face_values.append(frame.values)

    async def _ready(self, session: str, turn: int, segment: int) -> None:
        tr = self.turns[session]
        now = time.perf_counter()
        tr.ready_sent[(turn, segment)] = now
        if not tr.t_first_ready:
            tr.t_first_ready = now
        await self.send(P.Ready(session=session, turn=turn, segment=segment))


async def say(url: str, wav: str | Path, out: str | Path | None, npc: str = "guard",
              realtime: bool = True, timeout: float = 120.0, token: str | None = None,
              session: str = "npc-1") -> TurnResult:
    frames, rate = load_mic(wav)
    client = await Client.connect(url, token=token)
    try:
        # a recorded question is one turn, however long its pauses: the file's end ends it
        await client.open(session, npc, rate, frames.shape[1], endpoint="client")
        await client.stream(session, frames, rate, realtime=realtime)
        result = await client.wait_done(session, timeout)
    finally:
        await client.close()
    if out is not None:
        result.write(Path(out))
    return result
