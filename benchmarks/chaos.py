"""Chaos benchmark: whole turns through the real fleet while workers are killed at random.

    .venv/bin/python -m benchmarks.chaos [--sessions 4] [--turns 5] [--kill-every 3.0]
                                         [--workers 2] [--seed 0] [--aim]

Starts its own redis-server and fleet (gateway plus ``--workers`` processes per stage, a
supervisor thread that restarts whatever dies), then runs ``--sessions`` NPC sessions at once,
each speaking ``--turns`` utterances in a row through the reference client at real-time pace
(espeak-ng speech resampled to 16 kHz with soxr). Meanwhile a killer thread SIGKILLs a random
worker process every ``--kill-every`` seconds and notes which jobs it held (its pending entries
in the stage's job stream, read the moment it is dead, before anyone can take them over).
STT workers always hold the sessions' listening jobs, but an LLM, TTS or lipsync job lasts only
10 to 200 ms per turn, so a blind kill of one of those almost always finds it idle. ``--aim``
waits (up to half the period) for such a worker to be in the middle of a job and kills that one.

Per turn: completed (turn_done, no error), failed (a ``turn_failed`` error: the player spoke
and got no reply), no reply (neither within the timeout); failed and no-reply turns are both
lost, seq gaps and duplicates, whether the audio and face the client received
agree with turn_done and the reply's sample clock, and latency (first reply audio after the
last mic chunk). A turn is *hit* when a killed worker held one of its jobs. Recovery is the
extra latency of hit turns over the median of the turns that were not hit.

The last line printed is
``turns=<n> completed=<n>/<n> failed=<n> no_reply=<n> lost=<n> duplicated=<n>
recovery_p95_ms=<ms>`` where lost = failed + no_reply.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis

from benchmarks.speech import speech
from parley.client import Client, TurnResult
from parley.fleet import Fleet
from parley.redis_server import RedisServer, free_port
from schemas import protocol as P
from schemas.streams import STAGES, Job, Keys

RATE = 16000  # the mic rate the sessions open with
CHUNK_MS = 20  # what Client.stream sends per mic frame
ENV = {
    "PARLEY_WORKER_CLAIM_IDLE_MS": "1000",
    "PARLEY_WORKER_HEARTBEAT_MS": "200",
    "PARLEY_LOG_LEVEL": "warning",
}
NPCS = ("guard", "merchant", "innkeeper", "wizard")
UTTERANCES = (
    "Hello there. Who are you?",
    "Can you open the gate?",
    "Who are you? What is your name?",
    "Tell me about the road north.",
    "Hello. What do you sell?",
)
TURN_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------- the client side


# The reference client records each reply-audio chunk's place (Client.chunks).
RecordingClient = Client


@dataclass
class TurnRecord:
    session: str
    index: int  # 1.. within the session
    turn: int = 0  # the server's turn number
    status: str = "no_reply"  # completed | failed (turn_failed) | no_reply
    gaps: int = 0
    duplicates: int = 0
    latency_ms: float | None = None
    av_ok: bool = False  # audio and face agree with turn_done and the reply's sample clock
    av_problem: str = ""
    hit_by: list[str] = field(default_factory=list)  # workers killed holding a job of this turn

    @property
    def completed(self) -> bool:
        return self.status == "completed"


def av_problem(client: RecordingClient, session: str, turn: int, tr: TurnResult) -> str:
    """What is wrong with the reply audio and face the client got ('' when nothing)."""
    done = tr.done or {}
    if done.get("audio_samples") != tr.audio_samples:
        return f"turn_done says {done.get('audio_samples')} samples, got {tr.audio_samples}"
    if done.get("face_frames") != tr.face_frames:
        return f"turn_done says {done.get('face_frames')} face frames, got {tr.face_frames}"
    pos = 0
    for _, seq, sample, n in sorted(c for c in client.chunks.get(session, []) if c[0] == turn):
        if sample != pos:
            return f"audio seq {seq} at sample {sample}, previous chunk ended at {pos}"
        pos += n
    if tr.reply_rate and abs(tr.face_frames - tr.audio_samples * 60 / tr.reply_rate) > 2:
        return f"{tr.face_frames} face frames for {tr.audio_samples / tr.reply_rate:.3f} s"
    return ""


async def _turn_end(client: Client, session: str, expected: int,
                    timeout: float) -> tuple[str, int]:
    """Until turn_done or a turn_failed error for a turn >= ``expected``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [t for (s, t) in client.done_turns if s == session and t >= expected]
        if done:
            return "completed", min(done)
        failed = [e.get("turn") for e in client.turns[session].errors
                  if (e.get("turn") or 0) >= expected]
        if failed:
            return "failed", min(failed)
        await asyncio.sleep(0.02)
    return "no_reply", client.turns[session].turn or expected


