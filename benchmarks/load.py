"""`parley bench load`: how many players talking at once the fleet carries, and what idle
NPCs cost.

    parley bench load [--steps auto] [--sim-steps 1,10,25,50,100,200] [--step-s 20]
                      [--stagger-s 2] [--idle 1000] [--workers auto] [--profiles offline,sim]

For each profile it starts its own redis-server and fleet (`parley up`'s supervisor: a dead
process is restarted and counted) on loopback, then ramps concurrent players. Each player has
its own connection and NPC session (push-to-talk, ``endpoint: client``) and loops: it speaks
the recorded question at real-time pace in 20 ms chunks, sends ``end_of_utterance``, listens to
the whole reply as UE plays it (answering ``ready`` per segment, as UE does) and then speaks
again. Starts are staggered over ``--stagger-s``. A step runs ``--step-s`` seconds (the
one-player baseline twice that); a turn begun before that is finished (or given up after 30 s).
The ramp stops after the first step that does not hold. ``--steps auto`` (offline) runs one
player, then 25, 50, 75, 90, 100 and 110 % of the STT ceiling (below) that step implies.
Last, with ``--idle N``, the offline profile opens N idle sessions (open, no audio, 50 per
connection) before one player speaks.

Profiles: ``offline`` (pocketsphinx, scripted persona, espeak-ng: the real cost on this
machine) and ``sim`` (SIMULATED models with fixed sleeps, see benchmarks/simulated.py: the
fleet's own capacity: gateway, Redis, runtime, lipsync).

Per step: reply latency p50/p95 (client's ``end_of_utterance`` -> first reply audio),
underruns (a reply-audio chunk that arrives after the player's audio ran dry, playing from a
100 ms buffer from the first chunk on) and the longest silence one caused (stall, ms), face
frames per second of reply audio, failed turns (``turn_failed``) and turns with no reply (both
lost), players refused at ``open`` (never spoke: not lost, but the step does not hold),
``job_taken_over`` and ``job_dead_lettered`` in the fleet log and new entries in the
dead-letter streams, processes that died, and CPU per stage in % of one core (from /proc;
``bench`` is this process: the players). A step *holds* when p95 <= 2x the one-player p95 of
its profile with zero underruns, lost turns, refusals and false takeovers (takeovers while no
process died).

``stt_rtf`` is the offline recognizer's own cost, measured here before the fleets start: CPU
seconds per second of the question's audio, fed in 20 ms chunks. With the speaking share of
the one-player step (seconds spoken per second of a player's loop) it bounds the players the
machine's cores can serve: ceiling = cores / (stt_rtf x speaking share).

The last line is
``players_max=<n> sim_players_max=<n> idle_sessions=<n> false_takeovers=<n> lost_turns=<n>
stt_rtf=<x>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis

from benchmarks import simulated
from benchmarks.speech import speech
from parley.client import Client, TurnResult
from parley.fleet import Fleet, cpu_count
from parley.redis_server import RedisServer, free_port
from schemas import protocol as P
from schemas.streams import STAGES, Keys

RATE = 16000  # the players' mic rate
BUFFER_S = 0.1  # UE starts a reply after this much audio is buffered
TURN_TIMEOUT_S = 30.0  # no turn_done by then: the turn is lost
IDLE_PER_CONNECTION = 50  # under the gateway's default max_sessions (64)
# of the STT ceiling: --steps auto; the small ones find where latency first gives way
AUTO_FRACTIONS = (0.08, 0.12, 0.16, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1)
IDLE_LATENCY_RATIO = 1.2  # a player among idle sessions: p50 within this of its alone figure
NPCS = ("guard", "merchant", "innkeeper", "wizard")
# The players are a game server: it authenticates with a token, so the per-address cap for
# anonymous connections does not apply (a game server holds hundreds of NPC sessions).
TOKEN_NAME, TOKEN = "bench", "bench-load-token-0123456789abcdef"
ENV = {"PARLEY_LOG_LEVEL": "warning",  # takeovers and dead letters are warnings / errors
       "PARLEY_GATEWAY_TOKENS": f"{TOKEN_NAME}:{TOKEN}", "PARLEY_GATEWAY_MAX_SESSIONS": "256"}
PROFILES = {"offline": {}, "sim": simulated.ENV}


# --------------------------------------------------------------------------- one player


def _say(line: str) -> None:
    print(line, flush=True)


@dataclass
class Turn:
    player: int
    speech_s: float
    status: str = "lost"  # completed | failed (turn_failed) | lost (no reply in time)
    latency_ms: float | None = None
    underruns: int = 0
    stall_s: float = 0.0  # the longest silence underruns caused
    audio_s: float = 0.0
    face_frames: int = 0
    error: str = ""


def underruns(arrivals: list[tuple[float, int, int]], buffer_s: float = BUFFER_S
              ) -> tuple[int, float, float]:
    """UE's playback of one reply: ``arrivals`` are (arrival time, samples, rate) per chunk in
    order. Playback starts ``buffer_s`` after the first chunk; a chunk that arrives after the
    audio before it has run out is an underrun, and playback resumes ``buffer_s`` after it.
    Returns (underruns, the time playback ends, the longest silence an underrun caused)."""
    count, end, worst = 0, 0.0, 0.0
    for i, (t, n, rate) in enumerate(arrivals):
        if i and t <= end:
            end += n / rate
            continue
        if i:
            count += 1
            worst = max(worst, t + buffer_s - end)
        end = t + buffer_s + n / rate
    return count, end, worst


class PlayerClient(Client):
    """The reference client, plus when each reply-audio chunk arrived."""

    def __init__(self, ws, **kw):
        super().__init__(ws, **kw)
        self.arrivals: dict[tuple[str, int], list[tuple[float, int, int]]] = {}

    async def _on_binary(self, frame, now: float) -> None:
        if isinstance(frame, P.ReplyAudio):
            session = self.by_channel.get(frame.channel)
            if session is not None:
                self.arrivals.setdefault((session, frame.turn), []).append(
                    (now, len(frame.pcm) // 2, frame.sample_rate))
        await super()._on_binary(frame, now)


async def _one_turn(client: PlayerClient, name: str, sid: str, index: int,
                    frames: np.ndarray) -> Turn:
    turn = Turn(player=index, speech_s=len(frames) / RATE)
    tr = client.turns[name] = TurnResult(session=name, sid=sid)  # one result per turn
    done = client._done[name] = asyncio.Event()
    await client.stream(name, frames, RATE, realtime=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), TURN_TIMEOUT_S)
    if tr.errors:
        turn.status, turn.error = "failed", str(tr.errors[0].get("code"))
        return turn
    if tr.done is None:
        return turn
    turn.status = "completed"
    turn.latency_ms = tr.latency_ms()["first_audio"]
    turn.audio_s = tr.audio_samples / tr.reply_rate if tr.reply_rate else 0.0
    turn.face_frames = tr.face_frames
    arrivals = client.arrivals.pop((name, tr.turn), [])
    turn.underruns, play_end, turn.stall_s = underruns(arrivals)
    # the player listens to the end of the reply before speaking again
    await asyncio.sleep(max(0.0, play_end - time.perf_counter()))
    return turn


async def _player(url: str, index: int, frames: np.ndarray, start_in: float, until: float,
                  turns: list[Turn], spans: list[float]) -> None:
    await asyncio.sleep(start_in)
    t0 = time.monotonic()
    client = await PlayerClient.connect(url, token=TOKEN, token_name=TOKEN_NAME)
    name = f"p{index}"
    try:
        opened = await client.open(name, NPCS[index % len(NPCS)], RATE, 1, endpoint="client")
        while time.monotonic() < until:
            turn = await _one_turn(client, name, opened.sid, index, frames)
            turns.append(turn)
            if turn.status == "lost":  # the session may be wedged: a fresh one next time
                break
        with contextlib.suppress(Exception):
            await client.send(P.CloseSession(session=name))
    except RuntimeError as exc:  # open refused (e.g. overloaded): refused, never spoken
        turns.append(Turn(player=index, speech_s=0.0, status="refused", error=str(exc)))
    finally:
        spans.append(time.monotonic() - t0)
        await client.close()


# --------------------------------------------------------------------------- the fleet side


def _cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Rig:
    """One profile's Redis, fleet and supervisor thread."""

    profile: str
    server: RedisServer
    fleet: Fleet
    log: Path
    r: redis.Redis
    deaths: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.fleet.port}"

    def pids(self) -> dict[str, list[int]]:
        """Process ids per stage ("gateway", "stt", ...), plus "redis" and "bench" (us)."""
        groups: dict[str, list[int]] = {}
        for name, pid in self.fleet.pids().items():
            groups.setdefault(name if name == "gateway" else name.rsplit("-", 1)[0],
                              []).append(pid)
        groups["redis"] = [self.server.proc.pid] if self.server.proc else []
        groups["bench"] = [os.getpid()]
        return groups

    def counters(self) -> dict:
        """What the step deltas are taken from."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        dead = sum(self.r.xlen(Keys().dead(s)) for s in STAGES)
        cpu = {k: sum(_cpu_ticks(p) for p in v) for k, v in self.pids().items()}
        return {"t": time.monotonic(), "takeovers": text.count('"job_taken_over"'),
                "dead_logged": text.count('"job_dead_lettered"'), "dead_stream": dead,
                "deaths": len(self.deaths), "cpu": cpu}


def _supervise(rig: Rig) -> None:
    while not rig.stop.wait(0.1):
        rig.deaths += rig.fleet.supervise_once()


def start_rig(profile: str, workers: str) -> Rig:
    log = Path(tempfile.mkdtemp(prefix=f"parley-load-{profile}-")) / "fleet.log"
    server = RedisServer(appendonly=False).start()
    fleet = Fleet(port=free_port(), workers=workers, redis_url=server.url, log_path=str(log),
                  env={**ENV, **PROFILES[profile]})
    rig = Rig(profile, server, fleet, log, redis.from_url(server.url))
    try:
        fleet.start()
        fleet.wait_ready(180)
    except Exception:
        stop_rig(rig)
        raise
    threading.Thread(target=_supervise, args=(rig,), daemon=True).start()
    return rig


def stop_rig(rig: Rig) -> None:
    rig.stop.set()
    rig.fleet.stop()
    rig.r.close()
    rig.server.stop()


# --------------------------------------------------------------------------- steps


@dataclass
class Step:
    profile: str
    players: int
    idle: int
    turns: list[Turn]
    wall_s: float
    speaking_share: float
    takeovers: int
    dead: int
    deaths: int
    cpu: dict[str, float]  # % of one core
    stt_cpu_per_speech_s: float
    holds: bool = False
    base_p95: float = 0.0

    def latencies(self) -> list[float]:
        return [t.latency_ms for t in self.turns if t.latency_ms is not None]

    def pct(self, q: float) -> float:
        xs = self.latencies()
        return float(np.percentile(xs, q)) if xs else float("nan")

    @property
    def lost(self) -> int:
        return sum(t.status in ("failed", "lost") for t in self.turns)

    @property
    def refused(self) -> int:
        """Players whose session was refused at open (never spoke: not lost)."""
        return sum(t.status == "refused" for t in self.turns)

    @property
    def underruns(self) -> int:
        return sum(t.underruns for t in self.turns)

    @property
    def false_takeovers(self) -> int:
        # a takeover is false when no fleet process died in the step
        return self.takeovers if not self.deaths else 0

    def face_fps(self) -> float:
        audio = sum(t.audio_s for t in self.turns if t.status == "completed")
        return sum(t.face_frames for t in self.turns) / audio if audio else 0.0


def _delta(before: dict, after: dict, speech_s: float, rig: Rig) -> dict:
    wall = after["t"] - before["t"]
    tick = os.sysconf("SC_CLK_TCK")
    cpu = {k: 100.0 * (after["cpu"].get(k, 0) - before["cpu"].get(k, 0)) / tick / wall
           for k in after["cpu"]}
    stt_s = cpu.get("stt", 0.0) / 100.0 * wall
    return {"wall_s": wall, "takeovers": after["takeovers"] - before["takeovers"],
            "dead": max(after["dead_logged"] - before["dead_logged"],
                        after["dead_stream"] - before["dead_stream"]),
            "deaths": after["deaths"] - before["deaths"], "cpu": cpu,
            "stt_cpu_per_speech_s": stt_s / speech_s if speech_s else 0.0}


async def run_step(rig: Rig, players: int, frames: np.ndarray, step_s: float,
                   stagger_s: float, idle: int = 0) -> Step:
    before = rig.counters()
    turns: list[Turn] = []
    spans: list[float] = []
    until = time.monotonic() + stagger_s + step_s
    await asyncio.gather(*(_player(rig.url, i, frames, stagger_s * i / players, until, turns,
                                   spans) for i in range(players)))
    await asyncio.sleep(0.5)  # the last acks and logs land
    speech = sum(t.speech_s for t in turns)
    d = _delta(before, rig.counters(), speech, rig)
    share = speech / sum(spans) if spans else 0.0
    return Step(rig.profile, players, idle, turns, d["wall_s"], share, d["takeovers"],
                d["dead"], d["deaths"], d["cpu"], d["stt_cpu_per_speech_s"])


def judge(step: Step, base: Step | None) -> None:
    """A step holds when p95 <= 2x the one-player p95, with nothing lost, no underrun and
    no false takeover."""
    ref = base or step
    step.base_p95 = ref.pct(95)
    clean = (step.lost == 0 and step.underruns == 0 and step.false_takeovers == 0
             and step.dead == 0 and step.refused == 0 and bool(step.latencies()))
    step.holds = clean and step.pct(95) <= 2 * step.base_p95


async def open_idle(url: str, count: int) -> tuple[list[Client], int]:
    """Up to ``count`` idle sessions (open, never a sound), IDLE_PER_CONNECTION per
    connection; stops at the first the gateway refuses. Returns the clients and how many
    opened."""
    clients: list[Client] = []
    opened = 0
    for c in range(0, count, IDLE_PER_CONNECTION):
        client = await Client.connect(url, token=TOKEN, token_name=TOKEN_NAME)
        clients.append(client)
        for i in range(c, min(count, c + IDLE_PER_CONNECTION)):
            try:
                await client.open(f"idle{i}", NPCS[i % len(NPCS)], RATE, 1, endpoint="client")
            except RuntimeError as exc:  # refused (admission control): as many as it takes
                _say(f"  idle session {i + 1} refused: {exc}")
                return clients, opened
            opened += 1
    return clients, opened


def stt_ceiling(stt_rtf: float, share: float, cores: int) -> float:
    """Players the cores can serve when the recognizer's cost is all there is."""
    return cores / (stt_rtf * share) if stt_rtf > 0 and share > 0 else float("nan")


