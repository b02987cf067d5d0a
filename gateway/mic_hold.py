"""What the gateway keeps of a session's mic audio so that a Redis failover loses none of it
(Sans-I/O: the caller does the writes and passes the clock).

Replication to a replica is asynchronous: mic chunks the old primary acknowledged a moment
before it died may be missing on the replica that replaces it. A write that fails, or a relay
read that fails on the session's slot, makes the hold *suspect* a failover; the next write then
sends the recent chunks again ahead of the new ones. Chunk IDs are explicit (``<seq>-0``), so
Redis refuses the ones it still has and takes back exactly the ones it lost, in order (a lost
chunk is always above the top of what survived: replication keeps the primary's order).

While Redis does not answer, chunks wait here (not dropped) for up to ``give_up_s``: a
failover takes seconds, and the player keeps talking through it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from schemas.streams import MicEntry


@dataclass
class MicHold:
    hold_s: float = 3.0  # recent chunks kept for a re-append (far above a replica's lag)
    give_up_s: float = 10.0  # a write failing this long drops its chunks and tells the client
    recent: deque[tuple[float, MicEntry]] = field(default_factory=deque)
    suspect: bool = False
    failing_since: float | None = None

    def to_send(self, batch: list[MicEntry]) -> list[MicEntry]:
        """What to append for ``batch``: the recent chunks again first if a failover is
        suspected."""
        if not self.suspect:
            return batch
        new = {(e.seq, e.end_of_utterance) for e in batch}
        again = [e for _, e in self.recent if (e.seq, e.end_of_utterance) not in new]
        return again + batch

    def stored(self, batch: list[MicEntry], now: float) -> None:
        """``to_send(batch)`` was appended: nothing is suspect any more."""
        self.suspect = False
        self.failing_since = None
        for e in batch:
            self.recent.append((now, e))
        while self.recent and now - self.recent[0][0] > self.hold_s:
            self.recent.popleft()

    def failed(self, now: float) -> bool:
        """The append failed; True when it has failed for ``give_up_s`` (drop the batch)."""
        self.suspect = True
        if self.failing_since is None:
            self.failing_since = now
        if now - self.failing_since >= self.give_up_s:
            # the client is told to resend after a resume: nothing is re-appended from here,
            # and the writer ends instead of waiting out a long outage
            self.failing_since = None
            self.suspect = False
            self.recent.clear()
            return True
        return False

    def read_failed(self) -> None:
        """A read on the session's slot failed: its primary may have been replaced."""
        self.suspect = True
