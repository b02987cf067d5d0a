"""The gateway session machine (gateway/session.py), driven by typed inputs only: no sockets,
no Redis, time passed in. Each test asserts the typed effects the server would carry out."""

from __future__ import annotations

import numpy as np

from gateway import access
from gateway import core as C
from gateway import session as S
from schemas import protocol as P
from schemas.protocol import ErrorCode
from schemas.streams import EventEntry, FaceEntry, SessionMeta, VoiceEntry

PERSONAS = {"guard": "en-gb-scotland"}
OWNER = "gw1.1"


def kinds(effects):
    return [type(e).__name__ for e in effects]


def sent(effects):
    return [e.message for e in effects if isinstance(e, S.Send | S.SendDone)]


def errors(effects):
    return [m.code for m in sent(effects) if isinstance(m, P.ErrorEvent)]


def open_session(core=None, now=0.0):
    core = core or C.ConnectionCore(C.Limits(), PERSONAS, owner=OWNER)
    out = core.receive_text(P.encode(P.OpenSession(session="npc-1", npc="guard")), now, 1000.0)
    session = core.sessions["npc-1"]
    return core, session, out


def live_session(now=0.0):
    core, session, _ = open_session(now=now)
    for answer in (S.LoadVerdict(True), S.Attached(None), S.Created()):
        core.feed(session, answer, now)
    return core, session


def entry(core, session, stream, eid, fields, now):
    return core.feed(session, S.StreamEntry(stream, eid, fields), now)


def voice(turn_seq, segment, sample, n=11025, end=False):
    return VoiceEntry(segment=segment, sample=sample, rate=22050, end=end,
                      pcm=b"" if end else b"\x00\x00" * n,
                      last_in_segment=not end).to_fields()


def face(segment, samples, index=0, end=False):
    s = np.array(samples, np.int64)
    return FaceEntry(segment=segment, samples=s, values=np.zeros((len(s), 61), np.float32),
                     first_index=index, end=end).to_fields()


def reply(core, session, turn=1, now=0.0):
    """Half a second of audio in one segment, its face, and both end markers."""
    out = entry(core, session, "voice", f"{turn}-1", voice(1, 0, 0), now)
    out += entry(core, session, "face", f"{turn}-1", face(0, [0, 368]), now)
    out += entry(core, session, "voice", f"{turn}-2", voice(2, 1, 11025, end=True), now)
    out += entry(core, session, "face", f"{turn}-2", face(0, [], index=2, end=True), now)
    return out


# --------------------------------------------------------------------------- open


def test_open_asks_load_then_caps_then_stores_then_opens_and_starts_the_relay():
    core, session, out = open_session()
    assert out == [S.CheckLoad("npc-1")] and session.phase is S.Phase.OPENING
    assert core.feed(session, S.LoadVerdict(True), 0.0) == [S.Attach("npc-1", session.sid)]
    [create] = core.feed(session, S.Attached(None), 0.0)
    assert isinstance(create, S.CreateSession) and create.owner == OWNER
    assert create.meta.npc == "guard" and create.meta.sid == session.sid
    out = core.feed(session, S.Created(), 0.0)
    assert kinds(out) == ["Control", "Log", "Send", "StartRelay", "LiveLinkStart"]
    control, opened = out[0].entry, out[2].message
    assert control.kind == "open" and control.ts == 1000.0
    assert isinstance(opened, P.SessionOpened) and opened.channel == session.channel == 1
    # the client gets the secret, storage only its hash
    assert access.secret_matches(opened.resume_secret, create.secret_hash)
    assert out[3].cursors == {s: "0-0" for s in C.Relay.STREAMS}
    assert session.phase is S.Phase.OPEN and core.live_sessions() == [session]


def test_an_overloaded_fleet_or_a_full_cap_refuses_the_open_and_the_session_leaves():
    core, session, _ = open_session()
    out = core.feed(session, S.LoadVerdict(False, "stt lags", 2000), 0.0)
    assert errors(out) == [ErrorCode.OVERLOADED] and "retry in 2000 ms" in sent(out)[0].message
    assert session.phase is S.Phase.REFUSED and "npc-1" not in core.sessions
    core, session, _ = open_session()
    core.feed(session, S.LoadVerdict(True), 0.0)
    out = core.feed(session, S.Attached("64 sessions for this token"), 0.0)
    assert errors(out) == [ErrorCode.TOO_MANY_SESSIONS] and not core.sessions


