"""Admission policy (pure): when new sessions are refused, and why."""

from gateway.admission import Admission, StageLoad, decide
from schemas.streams import STAGES


def healthy(**stt) -> dict[str, StageLoad]:
    loads = {s: StageLoad(workers=1, slots=32) for s in STAGES}
    for k, v in stt.items():
        setattr(loads["stt"], k, v)
    return loads


def test_a_fleet_that_keeps_up_admits():
    assert decide(healthy(lag_ms=200), 1000, 1000).admit


def test_stt_behind_real_time_refuses_with_a_retry_hint():
    v = decide(healthy(lag_ms=1500), 1000, 1000)
    assert not v.admit and "behind real time" in v.reason and v.retry_after_ms == 3000


def test_a_waiting_queue_refuses():
    loads = healthy()
    loads["tts"].oldest_queued_ms = 2500
    assert "tts jobs wait" in decide(loads, 1000, 1000).reason


def test_limits_of_zero_are_off():
    loads = healthy(lag_ms=10_000, oldest_queued_ms=10_000)
    assert decide(loads, 0, 0).admit


def test_one_bad_poll_is_not_enough_to_refuse_and_one_good_poll_admits():
    a = Admission(1000, 1000)
    assert a.update(healthy(lag_ms=5000)).admit  # a burst of uploaded audio
    assert not a.update(healthy(lag_ms=5000)).admit
    assert a.update(healthy(lag_ms=0)).admit
