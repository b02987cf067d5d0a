"""Whole turns through the real fleet: gateway and four worker processes on a private Redis."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from core.personas import load_personas
from parley.client import Client, say
from schemas import protocol as P
from schemas.protocol import ErrorCode
from tests.conftest import speech
from tests.support.turns import check_turn

pytestmark = pytest.mark.slow


async def test_full_turn_from_jfk_flac(gateway_url, jfk_path, tmp_path):
    result = await say(gateway_url, jfk_path, tmp_path, npc="guard", realtime=False)
    s = check_turn(result)
    assert s["reply_sample_rate"] == 22050
    # jfk.flac has long pauses; `say` opens with endpoint "client", so it stays one turn
    assert result.turn == 1 and not result.interrupted
    for name in ("reply.wav", "face.csv", "turn.json"):
        assert (tmp_path / name).exists()
    turn = json.loads((tmp_path / "turn.json").read_text())
    assert {"transcript", "reply", "latency_ms", "seq_gaps", "seq_duplicates"} <= set(turn)
    rows = (tmp_path / "face.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:4] == ["Timecode", "BlendShapeCount", "EyeBlinkLeft", "EyeLookDownLeft"]
    assert len(header) == 2 + 61 and header[-1] == "RightEyeRoll"
    # Live Link Face's CSV order, not the enum's: these two pairs are swapped there
    assert header.index("JawRight") < header.index("JawLeft")
    assert header.index("MouthRight") < header.index("MouthLeft")
    assert len(rows) - 1 == result.face_frames
    # the jaw moves while the NPC speaks
    values = np.concatenate(result.face_values)
    assert values[:, 17].max() > 0.3  # JawOpen


async def test_timing_marks_lie_inside_their_segment(fleet, gateway_url, tmp_path):
    from core.redisconn import connect_sync
    from schemas.streams import Keys, VoiceEntry

    frames = speech("Who are you? What is your name?", 16000)
    client = await Client.connect(gateway_url)
    try:
        opened = await client.open("marks", "innkeeper", 16000, 1)
        await client.stream("marks", frames, 16000, realtime=False)
        await client.wait_done("marks", 60)
    finally:
        await client.close()
    r = connect_sync(fleet.redis_url)
    voice = [VoiceEntry.from_fields(f)
             for _, f in r.xrange(Keys().session(opened.sid, "voice"), "1-0", "1-99999")]
    r.close()
    span: dict[int, list[int]] = {}
    for v in voice:
        if not v.end:
            lo, hi = span.setdefault(v.segment, [v.sample, v.sample])
            span[v.segment] = [min(lo, v.sample), max(hi, v.sample + v.num_samples)]
    marks = [(v.segment, m) for v in voice for m in v.marks]
    assert len(marks) > 10
    for seg, m in marks:
        lo, hi = span[seg]
        assert lo <= m.sample <= hi, (seg, m, lo, hi)


@pytest.mark.parametrize("rate,channels", [(8000, 1), (16000, 1), (48000, 2)])
async def test_full_turn_at_other_rates(gateway_url, rate, channels):
    frames = speech("Hello there. Who are you?", rate, channels)
    client = await Client.connect(gateway_url)
    try:
        await client.open("npc-r", "innkeeper", rate, channels)
        await client.stream("npc-r", frames, rate, realtime=False)
        result = await client.wait_done("npc-r", 60)
    finally:
        await client.close()
    check_turn(result)


async def test_four_sessions_on_one_connection_each_get_their_persona(gateway_url, jfk_path):
    personas = load_personas(__import__("core.config").config.Config().personas_dir())
    npcs = ["guard", "merchant", "innkeeper", "wizard"]
    frames = speech("Who are you? What is your name?", 16000)
    client = await Client.connect(gateway_url)
    try:
        for i, npc in enumerate(npcs):
            await client.open(f"s{i}", npc, 16000, 1)
        await asyncio.gather(*(client.stream(f"s{i}", frames, 16000, realtime=True)
                               for i in range(len(npcs))))
        results = await asyncio.gather(*(client.wait_done(f"s{i}", 90)
                                         for i in range(len(npcs))))
    finally:
        await client.close()
    replies = []
    for npc, result in zip(npcs, results, strict=True):
        check_turn(result)
        p = personas[npc]
        allowed = {ln.reply for ln in p.lines} | {p.fallback}
        assert result.reply in allowed, (npc, result.reply)
        replies.append(result.reply)
    assert len(set(replies)) == 4


async def test_bad_input_gets_errors_while_a_concurrent_session_completes(gateway_url):
    frames = speech("Hello. Can you open the gate?", 16000)
    good = await Client.connect(gateway_url)
    bad = await Client.connect(gateway_url)
    try:
        await good.open("ok", "guard", 16000, 1)
        talk = asyncio.create_task(good.stream("ok", frames, 16000, realtime=True))

        async def expect(code: str, send) -> None:
            await send()
            err = await bad.wait_for(f"error:{code}", 5)
            assert err.code == code and err.message

        # binary audio before any session is open on this connection
        await expect(ErrorCode.SESSION_NOT_OPEN,
                     lambda: bad.send(P.MicAudio(1, 1, b"\x00\x00" * 160).encode()))
        await expect(ErrorCode.BAD_JSON, lambda: bad.ws.send("{this is not json"))
        await expect(ErrorCode.UNKNOWN_TYPE, lambda: bad.ws.send('{"type": "teleport"}'))
        await expect(ErrorCode.UNSUPPORTED_FORMAT, lambda: bad.ws.send(json.dumps(
            {"type": "open", "session": "b1", "npc": "guard", "sample_rate": 16000,
             "channels": 1, "format": "mp3"})))
        await expect(ErrorCode.BAD_SAMPLE_RATE, lambda: bad.ws.send(json.dumps(
            {"type": "open", "session": "b2", "npc": "guard", "sample_rate": 0,
             "channels": 1, "format": "s16le"})))
        opened = await bad.open("b3", "merchant", 16000, 1)
        # audio for a session (channel) that does not exist
        bad._waiters.pop(f"error:{ErrorCode.SESSION_NOT_OPEN}", None)
        await expect(ErrorCode.SESSION_NOT_OPEN,
                     lambda: bad.send(P.MicAudio(opened.channel + 50, 1, b"\x00\x00").encode()))
        bad._waiters.pop(f"error:{ErrorCode.SESSION_NOT_OPEN}", None)
        await expect(ErrorCode.SESSION_NOT_OPEN,
                     lambda: bad.send(P.EndOfUtterance(session="nobody")))
        await expect(ErrorCode.FRAME_TOO_LARGE,
                     lambda: bad.send(P.MicAudio(opened.channel, 1, b"\x00" * 200_000).encode()))
        await expect(ErrorCode.UNKNOWN_SEGMENT,
                     lambda: bad.send(P.Ready(session="b3", turn=1, segment=42)))

        async def flood():
            for i in range(2000):
                await bad.ws.send(P.encode(P.Ping(id=i)))

        await expect(ErrorCode.RATE_LIMITED, flood)
        # the bad connection is still usable, and its own session still works
        await asyncio.sleep(1.5)
        await bad.send(P.Ping(id=99_999))
        assert isinstance(await bad.wait_for("pong:99999", 5), P.Pong)

        await talk
        result = await good.wait_done("ok", 60)
    finally:
        await good.close()
        await bad.close()
    check_turn(result)
    assert "gate" in result.reply


async def test_status_shows_workers_and_queues(fleet):
    from parley.status import fleet_status

    status = fleet_status(fleet.redis_url)
    stages = sorted(w["stage"] for w in status["workers"])
    assert stages == ["lipsync", "llm", "stt", "tts"]
    assert all(w["pid"] > 0 for w in status["workers"])
    assert set(status["queues"]) == {"stt", "llm", "tts", "lipsync"}


async def test_a_named_players_voice_is_kept_for_their_other_sessions(fleet, gateway_url):
    """What the recognizer learned in a named player's turn is kept for that player on this
    connection (their first question to another NPC starts from it, with no warm-up); a player
    of the same name on another connection is someone else."""
    from core.redisconn import connect
    from schemas.streams import SPEAKER_START, Keys, SessionMeta
    from workers.stt.pocketsphinx_backend import SPEAKER_TAG

    keys, r = Keys(), connect(fleet.redis_url)

    async def player(sid: str) -> str:
        return SessionMeta.from_fields(await r.hgetall(keys.session(sid, "meta"))).player

    one, two = await Client.connect(gateway_url), await Client.connect(gateway_url)
    try:
        a = await one.open("pa", "guard", 16000, 1, endpoint="client", player="p1")
        await one.stream("pa", speech("Hello there. Can you open the gate for me?", 16000),
                         16000, realtime=False)
        check_turn(await one.wait_done("pa", 60))
        b = await one.open("pb", "merchant", 16000, 1, endpoint="client", player="p1")
        c = await two.open("pc", "merchant", 16000, 1, endpoint="client", player="p1")
        assert await player(a.sid) == await player(b.sid) != await player(c.sid)
        learned = None
        for _ in range(40):  # written once the reply's first audio is out
            learned = await r.get(keys.speaker(await player(a.sid)))
            if learned:
                break
            await asyncio.sleep(0.05)
        assert learned and learned.decode().startswith(SPEAKER_TAG)
        assert await r.ttl(keys.speaker(await player(a.sid))) > 0  # it expires like a session
        assert not await r.get(keys.speaker(await player(c.sid)))
        # the player's next NPC starts from it, and keeps that with the session (for a replay)
        await one.stream("pb", speech("Where does this road go?", 16000), 16000,
                         realtime=False)
        check_turn(await one.wait_done("pb", 60))
        assert await r.hget(keys.session(b.sid, "meta"), SPEAKER_START) == learned
    finally:
        await one.close()
        await two.close()
        await r.aclose()
