"""Hands-free on the real fleet: the reply UE plays comes back into the mic at room level. Its
echo neither barges in nor becomes a transcript; the player speaking over it still barges in.

The client is UE with speakers and an open mic (benchmarks.echo.RoomMic): it streams the mic in
real time, and the mic hears the room tone, the player, and the reply the client received, on
its play clock, delayed 120 ms and attenuated by 14 dB with reverb."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from benchmarks.echo import RoomMic, to16k
from parley.client import Client
from schemas import protocol as P
from tests.conftest import speech

pytestmark = pytest.mark.slow

QUESTION = "Who are you? What is your name?"


def voice(text: str) -> np.ndarray:
    x = to16k(speech(text, 16000)[:, 0], 16000)
    return x * 0.7  # the player's own voice, close to the mic


class _Client(Client):
    """Keeps when each message came, for the failure message."""

    async def _on_text(self, msg, now):
        self.received = [*getattr(self, "received", []), now]
        await super()._on_text(msg, now)


async def _hands_free(gateway_url, session: str, barge_after_s: float | None):
    client = await _Client.connect(gateway_url)
    mic = RoomMic(client, session, delay_ms=120, gain_db=-14, rt60_ms=250, noise_db=-55,
                  seed=3)
    stop = asyncio.Event()
    try:
        await client.open(session, "guard", 16000, 1)
        mic.say(voice(QUESTION), time.perf_counter() + 0.3)
        task = asyncio.create_task(mic.run(stop.is_set))
        first = await client.wait_turn(session, 1, 60)
        reply_s = first.audio_samples / client.turns[session].reply_rate
        assert reply_s > 2.5, first
        start = client.first_ready[(session, 1)]
        if barge_after_s is not None:
            mic.say(voice("Wait, stop! Hello!"), start + barge_after_s)
            await asyncio.wait_for(client._stopped[session].wait(), 20)
            await client.wait_turn(session, 2, 60)
        else:  # the reply plays (its first 8 s at most: CI time), and its echo dies away
            end = start + min(reply_s, 8.0)
            await asyncio.sleep(max(0.0, end + 1.0 - time.perf_counter()))
        stop.set()
        await task
    finally:
        stop.set()
        await client.close()
    return client


async def test_the_npcs_own_voice_in_the_mic_does_not_barge_in(gateway_url):
    client = await _hands_free(gateway_url, "echo", None)
    msgs = [(m.to_dict(), round(t - client.first_ready[("echo", 1)], 2))
            for m, t in zip(client.messages, client.received, strict=True)
            if not isinstance(m, P.ReplyText)]
    assert not any(isinstance(m, P.StopPlayback) for m in client.messages), msgs
    heard = [m for m in client.messages if isinstance(m, P.Transcript) and m.turn >= 2]
    assert heard == [], msgs
    assert [m.interrupted for m in client.messages if isinstance(m, P.TurnDone)] == [False]


async def test_the_player_over_the_reply_still_barges_in(gateway_url):
    client = await _hands_free(gateway_url, "echo-barge", 1.5)
    stops = [m for m in client.messages if isinstance(m, P.StopPlayback)]
    assert [s.turn for s in stops] == [1], [m.to_dict() for m in client.messages]
    final = [m for m in client.messages if isinstance(m, P.Transcript) and m.turn == 2
             and m.final]
    assert final and final[0].text, [m.to_dict() for m in client.messages]
