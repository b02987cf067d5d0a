"""The gateway's connection logic, Sans-I/O: messages in, effects out, no sockets, no Redis.

:class:`ConnectionCore` checks everything one WebSocket connection sends that is the
connection's business (frame size, message rate, hello and its token, which channel belongs to
which session) and hands session messages to that session's machine
(:class:`gateway.session.Session`), which decides what they mean. It returns the effects for
the I/O layer (``gateway/server.py``) to carry out; the I/O layer feeds the results back
through :meth:`ConnectionCore.feed`. Time is passed in, so tests drive it without a clock or a
network.
"""

from __future__ import annotations

import hmac
import secrets

from gateway.limits import Limits, Token, TokenBucket, parse_tokens
from gateway.relay import PLAYBACK_SLACK_S, InterruptTurn, Playback, Relay, heard_text
from gateway.session import (
    AppendEndOfUtterance,
    AppendMic,
    ClientAudio,
    ClientMessage,
    Detach,
    Effect,
    Input,
    Send,
    Session,
)
from schemas import protocol as P
from schemas.protocol import ErrorCode, ProtocolError

__all__ = [
    "PLAYBACK_SLACK_S",
    "AppendEndOfUtterance",
    "AppendMic",
    "ConnectionCore",
    "Effect",
    "InterruptTurn",
    "Limits",
    "Playback",
    "Relay",
    "Send",
    "Session",
    "Token",
    "TokenBucket",
    "heard_text",
    "parse_tokens",
]

# messages that belong to one session's machine
SESSION_MESSAGES = (P.CloseSession, P.EndOfUtterance, P.Ready, P.Interrupt)


