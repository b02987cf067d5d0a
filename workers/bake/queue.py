"""The bake queue: rq on a plain Redis (the fleet's, or ``bake.redis_url`` beside a Cluster).

rq's jobs carry one line each; rq retries a failed line ``bake.retries`` times and keeps the
last failure's traceback. A killed worker's line is rq's "abandoned job": rq itself notices it
only when the execution's heartbeat lapses (a minute or more), so bake workers prove they are
alive through the fleet's liveness sidecar (workers/liveness.py, a key that goes within one
interval of a kill -9), and :func:`reap_abandoned` hands a dead worker's line to rq's own
abandoned-job handling at once: retried if it has retries left, else failed with
AbandonedJobError.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import redis

from core.config import Config
from workers.bake.lines import Line

JOB_FUNC = "workers.bake.jobs.bake_line"
WORKER_PREFIX = "bake@"  # rq worker names of bake workers; only their jobs are reaped
RESULT_TTL_S = 7 * 24 * 3600


class BakeConfigError(ValueError):
    """Bake cannot run against this Redis as configured; the message says what to set."""


def is_cluster_url(url: str) -> bool:
    return urlparse(url).scheme in ("redis+cluster", "rediss+cluster")


def bake_url(config: Config, fleet_url: str) -> str:
    """The Redis the bake queue lives on: ``bake.redis_url``, else the fleet's own."""
    if config.bake.redis_url:
        if is_cluster_url(config.bake.redis_url):
            raise BakeConfigError(f"bake.redis_url {config.bake.redis_url!r} is a Redis Cluster; "
                                  "rq needs a plain Redis (redis://, unix://, redis+sentinel://)")
        return config.bake.redis_url
    if is_cluster_url(fleet_url):
        raise BakeConfigError(
            f"the fleet's Redis {fleet_url!r} is a Redis Cluster, where rq (the bake queue) "
            "does not run: set bake.redis_url ([bake] redis_url in the config file, or "
            "PARLEY_BAKE_REDIS_URL) to a plain Redis for the bake queue")
    return fleet_url


def sync_connect(url: str) -> redis.Redis:
    """A blocking client (rq is synchronous) for redis://, rediss://, unix://,
    redis+sentinel://h:p,h:p/master/db and redis+cluster:// (the last not for rq)."""
    parsed = urlparse(url)
    if is_cluster_url(url):
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(url.replace("+cluster", "", 1), socket_connect_timeout=2)
    if parsed.scheme.startswith("redis+sentinel"):
        hosts = [h.rsplit(":", 1) for h in parsed.netloc.split("@")[-1].split(",")]
        parts = [p for p in parsed.path.split("/") if p]
        if not parts:
            raise BakeConfigError(f"sentinel URL needs a master name: {url!r}")
        q = parse_qs(parsed.query)
        sentinel = redis.Sentinel(
            [(h, int(p)) for h, p in hosts], socket_timeout=2.0,
            sentinel_kwargs={"password": q.get("sentinel_password", [None])[0]})
        return sentinel.master_for(parts[0], db=int(parts[1]) if len(parts) > 1 else 0,
                                   password=parsed.password, socket_connect_timeout=2)
    return redis.Redis.from_url(url, socket_connect_timeout=2)


def alive_key(prefix: str, worker_name: str) -> str:
    return f"{prefix}:bake:alive:{worker_name}"


def job_id(out_dir: str | Path, line: Line) -> str:
    """One job per (output folder, line content): a rerun finds the job of a line still in
    the queue instead of adding a second one."""
    where = os.path.abspath(out_dir)
    h = hashlib.sha1(f"{where}\n{line.id}\n{line.digest()}".encode()).hexdigest()[:24]
    return f"bake-{h}"


@dataclass
class Outcome:
    line: Line
    state: str  # "done", "failed", or rq's status while it runs
    reason: str = ""  # why it failed: the last line of the last attempt's traceback
    attempts: int = 0


