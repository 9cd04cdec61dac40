"""Shared fixtures: a private key prefix per test on the REAL Redis, or fakeredis.

Tests of storage, tasks and the pipeline run against the Redis on
127.0.0.1:6379 (`.ci/run` starts one if none answers); each test gets its own
prefix and removes its keys afterwards, so tests never see each other.
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Iterator

import fakeredis
import pytest
import redis

from storage.store import Store

REDIS_URL = os.environ.get("ADAPTIVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def amqp_up() -> bool:
    """RabbitMQ runs on this machine kind; elsewhere its tests skip with a reason."""
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


needs_rabbitmq = pytest.mark.skipif(not amqp_up(), reason="no RabbitMQ on 127.0.0.1:5672")
AMQP_HOST = AMQP_URL.rsplit("/", 2)[0]  # amqp://guest:guest@127.0.0.1:5672


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    )
    return done.stdout


@pytest.fixture
def vhost() -> Iterator[str]:
    """A RabbitMQ vhost of this test's own (queue arguments of other runs never meet ours)."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        rabbitmqctl("delete_vhost", name)


def vhost_url(vhost: str) -> str:
    return f"{AMQP_HOST}/{vhost}"


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture(scope="session")
def real_redis() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        client.ping()
    except redis.ConnectionError as exc:  # pragma: no cover - .ci/run starts Redis
        pytest.fail(f"the real Redis at {REDIS_URL} is required for this test: {exc}")
    yield client
    client.close()


@pytest.fixture
def real_store(real_redis: redis.Redis, prefix: str) -> Iterator[Store]:
    store = Store(real_redis, prefix)
    yield store
    store.delete_prefix()


@pytest.fixture(params=["redis", "fakeredis"])
def store(request: pytest.FixtureRequest, prefix: str) -> Iterator[Store]:
    """The same test on the real server and on the embedded fakeredis."""
    if request.param == "redis":
        yield request.getfixturevalue("real_store")
    else:
        client = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
        yield Store(client, prefix)