def auto_steps(ceiling: float) -> list[int]:
    """Steps at fractions of the STT ceiling, to see how close to it the fleet gets."""
    out: list[int] = []
    for f in AUTO_FRACTIONS:
        n = max(2, round(ceiling * f)) if ceiling == ceiling else 2  # nan: no ceiling known
        if not out or n > out[-1]:
            out.append(n)
    return out


async def run_profile(rig: Rig, steps: list[int] | None, frames: np.ndarray, step_s: float,
                      stagger_s: float, ceiling_of=None, say=_say) -> list[Step]:
    """The ramp; ``steps`` None: 1 player, then auto_steps(ceiling_of(that step))."""
    out: list[Step] = []
    plan = list(steps) if steps else [1]
    for players in iter_growing(plan):
        # the baseline runs twice as long: every later step is judged against its p95
        step = await run_step(rig, players, frames, step_s * (1 if out else 2), stagger_s)
        judge(step, out[0] if out else None)
        out.append(step)
        say(row(step))
        if not step.holds:
            break  # this step is past the limit: the ramp stops
        if len(out) == 1 and not steps and ceiling_of is not None:
            plan += auto_steps(ceiling_of(step))
            say(f"  steps at {', '.join(f'{f:.0%}' for f in AUTO_FRACTIONS)} of the STT "
                f"ceiling: {', '.join(map(str, plan[1:]))} players")
    return out


