"""Replay, record, trace and forget on real sessions: a multi-turn conversation with a barge-in is
played through the shared fleet, stored, and then replayed (through the same fleet, and from a
recording file through fresh fleets with their own Redis), traced and forgotten."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest
import redis as syncredis

from core.redisconn import connect
from parley import recording as R
from parley.client import Client
from parley.replay import render
from parley.replay_run import replay
from schemas import protocol as P
from tests.conftest import ROOT, speech

pytestmark = pytest.mark.slow
RATE = 16000


async def _conversation(url: str) -> str:
    """Three turns; the player cuts the second reply short by speaking over it."""
    client = await Client.connect(url)
    try:
        opened = await client.open("npc", "guard", RATE, 1)
        await client.stream("npc", speech("What is your name?", RATE), RATE, realtime=False)
        await client.wait_turn("npc", 1, 60)
        await client.wait_played("npc")
        await asyncio.sleep(0.5)  # past the gateway's playback slack: no barge-in
        await client.stream("npc", speech("Tell me about the road north.", RATE), RATE,
                            realtime=False)
        await client.wait_turn("npc", 2, 60)
        # 0.6 s into the reply, the player speaks over it: stop, and UE's interrupt says
        # how far it played
        await _sleep_until_playing(client, 0.6)
        await client.stream("npc", speech("Hello there!", RATE), RATE, realtime=True)
        await client.wait_turn("npc", 3, 60)
        await client.wait_played("npc")
        await client.send(P.CloseSession(session="npc"))
        await asyncio.sleep(0.3)  # the gateway stores the close
    finally:
        await client.close()
    return opened.sid


async def _sleep_until_playing(client: Client, seconds: float) -> None:
    for _ in range(500):
        start = client.first_ready.get(("npc", 2))
        if start is not None and time.perf_counter() - start >= seconds:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("turn 2 never started playing")


@pytest.fixture(scope="module")
async def recorded(gateway_url, redis_server):
    sid = await _conversation(gateway_url)
    r = connect(redis_server.url)
    try:
        rec = await R.load(r, sid)
    finally:
        await r.aclose()
    return rec


def _cli(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parley", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_the_recording_holds_what_the_client_did(recorded):
    kinds = [e["kind"] for e in recorded.events]
    assert kinds[0] == "open" and kinds[-1] == "close"
    assert {"mic", "ready", "interrupt"} <= set(kinds)
    cut = [e for e in recorded.events if e["kind"] == "interrupt"]
    assert cut[0]["turn"] == 2 and cut[0]["code"] == "answer" and cut[0]["played"] > 0
    assert sorted(recorded.turns) == [1, 2, 3]
    assert recorded.turns[2].interrupted and recorded.turns[2].heard
    assert "secret" not in json.dumps(recorded.meta)


async def test_a_replay_through_the_fleet_is_identical(recorded, gateway_url, redis_server):
    result = await replay(gateway_url, recorded, redis_server.url, fast=True)
    assert result.report.differing == [], render(result.report)
    assert not result.waits, result.waits
    again = result.replay.turns
    assert again[2].interrupted and again[2].played == recorded.turns[2].played
    assert again[2].heard == recorded.turns[2].heard
    assert [again[t].audio_sha for t in (1, 3)] == [recorded.turns[t].audio_sha for t in (1, 3)]
    assert [again[t].face_sha for t in (1, 3)] == [recorded.turns[t].face_sha for t in (1, 3)]


def test_a_recording_file_replays_on_a_fresh_fleet_and_config_swaps(recorded, tmp_path):
    path = R.write_file(recorded, tmp_path / "session.parley")
    assert R.read_file(path).mic == recorded.mic
    # A fleet of the replay's own, with its own Redis, whose guard answers what it does not
    # understand differently (--config): the report shows those replies changed, and the
    # turn the persona answers as before comes out bit for bit, barge-in included.
    personas = tmp_path / "personas"
    personas.mkdir()
    for p in (ROOT / "personas").glob("*.toml"):
        text = p.read_text()
        if p.name == "guard.toml":
            text = text.replace('fallback = "I am only a guard, friend.',
                                'fallback = "Speak up, stranger.')
        (personas / p.name).write_text(text)
    cfg = tmp_path / "swap.toml"
    cfg.write_text(f'[llm]\npersonas_dir = "{personas}"\n')
    fallback = [t for t, o in recorded.turns.items() if o.reply.startswith("I am only a guard")]
    assert fallback, recorded.turns
    out = _cli("replay", str(path), "--config", str(cfg))
    assert out.returncode == 3, out.stdout + out.stderr
    assert "≠ reply" in out.stdout and "Speak up, stranger." in out.stdout, out.stdout
    n = len(recorded.turns)
    assert (f"turns={n} identical={n - len(fallback)} differing={len(fallback)} "
            f"({', '.join(map(str, fallback))})") in out.stdout, out.stdout


def test_trace_and_forget_a_stored_session(recorded, redis_server, capsys, monkeypatch):
    from parley.cli import main

    monkeypatch.setenv("PARLEY_REDIS_URL", redis_server.url)
    assert main(["trace", recorded.sid]) == 0
    text = capsys.readouterr().out
    assert "final transcript" in text and "slowest step" in text, text
    assert main(["trace", recorded.sid, "1", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one[0]["turn"] == 1 and one[0]["slowest"]["step_ms"] >= 0
    assert [s["mark"] for s in one[0]["steps"]][:2] == ["eos", "final_transcript"]
    assert main(["forget", recorded.sid]) == 0
    r = syncredis.from_url(redis_server.url)
    try:
        assert list(r.scan_iter(match=f"*{recorded.sid}*")) == []
    finally:
        r.close()
    assert main(["trace", recorded.sid]) == 1
    assert "nothing stored" in capsys.readouterr().err
