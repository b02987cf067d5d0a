"""The reference client: plays Unreal's part of the protocol.

It streams a file in 20 ms chunks at real-time pace (as a microphone would), in the file's own
sample format (int16 files as s16le, float and 24/32-bit files as f32le), receives the reply,
answers ``ready`` for each segment once it has that segment's audio (as UE does when it is about
to play it), checks every sequence number, stays until the reply has played (on a clock that
starts at the first ``ready``, as UE's audio would), and writes reply.wav, face.csv and turn.json.
A turn that produces nothing ends with a message that says what did not come.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    stayed_s: float = 0.0  # how long the client stayed after turn_done for the reply to play

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
            "stayed_after_turn_done_s": self.stayed_s,
        }

    def write(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        pcm = np.concatenate(self.audio) if self.audio else np.zeros(0, np.int16)
        sf.write(out / "reply.wav", pcm, self.reply_rate or 22050, subtype="PCM_16")
        write_livelink_csv(out / "face.csv", self.face_samples, self.face_values,
                           self.reply_rate or 22050)
        (out / "turn.json").write_text(json.dumps(self.summary(), indent=2) + "\n")


# Subtypes that fit int16 exactly; everything else (float, double, 24/32-bit, lossy codecs) is
# read as float32, which libsndfile scales to -1..1. Reading a float file as int16 does not
# scale (libsndfile's default), so speech would arrive as samples of -1, 0 and +1.
INT16_SUBTYPES = frozenset({"PCM_16", "PCM_S8", "PCM_U8", "ULAW", "ALAW"})


@dataclass
class MicFile:
    """A sound file as mic audio: frames (n, channels) in the format the session will use."""

    frames: np.ndarray  # int16 for s16le, float32 for f32le
    rate: int
    format: str  # "s16le" | "f32le"
    subtype: str = ""

    @property
    def channels(self) -> int:
        return self.frames.shape[1]

    @property
    def duration_s(self) -> float:
        return len(self.frames) / self.rate if self.rate else 0.0

    @property
    def peak_dbfs(self) -> float:
        """Loudest sample relative to full scale (-inf for digital silence)."""
        if not self.frames.size:
            return float("-inf")
        peak = float(np.max(np.abs(self.frames.astype(np.float64))))
        if self.format == "s16le":
            peak /= 32768.0
        return 20 * np.log10(peak) if peak > 0 else float("-inf")


def load_mic(path: str | Path) -> MicFile:
    """Any file soundfile reads, in its own format: int16 stays int16, float stays float."""
    subtype = sf.info(str(path)).subtype
    if subtype in INT16_SUBTYPES:
        data, rate = sf.read(str(path), dtype="int16", always_2d=True)
        return MicFile(data, rate, "s16le", subtype)
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return MicFile(data, rate, "f32le", subtype)


def to_pcm(frames: np.ndarray, fmt: str) -> bytes:
    """Interleaved frames as the session's wire format, scaling between int16 and float."""
    if fmt == "f32le":
        if frames.dtype.kind in "iu":
            return (frames.astype("<f4") / 32768.0).tobytes()
        return frames.astype("<f4").tobytes()
    if frames.dtype.kind == "f":
        return (np.clip(frames, -1.0, 32767 / 32768) * 32768).astype("<i2").tobytes()
    return frames.astype("<i2").tobytes()


class SayError(RuntimeError):
    """`say` got no complete turn; the message says what did not come and what to check."""