def test_storage_failing_while_opening_refuses_and_releases_the_attachment():
    core, session, _ = open_session()
    core.feed(session, S.LoadVerdict(True), 0.0)
    core.feed(session, S.Attached(None), 0.0)
    assert core.feed(session, S.StorageFailed(), 0.0) == [S.Release(session.sid)]
    assert not core.sessions and not core.by_channel


def test_audio_and_end_of_utterance_become_appends():
    core, session = live_session()
    pcm = b"\x00\x00" * 320
    out = core.receive_binary(P.MicAudio(session.channel, 1, pcm).encode(), 0.1)
    assert out == [S.AppendMic("npc-1", session.sid, 1, pcm)]
    out = core.receive_text(P.encode(P.EndOfUtterance(session="npc-1")), 0.2)
    assert out == [S.AppendEndOfUtterance("npc-1", session.sid, 1)]


# --------------------------------------------------------------------------- resume


def stored_meta(secret_hash, state="detached", owner="gw0.7"):
    meta = SessionMeta(sid="npc-1.abc", session="npc-1", npc="guard", persona="guard",
                       voice="en-gb-scotland", sample_rate=16000, channels=1, format="s16le",
                       state=state)
    raw = {k.encode(): v.encode() for k, v in meta.to_fields().items()}
    return raw | {b"secret_hash": secret_hash.encode(), b"owner": owner.encode()}


def resume(core, secret, turn=2, last=None):
    msg = P.Resume(session="npc-1", sid="npc-1.abc", resume_secret=secret, turn=turn,
                   last=last or {"audio": 3}, mic_seq=7)
    return core.receive_text(P.encode(msg), 0.0, 2000.0)


def test_resuming_own_detached_session_takes_it_over_and_replays_from_the_cursors():
    # the session was detached when its gateway died; its owner is that gateway's connection
    secret, secret_hash = access.new_secret()
    core = C.ConnectionCore(C.Limits(), PERSONAS, owner=OWNER)
    assert resume(core, secret) == [S.LoadMeta("npc-1", "npc-1.abc")]
    session = core.sessions["npc-1"]
    assert session.phase is S.Phase.RESUMING and not core.by_channel  # no channel yet
    out = core.feed(session, S.MetaLoaded(stored_meta(secret_hash)), 0.0)
    assert out == [S.LoadResume("npc-1", "npc-1.abc", 2)]
    out = core.feed(session, S.ResumeLoaded(8, {(2, 0)}, {(2, 0)}, 3000.0), 0.0)
    assert out == [S.Attach("npc-1", "npc-1.abc")]
    assert core.feed(session, S.Attached(None), 0.0) == [
        S.TakeOver("npc-1", "npc-1.abc", OWNER)]
    out = core.feed(session, S.TookOver((1700, 4)), 0.0)
    assert kinds(out) == ["Control", "Log", "Send", "StartRelay", "LiveLinkStart"]
    opened = out[2].message
    assert opened.resumed and opened.next_mic_seq == 8 and opened.resume_secret is None
    assert "secret" not in str(out[0].entry.data)  # the control stream never holds it
    assert out[3].cursors == {"events": "0-0", "transcript": "2-0", "reply": "2-0",
                              "voice": "2-3", "face": "2-0"}
    assert session.live and core.by_channel[opened.channel] is session
    # the old owner's entry (before our mark) and our own do not take it from us
    old = EventEntry(kind="owner", turn=0, code="gw0.7").to_fields()
    assert entry(core, session, "events", "1700-2", _b(old), 0.0) == []
    mine = EventEntry(kind="owner", turn=0, code=OWNER).to_fields()
    assert entry(core, session, "events", "1700-4", _b(mine), 0.0) == []
    assert session.live


def _b(fields):
    return {k.encode(): v.encode() for k, v in fields.items()}


