"""A worker's proof of life that model work cannot starve.

A decoder that holds the GIL (pocketsphinx does while it decodes) starves the worker's event loop
and every thread in it, so a heartbeat written from there says "busy" and "dead" the same way:
under load, 35 live jobs were taken over and 15 dead-lettered in one run. The proof of life is
therefore written by a small sidecar process: every ``every_ms`` it sets the worker's liveness
key (TTL ``ttl_ms``) while the worker process exists and is not stopped. It deletes the key and
exits as soon as the worker is gone (a kill -9 is seen within one interval), and stops
refreshing while the worker is stopped (SIGSTOP, a frozen container), so such a worker loses its
jobs as a dead one does.

Run as ``python -m workers.liveness URL KEY EVERY_MS TTL_MS PID``; the worker starts and stops it
(:class:`Sidecar`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys


def process_state(pid: int) -> str:
    """The kernel's one-letter state of ``pid`` ("R", "S", "T" stopped, ...); "" when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return ""
    # the command name is in parentheses and may itself hold spaces or parentheses
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool | None:
    """True: running; False: gone (or a zombie awaiting its parent); None: stopped."""
    if os.path.exists("/proc"):
        state = process_state(pid)
        if not state or state in ("Z", "X"):
            return False
        return None if state in ("T", "t") else True
    try:  # no /proc (not Linux): existence only
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


async def _beat(url: str, key: str, every_ms: int, ttl_ms: int, pid: int) -> None:
    from core.redisconn import RETRYABLE, connect

    r = connect(url, max_connections=2)
    try:
        while True:
            state = alive(pid)
            if state is False or os.getppid() != pid:
                break
            if state:
                try:
                    await r.set(key, pid, px=ttl_ms)
                except RETRYABLE:
                    pass  # Redis away: the key lapses, which is the truth seen from Redis
            await asyncio.sleep(every_ms / 1000)
        try:
            await r.delete(key)
        except RETRYABLE:
            pass
    finally:
        await r.aclose()


def main(argv: list[str]) -> int:
    url, key, every_ms, ttl_ms, pid = argv
    # A Ctrl-C or SIGTERM to the process group must not end the proof of life while the worker
    # drains its jobs: the sidecar ends when the worker does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    asyncio.run(_beat(url, key, int(every_ms), int(ttl_ms), int(pid)))
    return 0


class Sidecar:
    """Starts, watches and stops the liveness process of one worker."""

    def __init__(self, url: str, key: str, every_ms: int, ttl_ms: int):
        self.args = [sys.executable, "-m", "workers.liveness", url, key, str(every_ms),
                     str(ttl_ms), str(os.getpid())]
        self.proc: subprocess.Popen | None = None

    def ensure(self) -> bool:
        """Start the sidecar if it is not running; True when it had to be (re)started."""
        if self.proc is not None and self.proc.poll() is None:
            return False
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL,
                                     start_new_session=False)
        return True

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc = None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
