"""The per-turn watchdog (gateway/watchdog.py) on real Redis and a real fleet.

A stage's last output entries lost after its job was acked (a Cluster failover within the
replication lag: the session's master dies, the ack on the {jobs} master survives) leave a turn
that nothing would finish. The fleet here runs llm, tts and lipsync workers with a named
failure injection (tests/support/lost_writes.py) that withholds those entries and acks; the
gateway's watchdog must re-issue the stage, and the turn must reach the player whole.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import urllib.request

import pytest

from core.config import Config
from gateway.watchdog import REISSUE_LUA, SESSION_TOPS_LUA, TurnWatch, parse_tops
from parley.client import Client
from parley.fleet import Fleet
from schemas.streams import Job, Keys
from tests.conftest import speech
from tests.support import topology
from tests.support.fleet import log_tail, running_fleet
from tests.support.lost_writes import lost_key
from tests.support.turns import turn_problems

KEYS = Keys()
RATE = 16000
STALL_S = Config().gateway.turn_stall_s  # the default is what is measured
UTTERANCE = "Who are you? What is your name? Tell me about the gate and the road north."
TIMINGS: list[str] = []


# --------------------------------------------------------------------------- the scripts


async def _reissue(r, stages, sid="s1", turn=1):
    stage = stages[-1]
    job = Job(stage=stage, sid=sid, turn=turn)
    flat = [x for kv in job.to_fields().items() for x in kv]
    script = r.register_script(REISSUE_LUA)
    got = await script(keys=[*(KEYS.jobs(s) for s in stages), KEYS.started(stage, sid, turn)],
                       args=[sid, turn, 60, len(stages), 1000, *stages, *flat])
    return int(got[0]), got[1].decode()


async def test_reissue_only_when_no_job_of_the_turn_is_left(redis_client):
    r = redis_client
    stages = ("stt", "llm", "tts")
    for s in stages:
        await r.xgroup_create(KEYS.jobs(s), s, id="0", mkstream=True)
    tts = KEYS.jobs("tts")
    # another session's and another turn's jobs do not count
    await r.xadd(tts, Job(stage="tts", sid="other", turn=1).to_fields())
    await r.xadd(tts, Job(stage="tts", sid="s1", turn=2).to_fields())
    mine = await r.xadd(tts, Job(stage="tts", sid="s1", turn=1).to_fields())
    assert await _reissue(r, stages) == (0, "tts")  # queued, not delivered yet
    got = await r.xreadgroup("tts", "w1", {tts: ">"}, count=10)
    assert len(got[0][1]) == 3
    assert await _reissue(r, stages) == (0, "tts")  # delivered: running (or to be taken over)
    await r.xack(tts, "tts", mine)
    # an upstream job of the turn still pending (its ack, with its follow-ups, is to come)
    llm = KEYS.jobs("llm")
    await r.xadd(llm, Job(stage="llm", sid="s1", turn=1).to_fields())
    await r.xreadgroup("llm", "w2", {llm: ">"})
    assert await _reissue(r, stages) == (0, "llm")
    pend = await r.xpending_range(llm, "llm", "-", "+", 10)
    await r.xack(llm, "llm", pend[0]["message_id"])
    before = await r.xlen(tts)
    assert await _reissue(r, stages) == (1, "tts")
    assert await r.xlen(tts) == before + 1
    top = (await r.xrevrange(tts, count=1))[0][1]
    assert top[b"sid"] == b"s1" and top[b"turn"] == b"1" and top[b"stage"] == b"tts"
    assert await r.get(KEYS.started("tts", "s1", 1)) == b"1"
    # the re-issued job is queued now: a second look finds it
    assert await _reissue(r, stages) == (0, "tts")
    # a stage without its group cannot be judged: nothing is done
    assert (await _reissue(r, ("stt", "lipsync")))[0] == -1


async def test_session_tops_script(redis_client):
    r = redis_client
    sid = "s9"
    k = lambda n: KEYS.session(sid, n)  # noqa: E731
    await r.xadd(k("transcript"), {"text": "hi", "final": "1"}, id="2-4")
    await r.xadd(k("reply"), {"segment": "0", "text": "a", "end": "0"}, id="2-1")
    await r.xadd(k("voice"), {"pcm": b"\0" * 4000, "flags": "1"}, id="1-9")
    await r.xadd(k("voice"), {"pcm": b"", "flags": "2"}, id="1-10")
    await r.xadd(k("events"), {"kind": "error", "turn": "1"})
    await r.xadd(k("events"), {"kind": "speech_start", "turn": "2"})
    await r.set(k("cancel"), "1")
    tops = r.register_script(SESSION_TOPS_LUA)
    raw = await tops(keys=[k(n) for n in ("transcript", "reply", "voice", "face", "events",
                                          "cancel")], args=[16])
    v = parse_tops(raw)
    assert (v.transcript.turn, v.transcript.seq, v.transcript.end) == (2, 4, True)
    assert (v.reply.turn, v.reply.seq, v.reply.end) == (2, 1, False)
    assert (v.voice.turn, v.voice.seq, v.voice.end) == (1, 10, True)
    assert v.face.turn == 0 and v.cancelled == 1 and v.ended == frozenset({1})
    # the I/O reads the same view
    view = await TurnWatch(r, KEYS, 3.0, 60).view(sid)
    assert view == v


# --------------------------------------------------------------------------- the fleet


class LosingFleet(Fleet):
    """The fleet with its llm, tts and lipsync workers run by the failure injection."""

    def _spawn(self, child) -> None:
        stage = child.name.rsplit("-", 1)[0]
        if stage in ("llm", "tts", "lipsync"):
            child.args = [sys.executable, "-m", "tests.support.lost_writes", stage]
        super()._spawn(child)


@pytest.fixture(scope="module", autouse=True)
def _print_timings():
    yield
    if TIMINGS:
        print("\n" + "\n".join(TIMINGS))


LOSES = {2: "llm", 3: "tts", 4: "lipsync"}  # turn 1: no loss, the fault-free reference


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["single", "cluster"])
async def test_lost_outputs_after_the_ack_are_reissued_and_the_turn_completes_whole(kind,
                                                                                   tmp_path):
    """Turn 1 goes through untouched; turns 2, 3 and 4 lose the last entries of llm, tts and
    lipsync in turn. On a Cluster the session's slot and {jobs} are on whichever masters they
    hash to; the state after the loss is the same."""
    topo = topology.start(kind)
    try:
        await _lost_outputs(topo, tmp_path)
    finally:
        topo.stop()


async def _lost_outputs(topo, tmp_path) -> None:
    env = {"PARLEY_TEST_LOSE": ",".join(f"{s}:{t}" for t, s in LOSES.items()),
           "PARLEY_GATEWAY_ADMIT_MAX_LAG_MS": "0", "PARLEY_GATEWAY_ADMIT_MAX_QUEUE_MS": "0"}
    log = tmp_path / "fleet.log"
    frames = speech(UTTERANCE, RATE)
    with running_fleet(topo.url, log, env=env, fleet_cls=LosingFleet) as fleet:
        r = topo.client()
        client = await Client.connect(f"ws://127.0.0.1:{fleet.port}")
        try:
            opened = await client.open("npc", "guard", RATE, 1)
            wall = time.time() - time.perf_counter()
            results = {}
            for turn in (1, *LOSES):
                if turn > 1:
                    client.new_turn("npc")
                tr = client.turns["npc"]
                await client.stream("npc", frames, RATE, realtime=False)
                opened.next_mic_seq += math.ceil(len(frames) / (RATE * 20 // 1000))
                try:
                    await client.wait_turn("npc", turn, STALL_S + 60)
                except TimeoutError:
                    raise AssertionError(f"turn {turn}: no turn_done: {tr.summary()}\n"
                                         f"{log_tail(log, 6000)}") from None
                bad = turn_problems(tr, turn, client.chunks.get("npc", []),
                                    results.get(1))
                assert not bad, (turn, bad, log_tail(log, 4000))
                results[turn] = tr
                await client.wait_played("npc")
                lost = r.get(lost_key(opened.sid, turn))
                if turn in LOSES:
                    assert lost is not None, f"turn {turn}: the injection did not fire"
                    after = tr.t_done + wall - float(lost) / 1000
                    TIMINGS.append(f"watchdog {topo.kind:7}: {LOSES[turn]:7} lost its last 2 "
                                   f"entries after its ack: turn done {after:.2f} s after the loss "
                                   f"(turn_stall_s {STALL_S:g})")
                    assert 0 < after <= STALL_S + 7, (turn, after)
                else:
                    assert lost is None
            r.close()
            # operators see it: one re-issue per stage on the gateway's /metrics
            port = fleet.metrics_ports()["gateway"]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                body = resp.read().decode()
            for stage in LOSES.values():
                assert f'parley_turn_reissues_total{{stage="{stage}"}} 1.0' in body, body[-3000:]
        finally:
            await client.close()
    reissued = [e for e in _log_events(log) if e.get("event") == "turn_stalled_job_reissued"]
    # once each, for the stage that lost its entries; none for the fault-free turn
    assert {e["turn"]: e["stage"] for e in reissued} == LOSES, reissued
    assert len(reissued) == len(LOSES), reissued


def _log_events(path) -> list[dict]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return [e for e in out if isinstance(e, dict)]


@pytest.mark.slow
async def test_a_slow_stage_with_its_job_running_is_left_alone(tmp_path):
    """Busy is not lost: the LLM's first backend stalls mid-reply (a named test double) for
    longer than turn_stall_s before its fallback chain hands the reply to the next one. The
    watchdog looks, finds the turn's LLM job pending, and re-issues nothing; the turn comes
    whole, with no duplicate."""
    stall_s = 2 * STALL_S + 1
    env = {"PARLEY_LLM_BACKENDS": "tests.failing_backends:StallingAfterNTokens,scripted",
           "PARLEY_FALLBACK_STALL_TIMEOUT_S": str(stall_s), "PARLEY_LOG_LEVEL": "info",
           "PARLEY_GATEWAY_ADMIT_MAX_LAG_MS": "0", "PARLEY_GATEWAY_ADMIT_MAX_QUEUE_MS": "0"}
    log = tmp_path / "fleet.log"
    with running_fleet(None, log, env=env) as fleet:
        client = await Client.connect(f"ws://127.0.0.1:{fleet.port}")
        try:
            await client.open("npc", "guard", RATE, 1)
            await client.stream("npc", speech(UTTERANCE, RATE), RATE, realtime=False)
            tr = await client.wait_done("npc", stall_s + 60)
            bad = turn_problems(tr, 1, client.chunks.get("npc", []))
            assert not bad, (bad, log_tail(log, 4000))
        finally:
            await client.close()
    events = _log_events(log)
    assert any(e.get("event") == "backend_failover" or "stall" in str(e.get("error", ""))
               for e in events), "the first backend did not stall"
    slow = [e for e in events if e.get("event") == "turn_slow_job_in_fleet"]
    assert slow and all(e["job_stage"] == "llm" for e in slow), slow
    assert not [e for e in events if e.get("event") == "turn_stalled_job_reissued"]
