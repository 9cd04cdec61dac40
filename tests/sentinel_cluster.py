"""A Redis primary, one replica and three sentinels of a test's own, on free ports.

The failover test needs a real promotion: `kill -9` of the primary, the
sentinels agreeing it is down (quorum 2 of 3) and promoting the replica.
Everything runs as `redis-server` processes (Debian's binary is also the
sentinel, with `--sentinel`) in the test's temporary directory, with no
persistence, and is stopped at the end. Short down-after and failover
timeouts keep a failover within a few seconds.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
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
        # No 5 s wait before the replica's first sync (diskless default delay).
        self.primary = PrivateRedis(self._dir("primary"), extra=["--repl-diskless-sync-delay", "0"])
        self.replica = PrivateRedis(
            self._dir("replica"), extra=["--replicaof", "127.0.0.1", str(self.primary.port)]
        )
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

    def kill_primary(self) -> None:
        """`kill -9`: no shutdown, no last replication."""
        proc = self.primary.proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        self.primary.proc = None

    def stop(self) -> None:
        for proc in self.sentinel_procs:
            proc.terminate()
        for proc in self.sentinel_procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.sentinel_procs = []
        self.primary.stop()
        self.replica.stop()


@contextmanager
def sentinel_cluster(workdir: Path, **options: int) -> Iterator[SentinelCluster]:
    cluster = SentinelCluster(workdir, **options)
    try:
        cluster.start()
        yield cluster
    finally:
        with suppress(Exception):
            cluster.stop()
