"""Metrics and probes for real: a Prometheus server (Debian's `prometheus`) scrapes the running
fleet through a turn and the series are read back through its HTTP query API; a draining worker
reports not ready while it finishes its job."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import soundfile

from core.config import Config
from parley.client import say
from parley.redis_server import free_port
from schemas.streams import STAGES, Job, Keys
from tests.conftest import speech
from tests.integration.test_runtime import ToyStage
from workers.runtime import Worker

pytestmark = pytest.mark.slow


def get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def prometheus(fleet, tmp_path):
    """Prometheus on a free port with its own data dir, scraping every fleet process each
    second. Yields its base URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (Debian: apt-get install prometheus; "
                    "scripts/bootstrap.sh does it for the dev extra)")
    targets = [f"127.0.0.1:{p}" for p in fleet.metrics_ports().values()]
    assert len(targets) == 1 + len(STAGES), fleet.metrics_ports()
    cfg = tmp_path / "prometheus.yml"
    # JSON is YAML: no YAML writer needed
    cfg.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms",
                   "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "parley",
                            "static_configs": [{"targets": targets}]}],
    }))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [binary, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if get(f"{base}/-/ready")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            time.sleep(0.1)
        else:
            raise AssertionError("prometheus not ready in 30 s")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def query(base: str, promql: str) -> list[dict]:
    status, body = get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    data = json.loads(body)
    assert status == 200 and data["status"] == "success", body
    return data["data"]["result"]


def value(base: str, promql: str) -> float:
    res = query(base, promql)
    return sum(float(r["value"][1]) for r in res) if res else float("nan")


async def until(base: str, promql: str, ok, timeout: float = 15.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        v = await asyncio.to_thread(value, base, promql)
        if ok(v) or time.monotonic() > deadline:
            return v
        await asyncio.sleep(0.5)


async def test_prometheus_scrapes_the_fleet_through_a_turn(fleet, gateway_url, prometheus,
                                                          tmp_path):
    base = prometheus
    # every process is up as a target before the turn
    n = 1 + len(STAGES)
    assert await until(base, "sum(up)", lambda v: v == n) == n
    done_before = await asyncio.to_thread(value, base, 'sum(parley_turns_total{outcome="done"})')
    done_before = 0.0 if done_before != done_before else done_before  # NaN: no turn yet

    question = tmp_path / "question.wav"  # short: the turn, not the speech, is under test
    soundfile.write(question, speech("Who guards the gate tonight?", 16000), 16000)
    result = await say(gateway_url, question, tmp_path, npc="guard", realtime=False)
    assert result.done is not None and not result.errors, result.errors

    assert await until(base, 'sum(parley_turns_total{outcome="done"})',
                       lambda v: v >= done_before + 1) >= done_before + 1
    # the waterfall of the turn, each point from the end of speech
    for point in ("final_transcript", "first_token", "first_tts_chunk", "first_face",
                  "first_audio"):
        count = await until(base, f'parley_turn_latency_seconds_count{{point="{point}"}}',
                            lambda v: v >= 1)
        assert count >= 1, point
    p50 = await asyncio.to_thread(value, base, 'histogram_quantile(0.5, sum by (le) '
                                  '(parley_turn_latency_seconds_bucket{point="first_audio"}))')
    # gross bound: this machine is shared
    assert 0 < p50 <= 30, p50
    # every stage did its job, and reports its queue and what it holds
    for stage in STAGES:
        jobs = await until(base, f'sum(parley_jobs_total{{stage="{stage}",outcome="done"}})',
                           lambda v: v >= 1)
        assert jobs >= 1, stage
        for series in ("parley_queue_lag", "parley_queue_pending", "parley_jobs_in_flight",
                       "parley_input_lag_seconds"):
            got = await asyncio.to_thread(query, base, f'{series}{{stage="{stage}"}}')
            assert len(got) == 1, (series, stage, got)
        assert await asyncio.to_thread(value, base, f'parley_queue_lag{{stage="{stage}"}}') == 0
    states = {r["metric"]["state"] for r in await asyncio.to_thread(query, base,
                                                                    "parley_sessions")}
    assert states == {"open", "talking", "detached"}
    # the client left without `close`: its session is detached and counted so
    assert await until(base, 'parley_sessions{state="detached"}', lambda v: v >= 1) >= 1


async def test_draining_worker_reports_not_ready_and_a_wedged_one_not_alive(redis_server):
    cfg = Config.load(env={"PARLEY_REDIS_URL": redis_server.url.rsplit("/", 1)[0] + "/2",
                           "PARLEY_METRICS_PORT": str(free_port())})
    cfg.worker.block_ms = 200
    cfg.worker.drain_timeout_s = 5.0
    base = f"http://127.0.0.1:{cfg.metrics.port}"
    w = Worker(ToyStage(cfg), cfg, consumer="toy-drain")
    task = asyncio.create_task(w.run())
    try:
        async def status(path: str) -> tuple[int, str]:
            return await asyncio.to_thread(get, base + path)

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if (await status("/readyz"))[0] == 200:
                    break
            except OSError:
                pass
            await asyncio.sleep(0.05)
        assert (await status("/readyz"))[0] == 200
        # a loop that runs nothing past the threshold is wedged: liveness says so
        w.observer.stall_s = 0.3
        seen: list[int] = []
        probe = threading.Thread(target=lambda: (time.sleep(0.6),
                                                 seen.append(get(base + "/healthz")[0])))
        probe.start()
        time.sleep(1.0)  # holds this event loop, the worker's
        probe.join()
        assert seen == [503]
        w.observer.stall_s = 300.0
        await asyncio.sleep(1.1)
        assert (await status("/healthz"))[0] == 200
        await w.redis.xadd(Keys().jobs("toy"), Job(stage="toy", sid="s-drain", turn=1,
                                                   text="3").to_fields())
        deadline = time.monotonic() + 5
        while not w.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert w.inflight, "the worker took the job"
        w.request_stop()  # what SIGTERM does
        code, body = await status("/readyz")
        assert code == 503 and "draining" in body
        assert (await status("/healthz"))[0] == 200, "draining is alive"
        assert w.inflight, "still finishing its job"
        await asyncio.wait_for(task, 10)
    finally:
        w.request_stop()
        await asyncio.gather(task, return_exceptions=True)
    with pytest.raises(OSError):
        get(base + "/healthz", timeout=0.5)
