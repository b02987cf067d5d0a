"""The shared worker runtime against a real Redis: concurrency, takeover, heartbeat, dead letters,
graceful stop. A toy stage stands in for the real ones so each property is seen in isolation."""

from __future__ import annotations

import asyncio
import time

import pytest

from core.config import Config
from schemas.streams import EventEntry, Job, Keys
from workers.runtime import HandBack, Stage, Worker


class ToyStage(Stage):
    """Sleeps ``float(job.text)`` seconds, or fails when text is 'poison'."""

    name = "toy"

    def __init__(self, config):
        super().__init__(config)
        self.ran: list[str] = []

    async def handle(self, ctx):
        self.ran.append(ctx.job.sid)
        if ctx.job.text == "poison":
            raise ValueError("this input always fails")
        if ctx.job.text == "until-stop":
            await ctx.stopping.wait()
            raise HandBack(ctx.job)
        if ctx.job.text.startswith("block:"):
            # "block:WORKER:S" holds WORKER's event loop for S seconds as a GIL-bound decode
            # does (no heartbeat runs meanwhile); any other worker finishes at once
            _, who, seconds = ctx.job.text.split(":")
            if who == ctx.worker.consumer:
                time.sleep(float(seconds))
            await ctx.redis.rpush(f"done:{ctx.job.sid}", ctx.worker.consumer)
            return []
        await asyncio.sleep(float(ctx.job.text or 0))
        await ctx.redis.rpush(f"done:{ctx.job.sid}", ctx.worker.consumer)
        return []


def config(url: str, **worker) -> Config:
    cfg = Config.load(env={"PARLEY_REDIS_URL": url})
    cfg.worker.claim_idle_ms = 500
    cfg.worker.heartbeat_ms = 100
    cfg.worker.block_ms = 200
    for k, v in worker.items():
        setattr(cfg.worker, k, v)
    return cfg


async def start(cfg: Config, name: str):
    stage = ToyStage(cfg)
    w = Worker(stage, cfg, consumer=name)
    task = asyncio.create_task(w.run())
    await asyncio.sleep(0.05)
    return w, stage, task


async def enqueue(r, sid: str, text: str, turn: int = 1):
    await r.xadd(Keys().jobs("toy"), Job(stage="toy", sid=sid, turn=turn, text=text).to_fields())


async def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await cond():
            return True
        await asyncio.sleep(0.05)
    return False


async def stop(*pairs):
    for w, _task in pairs:
        w.request_stop()
    await asyncio.gather(*(t for _, t in pairs))


async def test_jobs_run_concurrently_and_are_acked(scratch_url, redis_client):
    cfg = config(scratch_url, max_jobs=4)
    w, _stage, task = await start(cfg, "a")
    t0 = time.monotonic()
    for i in range(4):
        await enqueue(redis_client, f"s{i}", "0.5")
    assert await wait_for(lambda: _count(redis_client, [f"done:s{i}" for i in range(4)], 4))
    assert time.monotonic() - t0 < 1.8, "four 0.5 s jobs should overlap"
    info = await redis_client.xpending(Keys().jobs("toy"), "toy")
    assert info["pending"] == 0
    await stop((w, task))


async def _count(r, keys, want):
    n = 0
    for k in keys:
        n += await r.llen(k)
    return n >= want


async def test_a_dead_consumers_job_is_taken_over(scratch_url, redis_client):
    cfg = config(scratch_url)
    keys = Keys()
    await redis_client.xgroup_create(keys.jobs("toy"), "toy", id="0", mkstream=True)
    await enqueue(redis_client, "orphan", "0")
    # A consumer that reads the job and then dies: it never acks and never heartbeats.
    got = await redis_client.xreadgroup("toy", "dead-worker", {keys.jobs("toy"): ">"}, count=1)
    assert got
    t0 = time.monotonic()
    w, _stage, task = await start(cfg, "rescuer")
    assert await wait_for(lambda: _count(redis_client, ["done:orphan"], 1), 5)
    took = time.monotonic() - t0
    assert 0.3 < took < 3.0, f"takeover after the idle threshold, took {took:.2f}s"
    assert await redis_client.lrange("done:orphan", 0, -1) == [b"rescuer"]
    await stop((w, task))


