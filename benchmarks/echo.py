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

import argparse
import contextlib
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
    player_at: int | None = None  # where the player's recording begins (samples), if any
    alone: np.ndarray | None = None  # the same mic with the player and no reply playing


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
    player_at = alone = None
    if player is not None:
        player_at = lead + int(player_at_s * RATE)
        p = at_level(player, player_db)[:n - player_at]
        mic[player_at:player_at + len(p)] += p
        alone = noise(n, noise_db, seed)
        alone[player_at:player_at + len(p)] += p
    return Scene(name, mic, reply, reply_rate, lead, player_at, alone)


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


# --------------------------------------------------------------------------- Sans-I/O scenes

NPC_VOICES = (("en-gb-scotland", 35), ("en-us", 50), ("en-gb", 60), ("en-us-nyc", 40))


def scenes(n: int, seed: int = 1) -> list[Scene]:
    """``n`` scenes, half with a player talking over the reply: delay 20-200 ms, echo 8-24 dB
    below the reply, RT60 100-400 ms, room tone -62..-45 dBFS; the player (jfk.flac, or a
    second synthesized voice) at -30..-22 dBFS from 0.8 s into the reply on."""
    rng = np.random.default_rng(seed)
    replies = [espeak(text, voice, pitch)
               for text, (voice, pitch) in zip(REPLIES, NPC_VOICES, strict=True)]
    players = [jfk()[:int(4.0 * RATE)], to16k(*espeak(SECOND_VOICE, "en-us+f3", 70))]
    out = []
    for i in range(n):
        pcm, rate = replies[i % len(replies)]
        delay, gain = rng.uniform(20, 200), rng.uniform(-24, -8)
        rt60, room_db = rng.uniform(100, 400), rng.uniform(-62, -45)
        player = players[(i // 2) % 2] if i % 2 else None
        at_s = rng.uniform(0.8, max(1.0, len(pcm) / rate - 1.0))
        name = (f"d{delay:.0f}ms g{gain:.0f}dB rt{rt60:.0f} n{room_db:.0f}"
                + (f" +player@{at_s:.1f}s" if player is not None else ""))
        out.append(make_scene(name, pcm, rate, delay, gain, rt60, room_db, player=player,
                              player_db=rng.uniform(-30, -22), player_at_s=at_s, seed=i))
    return out


def listen(mic: np.ndarray, scene: Scene | None) -> int | None:
    """Where the STT listener (its converter, its VAD, and the echo gate when ``scene`` gives
    the reply) starts the first utterance, in 16 kHz samples; None: it never does."""
    from schemas.streams import MicEntry
    from workers.stt.echo import EchoGate
    from workers.stt.listener import Listener, ListenerConfig, Start

    gate = None
    if scene is not None:
        gate = EchoGate()
        gate.played(1, 1, at=scene.play_at)
        for i in range(0, len(scene.reply), 1102):  # as the voice stream holds it: 50 ms chunks
            gate.reference(1, 1, i, scene.reply[i:i + 1102], scene.reply_rate)
        gate.turn_end(1)
    lis = Listener(RATE, 1, "s16le", ListenerConfig(), echo=gate)
    pcm = (np.clip(mic, -1, 1) * 32767).astype("<i2")
    for seq, i in enumerate(range(0, len(pcm), 320), 1):
        # stamped as the gateway would: when the chunk arrived, at real-time pace
        entry = MicEntry(seq=seq, pcm=pcm[i:i + 320].tobytes(), ts=1e12 + (i + 320) / 16)
        for action in lis.push(entry):
            if isinstance(action, Start):
                return action.sample
    return None


def run_scene(scene: Scene) -> dict:
    """One scene through the listener without the gate and with it; for a player scene also
    the player alone, where the same listener starts when no reply plays."""
    row: dict = {"scene": scene.name, "player": scene.player_at is not None, "alone": None}
    if scene.alone is not None:
        row["alone"] = listen(scene.alone, None)
    for mode, gated in (("baseline", None), ("gate", scene)):
        t0 = time.process_time()  # CPU time: the machine may be busy with other work
        row[mode] = listen(scene.mic, gated)
        row[f"{mode}_s"] = time.process_time() - t0
    return row


def verdict(row: dict, mode: str, scene: Scene) -> str:
    """false (started on the echo alone) | detected | missed | quiet (no player, no start)."""
    start = row[mode]
    if not row["player"]:
        return "quiet" if start is None else "false"
    if start is not None and start < scene.player_at:
        return "false"
    if start is None or row["alone"] is None or start > row["alone"] + 1.5 * RATE:
        return "missed"
    return "detected"


def report(rows: list[dict], scns: list[Scene]) -> str:
    lines = [f"{'mode':9} {'scenes':>6} {'false barge-ins':>15} {'detected':>9} {'missed':>7} "
             f"{'delay p50 ms':>12} {'delay p95 ms':>12} {'x real time':>11}"]
    summary = {}
    audio_s = sum(len(s.mic) for s in scns) / RATE
    for mode in ("baseline", "gate"):
        v = [verdict(r, mode, s) for r, s in zip(rows, scns, strict=True)]
        delays = [(r[mode] - r["alone"]) * 1000 / RATE for r, s, x in zip(rows, scns, v,
                                                                           strict=True)
                  if x == "detected" and r["alone"] is not None]
        players = sum(r["player"] for r in rows)
        speed = audio_s / max(sum(r[f"{mode}_s"] for r in rows), 1e-9)
        p50 = float(np.percentile(delays, 50)) if delays else float("nan")
        p95 = float(np.percentile(delays, 95)) if delays else float("nan")
        lines.append(f"{mode:9} {len(rows):>6} {v.count('false'):>15} "
                     f"{v.count('detected'):>4}/{players:<4} {v.count('missed'):>7} "
                     f"{p50:>12.0f} {p95:>12.0f} {speed:>11.0f}")
        summary[mode] = (v.count("false"), v.count("detected"), players, p50, p95)
    lines += [
        "",
        "false barge-in: the listener started an utterance on the echo alone (it would cut the",
        "reply and become a transcript of the NPC's own words); detected: it started on the",
        "player's voice over the reply; delay: that start minus where the same listener starts",
        "on the player alone (no reply playing); x real time: audio seconds per CPU second.",
    ]
    (bf, bd, n, _, _), (gf, gd, _, g50, g95) = summary["baseline"], summary["gate"]
    lines.append(f"false_bargeins={gf} detected={gd}/{n} delay_p50_ms={g50:.0f} "
                 f"delay_p95_ms={g95:.0f} baseline_false_bargeins={bf} "
                 f"baseline_detected={bd}/{n} scenes={len(rows)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="parley bench echo")
    ap.add_argument("--scenes", type=int, default=40, help="synthesized rooms (half with a "
                    "player talking over the reply)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fleet", type=int, default=0, metavar="N",
                    help="also N hands-free sessions per case through a real fleet, gate on/off")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per scene")
    args = ap.parse_args(argv)
    scns = scenes(args.scenes, args.seed)
    rows = []
    for s in scns:
        rows.append(run_scene(s))
        if args.verbose:
            r = rows[-1]
            print(f"  {s.name:48} baseline={verdict(r, 'baseline', s):8} "
                  f"gate={verdict(r, 'gate', s):8}", flush=True)
    print(report(rows, scns))
    if args.fleet:
        print()
        print(fleet_report(run_fleet(args.fleet)))
    return 0


# --------------------------------------------------------------------------- real fleet

QUESTION = "Who are you? What is your name?"
BARGE_IN = "Wait, stop! Hello there!"


def _onset(x: np.ndarray) -> float:
    """Seconds into ``x`` where its speech begins (first 20 ms frame within 30 dB of its peak)."""
    frames = x[:len(x) // 320 * 320].reshape(-1, 320)
    p = np.mean(frames.astype(np.float64) ** 2, axis=1)
    return float(np.argmax(p > p.max() * 1e-3) * 320 / RATE)


async def _fleet_session(url: str, name: str, barge: bool, rng) -> dict:
    import asyncio

    from parley.client import Client
    from schemas import protocol as P

    class Timed(Client):  # when each message came
        async def _on_text(self, msg, now):
            self.times = [*getattr(self, "times", []), now]
            await super()._on_text(msg, now)

    client = await Timed.connect(url)
    mic = RoomMic(client, name, delay_ms=rng.uniform(40, 180), gain_db=rng.uniform(-18, -10),
                  rt60_ms=rng.uniform(150, 350), noise_db=rng.uniform(-58, -48),
                  seed=int(rng.integers(1 << 30)))
    done = asyncio.Event()
    row = {"case": "barge" if barge else "echo", "stopped": False, "heard": [],
           "delay_ms": None, "false_stops": 0, "no_reply": False}
    task = onset = None
    try:
        for _ in range(30):  # a fleet still busy with the last session says so: wait
            try:
                await client.open(name, "guard", RATE, 1)
                break
            except RuntimeError as exc:
                if "overloaded" not in str(exc):
                    raise
                await asyncio.sleep(1.0)
        q = at_level(to16k(*espeak(QUESTION)), -24)
        mic.say(q, time.perf_counter() + 0.3)
        task = asyncio.create_task(mic.run(done.is_set))
        try:
            first = await client.wait_turn(name, 1, 60)
        except TimeoutError:  # the fleet is still busy with the last session's echo
            row["no_reply"] = True
            return row
        reply_s = first.audio_samples / client.turns[name].reply_rate
        start = client.first_ready[(name, 1)]
        onset = None
        if barge:
            voice = at_level(to16k(*espeak(BARGE_IN, "en-us+f3", 70)), -24)
            at = start + rng.uniform(1.0, max(1.2, min(reply_s, 6.0) - 1.0))
            mic.say(voice, at)
            onset = at + _onset(voice)
        end = start + min(reply_s, 8.0) + 1.0
        if onset is not None:
            end = max(end, onset + 3.0)
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
    finally:
        done.set()
        if task is not None:
            with contextlib.suppress(Exception):
                await task
        await client.close()
    stops = [t for m, t in zip(client.messages, client.times, strict=True)
             if isinstance(m, P.StopPlayback)]
    real = [t for t in stops if onset is not None and onset <= t <= onset + 3.0]
    row["stopped"] = bool(stops)
    row["false_stops"] = len([t for t in stops if onset is None or t < onset])
    if real:
        row["delay_ms"] = (real[0] - onset) * 1000
    row["heard"] = [m.text for m in client.messages
                    if isinstance(m, P.Transcript) and m.final and m.turn >= 2]
    return row


def run_fleet(n: int, seed: int = 5) -> dict[str, list[dict]]:
    """``n`` echo-only and ``n`` barge-in sessions, one after another, on a fleet with the gate
    and on one without."""
    import asyncio

    from parley.fleet import Fleet
    from parley.redis_server import RedisServer, free_port

    results = {}
    for mode, flag in (("baseline", "0"), ("gate", "1")):
        rng = np.random.default_rng(seed)
        redis = RedisServer(appendonly=False).start()
        fleet = Fleet(port=free_port(), workers=1, redis_url=redis.url,
                      env={"PARLEY_STT_ECHO_GATE": flag, "PARLEY_LOG_LEVEL": "warning"})
        try:
            fleet.start()
            fleet.wait_ready(60)
            url = f"ws://127.0.0.1:{fleet.port}"
            rows = []
            for i in range(2 * n):
                t0 = time.monotonic()
                rows.append(asyncio.run(_fleet_session(url, f"{mode}{i}", i % 2 == 1, rng)))
                print(f"  fleet {mode:8} session {i + 1}/{2 * n} {rows[-1]['case']:5} "
                      f"{time.monotonic() - t0:5.1f} s", flush=True)
                time.sleep(2.0)  # let the last session's jobs end
            results[mode] = rows
        finally:
            fleet.stop()
            redis.stop()
    return results


def fleet_report(results: dict[str, list[dict]]) -> str:
    lines = [f"{'fleet':9} {'echo sessions':>13} {'false barge-ins':>15} "
             f"{'false transcripts':>17} {'barge-ins':>9} {'stop delay p50 ms':>17}"]
    out = {}
    for mode, rows in results.items():
        echo = [r for r in rows if r["case"] == "echo"]
        barge = [r for r in rows if r["case"] == "barge"]
        false_stops = sum(r["false_stops"] for r in rows)
        false_heard = sum(len(r["heard"]) for r in echo)
        hit = [r for r in barge if r["delay_ms"] is not None]
        p50 = float(np.percentile([r["delay_ms"] for r in hit], 50)) if hit else float("nan")
        lines.append(f"{mode:9} {len(echo):>13} {false_stops:>15} {false_heard:>17} "
                     f"{len(hit):>4}/{len(barge):<4} {p50:>17.0f}"
                     + (f"  ({sum(r['no_reply'] for r in rows)} got no reply: fleet busy)"
                        if any(r["no_reply"] for r in rows) else ""))
        out[mode] = (false_stops, false_heard, len(hit), len(barge), p50)
    lines += [
        "",
        "hands-free sessions through a real fleet (the reference client as UE with speakers:",
        "benchmarks.echo.RoomMic); false barge-ins: stop_playback caused by the echo; false",
        "transcripts: final transcripts after the first turn in echo-only sessions; stop delay:",
        "the barge-in voice's onset -> stop_playback at the client (VAD start + hops).",
    ]
    g, b = out.get("gate"), out.get("baseline")
    if g and b:
        lines.append(f"fleet_false_bargeins={g[0]} fleet_false_transcripts={g[1]} "
                     f"fleet_bargeins={g[2]}/{g[3]} fleet_stop_p50_ms={g[4]:.0f} "
                     f"baseline_fleet_false_bargeins={b[0]} "
                     f"baseline_fleet_false_transcripts={b[1]}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
