"""`parley bake-worker`: an rq worker that renders lines and yields to live conversations.

Yielding, two ways: the process runs at ``bake.nice`` (the OS gives live workers the CPU
first), and before each line it waits while the live fleet has reply work in flight or queued
(LLM, TTS or lipsync jobs), any stage has jobs nobody has picked up, or STT runs more than
``bake.yield_stt_lag_ms`` behind; at most ``bake.max_pause_s`` per line, so a fleet that is
never idle slows a bake down without stopping it. A player who is merely speaking does not
pause it (STT keeps up, or its lag says otherwise).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid

import structlog
from rq.worker import SimpleWorker, WorkerStatus

from core.config import Config
from schemas.streams import STAGES, Keys
from workers.bake import jobs
from workers.bake.queue import (
    WORKER_PREFIX,
    BakeQueue,
    alive_key,
    bake_url,
    sync_connect,
)

REPLY_STAGES = ("llm", "tts", "lipsync")


class LiveLoad:
    """Whether the live fleet is busy, read from its worker registry and job streams."""

    def __init__(self, conn, keys: Keys, stt_lag_ms: float, speech: bool = False):
        self.conn = conn
        self.keys = keys
        self.stt_lag_ms = stt_lag_ms
        self.speech = speech  # STT jobs in flight count too

    def busy(self) -> str:
        """Why bake should wait now; "" when the fleet is idle."""
        k = self.keys
        with self.conn.pipeline(transaction=False) as p:
            for st in STAGES:
                p.zrange(k.workers(st), 0, -1)
            for st in STAGES:
                p.xinfo_groups(k.jobs(st))
            rows = p.execute(raise_on_error=False)
        consumers = {st: [c.decode() if isinstance(c, bytes) else c for c in rows[i]]
                     for i, st in enumerate(STAGES) if isinstance(rows[i], list)}
        for st, groups in zip(STAGES, rows[len(STAGES):], strict=True):
            if isinstance(groups, Exception):
                continue  # no stream yet
            for g in groups:
                name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
                if name == k.group(st) and g.get("lag"):
                    return f"{st}: {g['lag']} job(s) queued"
        flat = [(st, c) for st, cs in consumers.items() for c in cs]
        if not flat:
            return ""
        with self.conn.pipeline(transaction=False) as p:
            for _st, c in flat:
                p.hmget(k.worker(c), ["jobs", "lag_ms"])
            regs = p.execute(raise_on_error=False)
        for (st, _c), reg in zip(flat, regs, strict=True):
            if isinstance(reg, Exception) or reg[0] is None:
                continue  # lapsed: a worker that is gone
            if st in REPLY_STAGES and json.loads(reg[0]):
                return f"{st}: a reply is being made"
            if st == "stt" and self.speech and json.loads(reg[0]):
                return "stt: a player is speaking"
            if st == "stt" and float(reg[1] or 0) > self.stt_lag_ms:
                return f"stt: {float(reg[1]):.0f} ms behind"
        return ""


class BakeWorker(SimpleWorker):
    """rq's in-process worker (the backends are loaded once, not per fork), pausing before each
    line while the live fleet is busy. The pause comes after the job is registered as this
    worker's, so a worker killed while it waits loses no line either."""

    live: LiveLoad | None = None
    max_pause_s: float = 10.0
    paused_s: float = 0.0
    current: str = ""
    done_count: int = 0
    failed_count: int = 0

    def execute_job(self, job, queue):
        execution = self.prepare_execution(job)
        self.current = job.id
        try:
            self.wait_for_quiet()
            self.perform_job(job, queue, execution)
        finally:
            self.current = ""
        self.set_state(WorkerStatus.IDLE)

    def handle_job_success(self, job, queue, started_job_registry, *args, **kwargs):
        self.done_count += 1
        return super().handle_job_success(job, queue, started_job_registry, *args, **kwargs)

    def handle_job_failure(self, job, queue, *args, **kwargs):
        self.failed_count += 1
        return super().handle_job_failure(job, queue, *args, **kwargs)

    def wait_for_quiet(self) -> None:
        if self.live is None:
            return
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.max_pause_s and not self._stop_requested:
            try:
                if not self.live.busy():
                    break
            except Exception as exc:  # the fleet's Redis away: bake on rather than stall
                structlog.get_logger().warning("bake_live_load_unreadable", error=str(exc))
                break
            time.sleep(0.05)
        self.paused_s += time.monotonic() - t0


