"""What the gateway keeps of the mic through a Redis failover (gateway/mic_hold.py)."""

from __future__ import annotations

from gateway.mic_hold import MicHold
from schemas.streams import MicEntry


def chunks(*seqs: int) -> list[MicEntry]:
    return [MicEntry(seq=s, pcm=b"\0\0") for s in seqs]


def seqs(entries: list[MicEntry]) -> list[int]:
    return [e.seq for e in entries]


def test_nothing_is_sent_twice_while_redis_answers():
    hold = MicHold()
    hold.stored(chunks(1, 2), now=0.0)
    assert seqs(hold.to_send(chunks(3))) == [3]


def test_after_a_failed_write_the_recent_chunks_go_again_ahead_of_the_new_ones():
    hold = MicHold(hold_s=3.0)
    hold.stored(chunks(1, 2), now=0.0)
    hold.stored(chunks(3), now=2.0)
    assert not hold.failed(now=2.1)
    batch = chunks(4, 5)
    assert seqs(hold.to_send(batch)) == [1, 2, 3, 4, 5]
    hold.stored(batch, now=4.5)  # appended: the failover is behind us
    assert seqs(hold.to_send(chunks(6))) == [6]
    assert seqs(hold.to_send([])) == []


def test_a_failed_relay_read_also_makes_the_recent_chunks_go_again():
    hold = MicHold(hold_s=3.0)
    hold.stored(chunks(1, 2, 3), now=10.0)
    hold.read_failed()
    assert seqs(hold.to_send([])) == [1, 2, 3]


def test_only_the_last_hold_s_of_chunks_is_kept():
    hold = MicHold(hold_s=3.0)
    hold.stored(chunks(1), now=0.0)
    hold.stored(chunks(2), now=2.0)
    hold.stored(chunks(3), now=4.0)
    hold.read_failed()
    assert seqs(hold.to_send([])) == [2, 3]


def test_a_chunk_in_the_batch_and_the_hold_goes_once():
    hold = MicHold()
    hold.stored(chunks(1, 2), now=0.0)
    hold.read_failed()
    assert seqs(hold.to_send(chunks(2, 3))) == [1, 2, 3]


def test_an_end_of_utterance_is_not_taken_for_the_audio_chunk_of_its_seq():
    hold = MicHold()
    hold.stored(chunks(7), now=0.0)
    hold.read_failed()
    eou = MicEntry(seq=7, end_of_utterance=True)
    sent = hold.to_send([eou])
    assert [(e.seq, e.end_of_utterance) for e in sent] == [(7, False), (7, True)]


def test_writes_failing_for_give_up_s_drop_their_batch_and_the_hold():
    hold = MicHold(give_up_s=10.0)
    hold.stored(chunks(1), now=0.0)
    assert not hold.failed(now=0.0)
    assert not hold.failed(now=9.9)
    assert hold.failed(now=10.0)
    # the client resends after a resume: the writer stops, nothing is re-appended
    assert not hold.suspect and seqs(hold.to_send([])) == []
    assert not hold.failed(now=10.5)  # the next batch gets its own 10 s
