"""Bake benchmark: lines per second here, and what a running bake costs live turns.

    parley bench bake [--turns 12] [--lines 60] [--bake-workers N] [--out-json FILE]

Starts its own redis-server and a fleet (gateway, one worker per stage), then:

* **bake alone**: ``--lines`` lines (the personas' own scripted replies) on ``--bake-workers``
  bake workers (default: one per core); lines per second and seconds of audio per second, and
  the bake workers' CPU time per line, which says what idle cores would do (wall-clock rates
  here depend on whatever else the machine runs).
* then ``--turns`` rounds of three live turns, one per condition, in rotating order (so load
  from outside the benchmark falls on each alike): one player speaks a short question
  (espeak-ng speech at 16 kHz, real-time pace, through the reference client) and the first
  reply audio is timed from the last mic chunk,
  - **live alone**: no bake,
  - **live + bake**: while the bake workers render a full queue as they run in production
    (nice 19, pausing while the fleet makes a reply; workers/bake/worker.py),
  - **live + bake, not yielding**: the baseline, as many bake workers at nice 0 with no
    pause, on a queue of their own.

Prints a table and ends with ``bake_lines_per_s=<x> bake_cpu_ms_per_line=<ms>
live_p50_ms=<ms> live_p95_ms=<ms> bake_live_p50_ms=<ms> bake_live_p95_ms=<ms>
unyielding_p95_ms=<ms> bake_during_live_lines_per_s=<x>`` (one line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis
import soundfile as sf

from benchmarks.load import _cpu_ticks
from benchmarks.speech import speech
from core.config import Config
from core.personas import load_personas
from parley.client import say
from parley.fleet import Fleet, cpu_count
from parley.redis_server import RedisServer, free_port
from workers.bake.lines import Line
from workers.bake.queue import BakeQueue

ENV = {"PARLEY_LOG_LEVEL": "warning", "PARLEY_WORKER_CLAIM_IDLE_MS": "1000",
       "PARLEY_WORKER_HEARTBEAT_MS": "200",
       # every turn is timed, none refused: admission control would turn latency into refusals
       "PARLEY_GATEWAY_ADMIT_MAX_LAG_MS": "0", "PARLEY_GATEWAY_ADMIT_MAX_QUEUE_MS": "0"}
QUESTIONS = ("Who are you?", "Can you open the gate?", "Tell me about the road north.",
             "Hello there.", "What is your name?")


def _lines(n: int, tag: str) -> list[Line]:
    personas = load_personas(Config.load(env={}).personas_dir())
    texts = [(pid, ln.reply) for pid, p in sorted(personas.items()) for ln in p.lines]
    return [Line(npc=texts[i % len(texts)][0], text=texts[i % len(texts)][1],
                 id=f"{tag}-{i:05d}") for i in range(n)]


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


QUEUES = {"bake_live": "parley-bake", "unyielding": "parley-bake-unyielding"}


class Rig:
    """Redis, the fleet, and two sets of bake workers: the production kind on the bake queue
    and the not-yielding baseline (nice 0, no pause) on a queue of its own."""

    def __init__(self, bake_workers: int):
        self.redis = RedisServer().start()
        self.url = self.redis.url
        self.r = redis.Redis.from_url(self.url)
        self.fleet = Fleet(port=free_port(), workers=1, redis_url=self.url, env=ENV,
                           log_path=os.path.join(tempfile.gettempdir(), "parley-bench-bake.log"))
        self.procs: list[subprocess.Popen] = []
        self.fleet.start()
        self.fleet.wait_ready(60)
        self.queues = {}
        for name, queue in QUEUES.items():
            cfg = Config.load(env={"PARLEY_BAKE_QUEUE": queue})
            self.queues[name] = BakeQueue(self.r, cfg)
            extra = {"PARLEY_BAKE_QUEUE": queue}
            if name == "unyielding":
                extra.update(PARLEY_BAKE_NICE="0", PARLEY_BAKE_MAX_PAUSE_S="0")
            self.procs += [subprocess.Popen([sys.executable, "-m", "parley", "bake-worker"],
                                            env=dict(os.environ, **ENV, PARLEY_REDIS_URL=self.url,
                                                     **extra))
                           for _ in range(bake_workers)]
        deadline = time.monotonic() + 90
        while sum(1 for _ in self.r.scan_iter("parley:worker:bake@*")) < len(self.procs):
            if time.monotonic() > deadline:
                raise RuntimeError("bake workers did not start")
            time.sleep(0.05)

    def load(self, name: str, lines: list[Line], out: Path) -> None:
        """Fill ``name``'s queue and return once its workers are rendering."""
        bq = self.queues[name]
        bq.enqueue(lines, out)
        deadline = time.monotonic() + 5
        while not len(bq.queue.started_job_registry) and time.monotonic() < deadline:
            time.sleep(0.02)

    def unload(self, name: str) -> None:
        """Empty ``name``'s queue and wait for the lines in progress to end."""
        bq = self.queues[name]
        bq.queue.empty()
        deadline = time.monotonic() + 30
        while len(bq.queue.started_job_registry) and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.fleet.stop()
        self.redis.stop()


