"""`parley say` reads any file soundfile reads in its own format, stays until the reply has
played, and never waits silently."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from parley.client import SayError, load_mic, say
from tests.conftest import ROOT, speech

pytestmark = pytest.mark.slow
QUESTION = "Hello. Can you open the gate?"


def test_float_wav_is_sent_as_float_through_parley_say(gateway_url, tmp_path):
    wav = tmp_path / "question-f32.wav"
    frames = speech(QUESTION, 24000).astype(np.float32) / 32768.0
    sf.write(wav, frames, 24000, subtype="FLOAT")
    mic = load_mic(wav)
    assert mic.format == "f32le" and mic.frames.dtype == np.float32
    assert -12 < mic.peak_dbfs <= 0  # scaled to -1..1, not samples of -1, 0 and +1
    out = tmp_path / "out"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "parley", "say", "--url", gateway_url, "--wav", str(wav),
         "--out", str(out), "--fast"], capture_output=True, text=True, timeout=180, cwd=ROOT)
    took = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "transcript : " in proc.stdout and "gate" in proc.stdout, proc.stdout
    import json

    turn = json.loads((out / "turn.json").read_text())
    assert turn["transcript"] and turn["reply"], turn
    # like UE it stayed until the reply had played, not just until turn_done
    assert turn["stayed_after_turn_done_s"] > 0.5 * turn["reply_audio_s"], turn
    assert took > turn["reply_audio_s"]


async def test_int32_wav_through_say(gateway_url, tmp_path):
    wav = tmp_path / "question-s32.wav"
    frames = speech(QUESTION, 16000, channels=2).astype(np.int32) << 16
    sf.write(wav, frames, 16000, subtype="PCM_32")
    mic = load_mic(wav)
    assert mic.format == "f32le" and mic.channels == 2 and -12 < mic.peak_dbfs <= 0
    t0 = time.perf_counter()
    result = await say(gateway_url, wav, tmp_path / "out", npc="guard", realtime=False)
    s = result.summary()
    assert not result.errors and s["transcript"] and s["reply"], s
    assert s["reply_audio_s"] > 1 and s["face_frames"] > 60
    # the reply played out on the client's clock from its first ready
    assert time.perf_counter() - result.t_first_ready >= s["reply_audio_s"] - 0.05
    assert time.perf_counter() - t0 >= s["reply_audio_s"]


async def test_a_file_without_speech_ends_with_a_message(gateway_url, tmp_path):
    wav = tmp_path / "hiss.wav"
    rng = np.random.default_rng(1)
    sf.write(wav, (rng.standard_normal(16000 * 2) * 1e-4).astype(np.float32), 16000,
             subtype="FLOAT")
    t0 = time.perf_counter()
    with pytest.raises(SayError, match="no speech") as err:
        await say(gateway_url, wav, None, realtime=False, quiet_s=4.0)
    assert time.perf_counter() - t0 < 60
    assert "f32le" in str(err.value) or "no speech" in str(err.value)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(8000, np.int16), 16000, subtype="PCM_16")
    with pytest.raises(SayError, match="digital silence"):
        await say(gateway_url, silent, None)
