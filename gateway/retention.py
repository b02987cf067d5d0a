"""Retention by time: a live session's streams keep the last ``redis.retention_s`` of it.

Session streams cannot be trimmed with a plain ``XTRIM MINID <ms>``: the mic stream's IDs are
``<chunk seq>-<0|1>`` and the output streams' ``<turn>-<seq>`` (see schemas/streams.py), not
times. Every entry carries its write time (``ts``) though, and both numberings grow with time,
so the first entry to keep is found by a binary search on the ID's first part (about 20 reads
for a day of 20 ms chunks), and the stream is trimmed with ``MINID`` at that ID. The control
and events streams have time IDs and take the cutoff directly.

A live session grows only while its mic sends, so the gateway trims a session every
``TRIM_EVERY`` mic chunks it appends (gateway/server.py); an ended one is deleted whole when its
recording expires (gateway/lifecycle.py).
"""

from __future__ import annotations

from schemas.streams import Keys, _f, _get, parse_id

TRIM_EVERY = 3000  # mic chunks between trims: one minute of 20 ms chunks
SEQ_STREAMS = ("mic", "transcript", "reply", "voice", "face")  # "<n>-<m>" IDs, n grows with time
TIME_STREAMS = ("control", "events")  # auto IDs: milliseconds


async def _first_kept(redis, key: str, cutoff_ms: float) -> str | None:
    """The ID of the first entry whose major part's first entry is at or after the cutoff
    (None: the stream is empty or nothing in it is that old)."""
    head = await redis.xrange(key, "-", "+", count=1)
    if not head or _f(_get(head[0][1], "ts")) >= cutoff_ms:
        return None
    tail = await redis.xrevrange(key, "+", "-", count=1)
    lo, hi = parse_id(head[0][0])[0], parse_id(tail[0][0])[0] + 1  # answer in (lo, hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        probe = await redis.xrange(key, f"{mid}-0", "+", count=1)
        if not probe:
            hi = mid
            continue
        if _f(_get(probe[0][1], "ts")) >= cutoff_ms:
            hi = mid
        else:
            lo = parse_id(probe[0][0])[0]
    return f"{hi}-0"


async def trim_session(redis, keys: Keys, sid: str, cutoff_ms: float) -> dict[str, int]:
    """Drop the session's stream entries older than ``cutoff_ms`` (ms since the epoch; for a
    ``<turn>-<seq>`` stream: the turns that began before it). Returns entries dropped per
    stream."""
    dropped: dict[str, int] = {}
    for name in SEQ_STREAMS:
        key = keys.session(sid, name)
        minid = await _first_kept(redis, key, cutoff_ms)
        if minid is not None:
            dropped[name] = await redis.xtrim(key, minid=minid, approximate=False)
    for name in TIME_STREAMS:
        n = await redis.xtrim(keys.session(sid, name), minid=str(int(cutoff_ms)),
                              approximate=False)
        if n:
            dropped[name] = n
    return dropped
