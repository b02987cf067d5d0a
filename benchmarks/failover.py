"""Redis failover mid-turn, per topology: a primary killed (kill -9) while a turn is in flight.

    parley bench failover [--topologies single,cluster,sentinel] [--turns 1] [--quick]

For each topology it starts that Redis itself (parley/topology.py: one redis-server with AOF;
a Cluster of 3 masters and 3 replicas; a primary, a replica and 3 sentinels; failover tuned to
1 s as in the tests), a fleet on it (gateway and one worker per stage, as `parley up` runs
them) and plays turns through the reference client, each on a new session, at real-time pace:

* ``reply``: the primary holding the job streams (``{jobs}``) is killed at the first reply
  audio (TTS and lipsync jobs in flight);
* ``talking``: the primary holding the session's slot is killed at the first partial
  transcript (the player still speaking, the gateway appending mic audio); on a Cluster the
  session is opened on another master than the jobs'.

Each case first plays ``--turns`` turns with no kill (the baseline, measured from the same
moment), then ``--turns`` with one. A single Redis has no replica: its kill is a restart on the
same port and data. After a kill the dead node is started again and waits to be an in-sync
replica, so the next kill has one to promote.

Per case: seconds until the killed slot took a write again (a probe of this process's own
client, which also has to find the new primary), seconds from the moment to ``turn_done``
with the kill and without, and turns completed / lost (no ``turn_done`` in 60 s, or an error)
/ duplicated (a repeated seq) plus seq gaps. The last line is
``topologies=.. turns=.. completed=.. lost=.. duplicated=.. gaps=.. writable_max_s=..
added_max_s=..`` (added: the kill turn's time over the baseline's median, worst case).

``--quick``: the single topology's ``reply`` case, one turn each, a short utterance (a smoke
run of about half a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.speech import speech
from parley import topology
from parley.client import Client, TurnResult
from parley.fleet import Fleet
from parley.redis_server import free_port
from schemas.streams import Keys

RATE = 16000
KEYS = Keys()
ENV = {
    "PARLEY_WORKER_CLAIM_IDLE_MS": "1000",
    "PARLEY_WORKER_HEARTBEAT_MS": "200",
    "PARLEY_LOG_LEVEL": "warning",
    # one machine, failovers on purpose: admission would refuse a session while STT catches up
    "PARLEY_GATEWAY_ADMIT_MAX_LAG_MS": "0",
    "PARLEY_GATEWAY_ADMIT_MAX_QUEUE_MS": "0",
}
UTTERANCE = "Who are you? What is your name? Tell me about the gate and the road north."
SHORT = "Who are you? Tell me about the gate."
CASES = {"reply": "jobs", "talking": "session"}  # case -> whose primary is killed
TURN_TIMEOUT_S = 60.0
HEADER = "topology  case     writable_s  kill_turn_s  base_turn_s  completed/lost/duplicated"


@dataclass
class Turn:
    killed: bool
    seconds: float | None  # moment -> turn_done; None: no turn_done
    writable: float | None = None
    errors: int = 0
    gaps: int = 0
    duplicates: int = 0

    @property
    def completed(self) -> bool:
        return self.seconds is not None and not self.errors


@dataclass
class Case:
    topology: str
    name: str
    turns: list[Turn] = field(default_factory=list)

    def of(self, killed: bool) -> list[Turn]:
        return [t for t in self.turns if t.killed == killed]

    def median(self, killed: bool) -> float | None:
        got = [t.seconds for t in self.of(killed) if t.seconds is not None]
        return statistics.median(got) if got else None

    def row(self) -> str:
        kill, base = self.median(True), self.median(False)
        writable = [t.writable for t in self.of(True) if t.writable is not None]
        killed = self.of(True)
        done = sum(t.completed for t in killed)
        dup = sum(t.duplicates > 0 for t in killed)
        gaps = sum(t.gaps for t in killed)
        w = f"{max(writable):.2f}" if writable else "-"
        return (f"{self.topology:9} {self.name:8} {w:>11} {_f(kill):>11} {_f(base):>10}   "
                f"{done}/{len(killed) - done}/{dup}  gaps {gaps}")


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _kill(topo, key: str, probe: str) -> tuple[float | None, object]:
    """kill -9 the primary of ``key``; (seconds until writable, the killed node or None)."""
    t0 = time.monotonic()
    if topo.kind == "single":
        topo.kill_primary_for(key)
        return topology.writable_after(topo, probe, t0), None
    node = topo.primary_for(key)
    node.kill()
    return topology.writable_after(topo, probe, t0), node


async def _open(client: Client, topo, name: str) -> str:
    """A session (on a Cluster: on another master than the job streams'); returns its name."""
    jobs = topo.primary_for(KEYS.jobs("stt")) if topo.kind == "cluster" else None
    for i in range(12):
        session = f"{name}-{i}"
        opened = await client.open(session, "guard", RATE, 1)
        if jobs is None or topo.primary_for(KEYS.session(opened.sid, "mic")) is not jobs:
            return session
    raise RuntimeError("12 sessions all landed on the job streams' master")


async def _wait(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


async def play(client: Client, topo, case: str, kill: bool, frames, name: str) -> Turn:
    """One turn on a new session; the primary of ``case`` is killed at its moment if ``kill``."""
    session = await _open(client, topo, name)
    tr: TurnResult = client.turns[session]
    talk = asyncio.create_task(client.stream(session, frames, RATE, realtime=True))
    if case == "reply":
        moment = await _wait(lambda: tr.t_first_audio > 0, TURN_TIMEOUT_S)
    else:
        moment = await _wait(lambda: len(tr.partials) >= 1, TURN_TIMEOUT_S)
    t_mark = time.perf_counter()
    writable, node = None, None
    if kill and moment:
        sid = client.opened[session].sid
        key = KEYS.jobs("stt") if case == "reply" else KEYS.session(sid, "mic")
        probe = "parley:{jobs}:probe" if case == "reply" else KEYS.session(sid, "probe")
        writable, node = await asyncio.to_thread(_kill, topo, key, probe)
    await talk
    try:
        await client.wait_turn(session, 1, TURN_TIMEOUT_S)
        seconds = tr.t_done - t_mark
    except TimeoutError:
        seconds = None
    s = tr.summary()
    turn = Turn(kill, seconds, writable, len(tr.errors), s["seq_gaps"], s["seq_duplicates"])
    if node is not None:  # back as a replica: the next kill has one to promote
        await asyncio.to_thread(topology.rejoin, node)
    return turn


def _dead(fleet: Fleet) -> list[str]:
    return [c.name for c in fleet.children if c.proc is not None and c.proc.poll() is not None]


async def run_topology(kind: str, cases: list[str], turns: int, frames, log_dir: Path
                       ) -> list[Case]:
    topo = topology.start(kind)
    fleet = Fleet(port=free_port(), workers=1, redis_url=topo.url,
                  log_path=str(log_dir / f"fleet-{kind}.log"), env=ENV)
    out = []
    try:
        fleet.start()
        fleet.wait_ready(120)
        client = await Client.connect(f"ws://127.0.0.1:{fleet.port}")
        try:
            for name in cases:
                c = Case(kind, name)
                for kill in (False, True):
                    for i in range(turns):
                        tag = f"{name}-{'kill' if kill else 'base'}-{i}"
                        c.turns.append(await play(client, topo, name, kill, frames, tag))
                out.append(c)
                print(c.row(), flush=True)  # as it goes: a run takes minutes
        finally:
            await client.close()
        dead = _dead(fleet)
        if dead:
            print(f"  {kind}: fleet processes died: {', '.join(dead)} (see {fleet.log_path})")
    finally:
        fleet.stop()
        topo.stop()
    return out


def report(results: list[Case], kinds: list[str]) -> str:
    killed = [t for c in results for t in c.of(True)]
    done = sum(t.completed for t in killed)
    dup = sum(t.duplicates > 0 for t in killed)
    gaps = sum(t.gaps for t in killed)
    writable = [t.writable for t in killed if t.writable is not None]
    added = []
    for c in results:
        base = c.median(False)
        added += [t.seconds - base for t in c.of(True)
                  if t.seconds is not None and base is not None]
    return (f"topologies={','.join(kinds)} turns={len(killed)} completed={done} "
            f"lost={len(killed) - done} duplicated={dup} gaps={gaps} "
            f"writable_max_s={_f(max(writable) if writable else None)} "
            f"added_max_s={_f(max(added) if added else None)}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="parley bench failover",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--topologies", default="single,cluster,sentinel",
                    help="comma-separated: single, cluster, sentinel")
    ap.add_argument("--cases", default="reply,talking", help="reply, talking")
    ap.add_argument("--turns", type=int, default=1, help="turns per case, with and without kill")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: single, reply case, one turn each, a short utterance")
    ap.add_argument("--log-dir", default="", help="where the fleets' logs go (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.quick:
        args.topologies, args.cases, args.turns = "single", "reply", 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kinds = [k.strip() for k in args.topologies.split(",") if k.strip()]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        if c not in CASES:
            raise SystemExit(f"unknown case {c!r}; known: {', '.join(CASES)}")
    frames = speech(SHORT if args.quick else UTTERANCE, RATE)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="parley-bench-failover-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    results: list[Case] = []
    t0 = time.monotonic()
    print(HEADER)
    for kind in kinds:
        results += asyncio.run(run_topology(kind, cases, args.turns, frames, log_dir))
    print(f"failover bench: kill -9 of a primary mid-turn, {args.turns} turn(s) per case with "
          f"and without it, in {time.monotonic() - t0:.0f} s; logs in {log_dir}")
    print(HEADER)
    for c in results:
        print(c.row())
    line = report(results, kinds)
    print(line)
    return 0 if "lost=0 " in line and "duplicated=0 " in line else 1


if __name__ == "__main__":
    raise SystemExit(main())
