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
