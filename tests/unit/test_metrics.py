"""The metrics endpoint without its I/O (core.metrics.respond) and the turn waterfall."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from core import metrics as M


def test_routes_answer_metrics_and_probes():
    reg = CollectorRegistry()
    Counter("parley_demo", "a test series", registry=reg).inc()
    status, ctype, body = M.respond("/metrics", M.Probe(), reg)
    assert status == 200 and ctype.startswith("text/plain") and b"parley_demo_total 1.0" in body
    assert M.respond("/healthz", M.Probe())[0] == 200
    assert M.respond("/readyz?verbose", M.Probe())[:1] == (200,)
    status, _, body = M.respond("/readyz", M.Probe(ready=lambda: "draining"))
    assert status == 503 and b"draining" in body
    assert M.respond("/nope", M.Probe())[0] == 404


def test_a_failing_check_is_an_answer():
    def boom() -> str:
        raise RuntimeError("no redis")

    status, _, body = M.respond("/healthz", M.Probe(alive=boom))
    assert status == 503 and b"no redis" in body


def test_turn_latency_is_measured_from_the_end_of_speech():
    before = {p: _count(p) for p in M.LATENCY_POINTS}
    M.observe_turn({"eos": 1000.0, "final_transcript": 1200.0, "first_token": 1300.0,
                    "tts_first_chunk": 1400.0, "first_face": 1500.0, "gw_first_audio": 1450.0})
    for p in M.LATENCY_POINTS:
        assert _count(p) == before[p] + 1
    M.observe_turn({"final_transcript": 1200.0})  # no end of speech: nothing to measure from
    assert _count("final_transcript") == before["final_transcript"] + 1


def test_series_names_cover_every_suffix():
    names = M.series_names()
    assert {"parley_turns_total", "parley_turn_latency_seconds_bucket", "parley_queue_lag",
            "parley_sessions", "parley_dead_letters_total"} <= names


def _count(point: str) -> float:
    for family in M.TURN_LATENCY.collect():
        for s in family.samples:
            if s.name.endswith("_count") and s.labels.get("point") == point:
                return s.value
    return 0.0