def _register(worker: BakeWorker, fleet, bq: BakeQueue, keys: Keys, name: str,
              stop: threading.Event, every_s: float = 1.0) -> None:
    """Shows the worker in the fleet registry (`parley status`, `parley up`'s readiness) and
    reaps lines of bake workers that died, every ``every_s``."""
    log = structlog.get_logger()
    started = time.time()
    while not stop.is_set():
        jobs_now = [{"job": worker.current, "session": "bake", "turn": 0}] if worker.current else []
        try:
            with fleet.pipeline(transaction=False) as p:
                p.hset(keys.worker(name), mapping={
                    "stage": "bake", "consumer": name, "pid": os.getpid(),
                    "host": socket.gethostname(), "started": started * 1000,
                    "heartbeat": time.time() * 1000, "jobs": json.dumps(jobs_now),
                    "done": worker.done_count, "failed": worker.failed_count, "max_jobs": 1,
                    "paused_s": round(worker.paused_s, 1)})
                p.pexpire(keys.worker(name), int(3000 * every_s))
                p.execute()
            if gone := bq.reap_abandoned():
                log.warning("bake_lines_of_dead_worker_requeued", jobs=gone)
        except Exception as exc:  # Redis away for a moment: next round
            log.warning("bake_register_failed", error=str(exc))
        stop.wait(every_s)
    with contextlib.suppress(Exception):
        fleet.delete(keys.worker(name))


def _lower_priority(nice: int) -> None:
    with contextlib.suppress(OSError):
        now = os.getpriority(os.PRIO_PROCESS, 0)
        if nice > now:
            os.setpriority(os.PRIO_PROCESS, 0, nice)


def _wait_alive(conn, key: str, sidecar, timeout_s: float = 120.0) -> None:
    """Take no line before the proof of life is there: a line of a worker without one would be
    handed on by the others at once (a slow machine can take seconds to start the sidecar)."""
    deadline = time.monotonic() + timeout_s
    while not conn.exists(key):
        if time.monotonic() > deadline or (sidecar.proc and sidecar.proc.poll() is not None):
            raise RuntimeError(f"the bake worker's liveness sidecar did not set {key}")
        time.sleep(0.02)


def run_bake_worker(config: Config, burst: bool = False) -> int:
    from rq import Queue

    from workers.liveness import Sidecar

    cfg = config.bake
    url = bake_url(config, config.redis.url)
    conn = sync_connect(url)
    fleet = sync_connect(config.redis.url)
    keys = Keys(config.redis.prefix)
    name = f"{WORKER_PREFIX}{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    # the proof of life starts before the priority drops, so it keeps normal priority
    # The sidecar deletes the key the moment the worker is gone; the TTL only covers the
    # sidecar dying with it, so it can be long enough that no load makes it lapse.
    sidecar = Sidecar(url, alive_key(config.redis.prefix, name), every_ms=cfg.liveness_ms,
                      ttl_ms=max(10_000, 4 * cfg.liveness_ms))
    sidecar.ensure()
    _lower_priority(cfg.nice)
    jobs.setup(config)
    _wait_alive(conn, alive_key(config.redis.prefix, name), sidecar)
    bq = BakeQueue(conn, config)
    worker = BakeWorker([Queue(cfg.queue, connection=conn)], connection=conn, name=name)
    worker.live = (LiveLoad(fleet, keys, cfg.yield_stt_lag_ms, cfg.yield_to_speech)
                   if cfg.max_pause_s > 0 else None)
    worker.max_pause_s = cfg.max_pause_s
    stop = threading.Event()
    reg = threading.Thread(target=_register, args=(worker, fleet, bq, keys, name, stop),
                           name="bake-register", daemon=True)
    reg.start()
    try:
        worker.work(burst=burst, logging_level="WARNING")
    finally:
        stop.set()
        reg.join(timeout=5)
        sidecar.stop()
        jobs.teardown()
    return 0