def iter_growing(plan: list[int]):
    """Iterates a list that may grow while it is iterated."""
    i = 0
    while i < len(plan):
        yield plan[i]
        i += 1


async def run_idle(rig: Rig, idle: int, frames: np.ndarray, step_s: float, base: Step,
                   say=_say) -> tuple[Step, dict]:
    """One player speaks while ``idle`` sessions are open with no audio; memory per idle
    session from the gateway's RSS and Redis's used_memory before and after opening them."""
    gw = rig.fleet.pids().get("gateway", 0)
    rss0, mem0 = _rss_kib(gw), int(rig.r.info("memory")["used_memory"])
    clients, idle = await open_idle(rig.url, idle)
    n = max(1, idle)
    memory = {"gateway_kib_per_idle": (_rss_kib(gw) - rss0) / n,
              "redis_kib_per_idle": (int(rig.r.info("memory")["used_memory"]) - mem0)
              / 1024 / n}
    try:
        step = await run_step(rig, 1, frames, step_s, 0.0, idle=idle)
    finally:
        for c in clients:
            await c.close()
    judge(step, base)
    say(row(step))
    return step, memory


# --------------------------------------------------------------------------- measuring STT


def measure_stt_rtf(frames: np.ndarray, repeats: int = 3) -> float:
    """CPU seconds the offline recognizer spends per second of the question, fed in 20 ms
    chunks as the STT stage feeds it (median of ``repeats``)."""
    from core.config import Config
    from workers.stt.stage import make_backend

    config = Config.load(env={})
    backend = make_backend(config.stt.backends[0], config)
    backend.warm()
    audio = frames[:, 0].astype(np.float32) / 32768.0
    step = RATE // 50
    costs = []
    for _ in range(repeats):
        stream = backend.open_stream()
        t0 = time.thread_time()
        for i in range(0, len(audio), step):
            stream.feed(audio[i:i + step])
        stream.finish()
        costs.append(time.thread_time() - t0)
        stream.close()
    return statistics.median(costs) / (len(audio) / RATE)


