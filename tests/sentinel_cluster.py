"""A Redis primary, one replica and three sentinels of a test's own, on free ports.

The failover test needs a real promotion: `kill -9` of the primary, the
sentinels agreeing it is down (quorum 2 of 3) and promoting the replica.
Everything runs as `redis-server` processes (Debian's binary is also the
sentinel, with `--sentinel`) in the test's temporary directory, with no
persistence, and is stopped at the end. Short down-after and failover
timeouts keep a failover within a few seconds.

The killed node never comes back as a primary. With no persistence it
restarts EMPTY, and an empty primary is a data eraser: a replica still
pointed at it (the failover not done yet), or the promoted node itself (a
sentinel that has not heard of the promotion sees the restarted "primary"
sane and demotes the promoted node back under it), full-resyncs from it and
drops everything. That once wiped a whole failover test (1,200 runs gone,
340 of them acknowledged with WAIT). So `rejoin` brings it back only after
every sentinel names the new primary, in a fresh empty directory, and
already a replica of the new primary (`--replicaof`): at no moment does an
empty node claim to be a primary.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import redis
from redis.sentinel import Sentinel

from tests.private_redis import PrivateRedis, free_port

SERVICE = "mymaster"


class SentinelCluster:
    """Primary + replica (`PrivateRedis`) and three sentinels watching them."""

    def __init__(
        self, workdir: Path, *, down_after_ms: int = 1000, failover_ms: int = 3000
    ) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server binary not found: cannot run Redis Sentinel")
        self.workdir = workdir
        # No 5 s wait before a replica's full sync (diskless default delay):
        # on both nodes, since either may be the primary after a failover.
        fast_sync = ["--repl-diskless-sync-delay", "0"]
        self.primary = PrivateRedis(self._dir("primary"), extra=fast_sync)
        self.replica = PrivateRedis(
            self._dir("replica"),
            extra=[*fast_sync, "--replicaof", "127.0.0.1", str(self.primary.port)],
        )
        self.nodes = [self.primary, self.replica]
        self.down_after_ms = down_after_ms
        self.failover_ms = failover_ms
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinel_procs: list[subprocess.Popen[bytes]] = []

    def _dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def sentinels(self) -> str:
        """The `ADAPTIVE_REDIS_SENTINELS` value."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def sentinel(self) -> Sentinel:
        return Sentinel(
            [("127.0.0.1", port) for port in self.sentinel_ports],
            sentinel_kwargs={"socket_connect_timeout": 1, "socket_timeout": 1},
            socket_connect_timeout=1,
            socket_timeout=2,
        )

    def master_address(self) -> tuple[str, int]:
        host, port = self.sentinel().discover_master(SERVICE)
        return str(host), int(port)

    def start(self) -> SentinelCluster:
        self.primary.start()
        self.replica.start()
        for port in self.sentinel_ports:
            conf = self._dir(f"sentinel-{port}") / "sentinel.conf"
            conf.write_text(
                f"port {port}\n"
                "bind 127.0.0.1\n"
                f"dir {conf.parent}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} {self.failover_ms}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self.sentinel_procs.append(
                subprocess.Popen(
                    [self.primary.binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL
                )
            )
        self._wait_ready()
        return self

    def _wait_ready(self, timeout_s: float = 20.0) -> None:
        """Until the replica is in sync and every sentinel knows it and the
        other two: before that a failover could not be agreed on."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                # The primary counts the replica for WAIT only once it acked.
                ready = self.primary.client().wait(1, 200) >= 1
                for port in self.sentinel_ports:
                    probe = redis.Redis(port=port, socket_connect_timeout=1, decode_responses=True)
                    replicas = probe.execute_command("SENTINEL", "REPLICAS", SERVICE)
                    others = probe.execute_command("SENTINEL", "SENTINELS", SERVICE)
                    ready = ready and len(replicas) == 1 and len(others) == 2
                if ready:
                    return
            except redis.RedisError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail("sentinel cluster did not become ready")

    def node_at(self, address: tuple[str, int]) -> PrivateRedis:
        """The node listening on `address`."""
        (node,) = [n for n in self.nodes if n.port == address[1]]
        return node

    def kill_primary(self) -> PrivateRedis:
        """`kill -9` the node the sentinels name primary: no shutdown, no last replication."""
        node = self.node_at(self.master_address())
        proc = node.proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        node.proc = None
        return node

    def named_by_each_sentinel(self) -> list[tuple[str, int] | None]:
        """`SENTINEL get-master-addr-by-name` of every sentinel (None: no answer)."""
        named: list[tuple[str, int] | None] = []
        for port in self.sentinel_ports:
            try:
                with redis.Redis(
                    port=port, socket_connect_timeout=1, socket_timeout=1, decode_responses=True
                ) as probe:
                    host, node_port = probe.execute_command(
                        "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE
                    )
                named.append((str(host), int(node_port)))
            except (redis.RedisError, TypeError, ValueError):
                named.append(None)
        return named

    def wait_promoted(self, old: tuple[str, int], timeout_s: float = 45.0) -> tuple[str, int]:
        """Until every sentinel names the same new primary and that node says it
        is one (`ROLE`): the failover is over, not just started by one sentinel."""
        deadline = time.monotonic() + timeout_s
        named: list[tuple[str, int] | None] = []
        while time.monotonic() < deadline:
            named = self.named_by_each_sentinel()
            first = named[0]
            if first is not None and first != old and all(n == first for n in named):
                try:
                    role = self.node_at(first).client().execute_command("ROLE")
                    if role[0] in (b"master", "master"):
                        return first
                except redis.RedisError:
                    pass
            time.sleep(0.1)
        pytest.fail(f"no agreed promotion within {timeout_s:.0f} s: sentinels name {named}")

    def rejoin(
        self, node: PrivateRedis, primary: tuple[str, int], timeout_s: float = 30.0
    ) -> float:
        """Start the killed `node` again, EMPTY and as a replica of `primary`
        (never as a primary: see the module docstring); returns the seconds
        until the primary counts it for `WAIT` and every sentinel lists it as
        a replica that is up."""
        assert node.proc is None, "rejoin only a stopped node"
        assert all(n == primary for n in self.named_by_each_sentinel()), "failover not agreed"
        started = time.monotonic()
        # Fresh: a replica's full sync leaves a dump.rdb that a restart would load.
        node.workdir = Path(tempfile.mkdtemp(prefix=f"node-{node.port}-", dir=self.workdir))
        node.extra = [
            "--repl-diskless-sync-delay", "0", "--replicaof", primary[0], str(primary[1])
        ]  # fmt: skip
        node.start()
        writer = self.node_at(primary).client()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                # WAIT counts only replicas that acked this client's last write.
                writer.set("sentinel-cluster:rejoin-probe", str(time.time()))
                synced = writer.wait(1, 200) >= 1
                listed = True
                for port in self.sentinel_ports:
                    with redis.Redis(
                        port=port, socket_connect_timeout=1, decode_responses=True
                    ) as probe:
                        replicas = probe.execute_command("SENTINEL", "REPLICAS", SERVICE)
                    up = [
                        r for r in replicas
                        if int(r["port"]) == node.port and "s_down" not in r["flags"]
                        and "disconnected" not in r["flags"]
                    ]  # fmt: skip
                    listed = listed and bool(up)
                if synced and listed:
                    return time.monotonic() - started
            except redis.RedisError:
                pass
            time.sleep(0.2)
        pytest.fail(f"node {node.port} did not rejoin as a replica of {primary}")

    def stop(self) -> None:
        for proc in self.sentinel_procs:
            proc.terminate()
        for proc in self.sentinel_procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.sentinel_procs = []
        for node in self.nodes:
            node.stop()


@contextmanager
def sentinel_cluster(workdir: Path, **options: int) -> Iterator[SentinelCluster]:
    cluster = SentinelCluster(workdir, **options)
    try:
        cluster.start()
        yield cluster
    finally:
        with suppress(Exception):
            cluster.stop()
