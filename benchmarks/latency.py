"""`parley bench latency`: streaming pipeline against the sequential whole-file design.

For "streaming" (the product) it starts a fleet on its own Redis and plays turns through the
reference client at real-time pace (as a microphone would), with replies of 1, 3 and 6
sentences. "sequential" is the design it replaces, run in-process with the same backends
(benchmarks/sequential.py: each stage waits for all of its input, nothing reaches UE before the
face is done). Profiles: the offline backends as they are, and "sim", SIMULATED GPU-class model
timings (benchmarks/simulated.py, loaded by name like any backend).

TTFA = end of the player's speech (last mic chunk sent) -> first reply audio at the client.
Fleet overhead = the server's own part of TTFA minus the time spent inside backends on the
critical path (STT finish, LLM until its first fragment, TTS synthesis of the first fragment):
Redis hops, job hand-offs and Python, per turn.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import numpy as np

from benchmarks.speech import speech
from parley.client import Client
from parley.fleet import Fleet
from parley.redis_server import RedisServer, free_port

PERSONAS = Path(__file__).resolve().parent / "personas"
UTTERANCES = (
    "Hello there. Can you open the gate for me?",
    "Good evening. Where does this road go?",
    "Tell me about the town, please.",
)
LENGTHS = (1, 3, 6)
CONFIGS = (("streaming", ""), ("sequential", ""), ("streaming", "sim"), ("sequential", "sim"))


def synth_utterances(rate: int = 16000) -> list[np.ndarray]:
    # speech ends where the file ends: the end of the utterance is the end of speech
    return [speech(text, rate, tail_s=0.0) for text in UTTERANCES]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


async def _turns(url: str, utterances: list[np.ndarray], turns: int) -> list[dict]:
    rows = []
    client = await Client.connect(url)
    try:
        for n in LENGTHS:
            session = f"bench{n}"
            # push-to-talk: the turn ends at the client's end_of_utterance, where TTFA starts
            await client.open(session, f"bench{n}", 16000, 1, endpoint="client")
            for i in range(turns):
                frames = utterances[i % len(utterances)]
                tr = client.turns[session]
                before = set(client.done_turns)
                await client.stream(session, frames, 16000, realtime=True)
                for _ in range(3000):
                    new = set(client.done_turns) - before
                    if new:
                        break
                    await asyncio.sleep(0.01)
                else:
                    raise TimeoutError(f"{session}: no turn_done")
                (_, turn), = new
                done = client.done_turns[(session, turn)]
                t = done.timings or {}
                lat = tr.latency_ms()
                backend = sum(t.get(k, 0.0) for k in ("vad_ms", "stt_finish_ms",
                                                      "llm_first_fragment_ms",
                                                      "tts_first_synth_ms"))
                server = t.get("gw_first_audio", 0) - t.get("eos", 0)
                rows.append({
                    "sentences": n, "ttfa_ms": lat["first_audio"],
                    "first_face_ms": lat["first_face"],
                    "server_ms": server, "backend_ms": backend, "overhead_ms": server - backend,
                    "final_ms": t.get("final_transcript", 0) - t.get("eos", 0),
                    "gaps": tr.seq.gaps, "dups": tr.seq.duplicates,
                })
                # the next turn measures afresh
                tr.t_first_audio = tr.t_first_ready = tr.t_first_face = 0.0
            await asyncio.sleep(0.2)
    finally:
        await client.close()
    return rows


def sequential_rows(profile: str, turns: int, utterances) -> list[dict]:
    """The whole-file baseline: the same turns, each stage after the previous one's end."""
    from benchmarks.sequential import SequentialPipeline
    from core.personas import load_personas

    personas = load_personas(PERSONAS)
    pipe = SequentialPipeline(simulated=profile == "sim")
    rows = []
    for n in LENGTHS:
        for i in range(turns):
            t = asyncio.run(pipe.turn(utterances[i % len(utterances)], personas[f"bench{n}"]))
            rows.append({"sentences": n, "ttfa_ms": t["ttfa_ms"], "first_face_ms": 0.0,
                         "server_ms": t["ttfa_ms"], "backend_ms": t["ttfa_ms"],
                         "overhead_ms": 0.0, "final_ms": t["stt_ms"], "gaps": 0, "dups": 0})
    return rows


