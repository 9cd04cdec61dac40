"""Flower, started as the deployment starts it, answers and requires its login.

`celery -A worker flower --basic_auth=...` on the real Redis under a private
prefix: the health check answers without a login (as compose's healthcheck
needs), every page and API call without the configured credentials, or with
wrong ones, is refused with 401, and with them Flower's API lists the worker
that `adaptive-worker run` started, which shows it watches our broker keys
(kombu's `global_keyprefix` under the prefix).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from storage.store import Store
from tests.conftest import REDIS_URL

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
USER, PASSWORD = "flower-user", "s3cret-pass"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.fixture(scope="module")
def env(
    real_redis: redis.Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """One private prefix for the module (one Flower serves every test)."""
    prefix = f"test:flower-{uuid.uuid4().hex[:12]}:"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTIVE_")}
    env.update(
        ADAPTIVE_REDIS_URL=REDIS_URL,
        ADAPTIVE_KEY_PREFIX=prefix,
        ADAPTIVE_METRICS_PORT="0",
        HOME=str(tmp_path_factory.mktemp("home")),
        PYTHONUNBUFFERED="1",
    )
    yield env
    Store(real_redis, prefix).delete_prefix()


@pytest.fixture(scope="module")
def flower(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Flower's base URL; it is stopped (process group) afterwards."""
    for attempt in range(3):
        port = _free_port()
        log = tmp_path_factory.mktemp("flower") / f"flower-{attempt}.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                [str(BIN / "celery"), "-A", "worker", "flower", f"--port={port}",
                 "--address=127.0.0.1", f"--basic_auth={USER}:{PASSWORD}"],
                cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    if _get(f"{base}/healthcheck")[0] == 200:
                        break
                except OSError:
                    time.sleep(0.2)
            else:
                text = log.read_text()
                if "Address already in use" in text:  # the free port was taken meanwhile
                    continue
                pytest.fail(f"flower did not start:\n{text[-3000:]}")
            yield base
            return
        finally:
            _stop(proc)
    pytest.skip("no free port for flower after 3 attempts")


def test_flower_health_check_needs_no_login(flower: str) -> None:
    assert _get(f"{flower}/healthcheck") == (200, b"OK")


@pytest.mark.parametrize("path", ["/", "/workers", "/tasks", "/api/workers", "/api/tasks"])
def test_flower_refuses_requests_without_the_credentials(flower: str, path: str) -> None:
    assert _get(f"{flower}{path}")[0] == 401
    assert _get(f"{flower}{path}", (USER, "wrong"))[0] == 401
    assert _get(f"{flower}{path}", ("someone", PASSWORD))[0] == 401
    assert _get(f"{flower}{path}", (USER, PASSWORD))[0] == 200


def test_flower_api_lists_the_worker_of_adaptive_worker_run(
    flower: str, env: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    with log.open("wb") as sink:
        worker = subprocess.Popen(
            [str(BIN / "adaptive-worker"), "run", "--no-beat", "-c", "1"],
            cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        workers: dict[str, Any] = {}
        while not any(name.startswith("adaptive-") for name in workers):
            assert worker.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"flower never saw the worker: {workers}"
            status, body = _get(f"{flower}/api/workers?refresh=1", (USER, PASSWORD))
            assert status == 200
            workers = json.loads(body)
            time.sleep(0.5)
        name = next(n for n in workers if n.startswith("adaptive-"))
        queues = {q["name"] for q in workers[name].get("active_queues") or []}
        assert queues == {"adaptive.ingest", "adaptive.learn", "adaptive.maintenance"}
        assert "adaptive.ingest_runs" in (workers[name].get("registered") or [])
    finally:
        _stop(worker)
