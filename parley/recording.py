"""A stored session as a recording: what the client did, and what came out of each turn.

What the client did is the mic stream (audio ``<seq>-0`` and end_of_utterance ``<seq>-1``, each
stamped on arrival) and the control stream (open, ready, interrupt with its played position,
resume, close: schemas/streams.py ``ControlEntry``), merged in arrival order. What came out is
condensed per turn into a :class:`TurnOutcome`: transcript, reply, heard text, reply audio and
face frames (lengths and hashes: a replay compares them bit for bit) and the timing marks.

``load`` reads one from Redis; ``write_file``/``read_file`` carry one to another machine as a
zip: ``recording.json`` (session and outcomes), ``events.jsonl`` (one client event a line) and
``mic.wav`` (the mic audio as it arrived, bit for bit; events point into it by frame).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from schemas.streams import (
    ControlEntry,
    FaceEntry,
    Keys,
    MicEntry,
    ReplyEntry,
    TranscriptEntry,
    VoiceEntry,
    parse_id,
)

FORMAT_VERSION = 1
_MAX = 2**63 - 1
SAMPLE_BYTES = {"s16le": 2, "f32le": 4}


@dataclass
class TurnOutcome:
    """One turn's outputs, condensed so that two runs compare field by field."""

    turn: int
    transcript: str = ""
    reply: str = ""
    heard: str | None = None  # history's heard text (only where the reply was cut)
    interrupted: bool = False
    played: int | None = None  # interrupt's played_samples
    reply_rate: int = 0
    audio_samples: int = 0
    audio_sha: str = ""  # of the whole reply PCM (int16 LE)
    played_sha: str = ""  # of the PCM UE played before the cut (interrupted turns)
    face_frames: int = 0
    face_sha: str = ""  # of every frame's sample and values, in order
    played_face_sha: str = ""  # frames before the cut
    llm_backend: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # mark -> ms since the epoch

    @property
    def audio_s(self) -> float:
        return self.audio_samples / self.reply_rate if self.reply_rate else 0.0


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()[:16]


def turn_outcome(turn: int, transcript: list[dict], reply: list[dict], voice: list[dict],
                 face: list[dict], history: dict[str, str], timing: dict[str, float],
                 played: int | None, interrupted: bool) -> TurnOutcome:
    """Sans-I/O: the turn's stream entries (field dicts, in order) condensed."""
    out = TurnOutcome(turn=turn, interrupted=interrupted, played=played)
    for f in transcript:
        t = TranscriptEntry.from_fields(f)
        if t.final:
            out.transcript = t.text
    fragments = []
    for f in reply:
        r = ReplyEntry.from_fields(f)
        if r.end:
            out.reply, out.llm_backend = r.text, r.backend
        else:
            fragments.append(r.text)
    out.reply = out.reply or " ".join(fragments)
    out.heard = history.get(f"{turn}:heard")
    chunks = [VoiceEntry.from_fields(f) for f in voice]
    rates = {c.rate for c in chunks if c.rate}
    out.reply_rate = rates.pop() if rates else 0
    total = max([c.sample + c.num_samples for c in chunks], default=0)
    pcm = np.zeros(total, "<i2")
    for c in chunks:
        if c.num_samples:
            pcm[c.sample:c.sample + c.num_samples] = np.frombuffer(c.pcm, "<i2")
    out.audio_samples, out.audio_sha = total, _sha(pcm.tobytes())
    frames = [FaceEntry.from_fields(f) for f in face]
    frames = [f for f in frames if not f.end and len(f.samples)]
    samples = (np.concatenate([f.samples for f in frames]) if frames
               else np.zeros(0, "<i8")).astype("<i8")
    values = (np.concatenate([f.values for f in frames]) if frames
              else np.zeros((0, 0), "<f4")).astype("<f4")
    out.face_frames, out.face_sha = len(samples), _sha(samples.tobytes(), values.tobytes())
    if played is not None:
        cut = samples < played
        out.played_sha = _sha(pcm[:played].tobytes())
        out.played_face_sha = _sha(samples[cut].tobytes(), values[cut].tobytes())
    out.timings = {k: v for k, v in timing.items()}
    return out


@dataclass
class Recording:
    """A session as the client played it (``events``, ``mic``) and as it came out (``turns``)."""

    sid: str
    meta: dict  # npc, persona, sample_rate, channels, format, endpoint, seed
    events: list[dict]  # in arrival order; "t": ms since the epoch; mic events: "frame", "n"
    mic: bytes  # the mic audio as it arrived, interleaved, in meta["format"]
    turns: dict[int, TurnOutcome]

    @property
    def frame_bytes(self) -> int:
        return SAMPLE_BYTES.get(self.meta["format"], 2) * int(self.meta["channels"])

    def pcm(self, event: dict) -> bytes:
        fb = self.frame_bytes
        return self.mic[event["frame"] * fb:(event["frame"] + event["n"]) * fb]

    @property
    def duration_s(self) -> float:
        return (self.events[-1]["t"] - self.events[0]["t"]) / 1000 if self.events else 0.0


