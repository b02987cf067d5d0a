"""Every Prometheus series Parley exports, defined once, and the HTTP endpoint that serves them.

Each process (the gateway, every worker) serves ``/metrics``, ``/healthz`` and ``/readyz`` on
``metrics.port`` (0: off). The gateway and the workers only count and time through the objects
below; the names here are what the Grafana dashboard (deploy/grafana-dashboard.json), the docs
and the tests check against, so a series is added here or nowhere.

The endpoint runs in its own thread, not on the event loop: a probe must be answered while the
loop is busy with model work (busy is not dead), and a scrape must not add to a turn's latency.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Seconds from the end of the player's speech; a turn's answer is heard in 0.3 to 3 s.
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# ---------------------------------------------------------------- gateway
SESSIONS = Gauge("parley_sessions",
                 "NPC sessions: open (attached to this gateway), talking (a turn under way), "
                 "detached (fleet-wide: client gone, resumable)", ["state"])
TURNS = Counter("parley_turns", "Turns that ended, by outcome (done, interrupted, failed)",
                ["outcome"])
# The waterfall of one turn, each point from the end of the player's speech (the `eos` mark).
TURN_LATENCY = Histogram("parley_turn_latency_seconds",
                         "Time from the end of the player's speech to each stage's first output",
                         ["point"], buckets=LATENCY_BUCKETS)
ERRORS = Counter("parley_errors", "Error events sent to clients, by code", ["code"])
CONNECTIONS = Gauge("parley_connections", "WebSocket connections open on this gateway")
TURN_REISSUES = Counter("parley_turn_reissues", "Jobs the per-turn watchdog re-issued: a stage's "
                        "output stopped short with no job of the turn left (a failover lost "
                        "its last writes)", ["stage"])

# The turn's timing marks (Redis hash `timing`) each latency point is read from.
LATENCY_POINTS = {
    "final_transcript": "final_transcript",
    "first_token": "first_token",
    "first_tts_chunk": "tts_first_chunk",
    "first_face": "first_face",
    "first_audio": "gw_first_audio",
}

# ---------------------------------------------------------------- workers
JOBS_IN_FLIGHT = Gauge("parley_jobs_in_flight", "Jobs this worker holds now", ["stage"])
JOBS = Counter("parley_jobs", "Jobs that left this worker, by outcome (done, failed, "
               "handed_back, interrupted, superseded, gone, redis_lost; speculative_*: "
               "speculative jobs)", ["stage", "outcome"])
JOB_SECONDS = Histogram("parley_job_seconds", "Time a job spent in this worker", ["stage"],
                        buckets=JOB_BUCKETS)
QUEUE_LAG = Gauge("parley_queue_lag", "Jobs in the stage's stream not yet delivered to any "
                  "worker (consumer-group lag)", ["stage"])
QUEUE_PENDING = Gauge("parley_queue_pending", "Jobs delivered and not yet acked", ["stage"])
INPUT_LAG = Gauge("parley_input_lag_seconds", "How far behind real time this worker's input "
                  "is (the most behind of its jobs)", ["stage"])
TAKEOVERS = Counter("parley_takeovers", "Jobs taken over from a worker that was gone or "
                    "stalled", ["stage", "reason"])
DEAD_LETTERS = Counter("parley_dead_letters", "Jobs sent to the dead-letter stream", ["stage"])
BACKEND_FAILURES = Counter("parley_backend_failures", "Backend calls that failed or stalled",
                           ["stage", "backend"])
BACKEND_FALLBACKS = Counter("parley_backend_fallbacks", "Outputs continued by the next backend "
                            "of the fallback chain", ["stage", "failed", "to"])

SPECULATIONS = Counter("parley_speculations", "Replies started early at a likely end of turn "
                       "(stt: started, adopted, cancelled) and adoptions that had to run the "
                       "model after all (llm, tts: abandoned)", ["stage", "outcome"])


ALL = (SESSIONS, TURNS, TURN_LATENCY, ERRORS, CONNECTIONS, TURN_REISSUES, JOBS_IN_FLIGHT, JOBS,
       JOB_SECONDS, QUEUE_LAG, QUEUE_PENDING, INPUT_LAG, TAKEOVERS, DEAD_LETTERS, BACKEND_FAILURES,
       BACKEND_FALLBACKS, SPECULATIONS)


def families() -> dict[str, str]:
    """name -> type of every metric family Parley exports."""
    return {f.name: f.type for m in ALL for f in m.describe()}


def series_names() -> set[str]:
    """Every sample name Parley exports (with the _total, _bucket, ... suffixes)."""
    names = set()
    for metric in ALL:
        for family in metric.describe():
            base = family.name
            if family.type == "counter":
                names |= {base + "_total", base + "_created"}
            elif family.type == "histogram":
                names |= {base + s for s in ("_bucket", "_count", "_sum", "_created")}
            else:
                names.add(base)
    return names


def observe_turn(timings: dict[str, float]) -> None:
    """The latency points of one finished turn, from its timing marks (ms since the epoch)."""
    eos = timings.get("eos")
    if not eos:
        return
    for point, mark in LATENCY_POINTS.items():
        at = timings.get(mark)
        if at and at >= eos:
            TURN_LATENCY.labels(point).observe((at - eos) / 1000.0)


def backend_failed(stage: str, backend: str, to: str) -> None:
    """A backend of ``stage``'s chain failed; ``to`` ("" when none is left) continues."""
    BACKEND_FAILURES.labels(stage, backend).inc()
    if to:
        BACKEND_FALLBACKS.labels(stage, backend, to).inc()


