"""The fleet the tests run: the same `parley` processes a user runs, on a Redis of the test's."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from parley.fleet import Fleet
from parley.redis_server import free_port

# Fast takeover and short VAD tails keep the suite quick; production defaults are in config.py.
FLEET_ENV = {
    "PARLEY_WORKER_CLAIM_IDLE_MS": "1000",
    "PARLEY_WORKER_HEARTBEAT_MS": "200",
    "PARLEY_GATEWAY_ADMISSION_POLL_S": "0.2",
    "PARLEY_LOG_LEVEL": "warning",
}


def log_tail(path: Path | str, n: int = 4000) -> str:
    path = Path(path)
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@contextmanager
def running_fleet(redis_url: str | None, log_path: Path | str, workers: int | str = 1,
                  env: dict[str, str] | None = None, ready_s: float = 60.0,
                  clean_exit: bool = True, fleet_cls: type[Fleet] = Fleet,
                  **kwargs) -> Iterator[Fleet]:
    """A started, ready fleet (FLEET_ENV plus ``env``); stopped on exit, and with
    ``clean_exit`` every process must have exited 0. A fleet that does not come up fails with
    the log's tail, which says which process did not, and why. After it, ``fleet.exit_codes``
    holds each process's exit code. ``fleet_cls``: a Fleet of the test's (e.g. one that runs a
    stage's workers with a failure injection)."""
    fleet = fleet_cls(port=free_port(), workers=workers, redis_url=redis_url,
                  log_path=str(log_path), env={**FLEET_ENV, **(env or {})}, **kwargs)
    fleet.start()
    try:
        try:
            fleet.wait_ready(ready_s)
        except Exception as exc:
            raise AssertionError(f"fleet not ready: {exc}\n{log_tail(log_path)}") from exc
        yield fleet
    finally:
        codes = fleet.exit_codes = fleet.stop()
    bad = {k: v for k, v in codes.items() if v != 0}
    assert not clean_exit or not bad, (
        f"fleet processes exited uncleanly: {bad}\n{log_tail(log_path, 3000)}")
