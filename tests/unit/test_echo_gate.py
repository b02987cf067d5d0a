"""EchoGate on synthesized rooms: the NPC's reply coming back into the mic (delayed 20-200 ms,
attenuated, with reverb and room noise) is echo; a second voice over it is not."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.echo import REPLIES, espeak, jfk, make_scene, noise, to16k
from workers.stt.echo import FRAME, RATE, EchoGate
from workers.stt.vad import Vad


@pytest.fixture(scope="module")
def reply():
    return espeak(REPLIES[0])


@pytest.fixture(scope="module")
def player():
    return jfk()[:int(3.0 * RATE)]


def starts(mic, gate: EchoGate | None, chunk: int = FRAME) -> list[int]:
    """Speech starts the listener's VAD finds, on the raw mic or through the gate."""
    vad, out = Vad(), []
    for i in range(0, len(mic), chunk):
        x = mic[i:i + chunk]
        out += [ev.sample for ev in vad.push(gate.push(x) if gate else x) if ev.kind == "start"]
    return out


def gate_for(scene) -> EchoGate:
    g = EchoGate()
    g.played(1, 1, at=scene.play_at)
    g.reference(1, 1, 0, scene.reply, scene.reply_rate)
    g.turn_end(1)
    return g


@pytest.mark.parametrize("delay_ms,gain_db,rt60_ms,noise_db", [
    (20, -12, 150, -60), (120, -18, 300, -50), (200, -10, 250, -45), (80, -25, 400, -55),
])
def test_the_reply_in_the_mic_is_echo(reply, delay_ms, gain_db, rt60_ms, noise_db):
    scene = make_scene("echo", *reply, delay_ms, gain_db, rt60_ms, noise_db, seed=delay_ms)
    assert starts(scene.mic, None), "the raw mic must start speech, or this proves nothing"
    g = gate_for(scene)
    assert starts(scene.mic, g, chunk=441) == []  # chunks not aligned to the gate's frames
    assert g.delay_ms is not None and abs(g.delay_ms - delay_ms) <= 40, g.delay_ms


@pytest.mark.parametrize("delay_ms,gain_db,at_s", [(20, -12, 1.6), (150, -18, 3.2),
                                                    (100, -10, 2.4)])
def test_a_second_voice_over_the_reply_is_not(reply, player, delay_ms, gain_db, at_s):
    scene = make_scene("barge", *reply, delay_ms, gain_db, 250, -55, player=player,
                       player_at_s=at_s, seed=7)
    alone = starts(noise(len(scene.mic), -55, 7) + _player_only(scene, player), None)
    got = starts(scene.mic, gate_for(scene))
    assert got, "the player's voice over the reply was gated"
    assert got[0] >= scene.player_at, "started on the echo, before the player spoke"
    assert got[0] - alone[0] <= 0.4 * RATE, (got[0] - alone[0]) / RATE


def _player_only(scene, player) -> np.ndarray:
    from benchmarks.echo import at_level

    x = np.zeros(len(scene.mic), np.float32)
    p = at_level(player, -26.0)[:len(x) - scene.player_at]
    x[scene.player_at:scene.player_at + len(p)] = p
    return x


def test_audio_out_of_the_replys_reach_passes_bit_for_bit(reply):
    scene = make_scene("echo", *reply, 100, -15, 200, -50)
    g = gate_for(scene)
    out = np.concatenate([g.push(scene.mic[i:i + 500]) for i in range(0, len(scene.mic), 500)])
    assert len(out) == len(scene.mic)
    before = scene.play_at // FRAME * FRAME
    assert np.array_equal(out[:before], scene.mic[:before])
    reach_end = scene.play_at + len(to16k(*reply)) + int(0.45 * RATE)
    assert np.array_equal(out[reach_end:], scene.mic[reach_end:])
    assert not np.array_equal(out[before:reach_end], scene.mic[before:reach_end])


def test_a_gate_without_a_reply_changes_nothing():
    x = noise(RATE, -40)
    g = EchoGate(base=12345)
    assert np.array_equal(g.push(x), x) and g.position == 12345 + RATE