async def one_turn(url: str, wav: Path, index: int) -> float | None:
    """First reply audio after the last mic chunk, in ms; None for a turn that failed."""
    try:
        tr = await say(url, wav, None, npc="guard", stay=False, session=f"bench-{index}")
    except (RuntimeError, OSError, TimeoutError) as exc:
        print(f"turn {index}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    return None if tr.errors else tr.latency_ms()["first_audio"]


def _baked(out: Path) -> int:
    return sum(1 for _ in out.glob("*.json"))


def bake_alone(rig: Rig, lines: int, out: Path, workers: int) -> dict:
    """Wall-clock lines/s here, and CPU seconds per line (the production bake workers' own
    CPU time): the second says what an idle machine does, 2 cores / CPU s per line."""
    bq = rig.queues["bake_live"]
    batch = _lines(lines, "alone")
    pids = [p.pid for p in rig.procs[:workers]]  # the production kind start first
    cpu0 = sum(_cpu_ticks(pid) for pid in pids)
    t0 = time.monotonic()
    jobs = bq.enqueue(batch, out)
    by_job = dict(zip(jobs, batch, strict=True))
    while not all(o.state in ("done", "failed") for o in bq.outcomes(by_job)):
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    cpu_s = (sum(_cpu_ticks(pid) for pid in pids) - cpu0) / os.sysconf("SC_CLK_TCK")
    audio_s = sum(json.loads(p.read_text())["audio_s"] for p in out.glob("*.json"))
    n = _baked(out)
    return {"lines": n, "s": elapsed, "lines_per_s": n / elapsed, "audio_x": audio_s / elapsed,
            "cpu_s_per_line": cpu_s / max(1, n), "audio_s_per_line": audio_s / max(1, n)}


def run(turns: int = 12, lines: int = 60, bake_workers: int = 0) -> dict:
    """Live turns interleaved across the three conditions, round by round in rotating order,
    so that load from outside the benchmark falls on all of them alike."""
    bake_workers = bake_workers or cpu_count()
    tmp = Path(tempfile.mkdtemp(prefix="parley-bench-bake-"))
    wavs = []
    for i, q in enumerate(QUESTIONS):
        wavs.append(tmp / f"q{i}.wav")
        sf.write(str(wavs[-1]), speech(q), 16000, subtype="PCM_16")
    rig = Rig(bake_workers)
    url = f"ws://127.0.0.1:{rig.fleet.port}"
    conds = ["live", "bake_live", "unyielding"]
    res: dict = {"cores": cpu_count(), "bake_workers": bake_workers, "turns": turns,
                 "loadavg_before": os.getloadavg()[0]}
    res.update({c: {"latency": [], "baked": 0, "s": 0.0, "failed": 0} for c in conds})
    try:
        asyncio.run(one_turn(url, wavs[0], -1))  # warm-up
        res["bake_alone"] = bake_alone(rig, lines, tmp / "alone", bake_workers)
        n = 0
        for rnd in range(turns):
            for cond in conds[rnd % 3:] + conds[:rnd % 3]:
                n += 1
                out = tmp / f"{cond}-{rnd}"
                if cond != "live":
                    rig.load(cond, _lines(300, f"{cond}-{rnd}"), out)
                t0 = time.monotonic()
                lat = asyncio.run(one_turn(url, wavs[n % len(wavs)], n))
                dt = time.monotonic() - t0
                if cond != "live":
                    res[cond]["baked"] += _baked(out) if out.exists() else 0
                    rig.unload(cond)
                res[cond]["s"] += dt
                if lat is None:
                    res[cond]["failed"] += 1
                else:
                    res[cond]["latency"].append(lat)
        for c in conds:
            res[c]["bake_lines_per_s"] = res[c]["baked"] / max(1e-6, res[c]["s"])
        res["loadavg_after"] = os.getloadavg()[0]
    finally:
        rig.close()
    return res


def render(res: dict) -> str:
    rows = [f"{res['cores']} cores, {res['bake_workers']} bake worker(s) per kind, "
            f"{res['turns']} rounds of live turns (one player, short questions at real-time "
            "pace, conditions interleaved); load average before "
            f"{res['loadavg_before']:.1f}, after {res.get('loadavg_after', float('nan')):.1f} "
            "(figures are only comparable within a run on a machine with other load)", "",
            f"{'condition':38} {'turns':>5} {'first audio p50':>16} {'p95':>8} "
            f"{'bake lines/s':>13}"]

    def row(name: str, c: dict, rate: float | None) -> str:
        lat = c["latency"]
        r = f"{rate:13.2f}" if rate is not None else f"{'-':>13}"
        failed = f"  ({c['failed']} failed)" if c.get("failed") else ""
        return (f"{name:38} {len(lat):5d} {_pct(lat, 50):13.0f} ms {_pct(lat, 95):5.0f} ms "
                f"{r}{failed}")

    b = res["bake_alone"]
    rows.append(f"{'bake alone':38} {'-':>5} {'-':>16} {'-':>8} {b['lines_per_s']:13.2f}"
                f"   ({b['lines']} lines in {b['s']:.1f} s, {b['audio_x']:.1f} s of audio/s)")
    if "cpu_s_per_line" in b:
        rows.append(f"{'  CPU per line':38} {b['cpu_s_per_line'] * 1000:.0f} ms for "
                    f"{b['audio_s_per_line']:.1f} s of audio: {res['cores']} idle cores would "
                    f"bake {res['cores'] / max(1e-6, b['cpu_s_per_line']):.1f} lines/s")
    rows.append(row("live alone", res["live"], None))
    rows.append(row("live + bake (nice 19, pausing)", res["bake_live"],
                    res["bake_live"]["bake_lines_per_s"]))
    rows.append(row("live + bake, not yielding (baseline)", res["unyielding"],
                    res["unyielding"]["bake_lines_per_s"]))
    return "\n".join(rows)


def summary(res: dict) -> str:
    b = res["bake_alone"]
    return (f"bake_lines_per_s={b['lines_per_s']:.2f} "
            f"bake_cpu_ms_per_line={b.get('cpu_s_per_line', float('nan')) * 1000:.0f} "
            f"live_p50_ms={_pct(res['live']['latency'], 50):.0f} "
            f"live_p95_ms={_pct(res['live']['latency'], 95):.0f} "
            f"bake_live_p50_ms={_pct(res['bake_live']['latency'], 50):.0f} "
            f"bake_live_p95_ms={_pct(res['bake_live']['latency'], 95):.0f} "
            f"unyielding_p95_ms={_pct(res['unyielding']['latency'], 95):.0f} "
            f"bake_during_live_lines_per_s={res['bake_live']['bake_lines_per_s']:.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="parley bench bake", description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=12, help="live turns per phase")
    ap.add_argument("--lines", type=int, default=60, help="lines in the bake-alone phase")
    ap.add_argument("--bake-workers", type=int, default=0, help="default: one per core")
    ap.add_argument("--out-json", help="also write the raw figures here")
    args = ap.parse_args(argv)
    res = run(turns=args.turns, lines=args.lines, bake_workers=args.bake_workers)
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(res, indent=1))
    print(render(res))
    print(summary(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