class ConnectionCore:
    """State of one client connection: its credential, its buckets and its sessions."""

    def __init__(self, limits: Limits, personas: dict[str, str], owner: str = ""):
        self.limits = limits
        self.personas = personas  # persona id -> voice
        self.owner = owner  # this connection's id, the owner its sessions record
        self.authenticated = not limits.tokens
        self.token: Token | None = None  # the token hello authenticated with
        self.sessions: dict[str, Session] = {}
        self.by_channel: dict[int, Session] = {}
        self._next_channel = 1
        self.bucket = TokenBucket(limits.conn_msgs_per_s, limits.conn_msgs_burst)
        self._limited_at = -1e9

    # -------------------------------------------------------------- inbound

    def receive_text(self, text: str, now: float, wall_ms: float = 0.0) -> list[Effect]:
        size = len(text) if text.isascii() else len(text.encode())
        if size > self.limits.max_frame_bytes:
            return self._refuse(now, ErrorCode.FRAME_TOO_LARGE,
                                f"text frame of {size} bytes exceeds the limit of "
                                f"{self.limits.max_frame_bytes}")
        try:
            msg = P.decode_text(text)
        except ProtocolError as exc:
            if not self.bucket.take(now):
                return self._limited(None, now)
            return [self._error(exc.code, exc.message, exc.session)]
        session = getattr(msg, "session", None)
        state = self.sessions.get(session) if session else None
        allowed = state.take_message(now) if state is not None else self.bucket.take(now)
        if not allowed:
            return self._limited(state, now)
        try:
            return self._handle(msg, state, now, wall_ms)
        except ProtocolError as exc:
            return [self._error(exc.code, exc.message, exc.session or session)]

    def receive_binary(self, data: bytes, now: float) -> list[Effect]:
        if len(data) > self.limits.max_frame_bytes:
            return self._refuse(now, ErrorCode.FRAME_TOO_LARGE,
                                f"binary frame of {len(data)} bytes exceeds the limit of "
                                f"{self.limits.max_frame_bytes}")
        if data[:1] != bytes([P.FrameKind.MIC_AUDIO]):
            return self._refuse(now, ErrorCode.BAD_MESSAGE,
                                "clients send only mic audio frames (kind 1)")
        try:
            frame = P.decode_binary(data)
        except ProtocolError as exc:
            return self._refuse(now, exc.code, exc.message)
        state = self.by_channel.get(frame.channel)
        if not self.authenticated:
            return self._refuse(now, ErrorCode.NOT_AUTHENTICATED, "send hello before audio")
        if state is None:
            return self._refuse(
                now, ErrorCode.SESSION_NOT_OPEN,
                f"audio for channel {frame.channel}, which no open session has; "
                "open a session and use the channel from its 'opened' reply")
        return self.feed(state, ClientAudio(frame), now)

    def feed(self, session: Session, inp: Input, now: float) -> list[Effect]:
        """``inp`` to ``session``'s machine; a session that ended leaves the connection, one
        that came live gets its channel."""
        if self.sessions.get(session.name) is not session:
            return []  # gone meanwhile (closed, refused, taken over)
        out = session.handle(inp, now)
        if session.ended:
            self._forget(session)
        elif session.live and self.by_channel.get(session.channel) is not session:
            self._bind(session)
        return out

    def detach_all(self, now: float, wall_ms: float = 0.0) -> list[Effect]:
        """The connection is gone: every session it had detaches (and may be resumed)."""
        out: list[Effect] = []
        for session in list(self.sessions.values()):
            out += self.feed(session, Detach(wall_ms), now)
        return out

    def live_sessions(self) -> list[Session]:
        return [s for s in list(self.sessions.values()) if s.live]

    def _refuse(self, now: float, code: str, message: str) -> list[Effect]:
        """An error for a frame that names no session: it costs the connection's bucket, so a
        stream of bad frames cannot make the server answer each one."""
        if not self.bucket.take(now):
            return self._limited(None, now)
        return [self._error(code, message)]


    def _limited(self, state: Session | None, now: float) -> list[Effect]:
        if state is not None:
            return state.limited(now)
        # One error per second at most: answering every dropped message would amplify a flood.
        if now - self._limited_at < 1.0:
            return []
        self._limited_at = now
        return [self._error(ErrorCode.RATE_LIMITED,
                            "too many messages; messages are being dropped")]

    def _handle(self, msg: P.Message, state: Session | None, now: float,
                wall_ms: float) -> list[Effect]:
        if isinstance(msg, P.Hello):
            return self._hello(msg)
        if isinstance(msg, P.Ping):
            return [Send(P.Pong(id=msg.id))]
        if not self.authenticated:
            raise ProtocolError(ErrorCode.NOT_AUTHENTICATED,
                                f"send hello with the auth token before {msg.TYPE!r}")
        if isinstance(msg, P.OpenSession):
            return self._open(msg, now, wall_ms)
        if isinstance(msg, P.Resume):
            return self._resume(msg, now)
        if state is None:
            raise ProtocolError(ErrorCode.SESSION_NOT_OPEN,
                                f"{msg.TYPE}: no open session {msg.session!r} on this connection",
                                session=msg.session)
        if isinstance(msg, SESSION_MESSAGES):
            return self.feed(state, ClientMessage(msg, wall_ms), now)
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"{msg.TYPE} is not accepted from clients")

    def _hello(self, msg: P.Hello) -> list[Effect]:
        if msg.protocol != P.PROTOCOL_VERSION:
            raise ProtocolError(ErrorCode.UNSUPPORTED_PROTOCOL,
                                f"protocol {msg.protocol} is not supported; this server speaks "
                                f"{P.PROTOCOL_VERSION} (see 'Changes for client authors' in the "
                                "protocol document)")
        if self.limits.tokens:
            token = self.limits.tokens.get(msg.token_name or "default")
            # compare even for an unknown name, so the answer's timing tells nothing
            want = token.secret if token is not None else secrets.token_hex(16)
            if not hmac.compare_digest((msg.token or "").encode(), want.encode()) or not token:
                raise ProtocolError(ErrorCode.AUTH_FAILED,
                                    "hello: unknown token_name or wrong token")
            self.token = token
        self.authenticated = True
        return [Send(P.Welcome(max_frame_bytes=self.limits.max_frame_bytes,
                               max_sessions=self.limits.max_sessions,
                               npcs=self.allowed_npcs(),
                               token_name=self.token.name if self.token else None))]

    def allowed_npcs(self) -> list[str]:
        return sorted(p for p in self.personas if self.token is None or self.token.allows(p))

    def check_allowed(self, npc: str, session: str) -> None:
        if self.token is not None and not self.token.allows(npc):
            raise ProtocolError(ErrorCode.NPC_NOT_ALLOWED,
                                f"token {self.token.name!r} may not open npc {npc!r}",
                                session=session)

    def _room(self, session: str) -> None:
        if len(self.sessions) >= self.limits.max_sessions:
            raise ProtocolError(ErrorCode.TOO_MANY_SESSIONS,
                                f"this connection already has {self.limits.max_sessions} sessions",
                                session=session)

    def _free_channel(self) -> int:
        channel = self._next_channel
        while channel in self.by_channel:
            channel = channel % 65535 + 1
        return channel

    def _bind(self, session: Session) -> None:
        self.by_channel[session.channel] = session
        self._next_channel = session.channel % 65535 + 1

    def _open(self, msg: P.OpenSession, now: float, wall_ms: float) -> list[Effect]:
        if msg.session in self.sessions:
            raise ProtocolError(ErrorCode.SESSION_EXISTS,
                                f"session {msg.session!r} is already open on this connection",
                                session=msg.session)
        P.validate_open(msg)
        persona = msg.persona or msg.npc
        if persona not in self.personas:
            raise ProtocolError(
                ErrorCode.UNKNOWN_NPC,
                f"no persona {persona!r}; this connection may open: "
                f"{', '.join(self.allowed_npcs())}", session=msg.session)
        self.check_allowed(msg.npc, msg.session)
        self.check_allowed(persona, msg.session)
        self._room(msg.session)
        # readable in logs, unique, and at most 64 characters; it is no credential (see resume)
        sid = f"{msg.session[:47]}.{secrets.token_hex(8)}"
        session, out = Session.opening(msg, sid, self._free_channel(), persona,
                                       self.personas[persona], self.limits, now, wall_ms,
                                       self.owner, self.token)
        self.sessions[msg.session] = session
        self._bind(session)  # its channel is taken from the request on, as audio may follow
        return out

    def _resume(self, msg: P.Resume, now: float) -> list[Effect]:
        if msg.session in self.sessions:
            raise ProtocolError(ErrorCode.SESSION_EXISTS,
                                f"session {msg.session!r} is already open on this connection",
                                session=msg.session)
        # its channel is bound once the resume succeeds (a refused one takes none)
        session, out = Session.resuming(msg, self._free_channel(), self.limits, now,
                                        self.owner, self.token)
        for other in self.sessions.values():
            if other.sid == msg.sid:  # twice on one link would double every output
                raise ProtocolError(ErrorCode.SESSION_EXISTS,
                                    f"resume: sid {msg.sid!r} is already attached on this "
                                    f"connection as session {other.name!r}",
                                    session=msg.session)
        self._room(msg.session)
        self.sessions[msg.session] = session
        return out

    def _forget(self, session: Session) -> None:
        if self.sessions.get(session.name) is session:
            del self.sessions[session.name]
        if self.by_channel.get(session.channel) is session:
            del self.by_channel[session.channel]

    @staticmethod
    def _error(code: str, message: str, session: str | None = None) -> Send:
        return Send(P.ErrorEvent(code=code, message=message, session=session))