class Client:
    """One WebSocket connection, any number of NPC sessions on it."""

    # How long open() keeps asking a fleet that answers ``overloaded`` (it says so before anyone
    # speaks, and admits again once it has caught up), as a game would; 0: raise at once.
    overloaded_wait_s: float = 0.0

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
        self.formats: dict[str, str] = {}  # session -> mic sample format from open
        self._final: dict[str, asyncio.Event] = {}  # a final transcript came
        self._stopped: dict[str, asyncio.Event] = {}  # the server said stop
        self.closed = asyncio.Event()  # the connection is gone (reconnect() starts anew)
        # UE's playback clock per (session, turn): first ready, reply rate, end of the audio
        self.first_ready: dict[tuple[str, int], float] = {}
        self.reply_rates: dict[tuple[str, int], int] = {}
        self.reply_end: dict[tuple[str, int], int] = {}
        self.stopped: set[tuple[str, int]] = set()
        # every reply-audio chunk's place on the timeline: (turn, seq, sample, samples)
        self.chunks: dict[str, list[tuple[int, int, int, int]]] = {}
        self.done_turns: dict[tuple[str, int], P.TurnDone] = {}
        self._turn_events: dict[tuple[str, int], asyncio.Event] = {}

    @classmethod
    async def connect(cls, url: str, token: str | None = None, token_name: str | None = None,
                      **kw) -> Client:
        ws = await connect(url, max_size=16 * 1024 * 1024, compression=None)
        client = cls(ws, **kw)
        client._reader = asyncio.create_task(client._read_loop())
        await client.send(P.Hello(client="parley-say", token=token, token_name=token_name))
        client.welcome = await client.wait_for("welcome")
        return client

    async def reconnect(self, url: str, token: str | None = None,
                        token_name: str | None = None) -> None:
        """After the link (or the gateway) died: a new connection, then `resume` for every
        session with the last sequence number seen per channel, so nothing is missed and
        nothing comes twice."""
        if self._reader:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self.ws = await connect(url, max_size=16 * 1024 * 1024, compression=None)
        self._reader = asyncio.create_task(self._read_loop())
        self._waiters.pop("welcome", None)
        await self.send(P.Hello(client="parley-say", token=token, token_name=token_name))
        await self.wait_for("welcome")
        for session, opened in list(self.opened.items()):
            tr = self.turns[session]
            # from the oldest turn not yet done (a newer one must not hide it), else the latest
            seen = {t for t, _ in tr.seq.last}
            unfinished = [t for t in seen if (session, t) not in self.done_turns]
            turn = min(unfinished) if unfinished else max(seen or [0])
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

    def new_turn(self, session: str) -> TurnResult:
        """Start measuring a new turn of ``session`` (one TurnResult per session: the next
        ``wait_done`` waits for the next turn_done)."""
        opened = self.opened.get(session)
        self.turns[session] = TurnResult(session=session, sid=opened.sid if opened else "")
        self._done[session] = asyncio.Event()
        return self.turns[session]

    async def open(self, session: str, npc: str, rate: int, channels: int,
                   fmt: str = "s16le", persona: str | None = None,
                   endpoint: str | None = None,
                   overloaded_wait_s: float | None = None,
                   player: str | None = None) -> P.SessionOpened:
        """Open an NPC session; ``overloaded_wait_s`` (default: the class's): how long to keep
        asking while the fleet answers ``overloaded``; ``player``: who speaks (their sessions
        share what the recognizer learned about their voice). Raises RuntimeError on a
        refusal."""
        wait = self.overloaded_wait_s if overloaded_wait_s is None else overloaded_wait_s
        deadline = time.monotonic() + wait
        pause = 0.25
        while True:
            try:
                return await self._open(session, npc, rate, channels, fmt, persona, endpoint,
                                        player)
            except RuntimeError as exc:
                if ": overloaded:" not in str(exc) or time.monotonic() + pause > deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(2 * pause, 2.0)

    async def _open(self, session: str, npc: str, rate: int, channels: int, fmt: str,
                    persona: str | None, endpoint: str | None,
                    player: str | None = None) -> P.SessionOpened:
        self.turns[session] = TurnResult(session=session)
        self._done[session] = asyncio.Event()
        self._final[session] = asyncio.Event()
        self._stopped[session] = asyncio.Event()
        self.formats[session] = fmt
        await self.send(P.OpenSession(session=session, npc=npc, sample_rate=rate,
                                      channels=channels, format=fmt, persona=persona,
                                      endpoint=endpoint, player=player))
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
        """Send frames (n, channels) in chunk_ms pieces, paced like a microphone, in the
        session's format (int16 or float frames are scaled to it)."""
        opened = self.opened[session]
        step = max(1, rate * chunk_ms // 1000)
        if tail_silence_ms:
            pad = np.zeros((rate * tail_silence_ms // 1000, frames.shape[1]), frames.dtype)
            frames = np.concatenate([frames, pad])
        fmt = self.formats.get(session, "s16le")
        seq = self.next_seq[session]
        t0 = time.perf_counter()
        for i, start in enumerate(range(0, len(frames), step)):
            chunk = frames[start:start + step]
            await self.send(P.MicAudio(opened.channel, seq, to_pcm(chunk, fmt)).encode())
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

    def _latest_turn(self, session: str) -> int:
        return max((t for s, t in self.reply_end if s == session), default=0)

    def played_samples(self, session: str, turn: int | None = None) -> int:
        """What UE would have played of ``turn`` (default: the latest reply) by now: its audio
        clock starts at the turn's first ready and runs at the reply rate."""
        key = (session, self._latest_turn(session) if turn is None else turn)
        start, rate = self.first_ready.get(key), self.reply_rates.get(key)
        if start is None or not rate:
            return 0
        return min(self.reply_end[key], int((time.perf_counter() - start) * rate))

    def playback_left_s(self, session: str, turn: int | None = None) -> float:
        """How long UE would still be playing the reply it has, on the clock of played_samples;
        0 once the server said stop for it."""
        key = (session, self._latest_turn(session) if turn is None else turn)
        start, rate = self.first_ready.get(key), self.reply_rates.get(key)
        if key in self.stopped or start is None or not rate:
            return 0.0
        return max(0.0, start + self.reply_end[key] / rate - time.perf_counter())

    async def wait_played(self, session: str) -> float:
        """As UE does: stay until the latest reply has played, or until the server says stop
        (the interrupt then goes out with what was played). Returns the seconds waited."""
        t0 = time.perf_counter()
        stopped = self._stopped[session]
        while (left := self.playback_left_s(session)) > 0:
            stopped.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopped.wait(), left)
        return time.perf_counter() - t0

    async def wait_done(self, session: str, timeout: float = 60.0) -> TurnResult:
        await asyncio.wait_for(self._done[session].wait(), timeout)
        return self.turns[session]

    async def _read_loop(self) -> None:
        from websockets.exceptions import ConnectionClosed

        self.closed.clear()
        try:
            await self._read(self.ws)
        except ConnectionClosed:
            pass  # reconnect() starts a new reader
        finally:
            self.closed.set()

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
            self._on_error(msg)
        elif isinstance(msg, P.Transcript):
            self._on_transcript(msg, now)
        elif isinstance(msg, P.ReplyText):
            tr = self.turns[msg.session]
            if tr.seq.see(msg.turn, "reply", msg.seq) and msg.final:
                tr.reply = msg.text
        elif isinstance(msg, P.StopPlayback):
            await self._on_stop(msg)
        elif isinstance(msg, P.TurnDone):
            self._on_turn_done(msg, now)
        elif isinstance(msg, P.Pong):
            self._resolve(f"pong:{msg.id}", msg)

    def _on_error(self, msg: P.ErrorEvent) -> None:
        self.errors.append(msg)
        self._resolve(f"error:{msg.code}", msg)
        if msg.session and f"opened:{msg.session}" in self._waiters:
            self._resolve(f"opened:{msg.session}", msg)
        tr = self.turns.get(msg.session or "")
        if tr is not None:
            tr.errors.append(msg.to_dict())
            if msg.turn is not None:  # a failed turn ends the wait
                self._done[msg.session].set()

    def _on_transcript(self, msg: P.Transcript, now: float) -> None:
        tr = self.turns[msg.session]
        if not tr.seq.see(msg.turn, "transcript", msg.seq):
            return
        tr.turn = msg.turn
        if msg.final:
            tr.transcript = msg.text
            tr.t_final_transcript = now
            self._final[msg.session].set()
        else:
            tr.partials.append(msg.text)

    async def _on_stop(self, msg: P.StopPlayback) -> None:
        # As UE does: stop the audio, say how far it got.
        tr = self.turns[msg.session]
        tr.interrupted = True
        tr.played_samples = self.played_samples(msg.session, msg.turn)
        self.stopped.add((msg.session, msg.turn))
        self._stopped[msg.session].set()
        await self.send(P.Interrupt(session=msg.session, played_samples=tr.played_samples))

    def _on_turn_done(self, msg: P.TurnDone, now: float) -> None:
        tr = self.turns[msg.session]
        tr.done = msg.to_dict()
        tr.t_done = now
        tr.timings = dict(msg.timings or {})
        tr.interrupted = tr.interrupted or msg.interrupted
        self.done_turns[(msg.session, msg.turn)] = msg
        self._turn_events.setdefault((msg.session, msg.turn), asyncio.Event()).set()
        self._done[msg.session].set()

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
            key = (session, frame.turn)
            self.reply_rates[key] = frame.sample_rate
            self.reply_end[key] = max(self.reply_end.get(key, 0),
                                      frame.sample + len(frame.pcm) // 2)
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
        self.first_ready.setdefault((session, turn), now)
        if not tr.t_first_ready:
            tr.t_first_ready = now
        await self.send(P.Ready(session=session, turn=turn, segment=segment))


async def say(url: str, wav: str | Path, out: str | Path | None, npc: str = "guard",
              realtime: bool = True, timeout: float = 120.0, token: str | None = None,
              session: str = "npc-1", quiet_s: float = 30.0, stay: bool = True,
              token_name: str | None = None) -> TurnResult:
    """One turn from a sound file. Raises SayError, with what did not come, when the turn
    produced nothing: no transcript and no progress for ``quiet_s`` after the audio, no reply
    within ``timeout``, or a reply without audio. ``stay``: wait until the reply has played."""
    mic = load_mic(wav)
    if mic.peak_dbfs == float("-inf"):
        raise SayError(f"{wav} is digital silence ({mic.duration_s:.1f} s, every sample 0): "
                       "nothing to say")
    client = await Client.connect(url, token=token, token_name=token_name)
    try:
        # a recorded question is one turn, however long its pauses: the file's end ends it
        await client.open(session, npc, mic.rate, mic.channels, fmt=mic.format,
                          endpoint="client")
        await client.stream(session, mic.frames, mic.rate, realtime=realtime)
        # unpaced, the recognizer still has the whole file to go through
        quiet = quiet_s + (0.0 if realtime else mic.duration_s)
        result = await _await_turn(client, session, mic, wav, quiet, timeout)
        if stay:
            result.stayed_s = round(await client.wait_played(session), 3)
    finally:
        await client.close()
    if out is not None:
        result.write(Path(out))
    return result


def _check_open(client: Client, tr: TurnResult) -> None:
    if client.closed.is_set() and tr.done is None:
        ws = client.ws
        raise SayError(f"the gateway closed the connection before the turn ended (close code "
                       f"{ws.close_code}, reason {ws.close_reason or 'none'!r})")


async def _first(events: list[asyncio.Event], timeout: float) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def _await_turn(client: Client, session: str, mic: MicFile, wav: str | Path,
                      quiet_s: float, timeout: float) -> TurnResult:
    tr = client.turns[session]
    final, done = client._final[session], client._done[session]
    progress = -1
    while not (final.is_set() or done.is_set()):
        _check_open(client, tr)
        if len(tr.partials) + len(tr.errors) == progress:
            problems = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in tr.errors)
            raise SayError(
                f"no transcript {quiet_s:.0f} s after the end of {Path(wav).name} "
                f"({mic.duration_s:.1f} s, {mic.subtype or '?'} sent as {mic.format}, peak "
                f"{mic.peak_dbfs:.0f} dBFS): the server heard no speech in it, or no STT worker "
                f"is running (see `parley status`){'; errors: ' + problems if problems else ''}")
        progress = len(tr.partials) + len(tr.errors)
        await _first([final, done, client.closed], quiet_s)
    if not done.is_set():
        await _first([done, client.closed], timeout)
        _check_open(client, tr)
    if not done.is_set():
        raise SayError(f"heard {tr.transcript!r}, but no reply came within {timeout:.0f} s: are "
                       "the llm, tts and lipsync workers running? (see `parley status`)")
    if tr.done is not None and not tr.done.get("audio_samples") and not tr.interrupted:
        if not tr.transcript:
            said = " (turn_done no_speech)" if tr.done.get("no_speech") else ""
            raise SayError(f"the server heard no speech in {Path(wav).name} (peak "
                           f"{mic.peak_dbfs:.0f} dBFS): the turn ended without a "
                           f"transcript{said}")
        raise SayError(f"heard {tr.transcript!r}, but the turn ended without reply audio "
                       f"(reply text {tr.reply!r})")
    return tr
