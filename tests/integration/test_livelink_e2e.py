"""Live Link Face output from a real gateway: UDP packets on the audio's schedule, after ready."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time

import pytest

from core.config import Config
from gateway.livelink import decode_packet
from gateway.server import Gateway
from parley.client import Client
from tests.conftest import speech

pytestmark = pytest.mark.slow


async def livelink_gateway(fleet) -> tuple[socket.socket, Gateway]:
    """A UDP receiver standing in for Unreal's Live Link, and a second gateway on the same
    fleet (workers are shared) that sends Live Link Face packets to it."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    cfg = Config.load(env={"PARLEY_REDIS_URL": fleet.redis_url,
                           "PARLEY_LIPSYNC_LIVELINK": f"127.0.0.1:{rx.getsockname()[1]}"})
    gw = Gateway(cfg)
    await gw.start("127.0.0.1", 0)
    return rx, gw


async def test_gateway_sends_live_link_face_packets_after_ready(fleet):
    rx, gw = await livelink_gateway(fleet)
    client = await Client.connect(f"ws://127.0.0.1:{gw.port}")
    packets = []
    try:
        opened = await client.open("ll", "guard", 16000, 1)
        await client.stream("ll", speech("Hello, who are you?", 16000), 16000, realtime=False)
        result = await client.wait_done("ll", 60)
        t_ready = result.t_first_ready
        deadline = time.monotonic() + result.audio_samples / result.reply_rate + 2
        while time.monotonic() < deadline:
            try:
                data = rx.recv(4096)
                packets.append((time.perf_counter(), decode_packet(data)))
            except BlockingIOError:
                await asyncio.sleep(0.005)
    finally:
        await client.close()
        await gw.stop()
        rx.close()
    assert packets, "no Live Link packets"
    assert all(p.subject == opened.sid and len(p.values) == 61 for _, p in packets)
    # before ready only the idle face (blinks, gaze) goes out: the mouth stays shut
    assert all(p.values[17] < 0.05 for t, p in packets if t < t_ready), "JawOpen before ready"
    talk = [(t, p) for t, p in packets if t >= t_ready]
    first_t = talk[0][0]
    # paced on the audio clock: the frames span about the reply's duration, not a burst
    duration = result.audio_samples / result.reply_rate
    span = talk[-1][0] - first_t
    assert span > 0.6 * duration, (span, duration)
    assert len(talk) >= 0.8 * result.face_frames
    assert max(p.values[17] for _, p in talk) > 0.2  # the jaw moves while it talks
    # idle and speech share one timeline: frame times never run backwards
    frames = [p.frame_number for _, p in packets]
    assert all(b >= a - 1 for a, b in itertools.pairwise(frames)), frames[:50]


async def test_live_link_face_plays_out_while_parley_say_stays(fleet, tmp_path):
    """`say` stays like UE until the reply has played, so the session's Live Link face speaks
    the whole reply (leaving at turn_done closed the connection and cut it after ~150 ms)."""
    import numpy as np
    import soundfile as sf

    from parley.client import say

    rx, gw = await livelink_gateway(fleet)
    wav = tmp_path / "who.wav"
    sf.write(wav, speech("Who are you? What is your name?", 16000).astype(np.float32) / 32768,
             16000, subtype="FLOAT")
    packets: list[tuple[float, object]] = []

    async def receive():
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(rx, 4096)
            packets.append((time.perf_counter(), decode_packet(data)))

    listener = asyncio.create_task(receive())
    try:
        result = await say(f"ws://127.0.0.1:{gw.port}", wav, None, npc="guard", realtime=False)
        t_left = time.perf_counter()
    finally:
        listener.cancel()
        await gw.stop()
        rx.close()
    duration = result.audio_samples / result.reply_rate
    assert duration > 3 and not result.interrupted
    talk = [p for t, p in packets if result.t_first_ready <= t <= t_left]
    # the reply's face frames went out on the audio's clock while the client stayed
    assert len(talk) >= 0.8 * result.face_frames, (len(talk), result.face_frames)
    assert t_left - result.t_done > 0.5 * duration
    assert sum(p.values[17] > 0.2 for p in talk) > 30  # the jaw moves for more than a moment
