"""MicroBatcher: routing, window and max_batch, errors, threads with asyncio, close."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from workers.batching import BatcherClosed, MicroBatcher


class Recorder:
    """A batch fn that records the batches it saw; optionally slow or failing."""

    def __init__(self, delay_s: float = 0.0, fail_on: object = None) -> None:
        self.batches: list[list] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, items: list) -> list:
        with self.lock:
            self.batches.append(list(items))
            self.threads.add(threading.current_thread().name)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on!r}")
        return [(x, x * 2) for x in items]


def _submit_all(b: MicroBatcher, items: list, workers: int | None = None) -> list:
    with ThreadPoolExecutor(max_workers=workers or len(items)) as pool:
        return list(pool.map(b.submit, items))


def test_results_are_routed_to_their_callers():
    rec = Recorder(delay_s=0.002)
    with MicroBatcher(rec, max_batch=8, window_ms=5) as b:
        items = list(range(100))
        results = _submit_all(b, items, workers=32)
    assert results == [(x, x * 2) for x in items]
    # every item ran exactly once
    assert sorted(x for batch in rec.batches for x in batch) == items
    assert len(rec.threads) == 1  # fn always runs in the one worker thread
    st = b.stats()
    assert st.items == 100 and st.batches == len(rec.batches)
    assert st.mean_batch_size == pytest.approx(100 / len(rec.batches))
    assert st.mean_batch_size > 1.5  # 32 concurrent callers do get batched


def test_max_batch_is_never_exceeded_and_full_batches_do_not_wait():
    rec = Recorder()
    with MicroBatcher(rec, max_batch=4, window_ms=10_000) as b:
        futs = [b.submit_future(i) for i in range(10)]
        # two full batches go at once despite the 10 s window
        assert [f.result(timeout=2) for f in futs[:8]] == [(i, i * 2) for i in range(8)]
        assert not futs[8].done()  # the last two wait for their window (or close)
    assert [f.result(timeout=2) for f in futs[8:]] == [(8, 16), (9, 18)]
    assert [len(x) for x in rec.batches] == [4, 4, 2]
    assert b.stats().max_size == 4


def test_window_gathers_items_that_arrive_within_it():
    rec = Recorder()
    with MicroBatcher(rec, max_batch=64, window_ms=400) as b:
        futs = [b.submit_future(0)]
        time.sleep(0.03)  # well inside the window
        futs += [b.submit_future(i) for i in (1, 2)]
        t0 = time.monotonic()
        assert [f.result(timeout=3)[0] for f in futs] == [0, 1, 2]
        waited = time.monotonic() - t0
    assert rec.batches == [[0, 1, 2]]
    # the window runs from the first item: ~370 ms left when the last two arrived
    assert 0.2 < waited < 2.0


def test_window_bounds_the_wait_of_a_lone_item():
    rec = Recorder()
    with MicroBatcher(rec, max_batch=64, window_ms=20) as b:
        t0 = time.monotonic()
        assert b.submit(7, timeout=2) == (7, 14)
        elapsed = time.monotonic() - t0
    assert 0.015 <= elapsed < 0.5
    assert rec.batches == [[7]]


def test_zero_window_runs_at_once_and_batches_what_queued_meanwhile():
    started, release = threading.Event(), threading.Event()
    seen: list[list[str]] = []

    def fn(items):
        seen.append(list(items))
        started.set()
        release.wait(2)  # hold the first batch until the others are queued
        return items

    with MicroBatcher(fn, max_batch=16, window_ms=0) as b:
        first = b.submit_future("a")
        assert started.wait(2)  # "a" ran alone, without waiting for company
        rest = [b.submit_future(c) for c in "bcd"]
        release.set()
        assert first.result(2) == "a"
        assert [f.result(2) for f in rest] == ["b", "c", "d"]
    assert seen == [["a"], ["b", "c", "d"]]


def test_exception_reaches_every_caller_of_that_batch_only():
    rec = Recorder(fail_on=3)
    with MicroBatcher(rec, max_batch=4, window_ms=10_000) as b:
        bad = [b.submit_future(i) for i in range(4)]  # one full batch containing 3
        good = [b.submit_future(i) for i in range(4, 8)]
        for f in bad:
            with pytest.raises(ValueError, match="bad item 3"):
                f.result(timeout=2)
        assert [f.result(timeout=2) for f in good] == [(i, i * 2) for i in range(4, 8)]
        # the batcher keeps working after a failed batch
        after = [b.submit_future(i) for i in range(8, 12)]
        assert [f.result(timeout=2) for f in after] == [(i, i * 2) for i in range(8, 12)]
    st = b.stats()
    assert st.errors == 1 and st.batches == 3


def test_wrong_number_of_results_is_an_error_for_all():
    with MicroBatcher(lambda items: items[:-1], max_batch=2, window_ms=10_000) as b:
        futs = [b.submit_future(i) for i in range(2)]
        for f in futs:
            with pytest.raises(RuntimeError, match="1 results for 2 items"):
                f.result(timeout=2)


def test_blocking_submit_raises_the_batch_exception():
    with MicroBatcher(Recorder(fail_on="x"), max_batch=1) as b, \
            pytest.raises(ValueError, match="bad item"):
        b.submit("x", timeout=2)


async def test_asyncio_callers_get_their_own_results():
    rec = Recorder(delay_s=0.002)
    with MicroBatcher(rec, max_batch=8, window_ms=5) as b:
        results = await asyncio.gather(*(b.asubmit(i) for i in range(40)))
    assert results == [(i, i * 2) for i in range(40)]
    assert max(len(x) for x in rec.batches) > 1


async def test_asyncio_and_threads_mixed_in_one_batch():
    rec = Recorder()
    with MicroBatcher(rec, max_batch=6, window_ms=10_000) as b:
        loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(max_workers=3)
        threaded = [loop.run_in_executor(pool, b.submit, f"t{i}") for i in range(3)]
        awaited = [asyncio.ensure_future(b.asubmit(f"a{i}")) for i in range(3)]
        results = await asyncio.wait_for(asyncio.gather(*threaded, *awaited), 5)
        pool.shutdown()
    assert results == [(x, x * 2) for x in ("t0", "t1", "t2", "a0", "a1", "a2")]
    assert len(rec.batches) == 1 and sorted(rec.batches[0]) == sorted(x for x, _ in results)


async def test_asyncio_exception_propagates():
    with MicroBatcher(Recorder(fail_on=2), max_batch=3, window_ms=10_000) as b:
        results = await asyncio.gather(*(b.asubmit(i) for i in range(3)),
                                       return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results)


async def test_cancelled_asyncio_caller_is_dropped_from_its_batch():
    rec = Recorder()
    with MicroBatcher(rec, max_batch=2, window_ms=10_000) as b:
        gone = asyncio.ensure_future(b.asubmit("gone"))
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)  # its cancel has reached the batcher
        kept = await asyncio.wait_for(b.asubmit("kept"), 2)  # 2 queued: the batch is full
    assert kept == ("kept", "keptkept")
    assert rec.batches == [["kept"]]
    assert b.stats().cancelled == 1


def test_close_runs_what_is_queued_then_refuses():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=8, window_ms=60_000)
    futs = [b.submit_future(i) for i in range(3)]
    t0 = time.monotonic()
    b.close(timeout=2)
    assert time.monotonic() - t0 < 1.0  # close does not wait out the window
    assert [f.result(0) for f in futs] == [(0, 0), (1, 2), (2, 4)]
    assert b.closed and not b._thread.is_alive()
    with pytest.raises(BatcherClosed):
        b.submit(5)
    b.close()  # idempotent


async def test_asubmit_after_close_raises():
    b = MicroBatcher(Recorder())
    b.close()
    with pytest.raises(BatcherClosed):
        await b.asubmit(1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(Recorder(), max_batch=0)
    with pytest.raises(ValueError, match="window_ms"):
        MicroBatcher(Recorder(), window_ms=-1)


def test_stats_before_any_batch():
    with MicroBatcher(Recorder()) as b:
        st = b.stats()
    assert (st.batches, st.items, st.mean_batch_size) == (0, 0, 0.0)