def test_someone_elses_session_is_refused_with_the_same_answer_as_an_unknown_one():
    _, secret_hash = access.new_secret()
    for raw in (stored_meta(secret_hash), {}):
        core = C.ConnectionCore(C.Limits(), PERSONAS, owner=OWNER)
        resume(core, "not-the-secret")
        session = core.sessions["npc-1"]
        out = core.feed(session, S.MetaLoaded(raw), 0.0)
        assert errors(out) == [ErrorCode.SESSION_NOT_OPEN]
        assert sent(out)[0].message == "resume: no stored session with this sid and resume_secret"
        assert not core.sessions and session.phase is S.Phase.REFUSED


def test_a_closed_session_or_a_forbidden_npc_is_not_resumed():
    secret, secret_hash = access.new_secret()
    core = C.ConnectionCore(C.Limits(), PERSONAS, owner=OWNER)
    resume(core, secret)
    out = core.feed(core.sessions["npc-1"], S.MetaLoaded(stored_meta(secret_hash, "closed")), 0)
    assert errors(out) == [ErrorCode.SESSION_NOT_OPEN] and "was closed" in sent(out)[0].message
    limits = C.Limits(tokens=C.parse_tokens(["game:s:0:wizard"]))
    core = C.ConnectionCore(limits, {"guard": "v", "wizard": "w"}, owner=OWNER)
    core.receive_text(P.encode(P.Hello(token_name="game", token="s")), 0.0)
    resume(core, secret)
    out = core.feed(core.sessions["npc-1"], S.MetaLoaded(stored_meta(secret_hash)), 0.0)
    assert errors(out) == [ErrorCode.NPC_NOT_ALLOWED]


def test_a_later_owner_entry_of_another_connection_takes_the_session_over():
    core, session = live_session()
    session.owner_mark = (1700, 1)
    theirs = _b(EventEntry(kind="owner", turn=0, code="gw2.9").to_fields())
    out = entry(core, session, "events", "1800-0", theirs, 0.0)
    assert kinds(out) == ["StopRelay", "LiveLinkStopSession", "Release", "Log", "Send"]
    assert sent(out) == [P.TakenOver(session="npc-1")]
    assert session.phase is S.Phase.TAKEN_OVER and not core.sessions
    # what the relay still had in flight is not for this connection any more
    assert entry(core, session, "voice", "1-1", voice(1, 0, 0), 0.0) == []


# --------------------------------------------------------------------------- replying


def test_face_frames_wait_for_ready_then_go_out_with_the_turn_done():
    core, session = live_session()
    out = reply(core, session)
    assert [type(m) for m in sent(out)] == [bytes]  # the audio only; the face is held
    assert S.Timing(session.sid, 1, "gw_first_audio") in out
    assert [e.stream for e in out if isinstance(e, S.LiveLinkFeed)] == ["voice", "face",
                                                                           "voice", "face"]
    assert session.phase is S.Phase.REPLYING  # audio went out: UE is about to play it
    out = core.receive_text(P.encode(P.Ready(session="npc-1", turn=1, segment=0)), 1.0, 5e3)
    frames, done = sent(out)
    assert P.decode_binary(frames).samples.tolist() == [0, 368]
    assert isinstance(done, P.TurnDone) and done.face_frames == 2 and not done.interrupted
    assert any(isinstance(e, S.SendDone) for e in out)  # sent with its stored latency marks
    assert S.MarkPlaying(session.sid, 1, 0, True, 5e3) in out
    assert S.LiveLinkReady("npc-1", session.sid, 1) in out
    # a resent ready is stored, not news; one for audio never sent is an error
    out = core.receive_text(P.encode(P.Ready(session="npc-1", turn=1, segment=0)), 1.1, 6e3)
    assert S.MarkPlaying(session.sid, 1, 0, False, 6e3) in out
    out = core.receive_text(P.encode(P.Ready(session="npc-1", turn=1, segment=4)), 1.2)
    assert errors(out) == [ErrorCode.UNKNOWN_SEGMENT]


def test_the_timer_ends_replying_when_the_reply_has_played():
    core, session = live_session()
    reply(core, session, now=0.0)
    out = core.receive_text(P.encode(P.Ready(session="npc-1", turn=1, segment=0)), 1.0)
    [wake] = [e for e in out if isinstance(e, S.WakeAt)]
    assert wake.at == 1.0 + 0.5 + C.PLAYBACK_SLACK_S  # half a second of audio from ready
    # too early (a timer may fire before its time): still replying, wake again then
    assert core.feed(session, S.Timer(), 1.2) == [wake] and session.phase is S.Phase.REPLYING
    out = core.feed(session, S.Timer(), wake.at + 0.01)
    assert kinds(out) == ["Log"] and out[0].event == "reply_played"
    assert session.phase is S.Phase.OPEN


