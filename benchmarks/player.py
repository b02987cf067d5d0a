"""`parley bench player`: a player's first question to each NPC, push-to-talk, with and without
the player named at ``open``.

The offline recognizer adapts to a speaker over an utterance's first 1.5 s (pocketsphinx's
warm-up: it re-decodes that audio with the speaker's own cepstral mean) and hands what it
learned to the session's next utterance. A session's first question has nothing to start
from, so it pays the re-decode, partly after ``end_of_utterance``. A client that names the
player (``open.player``) gets what the player's other sessions on the connection learned: their
first question to another NPC starts adapted.

Per round: the player talks to a first NPC (a whole utterance, named), then asks two more NPCs a
question each, once as the named player and once unnamed (the baseline), in fresh sessions.
Latency: first reply audio at the client after ``end_of_utterance``, which follows the last
chunk at once. Material: jfk.flac (real speech, 44.1 kHz, crowd noise; the first NPC hears all
11 s, the questions are its first 2.4 s and "ask not" from 3.1 s) and espeak-ng sentences.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from benchmarks.speech import speech
from parley.client import Client
from parley.fleet import Fleet
from parley.redis_server import RedisServer, free_port

PERSONAS = Path(__file__).resolve().parent / "personas"
JFK = Path(__file__).resolve().parents[1] / "parley" / "samples" / "jfk.flac"
R = 16000
SENTENCES = ("Hello there. Can you open the gate for me?", "Tell me about the town, please.",
             "Where does this road go?")


def material() -> dict[str, tuple[np.ndarray, list[np.ndarray]]]:
    """Per kind: what the player says to the first NPC, and their questions to the next ones."""
    x, src = sf.read(str(JFK), dtype="float32", always_2d=True)
    jfk = soxr.resample(x.mean(axis=1), src, R).astype(np.float32)
    espeak = [speech(t, R, tail_s=0.0) for t in SENTENCES]
    return {"jfk.flac": (jfk, [jfk[: int(2.4 * R)], jfk[int(3.1 * R): int(4.4 * R)]]),
            "espeak-ng": (espeak[0], espeak[1:])}


async def _ask(client: Client, session: str, audio: np.ndarray, player: str | None) -> float:
    await client.open(session, "bench1", R, 1, endpoint="client", player=player)
    tr = client.turns[session]
    await client.stream(session, audio, R, realtime=True)
    await client.wait_done(session, 30)
    return tr.latency_ms()["first_audio"]


async def _rounds(url: str, rounds: int) -> dict[tuple[str, str], list[float]]:
    out: dict[tuple[str, str], list[float]] = {}
    client = await Client.connect(url)
    try:
        for kind, (first, questions) in material().items():
            for i in range(rounds):
                player = f"{kind[:3]}{i}"
                await _ask(client, f"{player}-first", first, player)
                for j, q in enumerate(questions):
                    out.setdefault((kind, "named"), []).append(
                        await _ask(client, f"{player}-n{j}", q, player))
                    out.setdefault((kind, "unnamed"), []).append(
                        await _ask(client, f"{player}-u{j}", q, None))
    finally:
        await client.close()
    return out


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def report(results: dict[tuple[str, str], list[float]]) -> str:
    lines = [f"{'material':10} {'player':8} {'n':>3} {'p50 ms':>7} {'p95 ms':>7}"]
    for (kind, who), xs in results.items():
        lines.append(f"{kind:10} {who:8} {len(xs):>3} {_pct(xs, 50):>7.0f} {_pct(xs, 95):>7.0f}")
    named = [x for (_, who), xs in results.items() if who == "named" for x in xs]
    unnamed = [x for (_, who), xs in results.items() if who == "unnamed" for x in xs]
    lines += ["", "first reply audio at the client after end_of_utterance, a player's first "
              "question to an NPC; unnamed (the baseline): the session starts with no "
              "speaker's mean; named: from the player's earlier session.",
              f"named_p50_ms={_pct(named, 50):.0f} named_p95_ms={_pct(named, 95):.0f} "
              f"unnamed_p50_ms={_pct(unnamed, 50):.0f} unnamed_p95_ms={_pct(unnamed, 95):.0f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="parley bench player")
    ap.add_argument("--rounds", type=int, default=4, help="players per material")
    args = ap.parse_args(argv)
    redis = RedisServer(appendonly=False).start()
    env = {"PARLEY_LLM_PERSONAS_DIR": str(PERSONAS), "PARLEY_LOG_LEVEL": "warning"}
    fleet = Fleet(port=free_port(), workers=1, redis_url=redis.url, env=env)
    try:
        fleet.start()
        fleet.wait_ready(90)
        results = asyncio.run(_rounds(f"ws://127.0.0.1:{fleet.port}", args.rounds))
    finally:
        fleet.stop()
        redis.stop()
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
