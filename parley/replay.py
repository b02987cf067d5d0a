"""Replay, Sans-I/O: when to send each recorded client event, and the report.

:func:`plan` turns a recording's events into :class:`Step` s. A step says what it waits for in
the replay (the audio of the segment a ``ready`` answers, the ``stop`` an interrupt answers, the
end of a reply's playback) and when to go after that:

* an event that came while a reply was playing (between its first ``ready`` and the end of its
  audio, or the cut) keeps its offset from that ``ready``, in both speeds: so the player's voice
  reaches the gateway at the same point of the reply, and a barge-in lands where it did;
* any other event keeps its gap to the previous one (``realtime``) or goes at once (``fast``;
  mic audio at 8x real time, well under the gateway's 20x audio limit), but never before the
  replay's own playback of the replies that had ended before it in the original, so speech
  that followed a reply does not become a barge-in.

:func:`compare` and :func:`render` make the side-by-side report: per turn, original against
replay, the deterministic outputs (transcript, reply, heard text, reply PCM and face frames by
hash) marked where they differ, and the latency waterfall of both (never marked: wall clocks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from parley.recording import Recording, TurnOutcome

PLAYBACK_SLACK_MS = 300.0  # the gateway's own slack (gateway/relay.py PLAYBACK_SLACK_S)
FAST_AUDIO_FACTOR = 8.0
CLIENT_KINDS = ("mic", "end_of_utterance", "ready", "interrupt", "close")


@dataclass
class Step:
    event: dict
    needs: list[tuple] = field(default_factory=list)  # ("audio", T, S) ("stop", T) ("played", T)
    anchor: int | None = None  # turn whose first replay ``ready`` the delay counts from
    delay_ms: float = 0.0  # after the anchor, or after the previous step


def _windows(rec: Recording) -> dict[int, tuple[float, float]]:
    """Original playback window of each turn: first ready to end of audio (or the cut)."""
    first_ready: dict[int, float] = {}
    cut: dict[int, float] = {}
    for e in rec.events:
        if e["kind"] == "ready":
            first_ready.setdefault(e["turn"], e["t"])
        elif e["kind"] == "interrupt" and e.get("turn"):
            cut.setdefault(e["turn"], e["t"])
    out = {}
    for turn, start in first_ready.items():
        o = rec.turns.get(turn)
        end = start + (o.audio_s * 1000 if o else 0.0) + PLAYBACK_SLACK_MS
        out[turn] = (start, min(end, cut.get(turn, end)))
    return out


def plan(rec: Recording, fast: bool = False, turns: set[int] | None = None) -> list[Step]:
    """The replay's steps. ``turns``: stop after the last of these turns (``--turn``)."""
    windows = _windows(rec)
    rate = int(rec.meta.get("sample_rate", 16000))
    steps: list[Step] = []
    prev_t: float | None = None
    last = max(turns) if turns else None
    for e in rec.events:
        kind = e["kind"]
        if kind not in CLIENT_KINDS:
            continue
        if last is not None and kind == "ready" and e["turn"] > last:
            break
        t = e["t"]
        step = Step(e)
        playing = [turn for turn, (a, b) in windows.items() if a <= t < b
                   and not (kind == "ready" and turn == e["turn"])]
        if kind == "ready":
            step.needs.append(("audio", e["turn"], e["segment"]))
        elif kind == "interrupt" and e.get("code") == "answer":
            step.needs.append(("stop", e["turn"]))
        elif kind == "interrupt" and e.get("code") == "client":
            step.needs.append(("audio", e["turn"], None))
        if kind == "close":  # the session ends once the replay's turns have
            step.needs += [("done", turn) for turn in rec.turns if last is None or turn <= last]
        if playing and kind != "interrupt":
            step.anchor = max(playing)
            step.delay_ms = t - windows[step.anchor][0]
        else:
            step.needs += [("played", turn) for turn, (_, b) in windows.items()
                           if b <= t and turn != e.get("turn")]
            gap = 0.0 if prev_t is None else max(0.0, t - prev_t)
            if fast:
                if kind == "mic":
                    chunk_ms = e["n"] / rate * 1000
                    gap = min(gap, chunk_ms / FAST_AUDIO_FACTOR)
                else:
                    gap = 0.0
            step.delay_ms = gap
        steps.append(step)
        prev_t = t
    return steps


# --------------------------------------------------------------------------- report

STEPS = ("final_transcript", "first_token", "first_fragment", "tts_first_chunk",
         "gw_first_audio", "ready", "first_face", "gw_first_face")


@dataclass
class Row:
    name: str
    original: str
    replay: str
    differs: bool


