"""The recording commands: `parley replay`, `record`, `trace` and `forget`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path

from core.config import Config

COMMANDS = ("replay", "record", "trace", "forget")


def add_parsers(sub) -> None:
    rp = sub.add_parser("replay", help="re-run a stored session (or a `record` file) as a new "
                                       "session and compare, turn by turn")
    rp.add_argument("source", help="stored session id (the sid from `opened`), or a file "
                                   "written by `parley record`")
    rp.add_argument("--turn", type=int, action="append",
                    help="report this turn (repeatable); the replay stops after it")
    rp.add_argument("--url", help="replay through this running gateway (default: start a fleet "
                                  "of its own, with its own Redis)")
    rp.add_argument("--redis", help="with --url: that fleet's Redis (default: as `status`)")
    rp.add_argument("--config", dest="replay_config",
                    help="TOML config for the fleet replay starts (swap a backend, a persona)")
    rp.add_argument("--speed", choices=["realtime", "fast"], default="fast",
                    help="realtime: the recorded pauses; fast: no pauses where they cannot "
                         "change the outcome (default)")
    rp.add_argument("--json", action="store_true")
    rp.add_argument("--token", default=os.environ.get("PARLEY_GATEWAY_AUTH_TOKEN"))
    rp.add_argument("--token-name", default=os.environ.get("PARLEY_TOKEN_NAME"))

    rc = sub.add_parser("record", help="a stored session as one portable file for `replay`")
    rc.add_argument("session", help="stored session id")
    rc.add_argument("--out", required=True, help="the file to write (a zip)")

    tr = sub.add_parser("trace", help="each turn's latency waterfall of a stored session")
    tr.add_argument("session", help="stored session id, or a `parley record` file")
    tr.add_argument("turn", nargs="?", type=int)
    tr.add_argument("--json", action="store_true")

    fg = sub.add_parser("forget", help="delete a session's recording and every key of it now")
    fg.add_argument("session", help="stored session id")


def run(args, config: Config, redis_url: str) -> int:
    try:
        if args.cmd == "forget":
            return _forget(args, config, redis_url)
        if args.cmd == "record":
            return _record(args, config, redis_url)
        if args.cmd == "trace":
            return _trace(args, config, redis_url)
        return _replay(args, config, redis_url)
    except (LookupError, ValueError, OSError, TimeoutError, RuntimeError) as exc:
        print(f"parley {args.cmd}: {exc}", file=sys.stderr)
        return 1


async def _with_redis(url: str, fn):
    from core.redisconn import connect

    r = connect(url)
    try:
        return await fn(r)
    finally:
        await r.aclose()


def _load(source: str, config: Config, redis_url: str):
    from parley import recording as R

    if zipfile.is_zipfile(source):
        return R.read_file(source)
    return asyncio.run(_with_redis(redis_url, lambda r: R.load(r, source, config.redis.prefix)))


def _forget(args, config: Config, redis_url: str) -> int:
    from gateway.lifecycle import SessionLifecycle
    from schemas.streams import Keys

    async def go(r):
        return await SessionLifecycle(r, Keys(config.redis.prefix), config).forget(args.session)

    n = asyncio.run(_with_redis(redis_url, go))
    print(f"forgot {args.session}: {n} keys deleted")
    return 0 if n else 1


def _record(args, config: Config, redis_url: str) -> int:
    from parley import recording as R

    rec = _load(args.session, config, redis_url)
    path = R.write_file(rec, args.out)
    mics = sum(1 for e in rec.events if e["kind"] == "mic")
    print(f"wrote {path}: {len(rec.turns)} turns, {len(rec.events)} client events "
          f"({mics} mic chunks, {rec.duration_s:.1f} s), {path.stat().st_size} bytes")
    return 0


def _trace(args, config: Config, redis_url: str) -> int:
    from parley import trace as T

    rec = _load(args.session, config, redis_url)
    turns = [o for t, o in sorted(rec.turns.items()) if args.turn in (None, t)]
    if not turns:
        raise LookupError(f"session {args.session!r} has no turn {args.turn}; "
                          f"stored turns: {sorted(rec.turns)}")
    traces = [T.turn_trace(o) for o in turns]
    print(json.dumps(traces, indent=2) if args.json else T.render(traces), end="" if not
          args.json else "\n")
    return 0


def _replay(args, config: Config, redis_url: str) -> int:
    from parley.replay import render
    from parley.replay_run import replay

    rec = _load(args.source, config, redis_url)
    turns = set(args.turn) if args.turn else None
    fast = args.speed == "fast"
    if args.url:
        target = Config.load(args.replay_config) if args.replay_config else config
        result = asyncio.run(replay(args.url, rec, args.redis or redis_url,
                                    target.redis.prefix, fast=fast, turns=turns,
                                    token=args.token, token_name=args.token_name))
    else:
        result = _replay_on_own_fleet(args, rec, turns, fast)
    if args.json:
        print(json.dumps({"original": rec.sid, "replay": result.sid,
                          **result.report.to_json(), "missed": result.waits}, indent=2))
    else:
        print(f"replay of {rec.sid} ({len(rec.turns)} turns, {rec.duration_s:.1f} s) as "
              f"{result.sid}, speed {args.speed}\n")
        print(render(result.report))
        for w in result.waits:
            print(f"note: {w}")
    return 0 if not result.report.differing else 3


def _replay_on_own_fleet(args, rec, turns, fast):
    from parley.fleet import Fleet
    from parley.redis_server import free_port
    from parley.replay_run import replay

    target = Config.load(args.replay_config)
    log = Path(tempfile.mkdtemp(prefix="parley-replay-")) / "fleet.log"
    # its own Redis (redis_url None), never the recorded session's
    fleet = Fleet(port=free_port(), workers=1, config_path=args.replay_config,
                  log_path=str(log), env={"PARLEY_REDIS_PREFIX": target.redis.prefix})
    fleet.start()
    try:
        fleet.wait_ready(90)
        return asyncio.run(replay(f"ws://127.0.0.1:{fleet.port}", rec, fleet.redis_url,
                                  target.redis.prefix, fast=fast, turns=turns,
                                  token=args.token, token_name=args.token_name))
    finally:
        fleet.stop()


def main_args(argv: list[str]) -> argparse.Namespace:  # for tests
    ap = argparse.ArgumentParser(prog="parley")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_parsers(sub)
    return ap.parse_args(argv)
