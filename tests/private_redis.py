"""A redis-server of a test's own, on a free port: stopped and started again at will.

Tests of outages need a broker URL that is unreachable first and then
answers, at the same address (a spool is replayed only into the deployment
it was written for), and the TLS tests need a server with `--tls-port`.
Both start the `redis-server` binary (Debian's supports TLS) with no
persistence, in the test's temporary directory, and stop it at the end.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PrivateRedis:
    """One redis-server on `port`; `url` is valid whether or not it runs."""

    def __init__(self, workdir: Path, *, db: int = 0, extra: Sequence[str] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server binary not found: cannot run a private Redis")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/{db}"
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            *self.extra,
        ]

    def start(self) -> PrivateRedis:
        assert self.proc is None, "already running"
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL)
        probe = self.client()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                probe.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        pytest.fail(f"private redis-server on port {self.port} did not start")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def client(self) -> redis.Redis:
        """A plain-TCP client (the TLS tests also keep the plain port open)."""
        return redis.Redis.from_url(self.url, socket_connect_timeout=1)


@contextmanager
def private_redis(workdir: Path, *, db: int = 0, started: bool = True) -> Iterator[PrivateRedis]:
    server = PrivateRedis(workdir, db=db)
    try:
        if started:
            server.start()
        yield server
    finally:
        with suppress(Exception):
            server.stop()