# --------------------------------------------------------------------------- report


HEADER = (f"{'profile':8} {'players':>7} {'idle':>5} {'turns':>5} {'p50_ms':>7} {'p95_ms':>7} "
          f"{'p95/1p':>6} {'underr':>6} {'stall':>5} {'face/s':>6} {'failed':>6} {'lost':>4} "
          f"{'refus':>5} {'takeov':>6} {'dead':>4} {'died':>4} {'holds':5} cpu % of a core")


def row(s: Step) -> str:
    failed = sum(t.status == "failed" for t in s.turns)
    noreply = sum(t.status == "lost" for t in s.turns)
    ratio = s.pct(95) / s.base_p95 if s.base_p95 else float("nan")
    cpu = " ".join(f"{k}={v:.0f}" for k, v in s.cpu.items())
    stall = 1000 * max([t.stall_s for t in s.turns] or [0.0])
    turns = len(s.turns) - s.refused
    return (f"{s.profile:8} {s.players:>7} {s.idle:>5} {turns:>5} {s.pct(50):>7.0f} "
            f"{s.pct(95):>7.0f} {ratio:>6.2f} {s.underruns:>6} {stall:>5.0f} {s.face_fps():>6.1f} "
            f"{failed:>6} {noreply:>4} {s.refused:>5} {s.takeovers:>6} {s.dead:>4} {s.deaths:>4} "
            f"{'yes' if s.holds else 'NO':5} {cpu}")


