import numpy as np

from gateway import core as C
from gateway import session as S
from schemas import protocol as P
from schemas.protocol import ErrorCode
from schemas.streams import FaceEntry, ReplyEntry, TranscriptEntry, VoiceEntry

PERSONAS = {"guard": "en-gb-scotland", "merchant": "en-us"}


def errors(actions):
    return [a.message.code for a in actions
            if isinstance(a, C.Send) and isinstance(a.message, P.ErrorEvent)]


def opened(core, session="npc-1", now=0.0, **kw):
    """Opens a session and answers its storage requests as the gateway would: it is live."""
    args = dict(session=session, npc="guard", sample_rate=16000, channels=1, format="s16le")
    args.update(kw)
    acts = core.receive_text(P.encode(P.OpenSession(**args)), now)
    assert acts == [S.CheckLoad(session)], acts
    sess = core.sessions[session]
    for answer in (S.LoadVerdict(True), S.Attached(None), S.Created()):
        core.feed(sess, answer, now)
    assert sess.live
    return sess


def test_open_then_audio_is_appended_in_order():
    core = C.ConnectionCore(C.Limits(), PERSONAS)
    op = opened(core)
    assert op.meta.persona == "guard" and op.meta.voice == "en-gb-scotland" and op.channel == 1
    pcm = np.zeros(320, np.int16).tobytes()
    acts = core.receive_binary(P.MicAudio(op.channel, 1, pcm).encode(), 0.1)
    assert acts == [C.AppendMic("npc-1", op.sid, 1, pcm)]
    # a resend after a reconnect is dropped silently; a gap is reported but audio goes on
    assert core.receive_binary(P.MicAudio(op.channel, 1, pcm).encode(), 0.2) == []
    acts = core.receive_binary(P.MicAudio(op.channel, 4, pcm).encode(), 0.3)
    assert errors(acts) == [ErrorCode.BAD_AUDIO] and isinstance(acts[1], C.AppendMic)
    eou = core.receive_text(P.encode(P.EndOfUtterance(session="npc-1")), 0.4)
    assert eou == [C.AppendEndOfUtterance("npc-1", op.sid, 4)]


def test_every_bad_input_gets_its_error_and_state_survives():
    core = C.ConnectionCore(C.Limits(max_frame_bytes=1000), PERSONAS)
    pcm = b"\x00\x00" * 100
    assert errors(core.receive_binary(P.MicAudio(1, 1, pcm).encode(), 0)) == [
        ErrorCode.SESSION_NOT_OPEN]
    assert errors(core.receive_text("{oops", 0)) == [ErrorCode.BAD_JSON]
    assert errors(core.receive_text('{"type":"sing"}', 0)) == [ErrorCode.UNKNOWN_TYPE]
    assert errors(core.receive_binary(b"\x01" * 5000, 0)) == [ErrorCode.FRAME_TOO_LARGE]
    bad_open = dict(session="x", npc="guard", sample_rate=16000, channels=1)
    assert errors(core.receive_text(P.encode(P.OpenSession(**{**bad_open, "format": "u8"})),
                                    0)) == [ErrorCode.UNSUPPORTED_FORMAT]
    assert errors(core.receive_text(P.encode(P.OpenSession(**{**bad_open, "sample_rate": 0})),
                                    0)) == [ErrorCode.BAD_SAMPLE_RATE]
    assert errors(core.receive_text(P.encode(P.OpenSession(**{**bad_open, "npc": "dragon"})),
                                    0)) == [ErrorCode.UNKNOWN_NPC]
    op = opened(core)
    assert errors(core.receive_text(P.encode(P.Ready(session="npc-1", turn=1, segment=5)),
                                    0)) == [ErrorCode.UNKNOWN_SEGMENT]
    assert errors(core.receive_text(P.encode(P.EndOfUtterance(session="ghost")), 0)) == [
        ErrorCode.SESSION_NOT_OPEN]
    assert errors(core.receive_binary(P.MicAudio(op.channel, 1, b"\x00" * 3).encode(), 0)) == [
        ErrorCode.BAD_AUDIO]
    assert errors(core.receive_text(P.encode(P.OpenSession(**{**bad_open, "session": "npc-1"})),
                                    0)) == [ErrorCode.SESSION_EXISTS]
    # after all that the session still takes audio
    assert isinstance(core.receive_binary(P.MicAudio(op.channel, 1, pcm).encode(), 0)[0],
                      C.AppendMic)


