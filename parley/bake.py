"""`parley bake LINES.csv --out DIR` and `parley bake-worker`: the command-line side of bake.

``bake`` reads and checks the lines, skips those already baked in DIR, enqueues the rest (one
rq job per line), shows a progress bar until every line is baked or has failed for good, and
lists the failures with their reasons. It can start bake workers of its own (``--workers N``);
otherwise the fleet's (``parley up --bake-workers N``) or any ``parley bake-worker`` do the work.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TextIO

from core.config import Config


class Progress:
    """One line on a terminal, redrawn; elsewhere (logs, CI) a line per tenth of the way."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, width: int = 30):
        self.total, self.stream, self.width = max(1, total), stream, width
        self.tty = stream.isatty()
        self.t0 = time.monotonic()
        self.last_tenth = -1

    def update(self, done: int, failed: int, running: int, workers: int) -> None:
        ended = done + failed
        fill = int(self.width * ended / self.total)
        bar = "#" * fill + "." * (self.width - fill)
        rate = done / max(1e-6, time.monotonic() - self.t0)
        eta = f", ~{(self.total - ended) / rate:.0f} s left" if rate > 0 and ended < self.total \
            else ""
        text = (f"bake [{bar}] {ended}/{self.total} lines, {failed} failed, {running} rendering, "
                f"{workers} worker(s), {rate:.2f} lines/s{eta}")
        if self.tty:
            self.stream.write("\r" + text.ljust(110)[:160])
        elif ended * 10 // self.total != self.last_tenth:
            self.last_tenth = ended * 10 // self.total
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _spawn_workers(n: int, config_path: str | None, redis_url: str) -> list[subprocess.Popen]:
    import os

    args = [sys.executable, "-m", "parley"]
    if config_path:
        args += ["--config", config_path]
    env = dict(os.environ, PARLEY_REDIS_URL=redis_url)
    return [subprocess.Popen([*args, "bake-worker"], env=env, stdin=subprocess.DEVNULL)
            for _ in range(n)]


def _stop_workers(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _remove_leftovers(out_dir: Path) -> None:
    """Temporary files of workers that were killed mid-write (``.<name>.<pid>.tmp``)."""
    import os

    for tmp in out_dir.glob(".*.tmp"):
        try:
            pid = int(tmp.name.rsplit(".", 2)[1])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError):
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass  # a live process of another user


def bake(config: Config, fleet_url: str, lines_csv: str, out_dir: str, workers: int = 0,
         config_path: str | None = None, timeout_s: float = 0.0,
         out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """The whole command; returns its exit code (0: every line baked, 1: some failed)."""
    from core.personas import load_personas
    from workers.bake.lines import baked, read_lines
    from workers.bake.queue import BakeQueue, bake_url, sync_connect

    lines = read_lines(lines_csv, set(load_personas(config.personas_dir())))
    url = bake_url(config, fleet_url)
    todo = [ln for ln in lines if not baked(out_dir, ln)]
    skipped = len(lines) - len(todo)
    if not todo:
        print(f"bake: all {len(lines)} lines are already baked in {out_dir}; nothing to do",
              file=out)
        return 0
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    conn = sync_connect(url)
    bq = BakeQueue(conn, config)
    jobs = bq.enqueue(todo, out_dir)
    by_job = {jid: ln for jid, ln in zip(jobs, todo, strict=True)}
    print(f"bake: {len(todo)} line(s) queued on {url}, {skipped} already baked in {out_dir}",
          file=out, flush=True)
    procs = _spawn_workers(workers, config_path, fleet_url) if workers else []
    progress = Progress(len(todo), err)
    t0 = time.monotonic()
    warned = False
    try:
        while True:
            outcomes = bq.outcomes(by_job)
            states = Counter(o.state for o in outcomes)
            n_workers = bq.workers()
            progress.update(states["done"], states["failed"], states["started"], n_workers)
            if states["done"] + states["failed"] == len(outcomes):
                break
            if not n_workers and not warned and time.monotonic() - t0 > 5:
                warned = True
                print("\nbake: no bake worker is running: start `parley bake-worker`, "
                      "`parley up --bake-workers N`, or pass --workers N", file=err, flush=True)
            if timeout_s and time.monotonic() - t0 > timeout_s:
                progress.close()
                print(f"bake: stopped waiting after {timeout_s:.0f} s; queued lines stay "
                      "queued, run the same command again to wait for them", file=err)
                return 1
            bq.reap_abandoned()
            time.sleep(0.2)
    finally:
        progress.close()
        _stop_workers(procs)
        _remove_leftovers(Path(out_dir))
    elapsed = time.monotonic() - t0
    failed = [o for o in outcomes if o.state == "failed"]
    ok = len(outcomes) - len(failed)
    print(f"bake: {ok} line(s) baked in {elapsed:.1f} s ({ok / max(elapsed, 1e-6):.2f} lines/s), "
          f"{skipped} already baked, {len(failed)} failed", file=out)
    for o in failed:
        tries = f" after {o.attempts} attempt(s)" if o.attempts else ""
        print(f"  FAILED {o.line.id} (row {o.line.row}, {o.line.npc}){tries}: {o.reason}",
              file=out)
    return 1 if failed else 0


def cmd_bake(args, config: Config, fleet_url: str) -> int:
    from workers.bake.lines import LinesError
    from workers.bake.queue import BakeConfigError

    try:
        return bake(config, fleet_url, args.lines, args.out, workers=args.workers,
                    config_path=args.config, timeout_s=args.timeout)
    except (LinesError, BakeConfigError, OSError) as exc:
        print(f"parley bake: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # Redis unreachable and the like: say what, not a traceback
        print(f"parley bake: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def cmd_bake_worker(args, config: Config) -> int:
    import signal

    from parley.logs import configure
    from workers.bake.queue import BakeConfigError
    from workers.bake.worker import run_bake_worker

    configure("bake-worker")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # while loading; rq's own after
    try:
        return run_bake_worker(config, burst=args.burst)
    except BakeConfigError as exc:
        print(f"parley bake-worker: {exc}", file=sys.stderr)
        return 2