def _audio(o: TurnOutcome | None) -> str:
    if o is None:
        return "-"
    return f"{o.audio_s:.2f} s #{o.audio_sha[:8]}"


def _face(o: TurnOutcome | None) -> str:
    return "-" if o is None else f"{o.face_frames} #{o.face_sha[:8]}"


def _get(o: TurnOutcome | None, name: str):
    return None if o is None else getattr(o, name)


def waterfall(o: TurnOutcome | None) -> dict[str, float]:
    """Each mark in ms after the end of the player's speech."""
    if o is None or "eos" not in o.timings:
        return {}
    eos = o.timings["eos"]
    return {k: round(o.timings[k] - eos, 1) for k in STEPS if k in o.timings}


def compare_turn(a: TurnOutcome | None, b: TurnOutcome | None) -> list[Row]:
    rows = [
        Row("transcript", repr(_get(a, "transcript")), repr(_get(b, "transcript")),
            _get(a, "transcript") != _get(b, "transcript")),
        Row("reply", repr(_get(a, "reply")), repr(_get(b, "reply")),
            _get(a, "reply") != _get(b, "reply")),
    ]
    cut = bool(_get(a, "interrupted") or _get(b, "interrupted"))
    if cut:
        rows += [
            Row("interrupted", f"at {_get(a, 'played')}", f"at {_get(b, 'played')}",
                (_get(a, "interrupted"), _get(a, "played"))
                != (_get(b, "interrupted"), _get(b, "played"))),
            Row("heard", repr(_get(a, "heard")), repr(_get(b, "heard")),
                _get(a, "heard") != _get(b, "heard")),
            # what was produced after the cut depends on timing; what UE played must not
            Row("played audio", f"#{(_get(a, 'played_sha') or '-')[:8]}",
                f"#{(_get(b, 'played_sha') or '-')[:8]}",
                _get(a, "played_sha") != _get(b, "played_sha")),
            Row("played face", f"#{(_get(a, 'played_face_sha') or '-')[:8]}",
                f"#{(_get(b, 'played_face_sha') or '-')[:8]}",
                _get(a, "played_face_sha") != _get(b, "played_face_sha")),
        ]
    rows += [
        Row("audio", _audio(a), _audio(b),
            not cut and _get(a, "audio_sha") != _get(b, "audio_sha")),
        Row("face frames", _face(a), _face(b),
            not cut and _get(a, "face_sha") != _get(b, "face_sha")),
        Row("llm backend", str(_get(a, "llm_backend") or "-"),
            str(_get(b, "llm_backend") or "-"),
            _get(a, "llm_backend") != _get(b, "llm_backend")),
    ]
    wa, wb = waterfall(a), waterfall(b)
    for k in STEPS:
        if k in wa or k in wb:
            rows.append(Row(f"  {k}", _ms(wa.get(k)), _ms(wb.get(k)), False))
    if wa or wb:
        rows.insert(len(rows) - len([k for k in STEPS if k in wa or k in wb]),
                    Row("waterfall (ms after end of speech)", "", "", False))
    return rows


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:+.0f} ms"


@dataclass
class Report:
    turns: dict[int, list[Row]]

    @property
    def differing(self) -> list[int]:
        return [t for t, rows in self.turns.items() if any(r.differs for r in rows)]

    def to_json(self) -> dict:
        return {"turns": {t: [r.__dict__ for r in rows] for t, rows in self.turns.items()},
                "differing_turns": self.differing}


def compare(original: dict[int, TurnOutcome], replay: dict[int, TurnOutcome],
            turns: set[int] | None = None) -> Report:
    wanted = sorted(set(original) | set(replay))
    if turns:
        wanted = [t for t in wanted if t in turns]
    return Report({t: compare_turn(original.get(t), replay.get(t)) for t in wanted})


def render(report: Report, width: int = 44) -> str:
    def cell(s: str) -> str:
        return s if len(s) <= width else s[:width - 1] + "…"

    lines = []
    for turn, rows in report.turns.items():
        lines.append(f"turn {turn}" + ("" if turn not in report.differing else "   DIFFERS"))
        lines.append(f"  {'':18} {'original':{width}}   replay")
        for r in rows:
            mark = "≠" if r.differs else ("~" if r.original != r.replay and not
                                          r.name.startswith(" ") else " ")
            lines.append(f"{mark} {r.name:18} {cell(r.original):{width}}   {cell(r.replay)}")
        lines.append("")
    n, d = len(report.turns), len(report.differing)
    lines.append("(≠ differs; ~ differs where timing decides: what was produced after a cut)")
    lines.append(f"turns={n} identical={n - d} differing={d}"
                 + (f" ({', '.join(map(str, report.differing))})" if d else ""))
    return "\n".join(lines)