def test_auth_token_is_required_when_configured():
    core = C.ConnectionCore(C.Limits(auth_token="s3cret"), PERSONAS)
    open_msg = P.encode(P.OpenSession(session="a", npc="guard"))
    assert errors(core.receive_text(open_msg, 0)) == [ErrorCode.NOT_AUTHENTICATED]
    assert errors(core.receive_text(P.encode(P.Hello(token="nope")), 0)) == [
        ErrorCode.AUTH_FAILED]
    acts = core.receive_text(P.encode(P.Hello(token="s3cret")), 0)
    assert isinstance(acts[0].message, P.Welcome)
    assert isinstance(core.receive_text(open_msg, 0)[0], S.CheckLoad)


def test_flood_is_limited_per_session_with_one_error_per_second():
    core = C.ConnectionCore(C.Limits(msgs_per_s=50, msgs_burst=100, conn_msgs_per_s=50,
                                     conn_msgs_burst=100), PERSONAS)
    op = opened(core)
    other = opened(core, session="npc-2")
    out = []
    for i in range(1000):
        out += core.receive_text(P.encode(P.Ping(id=i)), 0.0)
    limited = [a for a in out if isinstance(a.message, P.ErrorEvent)]
    assert [e.message.code for e in limited] == [ErrorCode.RATE_LIMITED]
    # the ping flood uses the connection's bucket; sessions keep their own
    pcm = b"\x00\x00" * 320
    assert isinstance(core.receive_binary(P.MicAudio(op.channel, 1, pcm).encode(), 0.0)[0],
                      C.AppendMic)
    assert isinstance(core.receive_binary(P.MicAudio(other.channel, 1, pcm).encode(), 0.0)[0],
                      C.AppendMic)
    # and the bucket refills with time
    assert isinstance(core.receive_text(P.encode(P.Ping(id=1)), 5.0)[0].message, P.Pong)


def voice(segment, sample, n=100, last=False):
    return VoiceEntry(segment=segment, sample=sample, rate=22050, pcm=b"\x00\x00" * n,
                      last_in_segment=last).to_fields()


def face(segment, samples, index=0):
    s = np.array(samples, np.int64)
    return FaceEntry(segment=segment, samples=s, values=np.zeros((len(s), 61), np.float32),
                     first_index=index).to_fields()


def test_relay_holds_face_frames_until_ready_then_reports_turn_done():
    core = C.ConnectionCore(C.Limits(), PERSONAS)
    relay = opened(core).relay
    out = relay.feed("transcript", "1-1", TranscriptEntry(text="hi", final=True).to_fields())
    assert out[0].text == "hi" and out[0].final and out[0].seq == 1
    assert relay.feed("reply", "1-1", ReplyEntry(segment=0, text="Halt.").to_fields())[0].text \
        == "Halt."
    audio = relay.feed("voice", "1-1", voice(0, 0, last=True))
    assert isinstance(audio[0], bytes) and P.decode_binary(audio[0]).segment == 0
    assert relay.feed("face", "1-1", face(0, [0, 368])) == []  # held: no ready yet
    assert relay.feed("voice", "1-2", VoiceEntry(segment=1, sample=100, rate=22050,
                                                 end=True).to_fields()) == []
    assert relay.feed("face", "1-2", FaceEntry(segment=0, samples=np.zeros(0, np.int64),
                                               values=np.zeros((0, 61), np.float32),
                                               first_index=2, end=True).to_fields()) == []
    # the client's ready releases the frames at once, and then the turn is done
    out = relay.ready(1, 0)
    frames = P.decode_binary(out[0])
    assert frames.samples.tolist() == [0, 368]
    assert isinstance(out[1], P.TurnDone) and out[1].face_frames == 2
    # frames of a segment already ready go straight through
    relay.feed("voice", "2-1", voice(0, 0))
    relay.ready(2, 0)
    assert len(relay.feed("face", "2-1", face(0, [0]))) == 1


