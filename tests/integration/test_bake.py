"""`parley bake` end to end: real redis-server, real rq bake workers as processes, kill -9."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import soundfile as sf
from rq import Queue
from rq.job import Job

from parley.export import LIVE_LINK_CSV_COLUMNS
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

NPCS = ["guard", "merchant", "innkeeper", "wizard"]
WORDS = ["Halt there.", "The gate opens at dawn.", "Fine wares for a fine traveller.",
         "Rooms are two silver a night.", "The stars are wrong tonight.",
         "Wolves on the north road, friend."]


def _env(url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ, PARLEY_REDIS_URL=url, PARLEY_LOG_LEVEL="warning",
               PARLEY_BAKE_LIVENESS_MS="200", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def _parley(*args: str) -> list[str]:
    return [sys.executable, "-m", "parley", *args]


@pytest.fixture
def bake_url(redis_server) -> str:
    url = redis_server.url.rsplit("/", 1)[0] + "/3"
    redis.Redis.from_url(url).flushdb()
    return url


def _write_lines(path: Path, n: int) -> list[str]:
    ids = []
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["npc", "line", "id"])
        for i in range(n):
            lid = f"line-{i:02d}" if i % 3 else ""  # every third id left to bake to choose
            w.writerow([NPCS[i % len(NPCS)], f"{WORDS[i % len(WORDS)]} Number {i}.", lid])
            ids.append(lid)
    return ids


def _check_pair(wav: Path) -> None:
    info = sf.info(str(wav))
    assert info.format == "WAV" and info.subtype == "PCM_16" and info.channels == 1
    assert info.samplerate > 0 and info.frames > info.samplerate // 4
    with open(wav.with_suffix(".csv"), newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["Timecode", "BlendShapeCount", *LIVE_LINK_CSV_COLUMNS]
    assert len(rows[0]) == 63
    frames = len(rows) - 1
    assert abs(frames - math.ceil(info.frames * 60 / info.samplerate)) <= 1, (wav, frames)
    assert all(r[1] == "61" and len(r) == 63 for r in rows[1:])


def test_bake_survives_a_killed_worker_and_resumes(bake_url, tmp_path):
    lines, out = tmp_path / "lines.csv", tmp_path / "out"
    _write_lines(lines, 30)
    env = _env(bake_url)
    workers = [subprocess.Popen(_parley("bake-worker"), env=env) for _ in range(2)]
    try:
        driver = subprocess.Popen(_parley("bake", str(lines), "--out", str(out)), env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # kill -9 the first worker while it renders a line (its job is in rq's started registry)
        r = redis.Redis.from_url(bake_url)
        started = Queue("parley-bake", connection=r).started_job_registry
        victim = workers[0]
        deadline = time.monotonic() + 60
        killed_job = None
        while time.monotonic() < deadline and killed_job is None:
            done = len(list(out.glob("*.json"))) if out.exists() else 0
            for jid in started.get_job_ids(cleanup=False) if done >= 3 else []:
                job = Job.fetch(jid, connection=r)
                if f":{victim.pid}:" in (job.worker_name or ""):
                    victim.send_signal(signal.SIGKILL)
                    killed_job = jid
                    break
            time.sleep(0.01)
        assert killed_job, "never saw the victim worker rendering a line"
        victim.wait(5)
        stdout, stderr = driver.communicate(timeout=90)
        assert driver.returncode == 0, stdout + stderr
        assert "30 line(s) baked" in stdout and "0 failed" in stdout, stdout
        assert "bake [" in stderr  # the progress bar
        # the line that was being rendered was run again (rq's retry after abandonment)
        assert Job.fetch(killed_job, connection=r).get_status() == "finished"
        wavs = sorted(out.glob("*.wav"))
        assert len(wavs) == 30 and len(list(out.glob("*.json"))) == 30
        assert not list(out.glob(".*")), "a temporary file was left behind"
        for wav in wavs:
            _check_pair(wav)
        mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

        again = subprocess.run(_parley("bake", str(lines), "--out", str(out)), env=env,
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr
        assert "all 30 lines are already baked" in again.stdout
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
        # a line whose outputs were damaged is baked again, and only that one
        victim_wav = wavs[5]
        victim_wav.write_bytes(victim_wav.read_bytes()[:1000])
        third = subprocess.run(_parley("bake", str(lines), "--out", str(out)), env=env,
                               capture_output=True, text=True, timeout=60)
        assert third.returncode == 0, third.stdout + third.stderr
        assert "1 line(s) baked" in third.stdout and "29 already baked" in third.stdout
        _check_pair(victim_wav)
    finally:
        for w in workers:
            if w.poll() is None:
                w.terminate()
        codes = [w.wait(15) for w in workers]
    assert codes[1] == 0, "the surviving worker did not stop cleanly on SIGTERM"


def test_a_failing_line_is_retried_and_reported(bake_url, tmp_path):
    lines, out = tmp_path / "lines.csv", tmp_path / "out"
    lines.write_text("npc,line,id\nguard,Halt there.,ok-1\n"
                     "merchant,This price is unspeakable.,bad\nwizard,The stars are wrong.,ok-2\n")
    env = _env(bake_url, PARLEY_TTS_BACKENDS="tests.failing_backends:RefusingWord",
               PARLEY_BAKE_RETRIES="2")
    run = subprocess.run(_parley("bake", str(lines), "--out", str(out), "--workers", "1"),
                         env=env, capture_output=True, text=True, timeout=90)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "2 line(s) baked" in run.stdout and "1 failed" in run.stdout, run.stdout
    failed = [ln for ln in run.stdout.splitlines() if "FAILED" in ln]
    assert len(failed) == 1 and "FAILED bad (row 3, merchant) after 3 attempt(s)" in failed[0]
    assert "InjectedFailure: refusing to speak 'unspeakable'" in failed[0], failed[0]
    assert sorted(p.name for p in out.glob("*.wav")) == ["ok-1.wav", "ok-2.wav"]


def test_cluster_url_without_bake_redis_is_a_clear_error(tmp_path):
    lines = tmp_path / "lines.csv"
    lines.write_text("npc,line\nguard,Halt.\n")
    env = _env("redis+cluster://127.0.0.1:7000")
    run = subprocess.run(_parley("bake", str(lines), "--out", str(tmp_path / "out")), env=env,
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert "Redis Cluster" in run.stderr and "bake.redis_url" in run.stderr
    assert "PARLEY_BAKE_REDIS_URL" in run.stderr
    assert "Traceback" not in run.stderr
    worker = subprocess.run(_parley("bake-worker", "--burst"), env=env, capture_output=True,
                            text=True, timeout=30)
    assert worker.returncode == 2 and "bake.redis_url" in worker.stderr


def test_parley_up_runs_bake_workers_beside_the_fleet(redis_server, tmp_path):
    from parley.fleet import Fleet
    from parley.redis_server import free_port
    from parley.status import fleet_status
    from tests.conftest import FLEET_ENV

    url = redis_server.url.rsplit("/", 1)[0] + "/4"
    redis.Redis.from_url(url).flushdb()
    fleet = Fleet(port=free_port(), workers=1, redis_url=url, bake_workers=1,
                  log_path=str(tmp_path / "fleet.log"), env=FLEET_ENV)
    fleet.start()
    try:
        fleet.wait_ready(60)  # the bake worker too: it registers like the stage workers
        assert "bake-1" in fleet.pids()
        bakers = [w for w in fleet_status(url)["workers"] if w["stage"] == "bake"]
        assert [w["pid"] for w in bakers] == [fleet.pids()["bake-1"]]
        lines = tmp_path / "lines.csv"
        lines.write_text("npc,line,id\nguard,Halt there.,a\nwizard,The stars are wrong.,b\n")
        run = subprocess.run(_parley("bake", str(lines), "--out", str(tmp_path / "out")),
                             env=_env(url), capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "2 line(s) baked" in run.stdout
        for wav in (tmp_path / "out").glob("*.wav"):
            _check_pair(wav)
    finally:
        codes = fleet.stop()
    assert codes["bake-1"] == 0, (tmp_path / "fleet.log").read_text()[-3000:]


def test_bake_waits_while_the_fleet_makes_a_reply(redis_server):
    """The yield signal, read from the registry and job streams the live workers keep."""
    import json

    from schemas.streams import Keys
    from workers.bake.worker import LiveLoad

    url = redis_server.url.rsplit("/", 1)[0] + "/5"
    r = redis.Redis.from_url(url)
    r.flushdb()
    keys = Keys("parley")
    live = LiveLoad(r, keys, stt_lag_ms=200)
    assert live.busy() == ""

    def worker(stage: str, jobs: list, lag_ms: float = 0.0) -> None:
        name = f"{stage}@test:1:x"
        r.zadd(keys.workers(stage), {name: time.time() * 1000})
        r.hset(keys.worker(name), mapping={"jobs": json.dumps(jobs), "lag_ms": lag_ms})

    worker("stt", [{"job": "1-0"}], lag_ms=50)  # a player speaking: STT keeps up
    worker("llm", [])
    assert live.busy() == ""
    worker("stt", [{"job": "1-0"}], lag_ms=900)
    assert live.busy() == "stt: 900 ms behind"
    worker("stt", [], lag_ms=0)
    worker("tts", [{"job": "2-0"}])
    assert live.busy() == "tts: a reply is being made"
    worker("tts", [])
    # a job nobody has picked up yet
    r.xgroup_create(keys.jobs("lipsync"), keys.group("lipsync"), id="0", mkstream=True)
    r.xadd(keys.jobs("lipsync"), {"sid": "s"})
    assert live.busy() == "lipsync: 1 job(s) queued"
    r.xreadgroup(keys.group("lipsync"), "c", {keys.jobs("lipsync"): ">"})
    assert live.busy() == ""
    r.delete(keys.worker("tts@test:1:x"))  # a worker that is gone counts for nothing
    assert live.busy() == ""
    worker("stt", [{"job": "1-0"}], lag_ms=50)
    assert live.busy() == ""
    assert LiveLoad(r, keys, 200, speech=True).busy() == "stt: a player is speaking"