# ---------------------------------------------------------------- probes and the endpoint

@dataclass
class Probe:
    """What /healthz and /readyz answer. ``ready`` says why not ready ("" when ready)."""

    ready: Callable[[], str] = lambda: ""
    alive: Callable[[], str] = lambda: ""


def respond(path: str, probe: Probe,
            registry: CollectorRegistry = REGISTRY) -> tuple[int, str, bytes]:
    """(status, content type, body) for a GET of ``path``: the endpoint without its I/O."""
    route = path.split("?", 1)[0].rstrip("/") or "/"
    if route == "/metrics":
        return 200, CONTENT_TYPE_LATEST, generate_latest(registry)
    if route in ("/healthz", "/readyz"):
        check = probe.alive if route == "/healthz" else probe.ready
        try:
            why = check()
        except Exception as exc:  # a failing check is an answer, not a crashed endpoint
            why = f"check failed: {type(exc).__name__}: {exc}"
        if why:
            return 503, "text/plain; charset=utf-8", f"not ok: {why}\n".encode()
        return 200, "text/plain; charset=utf-8", b"ok\n"
    return 404, "text/plain; charset=utf-8", b"not found: /metrics, /healthz, /readyz\n"


class MetricsServer:
    """``/metrics``, ``/healthz``, ``/readyz`` on one port, in a daemon thread."""

    def __init__(self, host: str, port: int, probe: Probe):
        self.probe = probe
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # http.server calls it by this name
                status, ctype, body = respond(self.path, outer.probe)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes every few seconds: not worth a log line
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics",
                                       daemon=True)

    def start(self) -> MetricsServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve(config, probe: Probe, log) -> MetricsServer | None:
    """The endpoint on ``metrics.host:metrics.port``, or None when off (port 0) or the port is
    taken: metrics are worth a warning, never a process that does not start."""
    m = config.metrics
    if not m.port:
        return None
    try:
        server = MetricsServer(m.host, m.port, probe).start()
    except OSError as exc:
        log.warning("metrics_unavailable", host=m.host, port=m.port, error=str(exc))
        return None
    log.info("metrics_listening", host=m.host, port=server.port)
    return server
