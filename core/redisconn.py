"""Redis clients for every process: retries with backoff, Sentinel URLs, health checks."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    BusyLoadingError,
    ClusterError,
    ConnectionError,
    ReadOnlyError,
    ResponseError,
    SlotNotCoveredError,
    TimeoutError,
    TryAgainError,
)

# Failover shows up as more than lost connections: a Cluster answers CLUSTERDOWN or TRYAGAIN
# (and the client finds no node for a slot) until a replica is promoted; a demoted primary
# answers READONLY. All of them pass; a loop waits them out like a restart.
RETRYABLE = (ConnectionError, TimeoutError, BusyLoadingError, OSError, ClusterError,
             TryAgainError, ReadOnlyError, SlotNotCoveredError)


# redis-py raises a plain ResponseError for these; Redis's reply starts with its error code,
# so the classification lives here, once, instead of text matching at every call site.
def is_stale_id(exc: Exception) -> bool:
    """XADD with an explicit ID at or below the stream's top: the entry is already there."""
    return isinstance(exc, ResponseError) and "equal or smaller" in str(exc)


def is_no_group(exc: Exception) -> bool:
    """The consumer group (or its stream) is gone: Redis lost its data, or the stream was
    deleted while a worker was blocked reading it (UNBLOCKED)."""
    return isinstance(exc, ResponseError) and str(exc).startswith(("NOGROUP", "UNBLOCKED"))


def is_group_exists(exc: Exception) -> bool:
    return isinstance(exc, ResponseError) and str(exc).startswith("BUSYGROUP")


def connect(url: str, *, max_connections: int = 256) -> aioredis.Redis:
    """A client for ``url``: redis://, rediss://, unix://, redis+sentinel://h:p,h:p/master/db,
    or redis+cluster://h:p (a Redis Cluster; every session's keys share one hash slot and the
    job streams share ``{jobs}``, so multi-key commands and transactions stay in one slot).

    Commands retry a few times with exponential backoff on connection loss, so a Redis restart
    shows up as a pause, not as an exception in every caller.
    """
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.02), retries=6)
    opts = dict(
        retry=retry,
        retry_on_error=[ConnectionError, TimeoutError, BusyLoadingError],
        health_check_interval=10,
        socket_connect_timeout=2.0,
        # No socket timeout: with one, redis-py wraps every command in asyncio.wait_for, which
        # on Python 3.11 can swallow a task's cancellation (91 of 150 cancels lost in a
        # measurement), so SIGTERM sometimes hung a process. Blocking reads carry their own
        # BLOCK limits and dead links are found by the health check.
        socket_timeout=None,
        max_connections=max_connections,
    )
    parsed = urlparse(url)
    if parsed.scheme in ("redis+cluster", "rediss+cluster"):
        plain = url.replace("+cluster", "", 1)
        return _cluster_class().from_url(plain, retry=retry, health_check_interval=10,
                                          socket_connect_timeout=2.0,
                                          max_connections=max_connections)
    if parsed.scheme.startswith("redis+sentinel"):
        hosts, service, db, password, sentinel_password = _sentinel_parts(url)
        sentinel = aioredis.Sentinel(hosts, socket_timeout=2.0,
                                     sentinel_kwargs={"password": sentinel_password})
        return sentinel.master_for(service, db=db, password=password, **opts)
    return aioredis.from_url(url, **opts)


_STREAM_READS = ("XREAD", "XREADGROUP")
_CLUSTER = None


def _cluster_class():
    """redis-py's asyncio RedisCluster, with one repair for failover.

    For XREAD and XREADGROUP it asks its *default node* which keys the command names
    (COMMAND GETKEYS), before its retry loop; when that node is the primary that died, every
    read fails for good (measured: 30 s of "connection refused" after the replica had taken
    over). The keys of these two commands follow STREAMS, so the slot is computed here; for
    any other command a dead default node is replaced, so the next attempt asks a live one.
    """
    global _CLUSTER
    if _CLUSTER is not None:
        return _CLUSTER
    from redis.asyncio.cluster import RedisCluster

    class Cluster(RedisCluster):
        async def _determine_slot(self, command: str, *args):
            if str(command).upper() in _STREAM_READS:
                names = [a.upper() if isinstance(a, (str, bytes)) else a for a in args]
                for word in (b"STREAMS", "STREAMS"):
                    if word in names:
                        return self.keyslot(args[names.index(word) + 1])
            try:
                return await super()._determine_slot(command, *args)
            except (ConnectionError, TimeoutError):
                self._initialize = True
                self.replace_default_node()
                raise

    _CLUSTER = Cluster
    return Cluster


def _sentinel_parts(url: str):
    parsed = urlparse(url)
    hosts = [h.rsplit(":", 1) for h in parsed.netloc.split("@")[-1].split(",")]
    parts = [p for p in parsed.path.split("/") if p]
    if not parts:
        raise ValueError(f"sentinel URL needs a master name: {url!r}")
    q = parse_qs(parsed.query)
    return ([(h, int(p)) for h, p in hosts], parts[0], int(parts[1]) if len(parts) > 1 else 0,
            parsed.password, q.get("sentinel_password", [None])[0])


def connect_sync(url: str, **kwargs):
    """A blocking client for the CLI and the supervisor (``parley status``, ``parley up``'s
    readiness check, export), for every URL form ``connect`` takes."""
    import redis as syncredis

    kwargs.setdefault("socket_connect_timeout", 2.0)
    scheme = urlparse(url).scheme
    if scheme in ("redis+cluster", "rediss+cluster"):
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(url.replace("+cluster", "", 1), **kwargs)
    if scheme.startswith("redis+sentinel"):
        hosts, service, db, password, sentinel_password = _sentinel_parts(url)
        sentinel = syncredis.Sentinel(hosts, socket_timeout=2.0,
                                      sentinel_kwargs={"password": sentinel_password})
        return sentinel.master_for(service, db=db, password=password, **kwargs)
    return syncredis.from_url(url, **kwargs)