def _players_max(steps: list[Step]) -> int:
    held = [s.players for s in steps if s.holds and not s.idle]
    return max(held) if held else 0


def _idle_held(steps: list[Step]) -> int:
    """Idle sessions open while one player was answered within IDLE_LATENCY_RATIO of its
    alone p50, nothing lost."""
    alone = next((s for s in steps if s.players == 1 and not s.idle), None)
    ok = [s.idle for s in steps if s.idle and alone and s.lost == 0 and s.latencies()
          and s.pct(50) <= IDLE_LATENCY_RATIO * alone.pct(50)]
    return max(ok) if ok else 0


def summary(results: dict[str, list[Step]], stt_rtf: float, memory: dict,
            cores: int) -> list[str]:
    every = [s for steps in results.values() for s in steps]
    offline = results.get("offline", [])
    players_max = _players_max(offline)
    lines = []
    if offline:
        share = offline[0].speaking_share
        ceiling = stt_ceiling(stt_rtf, share, cores)
        lines.append(f"STT ceiling: {cores} cores / (stt_rtf {stt_rtf:.3f} x speaking share "
                     f"{share:.2f}) = {ceiling:.1f} players; players_max {players_max} is "
                     f"{100 * players_max / ceiling:.0f} % of it")
        at = next((s for s in offline if s.players == players_max and not s.idle), None)
        if at is not None:
            rest = ", ".join(f"{k} {v / 100:.2f}" for k, v in at.cpu.items())
            lines.append(f"cores used at players_max={players_max}: {rest} "
                         f"(STT CPU per second of speech in the fleet: "
                         f"{at.stt_cpu_per_speech_s:.3f})")
    if memory:
        lines.append(f"per idle session: gateway {memory['gateway_kib_per_idle']:.1f} KiB RSS, "
                     f"redis {memory['redis_kib_per_idle']:.1f} KiB used_memory")
    lines.append(
        f"players_max={players_max} sim_players_max={_players_max(results.get('sim', []))} "
        f"idle_sessions={_idle_held(offline)} "
        f"false_takeovers={sum(s.false_takeovers for s in every)} "
        f"lost_turns={sum(s.lost for s in every)} stt_rtf={stt_rtf:.3f}")
    return lines


