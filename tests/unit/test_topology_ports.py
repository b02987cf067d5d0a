"""A Redis node whose port was taken after it was picked says so (PortTaken), so that a
topology start tries again on fresh ports instead of failing the run."""

from __future__ import annotations

import socket

import pytest

from parley import topology as T


def test_a_node_on_a_taken_port_raises_port_taken(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        node = T._Proc(port, tmp_path, T._server_args(T._binary(), port, tmp_path))
        with pytest.raises(T.PortTaken, match="Address already in use"):
            node.start()
        node.stop()
