"""Real Redis topologies, for the tests and `parley bench failover`: one redis-server, a
Cluster of 3 masters and 3 replicas, and a Sentinel set (1 primary, 1 replica, 3 sentinels), all
redis-server processes on free ports with their own data directories, torn down by ``stop()``.

Failover is made fast on purpose (cluster-node-timeout and down-after-milliseconds of 1 s) so
a kill -9 of a primary is repaired in about 2 to 4 s, as a tuned production set would be.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.cluster import RedisCluster

from parley.redis_server import RedisServer, free_port, terminate

NODE_TIMEOUT_MS = 1000


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class PortTaken(RuntimeError):
    """A node's port was taken between picking it and binding it (free ports are picked from
    the range outgoing connections also draw from): a topology on fresh ports will do."""


class _Proc:
    """One redis-server (or sentinel) process."""

    def __init__(self, port: int, data_dir: Path, args: list[str]):
        self.port, self.data_dir, self.args = port, data_dir, args
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> _Proc:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, cwd=self.data_dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.data_dir / "redis.log"
                text = log.read_text()[-2000:] if log.exists() else ""
                kind = PortTaken if "Address already in use" in text else RuntimeError
                raise kind(f"redis on {self.port} exited at start: {text}")
            if _ping(self.port):
                return self
            time.sleep(0.02)
        raise RuntimeError(f"redis on {self.port} did not answer in {timeout}s")

    def kill(self) -> None:
        """kill -9: no AOF flush, no goodbye to the replicas."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        terminate(self.proc)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _server_args(binary: str, port: int, data_dir: Path, *extra: str) -> list[str]:
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
            "--save", "", "--appendonly", "no", "--protected-mode", "yes",
            "--logfile", str(data_dir / "redis.log"), *extra]


def _binary(name: str = "redis-server") -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found (Debian: apt-get install redis-server redis-tools)")
    return path


class SingleTopology:
    """One redis-server, the default everywhere: same interface as the two below."""

    kind = "single"

    def __init__(self):
        self.server = RedisServer()

    def start(self) -> SingleTopology:
        self.server.start()
        return self

    @property
    def url(self) -> str:
        return self.server.url

    def client(self) -> redis.Redis:
        return redis.from_url(self.url)

    def kill_primary_for(self, key: str) -> None:
        """kill -9 the one server and start it again on its port and data (AOF, fsync every
        second): there is no replica to promote, so this is a restart."""
        proc = self.server.proc
        if proc is not None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            if proc.stderr:
                proc.stderr.close()
        self.server.proc = None
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


