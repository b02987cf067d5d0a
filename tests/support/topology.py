"""The Redis topologies the tests run on (parley/topology.py starts them; the benchmarks use
the same code): ``PARLEY_TEST_TOPOLOGY`` selects the one under the shared fleet."""

from __future__ import annotations

import os

from parley import topology as _topology
from parley.topology import (  # noqa: F401 - the tests name them through this module
    NODE_TIMEOUT_MS,
    TOPOLOGIES,
    ClusterTopology,
    SentinelTopology,
    SingleTopology,
    writable_after,
)


def selected() -> str:
    """PARLEY_TEST_TOPOLOGY: single (default), cluster or sentinel."""
    kind = os.environ.get("PARLEY_TEST_TOPOLOGY", "single").strip().lower() or "single"
    if kind not in TOPOLOGIES:
        raise ValueError(f"PARLEY_TEST_TOPOLOGY must be one of {sorted(TOPOLOGIES)}, "
                         f"not {kind!r}")
    return kind


def start(kind: str | None = None):
    return _topology.start(kind or selected())