def merge_events(mic: list[MicEntry], control: list[ControlEntry],
                 frame_bytes: int) -> tuple[list[dict], bytes]:
    """Sans-I/O: the client's events in arrival order, and the mic audio they point into."""
    events: list[dict] = []
    audio = bytearray()
    for m in mic:
        if m.end_of_utterance:
            events.append({"t": m.ts, "kind": "end_of_utterance", "seq": m.seq})
            continue
        n = len(m.pcm) // frame_bytes
        events.append({"t": m.ts, "kind": "mic", "seq": m.seq, "frame": len(audio) // frame_bytes,
                       "n": n})
        audio += m.pcm[:n * frame_bytes]
    for c in control:
        e = {"t": c.ts, "kind": c.kind}
        if c.kind == "ready":
            e |= {"turn": c.turn, "segment": c.segment}
        elif c.kind == "interrupt":
            e |= {"turn": c.turn, "played": None if c.played < 0 else c.played, "code": c.code}
        if c.data:
            e["data"] = c.data
        events.append(e)
    # stable: at one stamp the mic (written first by the gateway) goes first
    events.sort(key=lambda e: e["t"])
    return events, bytes(audio)


def _d(raw: dict) -> dict[str, str]:
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes)
                                                          else v) for k, v in raw.items()}


async def load(redis, sid: str, prefix: str = "parley") -> Recording:
    """The stored session ``sid`` (raises LookupError when nothing of it is stored)."""
    keys = Keys(prefix)
    k = lambda name: keys.session(sid, name)  # noqa: E731
    meta = _d(await redis.hgetall(k("meta")))
    if not meta:
        raise LookupError(f"session {sid!r}: nothing stored (unknown, expired or forgotten)")
    meta.pop("secret_hash", None)  # never leaves Redis
    meta.pop("owner", None)
    mic = [MicEntry.from_entry(i, f) for i, f in await redis.xrange(k("mic"))]
    control = [ControlEntry.from_fields(f) for _, f in await redis.xrange(k("control"))]
    fb = SAMPLE_BYTES.get(meta.get("format", "s16le"), 2) * int(meta.get("channels", 1))
    events, audio = merge_events(mic, control, fb)
    history = _d(await redis.hgetall(k("history")))
    timing: dict[int, dict[str, float]] = {}
    for key, v in _d(await redis.hgetall(k("timing"))).items():
        t, _, mark = key.partition(":")
        timing.setdefault(int(t), {})[mark] = float(v)
    played = {c.turn: (None if c.played < 0 else c.played) for c in control
              if c.kind == "interrupt" and c.turn}
    cut = {int(f.get(b"turn", 0)) for _, f in await redis.xrange(k("events"))
           if f.get(b"kind") == b"interrupt"}
    streams = {}
    for name in ("transcript", "reply", "voice", "face"):
        per: dict[int, list[dict]] = {}
        for i, f in await redis.xrange(k(name)):
            per.setdefault(parse_id(i)[0], []).append(f)
        streams[name] = per
    turns = {}
    for t in sorted(set().union(*streams.values())):
        turns[t] = turn_outcome(t, *(streams[n].get(t, []) for n in streams), history,
                                timing.get(t, {}), played.get(t), t in cut or t in played)
    return Recording(sid=sid, meta=meta, events=events, mic=audio, turns=turns)


# --------------------------------------------------------------------------- file


def write_file(rec: Recording, path: str | Path) -> Path:
    """One portable file: recording.json, events.jsonl, mic.wav (no secrets: none are stored)."""
    path = Path(path)
    head = {"format": FORMAT_VERSION, "sid": rec.sid, "meta": rec.meta,
            "turns": [asdict(o) for o in rec.turns.values()]}
    fmt, channels = rec.meta["format"], int(rec.meta["channels"])
    frames = np.frombuffer(rec.mic, "<f4" if fmt == "f32le" else "<i2").reshape(-1, channels)
    wav = io.BytesIO()
    sf.write(wav, frames, int(rec.meta["sample_rate"]), format="WAV",
             subtype="FLOAT" if fmt == "f32le" else "PCM_16")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("recording.json", json.dumps(head, indent=1))
        z.writestr("events.jsonl", "".join(json.dumps(e, separators=(",", ":")) + "\n"
                                           for e in rec.events))
        z.writestr("mic.wav", wav.getvalue())
    return path


def read_file(path: str | Path) -> Recording:
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{path}: not a Parley recording ({exc})") from None
    with z:
        names = set(z.namelist())
        missing = {"recording.json", "events.jsonl", "mic.wav"} - names
        if missing:
            raise ValueError(f"{path}: not a Parley recording (lacks {', '.join(sorted(missing))})")
        head = json.loads(z.read("recording.json"))
        if head.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: recording format {head.get('format')}, this Parley reads "
                             f"{FORMAT_VERSION}")
        events = [json.loads(line) for line in z.read("events.jsonl").decode().splitlines()
                  if line.strip()]
        fmt = head["meta"]["format"]
        frames, _ = sf.read(io.BytesIO(z.read("mic.wav")), always_2d=True,
                            dtype="float32" if fmt == "f32le" else "int16")
    mic = frames.astype("<f4" if fmt == "f32le" else "<i2").tobytes()
    turns = {o["turn"]: TurnOutcome(**o) for o in head["turns"]}
    return Recording(sid=head["sid"], meta=head["meta"], events=events, mic=mic, turns=turns)
