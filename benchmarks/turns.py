"""`parley bench turns`: what the player feels, hands-free: from the real end of their speech
to the NPC's first sound, and how often the turn is cut off or never ends.

A set of utterances with known speech boundaries is streamed at real-time pace (as a microphone
would) into sessions with ``endpoint: vad``, followed by 2.5 s of whatever follows speech in
that recording (digital silence, room tone, noise), and no ``end_of_utterance``: the server
alone decides where the turn ends. Each endpointing setting gets its own fleet and runs the
whole set; the 500 ms energy VAD (the previous default) is the baseline row.

The set: espeak-ng sentences with a pause of 200-700 ms inserted at a word boundary inside the
sentence ("I want | the sword from the blacksmith."; the sentence is synthesised whole, so the
words before the pause carry the pitch of an unfinished sentence), sentences without a pause,
a dip in level mid-sentence, at 8, 16, 44.1 and 48 kHz, in digital silence, room tone
(-50 dBFS brown noise) or trailing noise (-42 dBFS white noise after the speech); and real
speech: jfk.flac (44.1 kHz, crowd noise, pauses of 0.4-1.3 s between clauses) at 44.1 and
8 kHz, its end of speech marked from its waveform (last 20 ms frame 12 dB over its noise floor).
Items marked ``held_out`` (jfk and three sentences) took no part in choosing the settings.
``--players 1,3`` adds rows of several players at once (each on a connection of its own,
through the whole set, staggered): the hands-free path under load, speculation included.
``--audio`` measures your own recordings instead (or as well, ``--with-set``): one utterance
per file, its end of speech marked from its waveform or given as ``FILE@SECONDS``.

Per utterance: v2v = first reply audio at the client - the time the chunk holding the true end
of speech was sent; a cut-off = the turn ended before the speaker was done (a final transcript
before that chunk was sent, or more than one turn); missed = no turn within 2 s of the end.
Fleet overhead = the server's own part (gateway's first audio - the end decision) minus the
time in models on the critical path (the VAD on the chunk that ended the turn, STT finish,
end-of-turn model, LLM to first fragment, TTS first synthesis). The push-to-talk row
(endpoint client): first reply audio after the ``end_of_utterance`` that follows the last
chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from parley.client import Client, to_pcm
from parley.fleet import Fleet
from parley.redis_server import RedisServer, free_port
from schemas import protocol as P

PERSONAS = Path(__file__).resolve().parent / "personas"
JFK = Path(__file__).resolve().parents[1] / "parley" / "samples" / "jfk.flac"
CHUNK_MS = 20
LEAD_S = 0.4
TAIL_S = 2.5
MISSED_S = 2.0
STAGGER_S = 0.7  # --players: each player starts this much after the one before

# (text, pause before this word index (None: no pause), pause ms, rate, scene, held out)
SENTENCES = (
    ("I want the sword from the blacksmith.", 2, 450, 16000, "silence", False),
    ("Can you tell me where the old mill is?", 4, 600, 48000, "room", False),
    ("Open the gate, please.", None, 0, 44100, "trailing_noise", False),
    ("My brother went into the forest and never came back.", 5, 300, 8000, "room", False),
    ("What do you sell here?", None, 0, 8000, "dip", False),
    ("I am looking for the captain of the guard.", 3, 700, 44100, "silence", False),
    ("Tell me about the town.", None, 0, 16000, "room", False),
    ("Is the road to the north safe at night?", 4, 250, 16000, "trailing_noise", False),
    ("How much does the red potion cost?", 2, 500, 48000, "room", True),
    ("I need a room for the night.", None, 0, 16000, "silence", True),
    ("Where can I find the old wizard who lives in the tower?", 5, 650, 8000, "trailing_noise",
     True),
)
_SILERO_800 = {"PARLEY_STT_VAD": "silero", "PARLEY_STT_TURN_MODEL": "none",
               "PARLEY_STT_VAD_SILENCE_MS": "800"}
# The LLM and TTS as GPU-class stand-ins (their latencies, no model work): where starting the
# reply early at a likely end (stt.speculate_ms) has model time to hide. STT stays real.
_SIM_REPLY = {"PARLEY_LLM_BACKENDS": "benchmarks.simulated:SimulatedLlm",
              "PARLEY_TTS_BACKENDS": "benchmarks.simulated:SimulatedTts"}
CONFIGS = {
    "energy-500": {"PARLEY_STT_VAD": "energy", "PARLEY_STT_TURN_MODEL": "none",
                   "PARLEY_STT_VAD_SILENCE_MS": "500", "PARLEY_STT_SPECULATE_MS": "0"},
    "silero-500": {"PARLEY_STT_VAD": "silero", "PARLEY_STT_TURN_MODEL": "none",
                   "PARLEY_STT_VAD_SILENCE_MS": "500"},
    "silero-800": {**_SILERO_800, "PARLEY_STT_SPECULATE_MS": "300"},
    "silero-800-nospec": {**_SILERO_800, "PARLEY_STT_SPECULATE_MS": "0"},
    "silero-800+sim": {**_SILERO_800, **_SIM_REPLY, "PARLEY_STT_SPECULATE_MS": "300"},
    "silero-800-nospec+sim": {**_SILERO_800, **_SIM_REPLY, "PARLEY_STT_SPECULATE_MS": "0"},
    "silero+smart-turn": {"PARLEY_STT_VAD": "silero", "PARLEY_STT_TURN_MODEL": "smart-turn"},
}
# what runs without --configs (the speculation on/off pairs are asked for by name)
RUN_BY_DEFAULT = ("energy-500", "silero-500", "silero-800", "silero+smart-turn")
BASELINE = "energy-500"
DEFAULT = "silero-800"  # what the product ships (core/config.py)


@dataclass
class Item:
    name: str
    audio: np.ndarray  # int16 (n, 1) at rate
    rate: int
    end: int  # true end of speech, samples at rate
    held_out: bool


def _level_db(x: np.ndarray, rate: int) -> np.ndarray:
    f = rate * CHUNK_MS // 1000
    n = len(x) // f
    frames = x[: n * f].astype(np.float64).reshape(n, f)
    return 10 * np.log10(np.var(frames, axis=1) + 1e-12)  # a DC offset is no speech


def speech_span(x: np.ndarray, rate: int, over_floor_db: float = 12.0) -> tuple[int, int]:
    """(start, end) samples of the speech in ``x``: from the first to the end of the last 20 ms
    frame ``over_floor_db`` above the recording's noise floor (its 10th percentile level),
    and no more than 45 dB under its loudest frames (a faint tail or dither in a file of
    digital silence is no speech; a quiet mic's words are); (0, 0) when there is none."""
    levels = _level_db(x, rate)
    if not len(levels):
        return 0, 0
    floor = max(float(np.percentile(levels, 10)), -100.0)
    loudest = float(np.percentile(levels, 99))
    loud = np.nonzero(levels > max(floor + over_floor_db, loudest - 45.0))[0]
    f = rate * CHUNK_MS // 1000
    return (int(loud[0] * f), int((loud[-1] + 1) * f)) if len(loud) else (0, 0)


def _noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "room":  # brown noise: the low rumble of a room
        x = np.cumsum(rng.standard_normal(n))
        x -= np.convolve(x, np.ones(256) / 256, mode="same")  # no DC drift
        return x / (np.sqrt(np.mean(x * x)) + 1e-9) * 10 ** (-50 / 20)
    return rng.standard_normal(n) * 10 ** (-42 / 20)


def synth_item(synth, text: str, word: int | None, pause_ms: int, rate: int, scene: str,
               held_out: bool, rng: np.random.Generator) -> Item:
    chunks = list(synth.synthesize(text))
    pcm = np.concatenate([c.pcm for c in chunks]).astype(np.float32) / 32768
    words = sorted((w for c in chunks for w in c.words), key=lambda w: w.sample)
    src = synth.sample_rate
    end = speech_span(pcm, src)[1]
    pcm = pcm[:end]  # espeak's own trailing pause is not speech
    if word is not None:
        at = words[word].sample
        pcm = np.concatenate([pcm[:at], np.zeros(src * pause_ms // 1000, np.float32), pcm[at:]])
    if scene == "dip":  # a 150 ms drop of 25 dB after the second word, as a turned head does
        at = words[2].sample
        pcm[at - src * 3 // 20: at] *= 10 ** (-25 / 20)
    x = soxr.resample(pcm, src, rate)
    speech_len = len(x)
    lead, tail = int(LEAD_S * rate), int(TAIL_S * rate)
    x = np.concatenate([np.zeros(lead, np.float32), x, np.zeros(tail, np.float32)])
    if scene == "room":
        x += _noise("room", len(x), rng).astype(np.float32)
    elif scene == "trailing_noise":
        x[lead + speech_len:] += _noise("white", tail, rng).astype(np.float32)
    pause = f" pause {pause_ms} ms" if word is not None else ""
    name = f"{text[:24]!r}{pause} {rate / 1000:g}k {scene}"
    return Item(name, _int16(x), rate, lead + speech_len, held_out)


def jfk_items(rng: np.random.Generator) -> list[Item]:
    x, src = sf.read(str(JFK), dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    end = speech_span(x, src)[1]
    quiet = x[int(2.45 * src):int(3.15 * src)]  # its own crowd noise, from a pause
    tail = np.tile(quiet, int(np.ceil(TAIL_S * src / len(quiet))))[: int(TAIL_S * src)]
    x = np.concatenate([x[:end], tail])
    out = []
    for rate in (44100, 8000):
        y = x if rate == src else soxr.resample(x, src, rate)
        out.append(Item(f"jfk.flac (11 s, pauses 0.4-1.3 s) {rate / 1000:g}k", _int16(y), rate,
                        end * rate // src, True))
    return out


def _int16(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, -1, 32767 / 32768) * 32768).astype(np.int16)[:, None]


def build_set(seed: int = 7) -> list[Item]:
    from workers.tts.espeak import EspeakSynth

    synth, rng = EspeakSynth(), np.random.default_rng(seed)
    items = [synth_item(synth, *s, rng=rng) for s in SENTENCES]
    return items + jfk_items(rng)


# what libsndfile reads; phone and browser recordings often come in containers it does not
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".caf",
                  ".au", ".w64")
UNREAD_SUFFIXES = (".m4a", ".aac", ".mp4", ".webm", ".mka", ".wma", ".amr", ".3gp")


def _convert_hint(path: Path) -> str:
    return (f"{path.name}: {path.suffix[1:]} is not read here; convert it to wav or flac "
            f"(ffmpeg -i '{path.name}' '{path.stem}.wav')")


def room_tone(x: np.ndarray, rate: int, start: int, end: int) -> np.ndarray:
    """The recording's own background, to pad it with (``tile``): what it holds before its
    speech (``start``) and after it (``end``), its quietest 20 ms frames of that (within 6 dB
    of their 10th percentile level, so a click or a breath is left out). Digital silence where
    that is what it holds. With under 100 ms of it (a recording cut tight), the quietest
    frames of its pauses, or digital silence when it has none. Padding with digital silence
    always would make the end of a noisy recording easier to hear than it is; padding with
    anything but its background would make it harder."""
    f = rate * CHUNK_MS // 1000
    silence = np.zeros(f, x.dtype)
    levels = _level_db(x, rate)
    if not len(levels):
        return silence
    idx = np.arange(len(levels))
    outside = (idx < start // f) | (idx >= -(-end // f))
    if outside.sum() >= 5:
        candidates = outside
    else:
        candidates = np.ones(len(levels), bool)
        if float(np.percentile(levels, 10)) > float(np.percentile(levels, 95)) - 20:
            return silence  # no pause in it: nothing but speech
    floor = float(np.percentile(levels[candidates], 10))
    if floor <= -100:  # digital silence around the speech
        return silence
    keep = np.nonzero(candidates & (levels <= floor + 6))[0]
    return np.concatenate([x[i * f:(i + 1) * f] for i in keep])


def tile(pool: np.ndarray, n: int) -> np.ndarray:
    """``n`` samples of ``pool`` repeated."""
    return np.tile(pool, -(-max(n, 0) // len(pool)))[:max(n, 0)]


def load_recording(spec: str) -> Item:
    """A recording of the user's own: ``FILE`` (its end of speech marked from its waveform as
    jfk.flac's is: speech_span) or ``FILE@SECONDS`` (the
    true end of speech given, in seconds from the start of the file). Channels are mixed to
    one. It is streamed at its own rate after LEAD_S of its background (room_tone), and what
    follows the speech is its own tail, made up to TAIL_S with its background."""
    path, _, at = (spec, "", "") if Path(spec).exists() else spec.rpartition("@")
    if not path:
        path, at = spec, ""
    try:
        x, rate = sf.read(path, dtype="float32", always_2d=True)
    except (OSError, RuntimeError) as e:  # soundfile: unreadable or not audio
        if Path(path).suffix.lower() in UNREAD_SUFFIXES:
            raise ValueError(_convert_hint(Path(path))) from None
        raise ValueError(f"{path}: cannot read it as audio ({e})") from None
    x = x.mean(axis=1)
    if not len(x):
        raise ValueError(f"{path}: no samples")
    if at:
        try:
            end = round(float(at) * rate)
        except (ValueError, OverflowError):  # not a number, or nan / inf
            raise ValueError(f"{spec}: the end of speech after '@' must be seconds, "
                             f"not {at!r}") from None
        if not 0 < end <= len(x):
            raise ValueError(f"{spec}: the end of speech {at} s is outside the file "
                             f"(0-{len(x) / rate:.2f} s)")
    start, found = speech_span(x, rate)
    if not at:
        end = found
        if not end:
            raise ValueError(f"{path}: no speech found (nothing 12 dB over its noise floor); "
                             "give its end as FILE@SECONDS")
    start = min(start, end)
    tail = x[end: end + int(TAIL_S * rate)]
    background = room_tone(x, rate, start, end)
    lead = tile(background, int(LEAD_S * rate))
    x = np.concatenate([lead, x[:end], tail, tile(background, int(TAIL_S * rate) - len(tail))])
    return Item(f"{Path(path).name} {rate / 1000:g}k", _int16(x), rate, len(lead) + end, True)


def recordings(specs: list[str]) -> list[Item]:
    """Each ``--audio`` argument: a file (``FILE[@SECONDS]``) or a folder of them."""
    items = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix.lower() in AUDIO_SUFFIXES)
            unread = sorted(f for f in p.iterdir() if f.suffix.lower() in UNREAD_SUFFIXES)
            for f in unread:  # said, not dropped without a word: the set would look complete
                print(f"skipped {_convert_hint(f)}", file=sys.stderr)
            if not files:
                raise ValueError(f"{spec}: no audio files in it "
                                 f"({', '.join(x[1:] for x in AUDIO_SUFFIXES)})"
                                 + (f" ({len(unread)} skipped, see above)" if unread else ""))
            items += [load_recording(str(f)) for f in files]
        else:
            items.append(load_recording(spec))
    return items


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


async def _stream(client: Client, session: str, item: Item) -> tuple[float, float]:
    """Sends the item paced like a microphone; returns (time the chunk with the true end went
    out, time the last chunk went out)."""
    opened = client.opened[session]
    step = item.rate * CHUNK_MS // 1000
    seq = client.next_seq[session]
    t0 = time.perf_counter()
    t_end = 0.0
    for i, start in enumerate(range(0, len(item.audio), step)):
        pcm = to_pcm(item.audio[start:start + step], "s16le")
        await client.send(P.MicAudio(opened.channel, seq, pcm).encode())
        now = time.perf_counter()
        if not t_end and start + step >= item.end:
            t_end = now
        seq += 1
        delay = t0 + (i + 1) * CHUNK_MS / 1000 - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    client.next_seq[session] = seq
    return t_end, time.perf_counter()


def _finals(client: Client, session: str) -> list[tuple[int, float, int]]:
    """(turn, arrival, where the server ended it: 16 kHz samples since the session began)."""
    return [(m.turn, t, m.end_sample or 0) for m, t in client.final_times
            if m.session == session]


async def _hands_free(client: Client, n: int, item: Item, player: int = 0) -> dict:
    session = f"hf{n}"
    await client.open(session, "bench1", item.rate, 1)
    t_end, _ = await _stream(client, session, item)
    for _ in range(100):  # a late turn is still measured (and counted as missed)
        if _finals(client, session):
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)  # a second turn (the rest after a cut-off) comes this soon
    finals = _finals(client, session)
    # judged on the server's own positions, so a CPU that lags behind real time does not turn
    # a cut-off into a late end or a timely end into a missed one
    end16 = item.end * 16000 // item.rate
    row = {"item": item.name, "held_out": item.held_out, "turns": len(finals),
           "session": f"{session} of player {player}" if player else session,
           "cutoff": len(finals) > 1 or any(pos < end16 for _, _, pos in finals),
           "missed": not finals or finals[0][2] > end16 + MISSED_S * 16000}
    if finals:
        row["endpoint_ms"] = (finals[0][2] - end16) / 16
    if finals and not row["cutoff"] and not row["missed"]:
        turn = finals[-1][0]
        with _suppress():
            await client.wait_turn(session, turn, timeout=10)
        first = client.first_audio.get((session, turn))
        done = client.done_turns.get((session, turn))
        row["v2v_ms"] = (first - t_end) * 1000 if first else None
        row["decided_ms"] = (finals[-1][1] - t_end) * 1000
        row.update(_overhead(done.timings if done else None))
    await client.send(P.CloseSession(session=session))
    return row


async def _push_to_talk(client: Client, n: int, item: Item) -> dict:
    session = f"ptt{n}"
    await client.open(session, "bench1", item.rate, 1, endpoint="client")
    cut = Item(item.name, item.audio[: item.end + item.rate // 10], item.rate, item.end,
               item.held_out)
    _, t_last = await _stream(client, session, cut)
    await client.send(P.EndOfUtterance(session=session))
    row = {"item": item.name, "held_out": item.held_out}
    with _suppress():
        for _ in range(200):
            finals = _finals(client, session)
            if finals:
                break
            await asyncio.sleep(0.05)
        turn = finals[-1][0]
        await client.wait_turn(session, turn, timeout=10)
        first = client.first_audio.get((session, turn))
        row["v2v_ms"] = (first - t_last) * 1000 if first else None
        done = client.done_turns.get((session, turn))
        row.update(_overhead(done.timings if done else None))
    await client.send(P.CloseSession(session=session))
    return row


def _overhead(t: dict | None) -> dict:
    if not t or "gw_first_audio" not in t or "eos" not in t:
        return {}
    models = sum(t.get(k, 0.0) for k in ("vad_ms", "stt_finish_ms", "turn_model_ms",
                                         "llm_first_fragment_ms", "tts_first_synth_ms"))
    server = t["gw_first_audio"] - t["eos"]
    return {"server_ms": server, "overhead_ms": server - models,
            "stt_finish_ms": t.get("stt_finish_ms")}


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, (TimeoutError, KeyError, IndexError,
                                                      UnboundLocalError))


class BenchClient(Client):
    """The reference client, noting when each final transcript and each turn's first reply
    audio arrived."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.final_times: list[tuple[P.Transcript, float]] = []
        self.first_audio: dict[tuple[str, int], float] = {}

    def _on_transcript(self, msg: P.Transcript, now: float) -> None:
        if msg.final:
            self.final_times.append((msg, now))
        super()._on_transcript(msg, now)

    async def _on_binary(self, frame, now: float) -> None:
        session = self.by_channel.get(frame.channel)
        if session is not None and isinstance(frame, P.ReplyAudio):
            self.first_audio.setdefault((session, frame.turn), now)
        await super()._on_binary(frame, now)


async def _run_set(url: str, items: list[Item], ptt: bool, players: int = 1) -> dict:
    """The set, hands-free, then push-to-talk (``ptt``). With ``players`` > 1 each player has
    a connection of its own and goes through the whole set at once with the others, each
    starting at another utterance and ``STAGGER_S`` later, so that they speak over one
    another as a game server's players do."""
    out: dict = {"hands_free": [], "ptt": []}

    async def player(k: int) -> None:
        await asyncio.sleep(k * STAGGER_S)
        client = await BenchClient.connect(url)
        mine = items[k % len(items):] + items[: k % len(items)]
        try:
            for n, item in enumerate(mine):
                out["hands_free"].append(await _hands_free(client, n, item, k))
            if ptt:
                for n, item in enumerate(mine):
                    out["ptt"].append(await _push_to_talk(client, n, item))
        finally:
            await client.close()

    await asyncio.gather(*(player(k) for k in range(players)))
    return out


def run_config(name: str, items: list[Item], ptt: bool, settings: dict | None = None,
               players: int = 1, workers: int | str = 1, log: str | None = None) -> dict:
    """The set on a fleet of its own (``workers`` per stage, or "auto"), configured as
    CONFIGS[name] or ``settings`` (env), spoken by ``players`` players at once; ``log``: a
    file the fleet's structured logs go to, at info level (appended)."""
    redis = RedisServer(appendonly=False).start()
    # admission control off: one player at a time, and a busy 2-core machine must not turn
    # the bench's next session away
    env = {**(CONFIGS[name] if settings is None else settings),
           "PARLEY_LLM_PERSONAS_DIR": str(PERSONAS),
           "PARLEY_LOG_LEVEL": "info" if log else "warning",
           "PARLEY_GATEWAY_ADMIT_MAX_LAG_MS": "0", "PARLEY_GATEWAY_ADMIT_MAX_QUEUE_MS": "0"}
    fleet = Fleet(port=free_port(), workers=workers, redis_url=redis.url, env=env,
                  log_path=log)
    try:
        fleet.start()
        fleet.wait_ready(90)
        return asyncio.run(_run_set(f"ws://127.0.0.1:{fleet.port}", items, ptt, players))
    finally:
        fleet.stop()
        redis.stop()


def _row(label: str, rows: list[dict]) -> str:
    v2v = [r["v2v_ms"] for r in rows if r.get("v2v_ms") is not None]
    ep = [r["endpoint_ms"] for r in rows if r.get("endpoint_ms") is not None
          and not r.get("cutoff")]
    over = [r["overhead_ms"] for r in rows if r.get("overhead_ms") is not None]
    server = [r["server_ms"] for r in rows if r.get("server_ms") is not None]
    cut = sum(bool(r.get("cutoff")) for r in rows)
    miss = sum(bool(r.get("missed")) for r in rows)
    n = len(rows)
    return (f"{label:34} {n:>3} {pct(v2v, 50):>8.0f} {pct(v2v, 95):>8.0f} "
            f"{cut:>4} ({100 * cut / max(n, 1):>3.0f}%) {miss:>6} {pct(ep, 50):>8.0f} "
            f"{pct(over, 50):>9.1f} {pct(server, 50):>7.0f}")


def report(results: dict[str, dict]) -> str:
    lines = [f"{'endpointing / subset':34} {'n':>3} {'v2v p50':>8} {'v2v p95':>8} "
             f"{'cut-offs':>11} {'missed':>6} {'endpoint':>8} {'overhead':>9} {'server':>7}"]
    for name, res in results.items():
        hf = res["hands_free"]
        tag = " (baseline)" if name == BASELINE else ""
        lines.append(_row(f"{name}{tag}", hf))
        for label, rs in (("  tuning set", [r for r in hf if not r["held_out"]]),
                          ("  held out", [r for r in hf if r["held_out"]])):
            if rs and len(rs) < len(hf):
                lines.append(_row(label, rs))
        if res["ptt"]:
            lines.append(_row("  push-to-talk (end_of_utterance)", res["ptt"]))
    lines.append("")
    for name, res in results.items():
        lines += [_item_line(name, r) for r in res["hands_free"]]
    best = _best(results)
    hf = results[best]["hands_free"] if best else []
    base = results.get(BASELINE, {}).get("hands_free", [])
    ptt = results[best]["ptt"] if best else []

    def p(rows, key, q=50):
        return pct([r[key] for r in rows if r.get(key) is not None], q)

    lines += [
        "",
        "v2v: true end of speech (its chunk sent) -> first reply audio at the client; cut-off:",
        "the turn ended before the speaker was done; missed: no turn within 2 s of the end;",
        "endpoint: where the server ended the turn (its 16 kHz position) - the true end, p50 of",
        "turns not cut off: the wait itself, whatever the CPU; overhead: server time from the",
        "end decision to first audio minus time inside models; server: the end decision to",
        "first audio at the gateway (what a reply started early at a likely end can save).",
        f"best={best} v2v_p50_ms={p(hf, 'v2v_ms'):.0f} v2v_p95_ms={p(hf, 'v2v_ms', 95):.0f} "
        f"cutoff_rate={_rate(hf, 'cutoff'):.3f} missed={sum(bool(r['missed']) for r in hf)} "
        f"baseline_v2v_p50_ms={p(base, 'v2v_ms'):.0f} "
        f"baseline_cutoff_rate={_rate(base, 'cutoff'):.3f} "
        f"ptt_p50_ms={p(ptt, 'v2v_ms'):.0f} overhead_p50_ms={p(hf, 'overhead_ms'):.1f}"
        + _crowd(results, best),
    ]
    return "\n".join(lines)


def _item_line(setting: str, r: dict) -> str:
    """One utterance's row: its turns, and those of v2v, decided and endpoint it has (ms)."""
    flag = "CUT" if r["cutoff"] else "MISSED" if r["missed"] else ""
    figures = "".join(f"{label} {None if r[key] is None else round(r[key])} "
                      for label, key in (("v2v", "v2v_ms"), ("decided", "decided_ms"),
                                         ("endpoint", "endpoint_ms")) if key in r)
    where = f" (session {r['session']})" if r.get("session") else ""
    return f"  {setting:18} {r['item']:58} turns {r['turns']} {figures}{flag}{where}"


def _rate(rows: list[dict], key: str) -> float:
    return sum(bool(r.get(key)) for r in rows) / len(rows) if rows else float("nan")


def _best(results: dict[str, dict | None]) -> str | None:
    """The setting the product ships, else the last row; one player's rows first."""
    alone = [k for k, v in results.items() if not v or v.get("players", 1) == 1]
    for name in (DEFAULT, *reversed(alone or list(results))):
        if name in results:
            return name
    return None


def _crowd(results: dict[str, dict], best: str | None) -> str:
    """The key=value fields of ``best``'s setting at the most players (--players), if run."""
    rows = [v for v in results.values() if best and v.get("setting", best) ==
            results[best].get("setting", best) and v.get("players", 1) > 1]
    if not rows:
        return ""
    top = max(rows, key=lambda v: v["players"])
    hf = top["hands_free"]
    v2v = [r["v2v_ms"] for r in hf if r.get("v2v_ms") is not None]
    return (f" players={top['players']} players_v2v_p50_ms={pct(v2v, 50):.0f} "
            f"players_v2v_p95_ms={pct(v2v, 95):.0f} "
            f"players_cutoff_rate={_rate(hf, 'cutoff'):.3f} "
            f"players_missed={sum(bool(r['missed']) for r in hf)}")


# the decision alone: (label, ListenerConfig kwargs, uses the end-of-turn model)
OFFLINE = (
    ("energy-500", {"vad": "energy", "silence_ms": 500}, False),
    ("silero-500", {"vad": "silero", "silence_ms": 500}, False),
    ("silero-650", {"vad": "silero", "silence_ms": 650}, False),
    ("silero-800", {"vad": "silero", "silence_ms": 800}, False),
    ("silero-1000", {"vad": "silero", "silence_ms": 1000}, False),
    ("silero+smart-turn p>=0.5", {"vad": "silero", "turn_threshold": 0.5}, True),
    ("silero+smart-turn p>=0.9", {"vad": "silero", "turn_threshold": 0.9}, True),
    ("silero+smart-turn p>=0.98", {"vad": "silero", "turn_threshold": 0.98}, True),
)


def parse_setting(text: str) -> tuple[str, dict[str, str]]:
    """``--setting KEY=VALUE[,KEY=VALUE]`` in ``[stt]`` keys (``vad_silence_ms=650``,
    ``vad=energy``, ``turn_model=smart-turn``): its label and the environment that sets it on
    top of the product's defaults. A key that is not an ``[stt]`` setting, or a value its type
    cannot read, is a ValueError that says which."""
    from dataclasses import fields

    from core.config import Config, SttConfig

    known = {f.name for f in fields(SttConfig)}
    pairs: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().removeprefix("stt.")
        if not sep or not key or not value.strip():
            raise ValueError(f"--setting {text!r}: write KEY=VALUE[,KEY=VALUE] in [stt] keys, "
                             "e.g. vad_silence_ms=650")
        if key not in known:
            raise ValueError(f"--setting {text!r}: {key!r} is not an [stt] setting "
                             f"(known: {', '.join(sorted(known))})")
        pairs[key] = value.strip()
    env = {f"PARLEY_STT_{k.upper()}": v for k, v in pairs.items()}
    try:
        stt = Config.load(env=env).stt
    except ValueError as e:  # a value its type cannot read
        raise ValueError(f"--setting {text!r}: {e}") from None
    if stt.vad not in ("silero", "energy"):
        raise ValueError(f"--setting {text!r}: vad must be silero or energy, not {stt.vad!r}")
    if stt.turn_model not in ("none", "auto", "smart-turn"):
        raise ValueError(f"--setting {text!r}: turn_model must be none, auto or smart-turn, "
                         f"not {stt.turn_model!r}")
    return "stt:" + ",".join(f"{k}={v}" for k, v in pairs.items()), env


def _offline_settings(settings: dict[str, dict[str, str]], available=None) -> list[tuple]:
    """(label, ListenerConfig, model file) of each ``--setting``, as a worker would run it: the
    model file is ``stt.turn_model_path`` ("" for the one in the pipecat-ai wheel) where the
    row asks the end-of-turn model, None where it does not. ``turn_model=auto`` uses the model
    only where it can run (``available(path)``, turn_model.available, returns None)."""
    from core.config import Config
    from workers.stt import turn_model
    from workers.stt.listener import ListenerConfig

    available = available or turn_model.available
    out = []
    for label, env in settings.items():
        stt = Config.load(env=env).stt
        needs = stt.turn_model == "smart-turn" or (
            stt.turn_model == "auto" and available(stt.turn_model_path) is None)
        out.append((label, ListenerConfig.from_stt(stt, turn_model=needs),
                    stt.turn_model_path if needs else None))
    return out


def model_checks(items: list[Item], cfg, model) -> list[tuple[bool, float]]:
    """(asked at the true end, probability) of every question the listener puts to ``model``
    on ``items`` with ``cfg``'s VAD and pause, the model never ending a turn: how well it tells
    a pause inside speech from the end, whatever threshold one would pick."""
    from dataclasses import replace

    never = replace(cfg, turn_model=True, turn_threshold=float("inf"))
    asked: list[tuple[bool, float]] = []
    for item in items:
        decide(item, never, model, asked)
    return asked


def auc(asked: list[tuple[bool, float]]) -> float:
    """P(a true end scores above a pause inside speech), ties half: 0.5 is chance, 1 a
    model some threshold separates perfectly."""
    ends = np.array([p for at_end, p in asked if at_end])
    mids = np.array([p for at_end, p in asked if not at_end])
    if not len(ends) or not len(mids):
        return float("nan")
    above = (ends[:, None] > mids[None, :]).mean()
    return float(above + 0.5 * (ends[:, None] == mids[None, :]).mean())


def run_offline(items: list[Item], settings: dict[str, dict[str, str]] | None = None) -> str:
    """Cut-offs, missed ends and the endpoint wait of each setting's decision alone: the
    Sans-I/O listener on the same audio, no fleet, no CPU contention, deterministic."""
    from workers.stt import turn_model
    from workers.stt.listener import ListenerConfig

    models: dict[str, object] = {}  # model file ("" the wheel's) -> SmartTurn, or why not

    def model_at(path: str):
        if path not in models:
            why = turn_model.available(path)
            models[path] = why if why else turn_model.SmartTurn(path)
        return models[path]

    lines = [f"{'decision (offline)':28} {'subset':8} {'n':>3} {'cut-offs':>8} {'missed':>6} "
             f"{'endpoint p50':>12} {'p95':>6}"]
    summary = {}
    rows_to_run = [(label, ListenerConfig(**kw, turn_model=needs), "" if needs else None)
                   for label, kw, needs in OFFLINE]
    rows_to_run += _offline_settings(settings or {})
    asked_with: dict[str, object] = {}  # model file -> the first config that asked it
    for label, cfg, path in rows_to_run:
        model = None if path is None else model_at(path)
        if isinstance(model, str):
            lines.append(f"{label:28} skipped: {model}")
            continue
        if path is not None:
            asked_with.setdefault(path, cfg)
        rows = [offline_row(it, decide(it, cfg, model)) for it in items]
        summary[label] = rows
        if len(label) > 28:  # a long --setting label gets a line of its own
            lines.append(label)
            label = ""
        for sub, rs in (("all", rows), ("tuning", [r for r in rows if not r["held_out"]]),
                        ("held out", [r for r in rows if r["held_out"]])):
            if not rs or (len(rs) == len(rows) and sub != "all"):
                continue
            ep = [r["endpoint_ms"] for r in rs if r["endpoint_ms"] is not None
                  and not r["cutoff"]]
            lines.append(f"{label if sub == 'all' else '':28} {sub:8} {len(rs):>3} "
                         f"{sum(r['cutoff'] for r in rs):>8} {sum(r['missed'] for r in rs):>6} "
                         f"{pct(ep, 50):>12.0f} {pct(ep, 95):>6.0f}")
    if asked_with:
        lines += ["", "end-of-turn model, asked at every pause and never ending the turn: "
                  "probability that the speaker is done",
                  f"{'model':28} {'inside speech: n':>16} {'p50':>5} {'at the end: n':>14} "
                  f"{'p50':>5} {'separation':>10}"]
    for path, cfg in asked_with.items():
        asked = model_checks(items, cfg, models[path])
        mid = [p for at_end, p in asked if not at_end]
        end = [p for at_end, p in asked if at_end]
        lines.append(f"{models[path].name[:28]:28} {len(mid):>16} {pct(mid, 50):>5.2f} "
                     f"{len(end):>14} {pct(end, 50):>5.2f} {auc(asked):>10.2f}")
    if asked_with:
        lines.append("separation: the chance that a true end scores above a pause inside "
                     "speech (0.5: no better than a coin; 1: some threshold tells them all apart).")
    lines.append("")
    lines += [_item_line(DEFAULT, r) for r in summary.get(DEFAULT, [])]
    lines += ["", "endpoint: where the turn ends - the true end of speech (ms of audio), turns "
              "not cut off."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="parley bench turns")
    ap.add_argument("--offline", action="store_true",
                    help="the end-of-turn decision alone, without fleets (seconds, exact)")
    ap.add_argument("--configs", default=",".join(RUN_BY_DEFAULT),
                    help=f"comma-separated, of: {', '.join(CONFIGS)}")
    ap.add_argument("--speculation", action="store_true",
                    help="with --offline: how early replies at a likely end would fare, per "
                         "stt.speculate_ms (pocketsphinx's words at the likely end vs final)")
    ap.add_argument("--no-ptt", action="store_true", help="skip the push-to-talk rows")
    ap.add_argument("--limit", type=int, default=0, help="only the first N utterances")
    ap.add_argument("--audio", action="append", default=[], metavar="FILE[@SECONDS]|DIR",
                    help="your own recordings instead of the built-in set (repeatable): one "
                         "utterance each, its end of speech found from its level or given in "
                         "seconds after '@'; counted as held out")
    ap.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="an endpointing setting of your own, in [stt] keys (repeatable), "
                         "e.g. vad_silence_ms=650: a row next to the baseline and the default")
    ap.add_argument("--players", default="1", metavar="N[,N]",
                    help="players speaking at once, each through the whole set on a connection "
                         "of its own; each count is a row per setting (e.g. 1,3)")
    ap.add_argument("--workers", default="1",
                    help="worker processes per stage, or auto (as parley up --workers)")
    ap.add_argument("--with-set", action="store_true",
                    help="with --audio: the built-in set as well")
    ap.add_argument("--log", metavar="FILE",
                    help="the fleets' structured logs, at info level, appended to FILE (one "
                         "JSON line each; a bench_config line before each fleet's): each "
                         "utterance's row names its session, to find its turn there")
    args = ap.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; known: {list(CONFIGS)}")
    settings = {}
    for text in args.setting:
        try:
            label, env = parse_setting(text)
        except ValueError as e:
            ap.error(str(e))
        settings[label] = env
    if settings and args.configs == ap.get_default("configs"):
        names = [BASELINE, DEFAULT]  # compared with the baseline and what ships
    names += [n for n in settings if n not in names]
    try:
        mine = recordings(args.audio)
    except ValueError as e:
        ap.error(str(e))
    items = mine if mine and not args.with_set else build_set() + mine
    if args.limit:
        items = items[: args.limit]
    if args.offline:
        print(run_offline_speculation(items) if args.speculation
              else run_offline(items, settings))
        return 0
    from parley.fleet import worker_counts

    try:
        worker_counts(args.workers)
    except ValueError:
        ap.error(f"--workers must be auto or a number of 1 or more, not {args.workers!r}")
    try:
        counts = sorted({int(x) for x in args.players.split(",") if x.strip()})
    except ValueError:
        ap.error(f"--players: comma-separated counts, not {args.players!r}")
    if not counts or counts[0] < 1:
        ap.error("--players: counts of 1 or more")
    print(f"{len(items)} utterances x {len(names)} endpointing settings "
          f"({sum(i.held_out for i in items)} held out)"
          + (f" x {counts} players" if counts != [1] else ""), flush=True)
    results = {}
    for name in names:
        for players in counts:
            t0 = time.monotonic()
            label = name if players == 1 else f"{name} x{players} players"
            # push-to-talk does not depend on the hands-free setting: once, on the product's
            if args.log:
                with open(args.log, "a") as f:
                    f.write(json.dumps({"event": "bench_config", "config": label}) + "\n")
            res = run_config(name, items, ptt=not args.no_ptt and players == counts[0]
                             and name == _best(dict.fromkeys(names)),
                             settings=settings.get(name), players=players,
                             workers=args.workers, log=args.log)
            results[label] = {**res, "setting": name, "players": players}
            print(f"  {label:20} {time.monotonic() - t0:5.1f} s", flush=True)
    print(report(results))
    return 0



# --- the decision alone, offline ------------------------------------------------------------

def decide(item: Item, cfg, model=None, asked: list | None = None) -> list[tuple[str, int]]:
    """(reason, 16 kHz position) of every turn end the Sans-I/O listener makes on ``item``,
    fed in 20 ms chunks as the STT worker would, the model answering each pause at once;
    ``asked`` gets (at or after the true end, probability) of each of its answers."""
    from schemas.streams import MicEntry
    from workers.stt.listener import Check, End, Listener

    lis = Listener(item.rate, 1, "s16le", cfg)
    step = item.rate * CHUNK_MS // 1000
    end16 = item.end * 16000 // item.rate
    ends: list[tuple[str, int]] = []

    def take(actions):
        for a in actions:
            if isinstance(a, Check) and model is not None:
                p = model.predict(a.audio)
                if asked is not None:
                    asked.append((lis.position >= end16, p))
                take(lis.verdict(p, a))
            elif isinstance(a, End):
                ends.append((a.reason, lis.position))
                lis.utterance_done()

    for i, start in enumerate(range(0, len(item.audio), step)):
        pcm = to_pcm(item.audio[start:start + step], "s16le")
        take(lis.push(MicEntry(seq=i + 1, pcm=pcm, ts=float(i))))
    return ends


def offline_row(item: Item, ends: list[tuple[str, int]]) -> dict:
    end16 = item.end * 16000 // item.rate
    after = [p for _, p in ends if p >= end16]
    return {"item": item.name, "held_out": item.held_out, "turns": len(ends),
            "cutoff": any(p < end16 for _, p in ends),
            "missed": not after or after[0] > end16 + MISSED_S * 16000,
            "endpoint_ms": (after[0] - end16) / 16 if after else None}


SPECULATE_MS = (150, 200, 250, 300, 400, 500)


def _speculation_pass(item: Item, backend, values=SPECULATE_MS) -> dict[int, dict[str, int]]:
    """One recognizer pass over ``item`` (fed as the STT stage feeds it), with one silero-800
    listener per speculate_ms deciding alongside: per value, early starts, those cancelled by
    resumed speech, those the final words matched (adopted) and those they did not."""
    from schemas.streams import MicEntry
    from workers.speculation import norm
    from workers.stt.listener import End, Feed, Likely, Listener, ListenerConfig, Resumed, Start

    lis = [Listener(item.rate, 1, "s16le",
                    ListenerConfig(vad="silero", silence_ms=800, speculate_ms=v)) for v in values]
    out = {v: dict.fromkeys(("started", "resumed", "adopted", "changed"), 0) for v in values}
    early: dict[int, str | None] = dict.fromkeys(values)
    stream = None
    step = item.rate * CHUNK_MS // 1000
    for i, start in enumerate(range(0, len(item.audio), step)):
        mic = MicEntry(seq=i + 1, pcm=to_pcm(item.audio[start:start + step], "s16le"),
                       ts=float(i))
        acts = [lis_v.push(mic) for lis_v in lis]
        for a in acts[0]:  # the same audio reaches the recognizer whatever speculate_ms is
            if isinstance(a, Start):
                stream = backend.open_stream()
                stream.feed(a.audio)
            elif isinstance(a, Feed) and stream is not None and len(a.audio):
                stream.feed(a.audio)
        for v, actions in zip(values, acts, strict=True):
            for a in actions:
                if isinstance(a, Likely) and stream is not None:
                    out[v]["started"] += 1
                    early[v] = stream.hypothesis()
                elif isinstance(a, Resumed):
                    out[v]["resumed"] += 1
                    early[v] = None
        if any(isinstance(a, End) for a in acts[0]) and stream is not None:
            final = norm(stream.finish())
            stream.close()
            stream = None
            for v, lis_v in zip(values, lis, strict=True):
                if early[v] is not None:
                    out[v]["adopted" if norm(early[v]) == final else "changed"] += 1
                early[v] = None
                lis_v.utterance_done()
    return out


def run_offline_speculation(items: list[Item]) -> str:
    """Per stt.speculate_ms, over the set (silero, 800 ms): early replies started, cancelled
    because the speaker went on, adopted (the final words the same) and cancelled because the
    words changed; the head start is 800 - speculate_ms of silence."""
    from workers.stt.pocketsphinx_backend import PocketsphinxBackend

    backend = PocketsphinxBackend()
    backend.warm()
    total = {v: dict.fromkeys(("started", "resumed", "adopted", "changed"), 0)
             for v in SPECULATE_MS}
    for item in items:
        for v, counts in _speculation_pass(item, backend).items():
            for k, n in counts.items():
                total[v][k] += n
    lines = [f"{'speculate_ms':>12} {'head start':>10} {'started':>7} {'resumed':>7} "
             f"{'adopted':>7} {'changed':>7}"]
    for v in SPECULATE_MS:
        t = total[v]
        lines.append(f"{v:>12} {800 - v:>10} {t['started']:>7} {t['resumed']:>7} "
                     f"{t['adopted']:>7} {t['changed']:>7}")
    lines += ["", "started: early replies; resumed: cancelled, the speaker went on; adopted: "
              "the final words matched; changed: cancelled, they did not (silero, 800 ms)."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
