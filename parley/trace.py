"""`parley trace`, Sans-I/O: a turn's latency waterfall from its timing marks, as a text chart.

The marks are the session's ``timing`` hash (``<turn>:<mark>`` -> ms since the epoch, first
write wins), written by the stage that reached the mark. Each step of the chart is the time from
the mark it waits for (the last of them: first face sent waits for the face and for UE's
ready) to this one, owed to the mark's owner; the backends' own times
(``*_ms`` marks: STT's final decode, the LLM's first fragment, TTS's first synthesis) are shown
beside their stage.
"""

from __future__ import annotations

from parley.recording import TurnOutcome

MARKS = {  # mark -> (owner, what it is, the marks it waits for)
    "eos": ("stt", "end of speech", ()),
    "final_transcript": ("stt", "final transcript", ("eos",)),
    "first_token": ("llm", "first token", ("final_transcript",)),
    "first_fragment": ("llm", "first fragment", ("first_token",)),
    "tts_first_chunk": ("tts", "first TTS chunk", ("first_fragment",)),
    "gw_first_audio": ("gateway", "first audio sent", ("tts_first_chunk",)),
    "ready": ("client", "ready from UE", ("gw_first_audio",)),
    "first_face": ("lipsync", "first face frames", ("tts_first_chunk",)),
    "gw_first_face": ("gateway", "first face sent", ("first_face", "ready")),
}
OWN_TIME = {"final_transcript": "stt_finish_ms", "first_fragment": "llm_first_fragment_ms",
            "tts_first_chunk": "tts_first_synth_ms"}


def turn_trace(o: TurnOutcome) -> dict:
    """Each mark with its step: the time from the last of the marks it waits for (a mark
    written in the background may land a little after the next stage's; a step is never
    negative)."""
    t = o.timings
    if "eos" not in t:
        return {"turn": o.turn, "transcript": o.transcript, "reply": o.reply, "steps": [],
                "slowest": None, "note": "no end-of-speech mark: the turn never completed STT"}
    eos = t["eos"]
    steps = []
    for name, (owner, what, after) in MARKS.items():
        if name not in t:
            continue
        at = t[name] - eos
        start = max([t[a] - eos for a in after if a in t], default=0.0)
        step = {"mark": name, "what": what, "owner": owner, "at_ms": round(at, 1),
                "from_ms": round(min(start, at), 1), "step_ms": round(max(0.0, at - start), 1)}
        if OWN_TIME.get(name) in t:
            step["backend_ms"] = round(t[OWN_TIME[name]], 1)
        steps.append(step)
    slowest = max(steps[1:], key=lambda s: s["step_ms"], default=None)
    return {"turn": o.turn, "transcript": o.transcript, "reply": o.reply,
            "llm_backend": o.llm_backend, "interrupted": o.interrupted, "steps": steps,
            "slowest": slowest and {"mark": slowest["mark"], "owner": slowest["owner"],
                                    "step_ms": slowest["step_ms"]}}


def render(traces: list[dict], width: int = 40) -> str:
    lines: list[str] = []
    for tr in traces:
        head = f"turn {tr['turn']}: {tr['transcript']!r} -> {tr['reply'][:60]!r}"
        if tr.get("interrupted"):
            head += " (interrupted)"
        lines.append(head)
        if not tr["steps"]:
            lines += [f"  {tr.get('note', 'no timing marks')}", ""]
            continue
        span = max(s["at_ms"] for s in tr["steps"]) or 1.0
        for s in tr["steps"]:
            start = s["from_ms"] / span * width
            end = s["at_ms"] / span * width
            bar = " " * int(start) + "█" * max(1 if s["step_ms"] else 0, int(end) - int(start))
            own = f"  {s['owner']} backend {s['backend_ms']:.0f} ms" if "backend_ms" in s else ""
            who = s["owner"] + (f" ({tr['llm_backend']})" if s["owner"] == "llm"
                                and tr.get("llm_backend") else "")
            lines.append(f"  {s['what']:18} {s['at_ms']:+8.1f} ms |{bar:{width}}| "
                         f"+{s['step_ms']:.1f} {who}{own}")
        sl = tr["slowest"]
        if sl:
            lines.append(f"  slowest step: {MARKS[sl['mark']][1]} ({sl['owner']}), "
                         f"{sl['step_ms']:.1f} ms")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
