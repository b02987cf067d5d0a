"""A stopping gateway does not wait without bound for tasks that ignore their cancellation."""

from __future__ import annotations

import asyncio

from gateway.server import cancel_rest


async def test_cancel_rest_names_the_task_that_swallowed_its_cancellation():
    async def polite():
        await asyncio.sleep(30)

    async def stubborn():  # a failure injection: a call that swallows one cancellation
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(30)

    a = asyncio.create_task(polite(), name="relay:polite")
    b = asyncio.create_task(stubborn(), name="relay:stubborn")
    await asyncio.sleep(0)
    assert await cancel_rest(0.2) == ["relay:stubborn"]
    assert a.cancelled()
    b.cancel()  # the test's own cleanup
    await asyncio.gather(b, return_exceptions=True)
    assert await cancel_rest(0.2) == []


async def test_the_observers_stop_is_bounded_when_a_loop_ignores_its_cancellation():
    """The gateway's first stop step: its metrics loops ask Redis, and one whose call
    swallowed the cancellation once held a SIGTERMed gateway for over an hour."""
    import time

    from core.observe import ProcessObserver

    async def stubborn():  # a failure injection: a Redis call that swallows one cancellation
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(30)

    obs = ProcessObserver(60.0)
    obs._tasks = [asyncio.create_task(stubborn())]
    await asyncio.sleep(0)
    t0 = time.monotonic()
    await obs.stop_tasks(timeout=0.2)
    assert time.monotonic() - t0 < 2.0
    obs._tasks[0].cancel()
    await asyncio.gather(*obs._tasks, return_exceptions=True)
