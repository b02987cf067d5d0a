"""`parley bench echo`: the NPC's own voice in the player's mic, with and without the echo gate.

A scene is one reply (espeak-ng, the offline TTS voice, as UE plays it) coming back into the mic
at room level: delayed (output buffer + air), attenuated, with reverb (an exponentially decaying
noise tail after the direct path) and room noise; in half the scenes a player also talks over
the reply, at a random moment: a real recording (jfk.flac) or a second synthesized voice.
Each scene runs through the STT listener's own VAD twice: on the raw mic (the baseline: what
Parley did before the gate) and through :class:`workers.stt.echo.EchoGate` with the reply
placed at UE's play clock, exactly as the STT worker does. Counted per scene:

* false barge-in: speech starts while only the echo sounds (each such start would cut the
  reply and become a transcript of the NPC's own words);
* real barge-in detected: speech starts after the player's voice begins (within 1.5 s);
* detection delay: that start minus where the same VAD starts on the player's voice alone.

``--fleet`` also plays scenes through a real fleet (gateway, workers, Redis, the reference
client as UE: it plays the reply and streams the room's mic in real time), once with the gate
and once with ``PARLEY_STT_ECHO_GATE=0``, and counts stop_playback and transcripts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

RATE = 16000
JFK = Path(__file__).resolve().parent.parent / "parley" / "samples" / "jfk.flac"
REPLIES = (
    "Well met, traveller. The road north is closed since the bridge fell, but the ferry "
    "still runs at dawn if you have coin.",
    "I have guarded this gate for twenty years. Nobody passes without the captain's seal.",
    "Apples, pears and fresh bread! Two coppers a loaf, and the best in the whole valley.",
    "The old mine? Stay away from it. Men went down there last winter and never came back.",
)
SECOND_VOICE = "Wait, stop. I have a question about the bridge."


def db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.square(x, dtype=np.float64)) + 1e-20))


def espeak(text: str, voice: str = "en-us", pitch: int = 50) -> tuple[np.ndarray, int]:
    """(int16 samples, rate): the offline TTS voice, as the TTS worker renders it."""
    from workers.tts.espeak import EspeakSynth

    synth = EspeakSynth()
    pcm = np.concatenate([c.pcm for c in synth.synthesize(text, voice=voice, pitch=pitch)])
    return pcm.astype(np.int16), synth.sample_rate


def to16k(pcm: np.ndarray, rate: int) -> np.ndarray:
    x = pcm.astype(np.float32) / 32768.0 if pcm.dtype.kind == "i" else pcm.astype(np.float32)
    if x.ndim > 1:
        x = x.mean(axis=1)
    return soxr.resample(x, rate, RATE).astype(np.float32) if rate != RATE else x


def jfk() -> np.ndarray:
    import soundfile

    x, rate = soundfile.read(str(JFK), dtype="float32")
    return to16k(x, rate)


def room(x: np.ndarray, delay_ms: float, gain_db: float, rt60_ms: float,
         seed: int = 0) -> np.ndarray:
    """``x`` (16 kHz) as the mic hears it from the speakers: the direct path after
    ``delay_ms``, then a reverb tail decaying by 60 dB over ``rt60_ms``; ``gain_db`` is the
    level of the whole response relative to ``x``."""
    rng = np.random.default_rng(seed)
    n = max(1, int(rt60_ms * RATE / 1000))
    t = np.arange(n) / RATE
    h = 0.3 * rng.standard_normal(n) * np.exp(-6.9 * t / max(rt60_ms / 1000, 1e-3))
    h[0] = 1.0
    h *= 10 ** (gain_db / 20) / np.sqrt(np.sum(h * h))
    d = int(delay_ms * RATE / 1000)
    y = np.convolve(x, h)[:max(0, len(x) - d)]
    return np.concatenate([np.zeros(min(d, len(x)), np.float32), y]).astype(np.float32)


def noise(n: int, level_db: float, seed: int = 0) -> np.ndarray:
    """Room tone: pink-ish noise (white, low-passed once) at ``level_db`` dBFS."""
    w = np.random.default_rng(seed).standard_normal(n + 1)
    x = w[1:] + 0.9 * w[:-1]
    return (x / np.sqrt(np.mean(x * x)) * 10 ** (level_db / 20)).astype(np.float32)


def at_level(x: np.ndarray, level_db: float) -> np.ndarray:
    """``x`` scaled so its speech (frames within 30 dB of its loudest) is at ``level_db``."""
    frames = x[:len(x) // 320 * 320].reshape(-1, 320)
    p = np.mean(frames.astype(np.float64) ** 2, axis=1)
    active = p[p > p.max() * 1e-3]
    return (x * 10 ** (level_db / 20) / np.sqrt(np.mean(active))).astype(np.float32)


@dataclass
class Scene:
    """One mic recording: ``mic`` at 16 kHz, the reply UE started at ``play_at`` (samples)."""

    name: str
    mic: np.ndarray
    reply: np.ndarray  # int16 at reply_rate, as the voice stream holds it
    reply_rate: int
    play_at: int
    player_at: int | None = None  # where the player's voice begins (samples), if any


LEAD_S = 0.5  # room tone before UE starts the reply
TAIL_S = 1.0  # after it


def make_scene(name: str, reply: np.ndarray, reply_rate: int, delay_ms: float, gain_db: float,
               rt60_ms: float, noise_db: float, player: np.ndarray | None = None,
               player_db: float = -26.0, player_at_s: float = 0.0, seed: int = 0) -> Scene:
    """The mic of one reply: room tone, the reply's echo from ``LEAD_S`` on, and optionally a
    player (16 kHz) whose recording begins ``player_at_s`` after the reply started."""
    ref = to16k(reply, reply_rate)
    lead = int(LEAD_S * RATE)
    n = lead + len(ref) + int(TAIL_S * RATE)
    mic = noise(n, noise_db, seed)
    padded = np.concatenate([ref, np.zeros(n - lead - len(ref), np.float32)])
    mic[lead:] += room(padded, delay_ms, gain_db, rt60_ms, seed)
    player_at = None
    if player is not None:
        player_at = lead + int(player_at_s * RATE)
        p = at_level(player, player_db)[:n - player_at]
        mic[player_at:player_at + len(p)] += p
    return Scene(name, mic, reply, reply_rate, lead, player_at)


class RoomMic:
    """UE hands-free, for a real fleet: the mic streams 20 ms chunks in real time, and what it
    hears is the room tone, the player, and whatever reply the client is playing, on the
    client's play clock (from its first ``ready``, until the server says stop), through the
    room. The reply is the audio the client actually received, so the echo is of the very
    reply the server sent."""

    CHUNK = 320

    def __init__(self, client, session: str, delay_ms: float = 100, gain_db: float = -15,
                 rt60_ms: float = 250, noise_db: float = -55, seed: int = 0):
        rng = np.random.default_rng(seed)
        n = max(1, int(rt60_ms * RATE / 1000))
        h = 0.3 * rng.standard_normal(n) * np.exp(-6.9 * np.arange(n) / n)
        h[0] = 1.0
        h *= 10 ** (gain_db / 20) / np.sqrt(np.sum(h * h))
        self.h = np.concatenate([np.zeros(int(delay_ms * RATE / 1000)), h]).astype(np.float32)
        self.client, self.session = client, session
        self.noise_db, self.seed = noise_db, seed
        self.voices: list[tuple[float, np.ndarray]] = []  # (wall clock start, 16 kHz samples)
        self.stopped_at: dict[int, float] = {}
        self._reply: dict[int, np.ndarray] = {}
        self._reply_n: dict[int, int] = {}
        self.sent = 0  # mic samples sent

    def say(self, x: np.ndarray, at: float) -> None:
        """The player speaks ``x`` (16 kHz float) from wall clock ``at`` (time.perf_counter)."""
        self.voices.append((at, x.astype(np.float32)))

    def _reply16(self, turn: int) -> np.ndarray:
        """The turn's reply as received so far, at 16 kHz, on its own sample positions."""
        client = self.client
        tr = client.turns[self.session]
        chunks = [c for c in client.chunks.get(self.session, [])]
        if len(chunks) != len(tr.audio):
            raise RuntimeError("RoomMic needs a session without resent reply audio")
        mine = [(c, a) for c, a in zip(chunks, tr.audio, strict=True) if c[0] == turn]
        if self._reply_n.get(turn) != len(mine):
            rate = client.reply_rates[(self.session, turn)]
            end = max(c[2] + c[3] for c, _ in mine)
            x = np.zeros(end, np.float32)
            for (_, _, sample, n), a in mine:
                x[sample:sample + n] = a[:n] / 32768.0
            self._reply[turn] = to16k(x, rate)
            self._reply_n[turn] = len(mine)
        return self._reply[turn]

    def _echo(self, t: float) -> np.ndarray:
        """What the speakers put into the mic for the chunk starting at wall clock ``t``."""
        out = np.zeros(self.CHUNK, np.float32)
        for (session, turn), start in list(self.client.first_ready.items()):
            if session != self.session:
                continue
            if (session, turn) in self.client.stopped:
                self.stopped_at.setdefault(turn, t)
            reply = self._reply16(turn)
            p = int((t - start) * RATE)  # play position of this chunk's first sample
            lo = p - len(self.h) + 1
            if p + self.CHUNK <= 0 or lo >= len(reply):
                continue
            spk = np.zeros(self.CHUNK + len(self.h) - 1, np.float32)
            a, b = max(lo, 0), min(p + self.CHUNK, len(reply))
            if turn in self.stopped_at:  # UE stopped playing: nothing after that point
                b = min(b, int((self.stopped_at[turn] - start) * RATE))
            if b > a:
                spk[a - lo:b - lo] = reply[a:b]
                out += np.convolve(spk, self.h, mode="valid")
        return out

    def _voice(self, t: float) -> np.ndarray:
        out = np.zeros(self.CHUNK, np.float32)
        for start, x in self.voices:
            i = int((t - start) * RATE)
            if i + self.CHUNK > 0 and i < len(x):
                a = max(i, 0)
                seg = x[a:i + self.CHUNK]
                out[a - i:a - i + len(seg)] += seg
        return out

    async def run(self, until) -> None:
        """Stream until ``until()`` is true, at real-time pace."""
        import asyncio

        from parley.client import to_pcm
        from schemas import protocol as P

        client = self.client
        opened = client.opened[self.session]
        rng = noise(RATE * 60, self.noise_db, self.seed)
        t0 = time.perf_counter()
        while not until():
            t = t0 + self.sent / RATE
            i = self.sent % (len(rng) - self.CHUNK)
            x = rng[i:i + self.CHUNK] + self._voice(t) + self._echo(t)
            frames = (np.clip(x, -1, 1) * 32767).astype(np.int16)[:, None]
            self.sent += self.CHUNK
            delay = t0 + self.sent / RATE - time.perf_counter()
            if delay > 0:  # a mic sends a chunk once it has captured all of it
                await asyncio.sleep(delay)
            seq = client.next_seq[self.session]
            await client.send(P.MicAudio(opened.channel, seq, to_pcm(frames, "s16le")).encode())
            client.next_seq[self.session] = seq + 1