def run_config(mode: str, profile: str, turns: int, utterances) -> list[dict]:
    if mode == "sequential":
        return sequential_rows(profile, turns, utterances)
    from benchmarks import simulated

    redis = RedisServer(appendonly=False).start()
    env = {"PARLEY_LLM_PERSONAS_DIR": str(PERSONAS), "PARLEY_LOG_LEVEL": "warning",
           **(simulated.ENV if profile == "sim" else {})}
    fleet = Fleet(port=free_port(), workers=1, redis_url=redis.url, env=env)
    try:
        fleet.start()
        fleet.wait_ready(60)
        return asyncio.run(_turns(f"ws://127.0.0.1:{fleet.port}", utterances, turns))
    finally:
        fleet.stop()
        redis.stop()


def run(turns: int = 5, configs=CONFIGS) -> dict:
    utterances = synth_utterances()
    results = {}
    for mode, profile in configs:
        t0 = time.monotonic()
        results[(mode, profile)] = run_config(mode, profile, turns, utterances)
        print(f"  {mode:10} {profile or 'offline':8} {time.monotonic() - t0:5.1f} s", flush=True)
    return results


def report(results: dict) -> str:
    lines = [
        f"{'mode':10} {'profile':16} {'sent.':>5} {'n':>3} {'ttfa p50':>9} {'ttfa p95':>9} "
        f"{'final p50':>9} {'face p50':>9} {'server p50':>10} {'overhead p50':>12} {'gaps':>5}",
    ]
    for (mode, profile), rows in results.items():
        label = "sim (SIMULATED)" if profile == "sim" else "offline"
        for n in LENGTHS:
            rs = [r for r in rows if r["sentences"] == n]
            ttfa = [r["ttfa_ms"] for r in rs]
            lines.append(
                f"{mode:10} {label:16} {n:>5} {len(rs):>3} {pct(ttfa, 50):>9.1f} "
                f"{pct(ttfa, 95):>9.1f} {pct([r.get('final_ms', 0.0) for r in rs], 50):>9.1f} "
                f"{pct([r['first_face_ms'] for r in rs], 50):>9.1f} "
                f"{pct([r['server_ms'] for r in rs], 50):>10.1f} "
                f"{pct([r['overhead_ms'] for r in rs], 50):>12.1f} "
                f"{sum(r['gaps'] + r['dups'] for r in rs):>5}")
    stream = [r for r in results.get(("streaming", ""), []) if r["sentences"] == 3]
    seq = [r for r in results.get(("sequential", ""), []) if r["sentences"] == 3]
    s50 = pct([r["ttfa_ms"] for r in stream], 50)
    b50 = pct([r["ttfa_ms"] for r in seq], 50)
    over = pct([r["overhead_ms"] for r in stream], 50)
    lines += [
        "",
        "ttfa: end of player speech -> first reply audio at the client; final: end of speech",
        "-> final transcript published (server clocks); face: ready -> first",
        "face frame; server: gateway's first audio - end of speech (server clocks); overhead:",
        "server minus time inside backends on the critical path. sequential rows run in one",
        "process (no Redis or hand-offs counted). sim rows are SIMULATED model timings (STT",
        "50 ms final; LLM 150 ms to first token then 40 tok/s; TTS 80 ms to first chunk, RTF 0.1).",
        f"ttfa_p50_ms={s50:.1f} baseline_ttfa_p50_ms={b50:.1f} ratio={b50 / s50:.2f} "
        f"overhead_p50_ms={over:.2f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="parley bench latency")
    ap.add_argument("--turns", type=int, default=5, help="turns per reply length and mode")
    ap.add_argument("--quick", action="store_true", help="offline profile only")
    args = ap.parse_args(argv)
    configs = CONFIGS[:2] if args.quick else CONFIGS
    print(f"running {len(configs)} fleets x {len(LENGTHS)} reply lengths x {args.turns} turns",
          flush=True)
    print(report(run(args.turns, configs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