def test_speech_over_a_playing_reply_interrupts_it_and_ue_is_told_to_stop():
    core, session = live_session()
    reply(core, session)
    core.receive_text(P.encode(P.Ready(session="npc-1", turn=1, segment=0)), 1.0)
    start = _b(EventEntry(kind="speech_start", turn=2, ts=9e12).to_fields())
    out = entry(core, session, "events", "1900-0", start, 1.1)
    assert kinds(out)[:5] == ["LiveLinkStopTurn", "CancelTurn", "Log", "Send", "Send"]
    assert out[1] == S.CancelTurn(session.sid, 1, "barge_in")
    stop, done = sent(out)
    assert isinstance(stop, P.StopPlayback) and done.interrupted
    assert session.phase is S.Phase.OPEN
    # UE's interrupt answering our stop keeps the heard text and cancels nothing more
    out = core.receive_text(P.encode(P.Interrupt(session="npc-1", played_samples=4000)), 1.2)
    assert kinds(out) == ["Control", "Log", "KeepHeard"]
    assert out[0].entry.code == "answer" and out[2] == S.KeepHeard(session.sid, 1, 4000)


def test_ues_own_interrupt_cuts_what_plays_and_too_late_is_answered():
    core, session = live_session()
    reply(core, session)
    core.receive_text(P.encode(P.Ready(session="npc-1", turn=1, segment=0)), 1.0)
    out = core.receive_text(P.encode(P.Interrupt(session="npc-1")), 1.2)
    assert S.CancelTurn(session.sid, 1, "client") in out
    assert [type(m) for m in sent(out)] == [P.TurnDone]  # UE stopped itself: no stop_playback
    out = core.receive_text(P.encode(P.Interrupt(session="npc-1")), 5.0)
    assert errors(out) == [ErrorCode.NOT_PLAYING] and out[0].entry.code == "too_late"


# --------------------------------------------------------------------------- ending


def test_close_flushes_the_mic_stops_everything_and_the_session_leaves():
    core, session = live_session()
    out = core.receive_text(P.encode(P.CloseSession(session="npc-1")), 1.0, 7e3)
    assert kinds(out) == ["Control", "FlushMic", "StopRelay", "LiveLinkStopSession",
                          "MarkLeft", "Release", "Send", "Log"]
    assert out[4] == S.MarkLeft(session.sid, "closed")
    assert sent(out) == [P.SessionClosed(session="npc-1")]
    assert session.phase is S.Phase.CLOSED and not core.sessions and not core.by_channel
    out = core.receive_text(P.encode(P.EndOfUtterance(session="npc-1")), 1.1)
    assert errors(out) == [ErrorCode.SESSION_NOT_OPEN]


def test_a_lost_connection_detaches_its_live_sessions_for_a_later_resume():
    core, session = live_session()
    _, pending, _ = open_session(C.ConnectionCore(C.Limits(), PERSONAS))
    out = core.detach_all(2.0, 8e3)
    assert kinds(out) == ["Control", "MarkLeft", "Release"]
    assert out[0].entry.kind == "detach" and out[1] == S.MarkLeft(session.sid, "detached")
    assert session.phase is S.Phase.DETACHED and not core.sessions
    assert pending.handle(S.Detach(), 2.0) == [S.Release(pending.sid)]


def test_an_answer_that_comes_after_the_session_moved_on_decides_nothing():
    core, session = live_session()
    assert session.handle(S.Created(), 1.0) == []
    assert session.handle(S.TookOver((9, 9)), 1.0) == [] and session.owner_mark == (0, 0)
    assert session.handle(S.StorageFailed(), 1.0) == [] and session.live
    secret, _ = access.new_secret()
    core = C.ConnectionCore(C.Limits(), PERSONAS, owner=OWNER)
    resume(core, secret)
    pending = core.sessions["npc-1"]
    assert core.feed(pending, S.StorageFailed(), 0.0) == [S.Release("npc-1.abc")]
    assert not core.sessions and core.feed(pending, S.MetaLoaded({}), 0.0) == []