class ClusterTopology:
    """3 masters + 3 replicas, ``redis-cli --cluster create --cluster-replicas 1``."""

    kind = "cluster"

    def __init__(self, masters: int = 3):
        self.root = Path(tempfile.mkdtemp(prefix="parley-cluster-"))
        binary = _binary()
        self.nodes: list[_Proc] = []
        for i in range(masters * 2):
            port = free_port()
            d = self.root / f"n{i}"
            self.nodes.append(_Proc(port, d, _server_args(
                binary, port, d, "--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                # a replica of a master that died a moment ago may always take over
                "--cluster-replica-validity-factor", "0",
                # the other masters keep serving their slots while one is failed over
                "--cluster-require-full-coverage", "no")))

    def start(self, timeout: float = 30.0) -> ClusterTopology:
        try:
            for n in self.nodes:
                n.start()
            subprocess.run(
                [_binary("redis-cli"), "--cluster", "create",
                 *(f"127.0.0.1:{n.port}" for n in self.nodes),
                 "--cluster-replicas", "1", "--cluster-yes"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
            self.wait_ok(timeout)
        except Exception:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says cluster_state:ok and sees 3 masters with a slot each."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._ok(n.port) for n in self.nodes if n.alive):
                return
            time.sleep(0.1)
        raise RuntimeError(f"cluster not ok in {timeout}s")

    @staticmethod
    def _ok(port: int) -> bool:
        try:
            r = redis.Redis(port=port, socket_timeout=1)
            info = r.cluster("info")
            r.close()
        except redis.RedisError:
            return False
        if isinstance(info, (bytes, str)):
            text = info.decode() if isinstance(info, bytes) else info
            info = dict(line.split(":", 1) for line in text.split() if ":" in line)
        return str(info.get("cluster_state")) == "ok"

    @property
    def url(self) -> str:
        alive = [n for n in self.nodes if n.alive]
        return f"redis+cluster://127.0.0.1:{alive[0].port}"

    def client(self) -> RedisCluster:
        return RedisCluster(host="127.0.0.1", port=next(n.port for n in self.nodes if n.alive))

    def primary_for(self, key: str) -> _Proc:
        """The node serving ``key``'s slot now."""
        r = self.client()
        try:
            node = r.get_node_from_key(key)
        finally:
            r.close()
        return next(n for n in self.nodes if n.port == int(node.port))

    def kill_primary_for(self, key: str) -> _Proc:
        node = self.primary_for(key)
        node.kill()
        return node

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class SentinelTopology:
    """1 primary, 1 replica, 3 sentinels watching it as ``parley``."""

    kind = "sentinel"
    service = "parley"

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="parley-sentinel-"))
        binary = _binary()
        p, rp = free_port(), free_port()
        self.primary = _Proc(p, self.root / "primary", _server_args(binary, p,
                                                                    self.root / "primary"))
        self.replica = _Proc(rp, self.root / "replica", _server_args(
            binary, rp, self.root / "replica", "--replicaof", "127.0.0.1", str(p)))
        self.sentinels: list[_Proc] = []
        for i in range(3):
            port = free_port()
            d = self.root / f"s{i}"
            d.mkdir(parents=True)
            conf = d / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {d}\nlogfile {d / 'redis.log'}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {p} 2\n"
                f"sentinel down-after-milliseconds {self.service} {NODE_TIMEOUT_MS}\n"
                f"sentinel failover-timeout {self.service} 5000\n"
                f"sentinel parallel-syncs {self.service} 1\n")
            self.sentinels.append(_Proc(port, d, [binary, str(conf), "--sentinel"]))

    def start(self, timeout: float = 30.0) -> SentinelTopology:
        try:
            self.primary.start()
            self.replica.start()
            for s in self.sentinels:
                s.start()
            self._wait_linked(timeout)
        except Exception:
            self.stop()
            raise
        return self

    def _wait_linked(self, timeout: float) -> None:
        """Until the replica is in sync and every sentinel knows the replica and 2 others."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                rep = redis.Redis(port=self.replica.port).info("replication")
                ok = rep.get("master_link_status") == "up"
                for s in self.sentinels:
                    m = redis.Redis(port=s.port).sentinel_master(self.service)
                    ok = ok and int(m["num-slaves"]) >= 1 and int(m["num-other-sentinels"]) >= 2
                if ok:
                    return
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"sentinel set not linked in {timeout}s")

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def current_primary(self) -> _Proc:
        for s in self.sentinels:
            if not s.alive:
                continue
            try:
                _, port = redis.Redis(port=s.port).sentinel_get_master_addr_by_name(
                    self.service)
            except (redis.RedisError, TypeError):
                continue
            return next(n for n in (self.primary, self.replica) if n.port == int(port))
        raise RuntimeError("no sentinel knows the primary")

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.current_primary().port)

    def primary_for(self, key: str) -> _Proc:
        return self.current_primary()

    def kill_primary_for(self, key: str) -> _Proc:
        node = self.current_primary()
        node.kill()
        return node

    def stop(self) -> None:
        for p in (*self.sentinels, self.replica, self.primary):
            p.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def writable_after(topo, key: str, t_kill: float, timeout: float = 30.0) -> float | None:
    """Seconds from ``t_kill`` (time.monotonic) until ``key``'s slot takes a write again (a
    replica promoted); None if it does not within ``timeout``. ``key`` is a probe of its own
    in the slot under test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = topo.client()
            try:
                r.set(key, "probe", px=5000)
                return time.monotonic() - t_kill
            finally:
                r.close()
        except Exception:  # any refusal while the slot has no primary: try again
            time.sleep(0.05)
    return None


def rejoin(node: _Proc, timeout: float = 30.0) -> None:
    """Start a killed node again and wait until it serves as a replica in sync (the Cluster,
    or the sentinels, make it one), so that the next kill has a replica to promote."""
    node.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            rep = redis.Redis(port=node.port, socket_timeout=1).info("replication")
            if rep.get("role") == "slave" and rep.get("master_link_status") == "up":
                return
        except redis.RedisError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"node {node.port} not back as an in-sync replica in {timeout}s")


TOPOLOGIES = {"single": SingleTopology, "cluster": ClusterTopology,
              "sentinel": SentinelTopology}


def start(kind: str):
    """A started topology: ``single``, ``cluster`` or ``sentinel``."""
    if kind not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {sorted(TOPOLOGIES)}, not {kind!r}")
    for _ in range(2):  # each try picks its own ports
        try:
            return TOPOLOGIES[kind]().start()
        except PortTaken:
            continue
    return TOPOLOGIES[kind]().start()