async def test_a_pending_job_of_our_own_that_we_do_not_run_is_run(scratch_url, redis_client):
    """After a failover the replica may hold a job as pending in a live worker's name that the
    worker has finished (its ack was never replicated) or never saw: the worker runs it again
    (outputs are idempotent). Here the test reads the job in the worker's name, as the
    replica would show it."""
    cfg = config(scratch_url)
    keys = Keys()
    w, stage, task = await start(cfg, "survivor")
    try:
        await enqueue(redis_client, "replayed", "0")
        assert await wait_for(lambda: _count(redis_client, ["done:replayed"], 1), 5)
        await enqueue(redis_client, "unseen", "0")
        # the worker may read it first; if the test does, it is pending in the worker's name
        # and no task of the worker runs it
        await redis_client.xreadgroup("toy", "survivor", {keys.jobs("toy"): ">"}, count=1)
        t0 = time.monotonic()
        assert await wait_for(lambda: _count(redis_client, ["done:unseen"], 1), 5)
        assert time.monotonic() - t0 < 3.0

        async def none_pending():
            return (await redis_client.xpending(keys.jobs("toy"), "toy"))["pending"] == 0

        assert await wait_for(none_pending, 5)
        assert stage.ran.count("unseen") == 1
    finally:
        await stop((w, task))


async def test_heartbeat_keeps_a_long_job_with_its_live_worker(scratch_url, redis_client):
    cfg = config(scratch_url)
    a, sa, ta = await start(cfg, "busy")
    await enqueue(redis_client, "long", "2.0")  # four times the claim idle threshold
    assert await wait_for(lambda: _any(sa.ran))
    b, sb, tb = await start(cfg, "thief")
    assert await wait_for(lambda: _count(redis_client, ["done:long"], 1), 6)
    assert sb.ran == [] and sa.ran == ["long"]
    assert await redis_client.lrange("done:long", 0, -1) == [b"busy"]
    await stop((a, ta), (b, tb))


async def _any(xs):
    return bool(xs)


async def test_poison_job_goes_to_dead_letters_with_an_error_event(scratch_url, redis_client):
    cfg = config(scratch_url, max_deliveries=3)
    w, stage, task = await start(cfg, "a")
    keys = Keys()
    await enqueue(redis_client, "bad", "poison", turn=7)
    await enqueue(redis_client, "good", "0")
    assert await wait_for(lambda: _xlen(redis_client, keys.dead("toy"), 1))
    assert stage.ran.count("bad") == 3
    dead = await redis_client.xrange(keys.dead("toy"))
    assert b"always fails" in dead[0][1][b"reason"]
    events = await redis_client.xrange(keys.session("bad", "events"))
    ev = EventEntry.from_fields(events[0][1])
    assert (ev.kind, ev.code, ev.turn) == ("error", "turn_failed", 7)
    assert "always fails" in ev.message
    assert await wait_for(lambda: _count(redis_client, ["done:good"], 1))
    await stop((w, task))


async def _xlen(r, key, n):
    return await r.xlen(key) >= n


async def test_sigterm_hands_back_in_flight_jobs_at_once(scratch_url, redis_client):
    cfg = config(scratch_url, drain_timeout_s=0.3)
    cfg.worker.claim_idle_ms = 60_000  # a takeover by idle time would take a minute
    a, sa, ta = await start(cfg, "leaving")
    await enqueue(redis_client, "handoff", "until-stop")
    assert await wait_for(lambda: _any(sa.ran))
    a.request_stop()
    await ta  # returns: the worker exits once the job is handed back
    b, sb, tb = await start(cfg, "staying")
    assert await wait_for(lambda: _any(sb.ran), 3), "the handed-back job is picked up at once"
    info = await redis_client.xpending_range(Keys().jobs("toy"), "toy", "-", "+", 10)
    assert all(p["consumer"] != b"leaving" for p in info)
    b.request_stop()
    await tb


def _run_toy_worker(url: str, name: str, claim_idle_ms: str, stall_ms: str) -> None:
    """Entry point of a toy worker in its own process (its event loop can be starved alone)."""
    cfg = config(url, claim_idle_ms=int(claim_idle_ms), stall_ms=int(stall_ms))
    w = Worker(ToyStage(cfg), cfg, consumer=name)

    async def main():
        w.install_signal_handlers()
        await w.run()

    asyncio.run(main())


def spawn_toy_worker(url: str, name: str, claim_idle_ms: int = 500, stall_ms: int = 30_000):
    import subprocess
    import sys

    code = ("import sys; from tests.integration.test_runtime import _run_toy_worker as r; "
            "r(*sys.argv[1:])")
    return subprocess.Popen([sys.executable, "-c", code, url, name, str(claim_idle_ms),
                             str(stall_ms)])