@pytest.mark.parametrize("jitter_ms,gap_s", [(0, 0), (150, 0), (40, 2.0)])
def test_ready_by_wall_clock_is_placed_where_the_mic_was(reply, jitter_ms, gap_s):
    """The gateway stamps UE's ready with its arrival time, as it stamps every mic chunk; the
    gate maps it onto the mic's samples by the least delayed chunks around it, through chunks
    that arrive late and in bursts, and across a gap where the client sent nothing."""
    scene = make_scene("echo", *reply, 60, -12, 200, -55)
    g = EchoGate()
    g.reference(1, 1, 0, *reply)
    rng = np.random.default_rng(jitter_ms)
    t0, out, late = 1_000_000.0, [], 0.0
    gap_at = scene.play_at - 4 * FRAME if gap_s else -1
    for i in range(0, len(scene.mic), FRAME):
        if i == gap_at + FRAME:
            t0 += gap_s * 1000  # the mic was off; UE started the reply meanwhile
        captured = t0 + (i + FRAME) * 1000 / RATE
        late = max(0.0, late - 20) if rng.random() > 0.1 else rng.uniform(0, jitter_ms)
        if i <= scene.play_at < i + FRAME:  # UE says ready; stored before the next chunk
            g.played(1, 1, ts_ms=t0 + scene.play_at * 1000 / RATE)
        out.append(g.push(scene.mic[i:i + FRAME], ts_ms=captured + 5 + late))
    placed = g._segments[(1, 1)].start
    assert abs(placed - scene.play_at) <= FRAME, (placed, scene.play_at)
    assert starts(np.concatenate(out), None) == []


def test_segments_play_back_to_back_from_their_ready(reply):
    pcm, rate = reply
    half = len(pcm) // 2
    g = EchoGate()
    g.played(1, 1, at=1000)
    g.played(1, 2, at=1500)  # UE said ready for the second while the first still played
    g.reference(1, 1, 0, pcm[:half], rate)
    g.reference(1, 2, half, pcm[half:], rate)
    g.turn_end(1)
    first_len = round(half * RATE / rate)
    assert g._segments[(1, 2)].start == 1000 + first_len
    g2 = EchoGate()
    g2.reference(1, 1, 0, pcm[:half], rate)
    g2.played(1, 1, at=1000)
    g2.reference(1, 2, half, pcm[half:], rate)
    g2.played(1, 2, at=1000 + first_len + 8000)  # a late ready: UE's audio stalled
    g2.turn_end(1)
    assert g2._segments[(1, 2)].start == 1000 + first_len + 8000


def test_without_any_echo_a_voice_over_the_reply_is_heard_at_once(reply, player):
    """A headset: the reply never reaches the mic. Once the reply has sounded beyond the delay
    window with nothing audible, the room is known to be quiet and the player is heard as the
    VAD alone hears them."""
    scene = make_scene("headset", *reply, 100, -300, 150, -55, player=player,
                       player_at_s=2.0, seed=5)
    alone = starts(scene.mic, None)
    got = starts(scene.mic, gate_for(scene))
    assert got and got[0] - alone[0] <= 0.1 * RATE, (got, alone)


def test_a_ready_wants_its_reply_before_it_is_placed(reply):
    """STT may read a ready together with many mic chunks after it (when behind real time):
    the reply's audio must be fetched before those chunks are judged, not after."""
    g = EchoGate()
    g.played(1, 0, ts_ms=1000.0)
    assert g.playing_turns == [1]
    g.reference(1, 0, 0, *reply)
    g.push(np.zeros(FRAME, np.float32), ts_ms=1020.0)
    assert g._segments[(1, 0)].start is not None


