"""Shared fixtures: a private redis-server, the fleet as real processes, synthesized speech.

Nothing here mocks Redis or sockets: the tests start their own redis-server on a free port with
its own data directory, and the fleet is the same `parley` processes a user runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks.speech import speech  # noqa: F401
from parley.client import Client
from parley.redis_server import RedisServer

# tests import speech and FLEET_ENV from here
from tests.support.fleet import FLEET_ENV, running_fleet  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent

# A shared 2-core machine can leave STT behind real time for a while after a test that loaded
# it, and the gateway then (rightly) answers `open` with `overloaded`: the tests' clients keep
# asking, as a game would. A test of the refusal itself passes overloaded_wait_s=0.
Client.overloaded_wait_s = 60.0
JFK = ROOT / "parley" / "samples" / "jfk.flac"


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def scratch_url(redis_server) -> str:
    """Database 1 of the test server: tests that flush it never touch the fleet's database 0."""
    return redis_server.url.rsplit("/", 1)[0] + "/1"


@pytest.fixture
async def redis_client(scratch_url):
    from core.redisconn import connect

    r = connect(scratch_url)
    await r.flushdb()
    yield r
    await r.aclose()


@pytest.fixture(scope="session")
def redis_topology(redis_server):
    """The Redis the fleet tests run on: PARLEY_TEST_TOPOLOGY=single (the session's
    redis_server), cluster (3 masters + 3 replicas) or sentinel (primary, replica, 3
    sentinels); see tests/support/topology.py."""
    from tests.support import topology

    if topology.selected() == "single":
        yield redis_server
        return
    topo = topology.start()
    yield topo
    topo.stop()


@pytest.fixture(scope="session")
def fleet(redis_topology, tmp_path_factory):
    log = tmp_path_factory.mktemp("fleet") / "fleet.log"
    with running_fleet(redis_topology.url, log, playground=True) as f:
        yield f


@pytest.fixture(scope="session")
def gateway_url(fleet) -> str:
    return f"ws://127.0.0.1:{fleet.port}"


@pytest.fixture(scope="session")
def jfk_path() -> Path:
    assert JFK.exists(), "the bundled sample is part of the project"
    return JFK


def pytest_collection_modifyitems(items):
    # End-to-end tests last: unit failures show first and fast.
    items.sort(key=lambda it: "integration" in str(it.fspath))


os.environ.setdefault("PARLEY_LOG_LEVEL", "warning")
