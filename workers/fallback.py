"""What every stage's fallback chain shares: backend health, background probes, stall timeouts.

A chain (``FallbackReplyModel``, ``FallbackSynthesizer``, ``FallbackFaceMapper``,
``FallbackRecognizer``) is itself a backend of its stage's interface. Within one piece of
output it tries its backends in order; when one raises or stalls, the chain hands the rest of
the output to the next one (how the next one continues is the stage's business) and marks the
failed one unhealthy. Unhealthy backends go to the end of the order and are probed in the
background every ``probe_interval_s`` until a probe succeeds; then they are restored.

The stall timeout applies only while there is another backend to go to: a chain of one
behaves exactly like its backend (a slow model is better than none).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from core import metrics

T = TypeVar("T")


class StallTimeout(TimeoutError):
    """A backend produced nothing for ``stall_timeout_s`` in the middle of its output."""


class NoBackend(RuntimeError):
    """Every backend of the chain failed on this piece of output."""


@dataclass
class Failover:
    """One hand-over: ``first_output_ms`` is the time from the failure to the next backend's
    first output (None while it has produced nothing yet)."""

    failed: str
    to: str
    error: str
    at: float  # time.perf_counter() of the failure
    first_output_ms: float | None = None


class FallbackChain:
    """Backends of one stage in order, with their health. Subclasses add the stage's interface
    and implement :meth:`probe_backend`."""

    stage = ""

    def __init__(self, backends: list, stall_timeout_s: float = 10.0,
                 probe_interval_s: float = 5.0, log=None):
        if not backends:
            raise ValueError(f"{self.stage} fallback chain: no backends")
        self.backends = list(backends)
        self.stall_timeout_s = stall_timeout_s
        self.probe_interval_s = probe_interval_s
        self.log = log or structlog.get_logger().bind(stage=self.stage)
        self.down: dict[int, str] = {}  # index -> why it is unhealthy
        self.failovers: deque[Failover] = deque(maxlen=256)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._probes: dict[int, asyncio.Task] = {}

    @classmethod
    def from_config(cls, backends: list, config, log=None):
        fb = config.fallback
        return cls(backends, stall_timeout_s=fb.stall_timeout_s,
                   probe_interval_s=fb.probe_interval_s, log=log)

    # ------------------------------------------------------------------ order and health

    @property
    def name(self) -> str:
        """The backend that serves the next piece of output."""
        return self.backends[self.order()[0]].name

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.backends]

    def order(self) -> list[int]:
        """Healthy backends in configured order, then the unhealthy ones as a last resort."""
        healthy = [i for i in range(len(self.backends)) if i not in self.down]
        return healthy + [i for i in range(len(self.backends)) if i in self.down]

    def timeout_for(self, remaining: int) -> float | None:
        """The stall timeout while ``remaining`` backends are left to go to, else none."""
        return self.stall_timeout_s if remaining > 0 and self.stall_timeout_s > 0 else None

    def attach(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Probe failed backends on ``loop`` (the worker's); without it they are only
        reordered, never probed."""
        self._loop = loop or asyncio.get_running_loop()

    def failed(self, i: int, exc: BaseException, to: int | None) -> Failover:
        """Backend ``i`` failed mid-output and ``to`` (None: nothing) takes over. Thread-safe:
        the STT and TTS chains call it from worker threads."""
        why = f"{type(exc).__name__}: {exc}"
        nxt = self.backends[to].name if to is not None else ""
        self.log.warning("backend_failed", backend=self.backends[i].name, error=why,
                         fallback=nxt or None)
        event = Failover(failed=self.backends[i].name, to=nxt, error=why,
                         at=time.perf_counter())
        self.failovers.append(event)
        self.down[i] = why
        metrics.backend_failed(self.stage, event.failed, nxt)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._start_probe, i)
        return event

    def first_output(self, event: Failover | None) -> None:
        """The backend that took over produced its first output."""
        if event is not None and event.first_output_ms is None:
            event.first_output_ms = round((time.perf_counter() - event.at) * 1000, 2)
            self.log.info("backend_failover", failed=event.failed, to=event.to,
                          first_output_ms=event.first_output_ms)

    def _start_probe(self, i: int) -> None:
        if i in self._probes and not self._probes[i].done():
            return
        self._probes[i] = asyncio.ensure_future(self._probe_loop(i))

    async def _probe_loop(self, i: int) -> None:
        backend = self.backends[i]
        while i in self.down:
            await asyncio.sleep(self.probe_interval_s)
            try:
                await asyncio.wait_for(self.probe_backend(backend),
                                       max(self.stall_timeout_s, 1.0))
            except Exception as exc:  # still broken: probe again later
                self.log.debug("backend_probe_failed", backend=backend.name, error=str(exc))
                continue
            self.down.pop(i, None)
            self.log.info("backend_restored", backend=backend.name)

    async def probe_backend(self, backend) -> None:
        """One small request that must succeed for ``backend`` to count as healthy again.
        A backend's own ``probe()`` (sync or async) wins over the stage's default."""
        own = getattr(backend, "probe", None)
        if own is None:
            await self.default_probe(backend)
            return
        result = await asyncio.to_thread(own) if not asyncio.iscoroutinefunction(own) \
            else await own()
        if asyncio.iscoroutine(result):
            await result

    async def default_probe(self, backend) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ lifecycle

    async def each(self, method: str) -> None:
        """Call ``method`` (sync or async) on every backend that has it."""
        for backend in self.backends:
            call = getattr(backend, method, None)
            if call is not None:
                result = call()
                if asyncio.iscoroutine(result):
                    await result

    async def aclose(self) -> None:
        for task in self._probes.values():
            task.cancel()
        await asyncio.gather(*self._probes.values(), return_exceptions=True)
        self._probes.clear()


class ThreadCall:
    """Runs blocking backend calls one at a time in a thread of its own, with a timeout: a
    call that stalls is abandoned (its thread with it) and the caller moves on."""

    def __init__(self):
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def __call__(self, fn: Callable[..., T], *args: Any, timeout: float | None) -> T:
        if timeout is None:
            return fn(*args)
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, "backend-call")
        future = self._pool.submit(fn, *args)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            self.abandon()
            raise StallTimeout(f"no answer in {timeout:.1f}s") from None

    def abandon(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