async def test_a_worker_whose_event_loop_is_starved_keeps_its_job(scratch_url, redis_client):
    """Busy is not dead: a job that blocks its worker's event loop for 6x claim_idle_ms (no
    heartbeat runs) stays with that worker while a sibling looks for work to take over."""
    proc = spawn_toy_worker(scratch_url, "starved")
    try:
        assert await wait_for(lambda: redis_client.exists(Keys().alive("starved")), 10)
        await enqueue(redis_client, "busy", "block:starved:3.0")
        assert await wait_for(lambda: _held_by(redis_client, "starved"), 10)
        thief_cfg = config(scratch_url)
        b, sb, tb = await start(thief_cfg, "thief")  # now looking for work to take over
        assert await wait_for(lambda: _count(redis_client, ["done:busy"], 1), 15)
        await asyncio.sleep(0.6)  # a late takeover would run the job a second time now
        assert sb.ran == [], "the sibling took a live worker's job"
        assert await redis_client.lrange("done:busy", 0, -1) == [b"starved"]
        await stop((b, tb))
    finally:
        proc.terminate()
        proc.wait(10)
    assert proc.returncode == 0


async def test_a_wedged_worker_loses_its_job_after_stall_ms(scratch_url, redis_client):
    """Alive but making no progress past worker.stall_ms: the job is taken over anyway."""
    proc = spawn_toy_worker(scratch_url, "wedged")
    try:
        assert await wait_for(lambda: redis_client.exists(Keys().alive("wedged")), 10)
        await enqueue(redis_client, "stuck", "block:wedged:6.0")
        assert await wait_for(lambda: _held_by(redis_client, "wedged"), 10)
        thief_cfg = config(scratch_url, stall_ms=1500)
        b, sb, tb = await start(thief_cfg, "rescuer")
        assert await wait_for(lambda: _any(sb.ran), 5), "the wedged worker kept its job"
        assert await wait_for(lambda: _count(redis_client, ["done:stuck"], 1), 5)
        # The wedged worker wakes up (the toy's own write is not idempotent, a real stage's
        # are), finds the job is no longer its own and must not ack it a second time.
        assert await wait_for(lambda: _count(redis_client, ["done:stuck"], 2), 10)
        info = await redis_client.xpending(Keys().jobs("toy"), "toy")
        assert info["pending"] == 0
        await stop((b, tb))
    finally:
        proc.kill()
        proc.wait(10)


async def test_a_killed_workers_liveness_lapses_at_once(scratch_url, redis_client):
    import signal

    proc = spawn_toy_worker(scratch_url, "doomed")
    assert await wait_for(lambda: redis_client.exists(Keys().alive("doomed")), 10)
    proc.send_signal(signal.SIGKILL)
    proc.wait(5)
    t0 = time.monotonic()
    assert await wait_for(lambda: _none(redis_client.exists(Keys().alive("doomed"))), 3)
    assert time.monotonic() - t0 < 1.0


async def _held_by(r, consumer: str) -> bool:
    pending = await r.xpending_range(Keys().jobs("toy"), "toy", "-", "+", 10)
    return any(p["consumer"].decode() == consumer for p in pending)


async def _none(coro):
    return not await coro


@pytest.fixture(autouse=True)
async def _clean(redis_client):
    yield


async def test_redis_errors_are_classified_by_their_code(redis_client):
    """The runtime's decisions rest on these (a resend, a lost group, a group that exists)."""
    from redis.exceptions import ResponseError

    from core.redisconn import is_group_exists, is_no_group, is_stale_id

    await redis_client.xadd("classify", {"a": 1}, id="5-0")
    with pytest.raises(ResponseError) as stale:
        await redis_client.xadd("classify", {"a": 1}, id="3-0")
    await redis_client.xgroup_create("classify", "g", id="0")
    with pytest.raises(ResponseError) as busy:
        await redis_client.xgroup_create("classify", "g", id="0")
    with pytest.raises(ResponseError) as gone:
        await redis_client.xreadgroup("nope", "c", {"classify": ">"})
    assert is_stale_id(stale.value) and not is_no_group(stale.value)
    assert is_group_exists(busy.value) and not is_stale_id(busy.value)
    assert is_no_group(gone.value) and not is_group_exists(gone.value)