# --------------------------------------------------------------------------- the run


def run(profiles: list[str], steps: dict[str, list[int] | None], step_s: float,
        stagger_s: float, idle: int, workers: str, say=_say
        ) -> tuple[dict[str, list[Step]], float, dict]:
    frames = speech(simulated.QUESTION)
    stt_rtf = measure_stt_rtf(frames)
    cores = cpu_count()
    say(f"question {len(frames) / RATE:.2f} s; offline stt_rtf {stt_rtf:.3f}; {cores} cores; "
        f"workers {workers}; {step_s:.0f} s per step (the 1-player baseline {2 * step_s:.0f} s)")
    say(HEADER)
    results: dict[str, list[Step]] = {}
    memory: dict = {}
    for profile in profiles:
        rig = start_rig(profile, workers)
        try:
            async def ramp(profile=profile, rig=rig) -> list[Step]:
                out = await run_profile(
                    rig, steps[profile], frames, step_s, stagger_s,
                    lambda s: stt_ceiling(stt_rtf, s.speaking_share, cores), say)
                if idle and profile == "offline" and out:
                    step, mem = await run_idle(rig, idle, frames, step_s, out[0], say)
                    out.append(step)
                    memory.update(mem)
                return out

            results[profile] = asyncio.run(ramp())
        finally:
            stop_rig(rig)
        say(f"  ({profile} fleet log: {rig.log})")
    return results, stt_rtf, memory


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="parley bench load",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", default="auto",
                    help="players per step, offline models; auto: 1, then 25, 50, 75, 90, 100 "
                         "and 110 %% of the STT ceiling measured at 1 player")
    ap.add_argument("--sim-steps", default="1,10,25,50,100,200",
                    help="players per step, SIMULATED models")
    ap.add_argument("--step-s", type=float, default=20.0, help="seconds per step")
    ap.add_argument("--stagger-s", type=float, default=2.0, help="players start over this")
    ap.add_argument("--idle", type=int, default=1000,
                    help="idle sessions for the last offline step (0: none)")
    ap.add_argument("--workers", default="auto", help="worker processes per stage, or auto")
    ap.add_argument("--profiles", default="offline,sim")
    args = ap.parse_args(argv)
    profiles = [p for p in args.profiles.split(",") if p]
    unknown = set(profiles) - set(PROFILES)
    if unknown:
        ap.error(f"unknown profiles {sorted(unknown)}; known: {', '.join(PROFILES)}")
    steps = {p: None if text.strip() == "auto" else _ints(text)
             for p, text in (("offline", args.steps), ("sim", args.sim_steps))}
    if any(steps[p] is not None and (not steps[p] or steps[p][0] != 1) for p in profiles):
        ap.error("each profile's steps start with 1 player (the baseline)")
    results, stt_rtf, memory = run(profiles, steps, args.step_s, args.stagger_s, args.idle,
                                   args.workers)
    for line in summary(results, stt_rtf, memory, cpu_count()):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