async def _session(url: str, index: int, turns: int, speech: list[np.ndarray],
                   records: list[TurnRecord]) -> None:
    name = f"s{index + 1}"
    client = await RecordingClient.connect(url)
    try:
        opened = await client.open(name, NPCS[index % len(NPCS)], RATE, 1)
        last = 0
        for k in range(turns):
            frames = speech[(index + k) % len(speech)]
            rec = TurnRecord(session=opened.sid, index=k + 1)
            records.append(rec)
            # The reference client keeps one result per session: a fresh one per turn.
            client.turns[name] = TurnResult(session=name, sid=opened.sid)
            client._done[name] = asyncio.Event()
            await client.stream(name, frames, RATE, realtime=True)
            # Client.stream starts at opened.next_mic_seq each time: continue the sequence.
            opened.next_mic_seq += math.ceil(len(frames) / (RATE * CHUNK_MS // 1000))
            rec.status, rec.turn = await _turn_end(client, name, last + 1, TURN_TIMEOUT_S)
            last = max(last, rec.turn)
            tr = client.turns[name]
            rec.gaps, rec.duplicates = tr.seq.gaps, tr.seq.duplicates
            if rec.completed:
                rec.latency_ms = tr.latency_ms()["first_audio"]
                rec.av_problem = av_problem(client, name, rec.turn, tr)
                rec.av_ok = not rec.av_problem
            await asyncio.sleep(0.2)
        with contextlib.suppress(Exception):
            await client.send(P.CloseSession(session=name))
    finally:
        await client.close()


# --------------------------------------------------------------------------- chaos


@dataclass
class Kill:
    at_s: float
    worker: str
    pid: int
    held: list[tuple[str, str, int]]  # (stage, sid, turn) of the jobs it held


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def held_jobs(r: redis.Redis, keys: Keys, stage: str, pid: int) -> list[tuple[str, str, int]]:
    """Jobs pending on the consumer(s) of process ``pid`` (names are ``stage@host:pid:tag``)."""
    stream = keys.jobs(stage)
    out = []
    try:
        consumers = r.xpending(stream, keys.group(stage))["consumers"] or []
    except redis.ResponseError:
        return out
    for c in consumers:
        name = _s(c["name"])
        if name.rsplit(":", 2)[1] != str(pid):
            continue
        for p in r.xpending_range(stream, keys.group(stage), "-", "+", 1000, consumername=name):
            eid = _s(p["message_id"])
            got = r.xrange(stream, eid, eid)
            if got:
                job = Job.from_fields(got[0][0], got[0][1])
                out.append((stage, job.sid, job.turn))
    return out


def _busy(r: redis.Redis, keys: Keys, live: dict[int, object]) -> list:
    """Live LLM/TTS/lipsync workers holding a job right now (STT always holds listening jobs)."""
    out = []
    for stage in STAGES[1:]:
        with contextlib.suppress(redis.ResponseError):
            for c in r.xpending(keys.jobs(stage), keys.group(stage))["consumers"] or []:
                pid = int(_s(c["name"]).rsplit(":", 2)[1])
                if int(c["pending"]) and pid in live:
                    out.append(live[pid])
    return out


def _killer(fleet: Fleet, r: redis.Redis, every: float, rng: random.Random, aim: bool,
            stop: threading.Event, kills: list[Kill], t0: float) -> None:
    keys = Keys()
    while not stop.wait(every / 2 if aim else every):
        live = sorted((c for c in list(fleet.children)
                       if c.name != "gateway" and c.proc is not None and c.proc.poll() is None),
                      key=lambda c: c.name)
        if not live:
            continue
        child = None
        if aim:  # for up to half the period, wait for a worker caught in the middle of a job
            by_pid = {c.proc.pid: c for c in live}
            deadline = time.monotonic() + every / 2
            while child is None and time.monotonic() < deadline and not stop.is_set():
                busy = _busy(r, keys, by_pid)
                child = rng.choice(busy) if busy else None
                time.sleep(0.002)
        child = child or rng.choice(live)
        pid = child.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        # Read at once: a sibling takes the jobs over only after claim_idle_ms.
        held = held_jobs(r, keys, child.name.rsplit("-", 1)[0], pid)
        kills.append(Kill(round(time.monotonic() - t0, 2), child.name, pid, held))


def _supervise(fleet: Fleet, stop: threading.Event, restarts: list[str]) -> None:
    while not stop.wait(0.05):
        restarts += fleet.supervise_once()


# --------------------------------------------------------------------------- the run


def run(sessions: int = 4, turns: int = 5, workers: int = 2, kill_every_s: float = 3.0,
        seed: int = 0, aim: bool = False) -> dict:
    """Run the chaos benchmark; returns the per-turn records, the kills and the summary."""
    said = [speech(t, RATE) for t in UTTERANCES]
    log = Path(tempfile.mkdtemp(prefix="parley-chaos-")) / "fleet.log"
    server = RedisServer().start()
    fleet = Fleet(port=free_port(), workers=workers, redis_url=server.url, log_path=str(log),
                  env=ENV)
    stop = threading.Event()
    records: list[TurnRecord] = []
    kills: list[Kill] = []
    restarts: list[str] = []
    r = redis.from_url(server.url)
    threads = []
    codes: dict[str, int] = {}
    try:
        fleet.start()
        fleet.wait_ready(120)
        threads.append(threading.Thread(target=_supervise, args=(fleet, stop, restarts),
                                        daemon=True))
        t0 = time.monotonic()
        threads.append(threading.Thread(
            target=_killer,
            args=(fleet, r, kill_every_s, random.Random(seed), aim, stop, kills, t0),
            daemon=True))
        for t in threads:
            t.start()

        async def main() -> None:
            url = f"ws://127.0.0.1:{fleet.port}"
            await asyncio.gather(*(_session(url, i, turns, said, records)
                                   for i in range(sessions)))

        asyncio.run(main())
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        codes = fleet.stop()
        r.close()
        server.stop()

    hits: dict[tuple[str, int], list[str]] = {}
    for k in kills:
        for stage, sid, turn in k.held:
            hits.setdefault((sid, turn), []).append(f"{stage}:{k.worker}")
    for rec in records:
        rec.hit_by = hits.get((rec.session, rec.turn), [])
    calm = [x.latency_ms for x in records
            if x.completed and not x.hit_by and x.latency_ms is not None]
    base = float(np.median(calm)) if calm else 0.0
    extra = [x.latency_ms - base for x in records
             if x.completed and x.hit_by and x.latency_ms is not None]
    summary = {
        "turns": len(records),
        "completed": sum(x.completed for x in records),
        "failed": sum(x.status == "failed" for x in records),
        "no_reply": sum(x.status == "no_reply" for x in records),
        # a turn_failed is a lost turn too: the player spoke and got no reply
        "lost": sum(not x.completed for x in records),
        "duplicated": sum(x.duplicates > 0 for x in records),
        "gaps": sum(x.gaps for x in records),
        "av_broken": sum(x.completed and not x.av_ok for x in records),
        "hit": sum(bool(x.hit_by) for x in records),
        "kills": len(kills),
        "restarts": len(restarts),
        "median_latency_ms": round(base, 1),
        "recovery_p95_ms": round(float(np.percentile(extra, 95)), 1) if extra else 0.0,
        "elapsed_s": round(elapsed, 1),
        "exit_codes": codes,
        "log": str(log),
    }
    return {"records": records, "kills": kills, "summary": summary}


def render(result: dict) -> str:
    s = result["summary"]
    lines = [f"{'session':22} {'#':>2} {'turn':>4} {'status':10} {'first_audio_ms':>14} "
             f"{'gaps':>4} {'dups':>4} {'a/v':4} hit by"]
    for x in result["records"]:
        lat = f"{x.latency_ms:.0f}" if x.latency_ms is not None else "-"
        av = "ok" if x.av_ok else ("-" if not x.completed else "BAD")
        lines.append(f"{x.session:22} {x.index:>2} {x.turn:>4} {x.status:10} {lat:>14} "
                     f"{x.gaps:>4} {x.duplicates:>4} {av:4} {', '.join(x.hit_by) or '-'}")
    bad = [x for x in result["records"] if x.av_problem]
    if bad:
        lines += ["", "audio/face problems:"]
        lines += [f"  {x.session} turn {x.turn}: {x.av_problem}" for x in bad]
    lines += ["", "kills:"]
    for k in result["kills"]:
        held = ", ".join(f"{st} {sid}/{t}" for st, sid, t in k.held) or "nothing"
        lines.append(f"  t={k.at_s:6.2f}s  {k.worker:10} pid {k.pid:<7} held {held}")
    lines += ["", f"kills={s['kills']} restarts={s['restarts']} hit_turns={s['hit']} "
                  f"failed={s['failed']} gaps={s['gaps']} av_broken={s['av_broken']} "
                  f"median_first_audio_ms={s['median_latency_ms']} elapsed_s={s['elapsed_s']}",
              f"exit codes at stop: {s['exit_codes']}", f"fleet log: {s['log']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--kill-every", type=float, default=3.0, help="seconds between kills")
    ap.add_argument("--workers", type=int, default=2, help="worker processes per stage")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--aim", action="store_true",
                    help="prefer an LLM/TTS/lipsync worker caught in the middle of a job (their "
                         "jobs last 10-200 ms, so blind kills almost always find them idle)")
    args = ap.parse_args(argv)
    result = run(sessions=args.sessions, turns=args.turns, workers=args.workers,
                 kill_every_s=args.kill_every, seed=args.seed, aim=args.aim)
    print(render(result))
    s = result["summary"]
    print(f"turns={s['turns']} completed={s['completed']}/{s['turns']} failed={s['failed']} "
          f"no_reply={s['no_reply']} lost={s['lost']} duplicated={s['duplicated']} "
          f"recovery_p95_ms={s['recovery_p95_ms']:.0f}")


if __name__ == "__main__":
    main()
