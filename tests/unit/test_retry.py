"""The one backoff every Redis-facing loop uses."""

from core.retry import FIRST_S, Backoff, retrying


async def test_backoff_doubles_to_its_cap_and_resets():
    b = Backoff(cap_s=0.2)
    waits = [await b.wait() for _ in range(4)]
    assert waits == [FIRST_S, 0.1, 0.2, 0.2]
    b.reset()
    assert b.delay == FIRST_S


async def test_retrying_waits_out_a_connection_error():
    from redis.exceptions import ConnectionError

    calls = []

    async def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("Redis is restarting")
        return "up"

    class Log:
        def __init__(self):
            self.events = []

        def warning(self, event, **kw):
            self.events.append((event, kw["during"]))

    log = Log()
    assert await retrying(flaky, log, "test", cap_s=0.1) == "up"
    assert log.events == [("redis_unavailable", "test")] * 2
