"""Barge-in follows UE's playback on the offline fleet, where production is over long before UE
has played the reply: `turn_done` comes ~150 ms after the first audio of a reply that plays for
seconds. The client stays like UE does, and its audio clock starts at its first `ready`."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from gateway.core import PLAYBACK_SLACK_S
from parley.client import Client
from schemas import protocol as P
from schemas.protocol import ErrorCode
from schemas.streams import Keys
from tests.conftest import speech

pytestmark = pytest.mark.slow


async def test_talking_over_a_reply_after_its_turn_done_stops_it(fleet, gateway_url):
    client = await Client.connect(gateway_url)
    try:
        opened = await client.open("late", "guard", 16000, 1)
        await client.stream("late", speech("Who are you? What is your name?", 16000), 16000,
                            realtime=False)
        first = await client.wait_turn("late", 1, 60)
        tr = client.turns["late"]
        t_done = time.perf_counter()
        reply_s = first.audio_samples / tr.reply_rate
        assert not first.interrupted and reply_s > 3, first
        assert tr.t_first_ready and t_done - tr.t_first_ready < reply_s - 2, \
            "turn_done came late: the machine is too busy for this test's timeline"
        # the player talks over the reply after its turn_done, while UE still plays it
        await client.stream("late", speech("Wait, hello!", 16000), 16000, realtime=True)
        try:
            await client.wait_turn("late", 2, 60)
        except TimeoutError:
            raise AssertionError([m.to_dict() for m in client.messages]) from None
    finally:
        await client.close()
    stops = [m for m in client.messages if isinstance(m, P.StopPlayback)]
    assert [s.turn for s in stops] == [1], [m.to_dict() for m in client.messages]
    dones = [m for m in client.messages if isinstance(m, P.TurnDone) and m.turn == 1]
    assert [d.interrupted for d in dones] == [False, True]
    # everything had been sent when the player cut in: the totals say so
    assert (dones[1].audio_samples, dones[1].face_frames, dones[1].segments) == (
        dones[0].audio_samples, dones[0].face_frames, dones[0].segments)
    # the client answered the stop with what it had played; the history keeps those words
    assert 0 < tr.played_samples < first.audio_samples
    r = redis.from_url(fleet.redis_url)
    heard = r.hget(Keys().session(opened.sid, "history"), "1:heard")
    r.close()
    full = next(m.text for m in client.messages
                if isinstance(m, P.ReplyText) and m.turn == 1 and m.final)
    assert heard is not None and 0 < len(heard.decode()) < len(full), (heard, full)
    assert full.startswith(heard.decode().rstrip(",.")), (heard, full)


async def test_an_interrupt_after_the_reply_has_played_is_answered(gateway_url):
    client = await Client.connect(gateway_url)
    try:
        await client.open("over", "guard", 16000, 1)
        await client.stream("over", speech("Hello there.", 16000), 16000, realtime=False)
        await client.wait_turn("over", 1, 60)
        await client.wait_played("over")
        await asyncio.sleep(PLAYBACK_SLACK_S + 0.2)
        await client.send(P.Interrupt(session="over", played_samples=1000))
        err = await client.wait_for(f"error:{ErrorCode.NOT_PLAYING}", 10)
    finally:
        await client.close()
    assert err.session == "over" and "finished playing" in err.message, err
    assert not any(isinstance(m, P.StopPlayback) for m in client.messages)
    assert [m.interrupted for m in client.messages if isinstance(m, P.TurnDone)] == [False]
