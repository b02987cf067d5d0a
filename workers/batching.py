"""Micro-batching: many concurrent callers, one model call per batch.

GPU models (the lipsync transformer, a TTS vocoder) cost nearly the same for 1 or 16
inputs, so a worker serving many sessions should run them together. ``MicroBatcher``
collects items submitted from threads (``submit``, blocking) and from asyncio
(``await asubmit``), waits at most ``window_ms`` after the first item of a batch or until
``max_batch`` items are there, calls ``fn`` once on the list in its single worker thread, and
hands every caller its own result. Items that arrive while ``fn`` runs form the next batch, so
under load batches fill without waiting for the window at all.

``fn`` always runs in the one worker thread, so it needs no locking of its own (torch
modules and CUDA streams are happiest used from one thread). If ``fn`` raises, or returns a
list of the wrong length, every caller of that batch gets the exception.

Cost of the machinery (2 busy CPU cores, a no-op fn): a lone ``submit`` with ``window_ms=0``
round-trips in ~22 us; 16 threads push ~47k items/s, asyncio callers ~30k items/s, so it is
negligible next to a model call (the reduced lipsync transformer takes ~100 ms per window on
the same CPU). The window adds at most ``window_ms`` to a lone item's latency, and nothing
under load, when batches fill first. ``benchmarks/batching.py`` measures throughput and
latency against ``max_batch`` on a real model.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["BatchStats", "BatcherClosed", "MicroBatcher"]

T = TypeVar("T")
R = TypeVar("R")


class BatcherClosed(RuntimeError):
    """``submit`` after ``close``."""


@dataclass(frozen=True)
class BatchStats:
    batches: int  # calls of fn
    items: int  # items those calls were given
    errors: int  # calls of fn that raised (or returned the wrong number of results)
    max_size: int  # largest batch run
    cancelled: int  # items dropped because their caller had given up before the batch ran

    @property
    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0


class MicroBatcher(Generic[T, R]):
    """Run ``fn(list[T]) -> list[R]`` on batches of concurrently submitted items.

    ``fn`` must return one result per item, in order. ``window_ms=0`` never waits: a batch is
    whatever queued up while the previous one ran.
    """

    def __init__(self, fn: Callable[[list[T]], list[R]], max_batch: int = 8,
                 window_ms: float = 5.0, name: str = "batcher") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if window_ms < 0:
            raise ValueError(f"window_ms must be >= 0, got {window_ms}")
        self.fn = fn
        self.max_batch = max_batch
        self.window_s = window_ms / 1000.0
        # (item, future, monotonic arrival time); the window runs from the oldest arrival
        self._queue: deque[tuple[T, Future, float]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._batches = self._items = self._errors = self._max_size = self._cancelled = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- submitting ---------------------------------------------------------------------------

    def submit_future(self, item: T) -> Future:
        """Queue ``item``; the returned ``concurrent.futures.Future`` gets its result.

        Cancelling the future before its batch starts drops the item from the batch."""
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise BatcherClosed("MicroBatcher is closed")
            self._queue.append((item, fut, time.monotonic()))
            # The worker only needs waking for the first item (to start the window) and when
            # a batch becomes full; other arrivals would wake it for nothing.
            if len(self._queue) == 1 or len(self._queue) >= self.max_batch:
                self._cond.notify()
        return fut

    def submit(self, item: T, timeout: float | None = None) -> R:
        """Blocking: queue ``item`` and wait for its result (or the batch's exception)."""
        return self.submit_future(item).result(timeout)

    async def asubmit(self, item: T) -> R:
        """From a coroutine: the event loop keeps running while the batch is gathered and run.

        Cancelling the awaiting task drops the item if its batch has not started yet."""
        return await asyncio.wrap_future(self.submit_future(item))

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        """Refuse new items, run everything already queued, then stop the worker thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:  # close() called from inside fn
            self._thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> MicroBatcher[T, R]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> BatchStats:
        with self._cond:
            return BatchStats(self._batches, self._items, self._errors, self._max_size,
                              self._cancelled)

    # -- worker -------------------------------------------------------------------------------

    def _take(self) -> list[tuple[T, Future, float]] | None:
        """The next batch, after its window; None once closed and drained."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._queue[0][2] + self.window_s
            while len(self._queue) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            n = min(self.max_batch, len(self._queue))
            return [self._queue.popleft() for _ in range(n)]

    def _run(self) -> None:
        while (taken := self._take()) is not None:
            # Marks each future running; a caller that cancelled before this point drops out.
            batch = [(item, fut) for item, fut, _ in taken if fut.set_running_or_notify_cancel()]
            dropped = len(taken) - len(batch)
            failed = False
            if batch:
                futures = [fut for _, fut in batch]
                try:
                    results = self.fn([item for item, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(
                            f"batch fn returned {len(results)} results for {len(batch)} items")
                except BaseException as exc:  # delivered to every caller of this batch
                    failed = True
                    for fut in futures:
                        fut.set_exception(exc)
                else:
                    for fut, result in zip(futures, results, strict=True):
                        fut.set_result(result)
            with self._cond:
                self._cancelled += dropped
                if batch:
                    self._batches += 1
                    self._items += len(batch)
                    self._errors += failed
                    self._max_size = max(self._max_size, len(batch))
