"""The `parley` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

from core.config import Config

SAMPLE = Path(__file__).resolve().parent / "samples" / "jfk.flac"


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # output piped into `head` and the like: the reader has what it wanted. Point stdout at
        # /dev/null so the interpreter's final flush does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def build_parser() -> argparse.ArgumentParser:
    """Every command and its options (deploy tests check the deploy files' commands with it)."""
    ap = argparse.ArgumentParser(prog="parley", description="Talking NPCs for Unreal Engine.")
    ap.add_argument("--config", help="TOML config file (also PARLEY_CONFIG)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="Redis (own, unless PARLEY_REDIS_URL), gateway, workers")
    _fleet_args(up)
    up.add_argument("--ready-timeout", type=float, default=120.0, metavar="S",
                    help="seconds every process gets to load its models and register "
                         "(a process that exits at start is reported at once)")

    gw = sub.add_parser("gateway", help="run one gateway process")
    gw.add_argument("--host")
    gw.add_argument("--port", type=int)

    wk = sub.add_parser("worker", help="run one worker process")
    wk.add_argument("stage", choices=["stt", "llm", "tts", "lipsync"])

    sy = sub.add_parser("say", help="the reference client: one turn from a sound file")
    sy.add_argument("--url", default="ws://127.0.0.1:8765")
    sy.add_argument("--wav", required=True, help="any file soundfile reads (wav, flac, ...)")
    sy.add_argument("--out", required=True, help="writes reply.wav, face.csv, turn.json here")
    sy.add_argument("--npc", default="guard")
    sy.add_argument("--fast", action="store_true", help="send the file unpaced")
    sy.add_argument("--token", default=os.environ.get("PARLEY_GATEWAY_AUTH_TOKEN"))
    sy.add_argument("--token-name", default=os.environ.get("PARLEY_TOKEN_NAME"),
                    help="the name of the token in the gateway's configuration (default: "
                         "'default', the one gateway.auth_token sets)")
    sy.add_argument("--timeout", type=float, default=120.0,
                    help="seconds to wait for the reply once the transcript came")
    sy.add_argument("--no-wait", action="store_true",
                    help="leave at turn_done instead of staying until the reply has played")

    st = sub.add_parser("status", help="the live fleet as Redis knows it")
    st.add_argument("--json", action="store_true")

    bk = sub.add_parser("backends", help="every backend per stage: can it load here, and why not")
    bk.add_argument("--json", action="store_true")

    be = sub.add_parser("bench", help="benchmarks: latency, turns, lipsync, chaos, batching, "
                                      "load, bake, echo, failover, player")
    be.add_argument("which", choices=["latency", "turns", "lipsync", "chaos", "batching", "load",
                                      "bake", "echo", "failover", "player"])
    be.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options")

    ex = sub.add_parser("export", help="a stored session's replies as WAV + Live Link Face CSV")
    ex.add_argument("session", help="stored session id (the sid from `opened`)")
    ex.add_argument("turn", nargs="?", type=int)
    ex.add_argument("--out", required=True)

    from parley import replay_cli

    replay_cli.add_parsers(sub)
    bk_ = sub.add_parser("bake", help="pre-render lines (npc,line[,id] CSV) as WAV + Live Link "
                                       "Face CSV + JSON, on rq bake workers")
    bk_.add_argument("lines", help="CSV with a header: npc,line[,id]")
    bk_.add_argument("--out", required=True, help="writes <id>.wav, <id>.csv, <id>.json here")
    bk_.add_argument("--workers", type=int, default=0,
                     help="start this many bake workers for this bake (default: use running ones)")
    bk_.add_argument("--timeout", type=float, default=0.0,
                     help="stop waiting after this many seconds (0: until done)")
    bw = sub.add_parser("bake-worker", help="run one bake worker (rq, low priority)")
    bw.add_argument("--burst", action="store_true", help="exit once the bake queue is empty")

    de = sub.add_parser("demo", help="`up` plus `say` on the bundled sample")
    _fleet_args(de)
    de.add_argument("--out", default="out/demo")
    de.add_argument("--wav", default=str(SAMPLE))
    de.add_argument("--npc", default="guard")

    return ap


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    config = Config.load(args.config)
    if args.cmd == "up":
        return cmd_up(args, config)
    if args.cmd == "gateway":
        return cmd_gateway(args, config)
    if args.cmd == "worker":
        return cmd_worker(args, config)
    if args.cmd == "say":
        return cmd_say(args)
    if args.cmd == "status":
        return cmd_status(args, config)
    if args.cmd == "demo":
        return cmd_demo(args, config)
    if args.cmd == "export":
        return cmd_export(args, config)
    from parley import replay_cli

    if args.cmd in replay_cli.COMMANDS:
        return replay_cli.run(args, config, _status_url(config))
    if args.cmd in ("bake", "bake-worker"):
        from parley.bake import cmd_bake, cmd_bake_worker

        return (cmd_bake(args, config, _status_url(config)) if args.cmd == "bake"
                else cmd_bake_worker(args, config))
    if args.cmd == "backends":
        from parley.backends import cmd_backends

        return cmd_backends(args)
    if args.cmd == "bench":
        import importlib

        module = importlib.import_module(f"benchmarks.{args.which}")
        if args.which == "lipsync":  # takes sentences, not options
            return module.main(args.rest or None) or 0
        return module.main(args.rest) or 0
    return 2


def _fleet_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--workers", type=_workers_arg, default=1,
                   help="worker processes per stage, or auto: sized from this machine's cores "
                        "(STT one per core; LLM, TTS, lipsync one each, +1 per 8 cores)")
    p.add_argument("--livelink", help="HOST:PORT for Live Link Face UDP output")
    p.add_argument("--bake-workers", type=int, default=0,
                   help="bake workers beside the live fleet (low priority; see `parley bake`)")
    p.add_argument("--no-playground", action="store_true",
                   help="do not serve the browser playground on the gateway's port")


def _workers_arg(text: str) -> int | str:
    from parley.fleet import worker_counts

    try:
        worker_counts(text, cores=1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"auto or a number >= 1, not {text!r}") from None
    return "auto" if text.strip().lower() == "auto" else int(text)


def _make_fleet(args, config: Config):
    from parley.fleet import Fleet

    return Fleet(port=args.port, host=args.host, workers=args.workers,
                 redis_url=os.environ.get("PARLEY_REDIS_URL"), config_path=args.config,
                 livelink=args.livelink, bake_workers=args.bake_workers,
                 playground=not args.no_playground)


def _listen_refused(host: str, config: Config) -> str | None:
    """Why the gateway would refuse to listen on ``host`` (no auth beyond loopback), if so."""
    from gateway.access import check_listen

    g = config.gateway
    try:
        check_listen(host, bool(g.tokens or g.auth_token), g.insecure_no_auth)
    except ValueError as exc:
        return str(exc)
    return None


def cmd_up(args, config: Config) -> int:
    if why := _listen_refused(args.host, config):
        print(f"parley up: {why}", file=sys.stderr)
        return 2
    from parley import state as up_state
    from parley.fleet import worker_counts

    fleet = _make_fleet(args, config).start()
    stop = False

    def on_signal(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        try:
            fleet.wait_ready(args.ready_timeout, on_restart=lambda name: print(
                f"parley up: restarted {name}", file=sys.stderr, flush=True))
        except RuntimeError as exc:  # a process that never became ready: say which, stop
            print(f"parley up: {exc}", file=sys.stderr, flush=True)
            return 1
        up_state.write({"redis_url": fleet.redis_url, "prefix": config.redis.prefix,
                        "pid": os.getpid(), "gateway": f"ws://{args.host}:{fleet.port}",
                        "children": fleet.pids(), "metrics_ports": fleet.metrics_ports()})
        counts = ", ".join(f"{stage} {n}" for stage, n in worker_counts(args.workers).items())
        print(f"parley up: gateway ws://{args.host}:{fleet.port}, redis {fleet.redis_url}, "
              f"workers: {counts}. Ctrl-C stops.", flush=True)
        if fleet.playground:
            print(f"parley up: playground http://{args.host}:{fleet.port}/ (open it in a "
                  "browser)", flush=True)
        while not stop:
            for name in fleet.supervise_once():
                print(f"parley up: restarted {name}", file=sys.stderr, flush=True)
            time.sleep(0.2)
    finally:
        codes = fleet.stop()
        up_state.remove()
        bad = {k: v for k, v in codes.items() if v not in (0, -signal.SIGTERM)}
        if bad:
            print(f"parley up: unclean exits: {bad}", file=sys.stderr)
    return 0


def cmd_gateway(args, config: Config) -> int:
    from gateway.server import run_gateway
    from parley.logs import configure

    configure("gateway")
    if why := _listen_refused(args.host or config.gateway.host, config):
        print(f"parley gateway: {why}", file=sys.stderr)
        return 2
    asyncio.run(run_gateway(config, args.host, args.port))
    return 0


def cmd_worker(args, config: Config) -> int:
    from parley.logs import configure
    from workers.runtime import run_worker
    from workers.stages import make_stage

    configure(f"worker-{args.stage}")
    # SIGTERM while a model is still loading: nothing is held yet, so leave cleanly (exit 0);
    # the worker's own handlers (drain, hand back) replace this once it runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    stage = make_stage(args.stage, config)
    asyncio.run(run_worker(stage, config))
    return 0


def cmd_say(args) -> int:
    from parley.client import SayError, say

    try:
        result = asyncio.run(say(args.url, args.wav, args.out, npc=args.npc,
                                 realtime=not args.fast, timeout=args.timeout,
                                 token=args.token, stay=not args.no_wait,
                                 token_name=args.token_name))
    except SayError as exc:
        print(f"parley say: {exc}", file=sys.stderr)
        return 1
    except (TimeoutError, OSError, RuntimeError) as exc:
        print(f"parley say: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    _print_turn(result.summary())
    return 0 if not result.errors else 1


def _print_turn(s: dict) -> None:
    lat = s["latency_ms"]
    print(f"transcript : {s['transcript']}")
    print(f"reply      : {s['reply']}")
    print(f"audio      : {s['reply_audio_s']} s, {s['face_frames']} face frames")
    print(f"latency    : first audio {lat['first_audio']} ms after the last mic chunk, "
          f"first face {lat['first_face']} ms after ready, "
          f"final transcript {lat['final_transcript']} ms")
    print(f"sequence   : {s['seq_gaps']} gaps, {s['seq_duplicates']} duplicates")
    if s.get("interrupted"):
        print(f"played     : interrupted after {s['played_samples']} samples")
    elif s.get("stayed_after_turn_done_s"):
        print(f"played     : stayed {s['stayed_after_turn_done_s']} s after turn_done while "
              "the reply played")
    for e in s["errors"]:
        print(f"error      : {e.get('code')}: {e.get('message')}")


def _status_url(config: Config) -> str:
    """PARLEY_REDIS_URL (or the config file's) when given, else the fleet `parley up` started."""
    from core.config import RedisConfig
    from parley import state as up_state

    if os.environ.get("PARLEY_REDIS_URL") or config.redis.url != RedisConfig().url:
        return config.redis.url
    up = up_state.read()
    return up["redis_url"] if up else config.redis.url


def cmd_status(args, config: Config) -> int:
    from parley import state as up_state
    from parley.status import fleet_status, render

    url = _status_url(config)
    up = up_state.read()
    try:
        status = fleet_status(url, config.redis.prefix)
    except Exception as exc:  # say what is wrong, not a traceback
        print(f"parley status: cannot read {url}: {exc}", file=sys.stderr)
        return 1
    if up and up.get("redis_url") == url:
        status["up"] = {"pid": up["pid"], "gateway": up.get("gateway"),
                        "metrics_ports": up.get("metrics_ports", {})}
    print(json.dumps(status, indent=2) if args.json else render(status))
    return 0


def cmd_export(args, config: Config) -> int:
    from parley.export import export_turns

    url = _status_url(config)
    try:
        paths = export_turns(url, args.session, args.turn, Path(args.out), config.redis.prefix)
    except (LookupError, ValueError, OSError) as exc:
        print(f"parley export: {exc}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return 0


def cmd_demo(args, config: Config) -> int:
    from parley.client import SayError, say

    fleet = _make_fleet(args, config)
    fleet.log_path = str(Path(args.out) / "fleet.log")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    fleet.start()
    try:
        fleet.wait_ready(60)
        print(f"fleet up on ws://{args.host}:{fleet.port}; speaking {Path(args.wav).name} "
              f"to the {args.npc} in real time...", flush=True)
        result = asyncio.run(say(f"ws://{args.host}:{fleet.port}", args.wav, args.out,
                                 npc=args.npc))
    except SayError as exc:
        print(f"parley demo: {exc}; fleet log: {fleet.log_path}", file=sys.stderr)
        return 1
    finally:
        codes = fleet.stop()
    _print_turn(result.summary())
    print(f"wrote {args.out}/reply.wav, face.csv, turn.json; fleet exit codes {codes}")
    return 0 if not result.errors else 1


if __name__ == "__main__":
    sys.exit(main())