def test_a_mic_that_was_off_when_the_reply_began_is_the_player(reply, player):
    """A client that sends audio only while the player talks (no open mic, so no echo): the
    player cutting in at the very start of the reply, at the reply's own level, is heard as
    the VAD alone hears them."""
    pcm, rate = reply
    before = noise(RATE // 2, -55, 1)  # the tail of the question's stream
    voice = noise(2 * RATE, -55, 2)
    voice[RATE // 10:RATE // 10 + 24000] += 0.1 * player[:24000] / np.abs(player).max()
    g = EchoGate()
    g.reference(1, 0, 0, pcm, rate)
    t0 = 1e6
    for i in range(0, len(before), FRAME):
        g.push(before[i:i + FRAME], ts_ms=t0 + (i + FRAME) / 16)
    g.played(1, 0, ts_ms=t0 + 1500)  # UE starts the reply while the client sends nothing
    t1 = t0 + 1600  # and the player cuts in 100 ms later
    out = np.concatenate([g.push(voice[i:i + FRAME], ts_ms=t1 + (i + FRAME) / 16)
                          for i in range(0, len(voice), FRAME)])
    assert g._segments[(1, 0)].start < len(before)  # placed in the gap, before the cut-in
    assert starts(out, None) == starts(voice, None) != []


@pytest.mark.parametrize("continued", [True, False])
def test_a_reply_that_starts_within_a_frame_of_the_turns_end_is_still_echo(reply, continued):
    """The next listening job's gate starts at the end of the utterance, and a fast reply can
    start playing before that job's first mic chunk arrives. The mic was open all along (the
    previous job read it up to the end): told so, the gate keeps the echo out; not told, it
    takes the mic for one that began after the reply (a push-to-talk style client)."""
    scene = make_scene("echo", *reply, 60, -12, 200, -55)
    start = scene.play_at - 100  # the turn ended 6 ms before UE started the reply
    t0 = 1_000_000.0  # capture clock of sample ``start``
    g = EchoGate(base=start, open_since_ms=t0 - 15 if continued else None)
    g.reference(1, 1, 0, *reply)
    g.turn_end(1)
    g.played(1, 1, ts_ms=t0 + 100 * 1000 / RATE)  # before the first chunk below arrives
    mic = scene.mic[start:]
    out = np.concatenate([g.push(mic[i:i + FRAME], ts_ms=t0 + (i + FRAME) * 1000 / RATE + 5)
                          for i in range(0, len(mic), FRAME)])
    assert starts(mic, None) != []  # the echo alone starts speech at the raw mic
    assert (starts(out, None) == []) == continued


def test_comfort_noise_has_the_rooms_spectrum_and_no_vad_hears_it_start(reply):
    """An 8 kHz mic in steady noise (nothing above 4 kHz) with the reply starting 60 ms into
    the listening job, no echo in it. The gated frames are comfort noise at the room's level
    in each band; white noise at the room's level was a hiss that Silero heard start with the
    reply, as the player speaking over it: the NPC would have interrupted itself."""
    import soxr

    from workers.stt.echo import band_power
    from workers.stt.silero_vad import SileroVad, available

    rng = np.random.default_rng(11)
    room = soxr.resample(rng.standard_normal(8000 * 3), 8000, RATE).astype(np.float32)
    room *= 10 ** (-42 / 20) / np.sqrt(np.mean(room ** 2))
    g = EchoGate()
    pcm, rate = reply
    out = []
    for i in range(0, len(room), FRAME):
        if i == 3 * FRAME:
            g.played(1, 1, at=i)
            g.reference(1, 1, 0, pcm, rate)
        out.append(g.push(room[i:i + FRAME]))
    out = np.concatenate(out)
    assert g.echo_frames > 50  # frames were replaced: this is about what replaced them
    frames = slice(10 * FRAME, len(room) // FRAME * FRAME)
    got = band_power(out[frames].reshape(-1, FRAME).astype(np.float64)).mean(axis=0)
    was = band_power(room[frames].reshape(-1, FRAME).astype(np.float64)).mean(axis=0)
    low = np.geomspace(100, 7500, 21)[1:] < 3500  # bands wholly under the mic's 4 kHz
    ratio_db = 10 * np.log10(got[low] / was[low])
    # the room's level, band by band (a minimum reads the narrow low bands a few dB low)
    assert np.all(np.abs(ratio_db) < 9), ratio_db
    assert abs(10 * np.log10(got[low].sum() / was[low].sum())) < 3
    spec = np.abs(np.fft.rfft(out[frames])) ** 2
    assert spec[np.fft.rfftfreq(len(out[frames]), 1 / RATE) > 4500].sum() < 0.05 * spec.sum()
    if available() is None:
        assert [e for e in SileroVad(silence_ms=500).push(out) if e.kind == "start"] == []
