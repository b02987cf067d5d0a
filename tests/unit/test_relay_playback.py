"""Barge-in follows UE's playback, not the server's production (gateway.relay.Relay, Sans-I/O).

With the offline voices a whole 4 s reply is produced, sent and `turn_done` within ~150 ms,
while UE plays it for 4 s: these tests drive the relay on such a timeline, with time passed in.
"""

from __future__ import annotations

import numpy as np

from gateway import core as C
from schemas import protocol as P
from schemas.protocol import ErrorCode
from schemas.streams import EventEntry, FaceEntry, VoiceEntry

RATE = 22050
CHUNK = 1102  # 50 ms at 22050 Hz, as the default TTS sends


def new_relay() -> C.Relay:
    return C.Relay("npc-1", channel=1)


def ready(relay: C.Relay, turn: int, segment: int, now: float) -> list:
    # what the session machine does on UE's ready (the relay records the segment as ready)
    return relay.ready(turn, segment, now)


def send_reply(relay: C.Relay, turn: int, segments: list[float], t0: float = 0.0,
               step: float = 0.001, ready_at: float | None = None) -> tuple[list, float]:
    """Feeds a whole reply (segment lengths in seconds), its face and its end markers the way
    the workers write them, one entry every ``step`` s from ``t0``; UE says ready for each
    segment when its first chunk arrives (plus ``ready_at`` for the first). Returns what the
    relay sent and the time after the last entry."""
    out, now, seq, face_seq, sample, frame = [], t0, 0, 0, 0, 0
    for segment, seconds in enumerate(segments):
        n_chunks = round(seconds * RATE / CHUNK)
        for i in range(n_chunks):
            seq += 1
            now += step
            out += relay.feed("voice", f"{turn}-{seq}", VoiceEntry(
                segment=segment, sample=sample, rate=RATE, pcm=b"\x00\x00" * CHUNK,
                last_in_segment=i == n_chunks - 1).to_fields(), now)
            if i == 0:
                out += ready(relay, turn, segment,
                             ready_at if ready_at is not None and segment == 0 else now)
            end = sample + CHUNK
            stamps = [round(k * RATE / 60) for k in range(frame, frame + 200)]
            stamps = [s for s in stamps if sample <= s < end]
            face_seq += 1
            out += relay.feed("face", f"{turn}-{face_seq}", FaceEntry(
                segment=segment, samples=np.array(stamps, np.int64),
                values=np.zeros((len(stamps), 61), np.float32), first_index=frame).to_fields(),
                now)
            frame += len(stamps)
            sample = end
    now += step
    out += relay.feed("voice", f"{turn}-{seq + 1}", VoiceEntry(
        segment=len(segments), sample=sample, rate=RATE, end=True).to_fields(), now)
    out += relay.feed("face", f"{turn}-{face_seq + 1}", FaceEntry(
        segment=len(segments), samples=np.zeros(0, np.int64),
        values=np.zeros((0, 61), np.float32), first_index=frame, end=True).to_fields(), now)
    return out, now


def speech_start(relay: C.Relay, turn: int, now: float, ts: float | None = None) -> list:
    entry = EventEntry(kind="speech_start", turn=turn)
    if ts is not None:
        entry.ts = ts
    return relay.feed("events", "1-0", entry.to_fields(), now)


def turn_dones(out: list) -> list[P.TurnDone]:
    return [m for m in out if isinstance(m, P.TurnDone)]


def test_talking_over_a_reply_after_its_turn_done_stops_it():
    relay = new_relay()
    out, t_done = send_reply(relay, 1, [1.0, 1.5, 1.6])  # a 4.1 s reply, sent in ~0.3 s
    first_done = turn_dones(out)
    assert len(first_done) == 1 and not first_done[0].interrupted and t_done < 0.5
    # 0.7 s into playback the player talks: the server's production is long over, UE's is not
    verdict = speech_start(relay, 2, 0.7)
    assert verdict == [C.InterruptTurn(1, "barge_in")]
    stop, done = relay.interrupt(1, "barge_in")
    assert isinstance(stop, P.StopPlayback) and stop.turn == 1
    assert done.interrupted and done.turn == 1
    # the totals are what was sent: everything, since production had finished
    assert (done.audio_samples, done.face_frames, done.segments) == (
        first_done[0].audio_samples, first_done[0].face_frames, 3)
    # UE's answer to the stop: the gateway keeps the heard words, and stops nothing else
    assert relay.client_interrupt(0.75) == C.InterruptTurn(1, "answer")


def test_no_barge_in_once_the_reply_has_played():
    relay = new_relay()
    send_reply(relay, 1, [1.0, 1.5, 1.6])
    assert relay.playing(1, 4.0)
    assert not relay.playing(1, 4.1 + C.PLAYBACK_SLACK_S + 0.1)
    assert speech_start(relay, 2, 5.0) == []