PENDING = {"queued", "started", "scheduled", "deferred", "created"}


class BakeQueue:
    def __init__(self, conn: redis.Redis, config: Config):
        from rq import Queue

        self.conn = conn
        self.config = config
        self.queue = Queue(config.bake.queue, connection=conn)

    def enqueue(self, lines: list[Line], out_dir: str | Path) -> dict[str, str]:
        """Jobs for ``lines`` (job id -> line id); a line whose job is still waiting or running
        (an earlier bake that was stopped) keeps that job."""
        from rq import Retry
        from rq.job import Job

        cfg = self.config.bake
        ids = {job_id(out_dir, ln): ln for ln in lines}
        existing = Job.fetch_many(list(ids), connection=self.conn)
        todo = []
        for (jid, line), job in zip(ids.items(), existing, strict=True):
            if job is not None:
                if job.get_status(refresh=False) in PENDING:
                    continue
                job.delete()  # finished or failed before, but its outputs are not there
            todo.append(self.queue.prepare_data(
                JOB_FUNC, args=(line.to_dict(), os.path.abspath(out_dir)), job_id=jid,
                timeout=cfg.job_timeout_s, result_ttl=RESULT_TTL_S, failure_ttl=RESULT_TTL_S,
                retry=Retry(max=cfg.retries) if cfg.retries > 0 else None,
                meta={"retries": max(0, cfg.retries)},
                description=f"bake {line.id} ({line.npc})"))
        for start in range(0, len(todo), 500):
            self.queue.enqueue_many(todo[start:start + 500])
        return {jid: line.id for jid, line in ids.items()}

    def outcomes(self, jobs: dict[str, Line]) -> list[Outcome]:
        from rq.job import Job

        found = Job.fetch_many(list(jobs), connection=self.conn)
        out = []
        for (jid, line), job in zip(jobs.items(), found, strict=True):
            if job is None:
                out.append(Outcome(line, "failed", f"job {jid} is gone from Redis"))
                continue
            status = str(job.get_status(refresh=False).value)
            if status == "finished":
                out.append(Outcome(line, "done"))
            elif status in PENDING:
                out.append(Outcome(line, status))
            else:
                out.append(Outcome(line, "failed", _reason(job), _attempts(job)))
        return out

    def reap_abandoned(self) -> list[str]:
        """Hands the lines of bake workers that are gone to rq's abandoned-job handling now."""
        from rq.job import Job

        reg = self.queue.started_job_registry
        entries = reg.get_job_and_execution_ids(cleanup=False)
        if not entries:
            return []
        jobs = Job.fetch_many([j for j, _ in entries], connection=self.conn)
        prefix = self.config.redis.prefix
        gone = []
        for (jid, exe), job in zip(entries, jobs, strict=True):
            name = getattr(job, "worker_name", None) or ""
            if not name.startswith(WORKER_PREFIX) or self.conn.exists(alive_key(prefix, name)):
                continue
            # expired now: rq's cleanup retries it (or fails it, with AbandonedJobError)
            self.conn.zadd(reg.key, {f"{jid}:{exe}": 0}, xx=True)
            gone.append(jid)
        if gone:
            reg.cleanup()
        return gone

    def workers(self) -> int:
        """Bake workers alive now (by their liveness keys)."""
        prefix = self.config.redis.prefix
        return sum(1 for _ in self.conn.scan_iter(alive_key(prefix, "*"), count=500))


def _reason(job) -> str:
    try:
        result = job.latest_result()
    except Exception:  # an old rq without results: the job's own field
        result = None
    text = (getattr(result, "exc_string", None) or job.exc_info or "").strip()
    last = text.splitlines()[-1] if text else str(job.get_status(refresh=False).value)
    return last[:500]


def _attempts(job) -> int:
    """Runs of a job that ended for good: the first one plus the retries it used."""
    retries = int((job.meta or {}).get("retries", 0))
    return 1 + max(0, retries - int(job.retries_left or 0))