def test_relay_turns_dead_letter_events_into_errors():
    core = C.ConnectionCore(C.Limits(), PERSONAS)
    relay = opened(core).relay
    from schemas.streams import EventEntry

    out = relay.feed("events", "1700-0", EventEntry(kind="error", turn=3, code="turn_failed",
                                                    message="tts failed").to_fields())
    assert out[0].code == "turn_failed" and out[0].turn == 3 and out[0].session == "npc-1"


def test_malformed_binary_frames_of_any_kind_are_errors_not_crashes():
    core = C.ConnectionCore(C.Limits(), PERSONAS)
    opened(core)
    for raw in (b"\x02\x00\x01\x00", b"\x03\x00\x01\x00" + b"\xff" * 30, b"\x01\x00",
                b"\x09\x00\x01\x00"):
        acts = core.receive_binary(raw, 0.0)
        assert errors(acts) in ([ErrorCode.BAD_MESSAGE], [ErrorCode.BAD_AUDIO]), raw
    import pytest

    from schemas.protocol import ProtocolError
    with pytest.raises(ProtocolError):
        P.decode_binary(bytes([3, 0, 1, 0]) + bytes(16) + bytes([200, 0, 61, 0]))


def test_bad_frames_without_a_session_are_answered_at_most_at_the_connection_rate():
    core = C.ConnectionCore(C.Limits(conn_msgs_per_s=10, conn_msgs_burst=10), PERSONAS)
    out = []
    for _ in range(500):
        out += core.receive_binary(b"\x01\x00\x07\x00\x01\x00\x00\x00", 0.0)
    codes = errors(out)
    assert codes.count(ErrorCode.SESSION_NOT_OPEN) == 10
    assert codes.count(ErrorCode.RATE_LIMITED) == 1


def test_a_whole_utterance_pushed_unpaced_is_accepted_but_not_a_runaway_stream():
    core = C.ConnectionCore(C.Limits(msgs_per_s=50, msgs_burst=100), PERSONAS)
    op = opened(core, sample_rate=44100, channels=2)
    chunk = b"\x00" * (882 * 4)  # 20 ms of 44.1 kHz stereo s16le
    seq = 0
    # 12 s of audio in one go: far past the message burst, within the audio burst
    for seq in range(1, 601):
        acts = core.receive_binary(P.MicAudio(op.channel, seq, chunk).encode(), 0.0)
        assert isinstance(acts[-1], C.AppendMic), (seq, acts)
    # a runaway client streaming far faster than real time is stopped
    refused = 0
    for seq in range(601, 3001):
        acts = core.receive_binary(P.MicAudio(op.channel, seq, chunk).encode(), 0.1)
        refused += not any(isinstance(a, C.AppendMic) for a in acts)
    assert refused > 0


def test_heard_text_cuts_the_reply_at_the_last_word_that_started_playing():
    from gateway.core import heard_text
    from schemas.streams import Mark

    texts = {0: "Hmm?", 1: "I am Elowen, keeper of stars."}
    voice = [
        VoiceEntry(segment=0, sample=0, rate=22050, marks=[Mark("word", 100, "0:4")]),
        # espeak may report "I am" as one word event: offsets keep the text intact
        VoiceEntry(segment=1, sample=5000, rate=22050,
                   marks=[Mark("word", 5100, "0:4"), Mark("word", 9000, "5:12"),
                          Mark("word", 15000, "13:19")]),
    ]
    assert heard_text(texts, voice, 50) == ""
    assert heard_text(texts, voice, 6000) == "Hmm? I am"
    assert heard_text(texts, voice, 10_000) == "Hmm? I am Elowen,"
    assert heard_text(texts, voice, 10**9) == "Hmm? I am Elowen, keeper"