def test_playback_clock_starts_at_ready_and_stalls_on_late_audio():
    relay = new_relay()
    # UE buffers 2 s before it says ready: playback runs 2 s later than the audio arrived
    send_reply(relay, 1, [1.0], ready_at=2.0)
    assert relay.playing(1, 3.2) and not relay.playing(1, 3.0 + C.PLAYBACK_SLACK_S + 0.05)
    # audio sent slower than real time (one 50 ms chunk every 100 ms): UE's audio stalls, so
    # the reply plays until its last chunk has arrived and played
    slow = new_relay()
    _, t_last = send_reply(slow, 1, [1.0], step=0.1)
    assert t_last > 2.0
    assert slow.playing(1, t_last + 0.04)
    assert not slow.playing(1, t_last + 0.05 + C.PLAYBACK_SLACK_S + 0.05)


def test_audio_waiting_for_its_ready_counts_as_playing():
    relay = new_relay()
    relay.feed("voice", "1-1", VoiceEntry(segment=0, sample=0, rate=RATE,
                                          pcm=b"\x00\x00" * CHUNK).to_fields(), 0.0)
    relay.feed("voice", "1-2", VoiceEntry(segment=1, sample=CHUNK, rate=RATE,
                                          end=True).to_fields(), 0.0)
    assert relay.playing(1, 60.0)  # UE has it and will play it once it says ready
    ready(relay, 1, 0, 60.0)
    assert relay.playing(1, 60.05) and not relay.playing(1, 60.05 + C.PLAYBACK_SLACK_S + 0.05)


def test_an_interrupt_after_the_reply_has_played_is_answered():
    relay = new_relay()
    answer = relay.client_interrupt(0.0)
    assert isinstance(answer, P.ErrorEvent) and answer.code == ErrorCode.NOT_PLAYING
    assert "no reply audio" in answer.message and answer.session == "npc-1"
    send_reply(relay, 1, [1.0, 1.5, 1.6])
    assert relay.client_interrupt(2.0) == C.InterruptTurn(1, "client")
    relay.interrupt(1, "client")
    again = relay.client_interrupt(2.1)
    assert isinstance(again, P.ErrorEvent) and "interrupted already" in again.message
    late = new_relay()
    send_reply(late, 1, [1.0])
    answer = late.client_interrupt(6.0)
    assert isinstance(answer, P.ErrorEvent) and answer.code == ErrorCode.NOT_PLAYING
    assert "finished playing" in answer.message, answer.message
    assert answer.turn is None  # a turn on an error means the turn failed


def test_interrupted_turn_done_counts_what_was_sent():
    relay = new_relay()
    out, now = [], 0.0
    # three segments of audio and their face are sent; the turn is cut before its end markers
    for segment in range(3):
        for i in range(4):
            seq = segment * 4 + i + 1
            sample = (seq - 1) * CHUNK
            now += 0.01
            out += relay.feed("voice", f"1-{seq}", VoiceEntry(
                segment=segment, sample=sample, rate=RATE,
                pcm=b"\x00\x00" * CHUNK).to_fields(), now)
            if i == 0:
                out += ready(relay, 1, segment, now)
            stamps = np.arange(sample, sample + CHUNK, 368, dtype=np.int64)[:3]
            out += relay.feed("face", f"1-{seq}", FaceEntry(
                segment=segment, samples=stamps, values=np.zeros((len(stamps), 61), np.float32),
                first_index=0).to_fields(), now)
    faces = [P.decode_binary(b) for b in out if isinstance(b, bytes) and b[0] == 3]
    sent_records = sum(len(f.samples) for f in faces)
    assert sent_records == 36
    _, done = relay.interrupt(1, "barge_in")
    assert done.interrupted
    assert (done.audio_samples, done.face_frames, done.segments) == (12 * CHUNK, 36, 3)
    # nothing of the turn follows the cut
    assert relay.feed("voice", "1-13", VoiceEntry(segment=3, sample=12 * CHUNK, rate=RATE,
                                                  pcm=b"\x00\x00" * CHUNK).to_fields(), 1.0) == []


def test_a_resume_replaying_history_does_not_cut_the_replayed_reply():
    # after a reconnect the relay replays turn 1 (the client missed it) and then the stored
    # events, among them the speech start of turn 2 that happened while the link was down
    relay = C.Relay("npc-1", channel=1, min_turn=1, live_since_ms=1_700_000_100_000,
                    ready={(1, 0), (1, 1)})
    send_reply(relay, 1, [1.0, 1.5])
    assert relay.playing(1, 0.5)
    assert speech_start(relay, 2, 0.5, ts=1_700_000_099_000) == []  # history
    assert speech_start(relay, 2, 0.6, ts=1_700_000_100_500) == [C.InterruptTurn(1, "barge_in")]
