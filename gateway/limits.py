"""Connection and session limits: credentials, caps and the token buckets that rate-limit.

Pure data and arithmetic (time is passed in), shared by the connection core and the session
machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas import protocol as P


@dataclass
class TokenBucket:
    rate: float
    burst: float
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, now: float, cost: float = 1.0) -> bool:
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


@dataclass(frozen=True)
class Token:
    """A client credential from configuration: ``hello`` names it and presents its secret."""

    name: str
    secret: str
    max_sessions: int = 0  # sessions attached at once, fleet-wide, with this token; 0: no cap
    npcs: frozenset[str] | None = None  # persona ids it may open; None: all

    @classmethod
    def parse(cls, text: str) -> Token:
        """``NAME:SECRET[:MAX_SESSIONS[:NPC|NPC...]]`` (``*`` or nothing: every NPC)."""
        parts = text.strip().split(":")
        if len(parts) < 2 or len(parts) > 4 or not P._valid_id(parts[0]) or not parts[1]:
            raise ValueError("gateway.tokens: each entry is NAME:SECRET[:MAX_SESSIONS[:NPC|NPC]] "
                             f"with NAME of [A-Za-z0-9_.-]; got one with {len(parts)} part(s)")
        cap = int(parts[2]) if len(parts) > 2 and parts[2] else 0
        npcs = parts[3] if len(parts) > 3 else "*"
        allowed = None if npcs in ("", "*") else frozenset(n for n in npcs.split("|") if n)
        return cls(parts[0], parts[1], cap, allowed)

    def allows(self, npc: str) -> bool:
        return self.npcs is None or npc in self.npcs


def parse_tokens(entries: list[str], legacy: str = "") -> dict[str, Token]:
    tokens = {t.name: t for t in (Token.parse(e) for e in entries)}
    if legacy:  # gateway.auth_token: one unnamed token, known as "default"
        tokens.setdefault("default", Token("default", legacy))
    return tokens


@dataclass
class Limits:
    max_frame_bytes: int = 64 * 1024
    max_sessions: int = 64
    msgs_per_s: float = 200.0
    msgs_burst: float = 400.0
    conn_msgs_per_s: float = 100.0
    conn_msgs_burst: float = 200.0
    auth_token: str = ""
    tokens: dict[str, Token] = field(default_factory=dict)
    # Audio is limited by its own clock, not by message count: a client may push a whole
    # utterance unpaced (up to audio_burst_s of it at once), but not more than
    # audio_realtime_factor x real time for longer.
    audio_realtime_factor: float = 20.0
    audio_burst_s: float = 30.0

    def __post_init__(self) -> None:
        if self.auth_token and "default" not in self.tokens:
            self.tokens = parse_tokens([], self.auth_token) | self.tokens

