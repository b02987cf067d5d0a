"""The end of a turn through the real fleet: a mid-sentence pause does not end the turn, the
finished sentence does, and an end_of_utterance with nothing to answer gets turn_done no_speech
instead of silence."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from benchmarks.turns import BenchClient
from parley.client import Client, to_pcm
from schemas import protocol as P

pytestmark = pytest.mark.slow
R = 16000


def sentence_with_pause(text: str, word: int, pause_s: float):
    """int16 (n, 1) at 16 kHz: 0.3 s lead, the sentence with a pause before ``word``, 2 s of
    silence; and the true end of speech (samples)."""
    from tests.unit.test_endpointing import speech

    s, spans = speech(text, word, pause_s)
    lead = int(0.3 * R)
    x = np.concatenate([np.zeros(lead, np.float32), s, np.zeros(2 * R, np.float32)])
    return (np.clip(x, -1, 0.99997) * 32768).astype(np.int16)[:, None], lead + spans[-1][1]


async def stream_paced(client: Client, session: str, frames: np.ndarray, end: int) -> float:
    """Like a microphone; returns when the chunk holding sample ``end`` was sent."""
    ch = client.opened[session].channel
    seq, t0, t_end = client.next_seq[session], time.perf_counter(), 0.0
    for i, start in enumerate(range(0, len(frames), 320)):
        await client.send(P.MicAudio(ch, seq, to_pcm(frames[start:start + 320], "s16le"))
                          .encode())
        if not t_end and start + 320 >= end:
            t_end = time.perf_counter()
        seq += 1
        await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.02 - time.perf_counter()))
    client.next_seq[session] = seq
    return t_end


async def test_a_mid_sentence_pause_does_not_end_the_turn_and_the_sentence_end_does(
        gateway_url):
    """The shipped default (Silero VAD, 800 ms of silence): a 600 ms pause inside the sentence
    stays inside the turn; after the last word the turn ends within a second or so."""
    frames, end = sentence_with_pause("I want the sword from the blacksmith.", 2, 0.6)
    client = await BenchClient.connect(gateway_url)
    try:
        await client.open("pause", "guard", R, 1)
        t_end = await stream_paced(client, "pause", frames, end)
        for _ in range(100):  # a loaded machine's STT may lag; positions decide, not clocks
            if any(m.session == "pause" for m, _ in client.final_times):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        finals = [m for m, _ in client.final_times if m.session == "pause"]
        assert len(finals) == 1, [m.text for m in finals]  # one turn: not cut at the pause
        # the server ended it after the true end of speech, by about the silence it waits
        assert end <= finals[0].end_sample <= end + int(1.2 * R), (finals[0].end_sample, end)
        done = await client.wait_turn("pause", finals[0].turn, timeout=30)
        assert done.audio_samples > 0 and not done.no_speech
        assert client.first_audio[("pause", finals[0].turn)] > t_end
    finally:
        await client.close()


@pytest.mark.parametrize("endpoint", ["client", "vad"])
async def test_end_of_utterance_without_speech_gets_turn_done_no_speech(gateway_url, endpoint):
    client = await Client.connect(gateway_url)
    session = f"quiet-{endpoint}"
    try:
        await client.open(session, "guard", R, 1, endpoint=endpoint)
        hiss = (np.random.default_rng(1).standard_normal((R // 2, 1)) * 30).astype(np.int16)
        await client.stream(session, hiss, R, realtime=False)  # then end_of_utterance
        done = await client.wait_turn(session, 1, timeout=15)
        assert done.no_speech and done.audio_samples == 0 and not done.interrupted
        assert not client.turns[session].transcript
        # the session goes on: the next utterance is the next turn, answered as usual
        from tests.conftest import speech

        await client.stream(session, speech("Open the gate, please.", R), R, realtime=False)
        nxt = await client.wait_turn(session, 2, timeout=60)
        assert not nxt.no_speech and nxt.audio_samples > 0
    finally:
        await client.close()
