"""The Celery app's configuration, and that a real worker lives with it.

The configuration is asserted value by value where the value is a decision
(JSON only, late acks, routes, time limit below the visibility timeout), and
end to end where only behaviour proves it: a worker thread on the real Redis
consumes what the client published under the private key prefix, and does
not run a pickle-serialized message.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery.app.utils import find_app
from celery.contrib.testing.worker import start_worker
from kombu import Connection
from kombu.exceptions import ContentDisallowed
from kombu.serialization import dumps as kombu_dumps
from kombu.serialization import loads as kombu_loads
from kombu.serialization import prepare_accept_content

import worker.celery as celery_module
from adaptive_worker_client import RunClient
from worker.celery import (
    INGEST_QUEUE,
    INGEST_TASK,
    LEARN_QUEUE,
    LEARN_TASK,
    MAINTENANCE_QUEUE,
    QUEUES,
    configure,
    create_app,
)
from worker.settings import Settings, SettingsError, load_settings

REDIS = "redis://127.0.0.1:6379/15"


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test passes counts, not the developer's ADAPTIVE_* variables."""
    for var in [v for v in os.environ if v.startswith("ADAPTIVE_")]:
        monkeypatch.delenv(var)


def settings_for(**over: Any) -> Settings:
    return load_settings(_env_file=None, **over)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    value = f"test:{uuid.uuid4().hex[:12]}:"
    yield value
    client = redis.Redis.from_url(REDIS)
    keys = list(client.scan_iter(f"{value}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


# ---------------------------------------------------------------- config


def test_celery_finds_the_app_in_the_worker_package() -> None:
    # What `celery -A worker ...` does.
    assert find_app("worker") is celery_module.app
    assert celery_module.app.main == "adaptive"
    # a worker started in this process (the embedded `run`) adds Celery's own builtins
    ours = [m for m in celery_module.app.conf.include if not m.startswith("celery.")]
    assert ours == ["tasks.jobs"]


def test_json_only_and_pickle_is_refused() -> None:
    conf = create_app(settings_for()).conf
    assert conf.task_serializer == conf.result_serializer == conf.event_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    assert list(conf.result_accept_content) == ["json"]
    # What a worker does with a message body: a pickle one is refused.
    accept = prepare_accept_content(conf.accept_content)
    ctype, encoding, body = kombu_dumps(((["x"],), {}, {}), serializer="pickle")
    with pytest.raises(ContentDisallowed):
        kombu_loads(body, ctype, encoding, accept=accept)
    ctype, encoding, body = kombu_dumps([["x"], {}, {}], serializer="json")
    assert kombu_loads(body, ctype, encoding, accept=accept) == [["x"], {}, {}]


def test_delivery_settings() -> None:
    conf = create_app(settings_for()).conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 2  # long tasks hold it to 1 (worker/prefetch.py)
    assert conf.task_ignore_result is True
    assert conf.broker_connection_retry_on_startup is True
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is True
    assert conf.worker_send_task_events is True
    assert conf.task_send_sent_event is True
    assert conf.result_backend is None


def test_redis_transport_options_and_time_limits() -> None:
    s = settings_for(
        redis_url="redis://127.0.0.1:6379/3",
        key_prefix="nemo_flow:",
        broker_visibility_timeout_s=900,
        task_time_limit_s=400,
    )
    conf = create_app(s).conf
    options = conf.broker_transport_options
    assert options["visibility_timeout"] == 900
    assert options["unacked_restore_interval"] == s.broker_restore_interval_s
    assert options["unacked_restore_throttle"] == s.broker_restore_throttle
    assert options["global_keyprefix"] == "nemo_flow:adaptive_worker:celery:"
    assert options["socket_keepalive"] is True
    assert options["socket_timeout"] > 0 and options["socket_connect_timeout"] > 0
    assert conf.task_time_limit == 400
    assert conf.task_soft_time_limit < conf.task_time_limit
    assert 2 * conf.task_time_limit <= options["visibility_timeout"]


def test_a_time_limit_near_the_visibility_timeout_is_refused() -> None:
    with pytest.raises(SettingsError, match="ADAPTIVE_TASK_TIME_LIMIT_S"):
        settings_for(broker_visibility_timeout_s=600, task_time_limit_s=400)


def test_other_brokers_get_only_their_own_options() -> None:
    amqp = create_app(settings_for(broker_url="amqp://guest:guest@127.0.0.1:5672//")).conf
    assert amqp.broker_transport_options == {"confirm_publish": True}
    memory = create_app(settings_for()).conf
    assert memory.broker_url == "memory://"
    assert memory.broker_transport_options == {}


@pytest.mark.parametrize(
    ("task", "queue"),
    [
        (INGEST_TASK, INGEST_QUEUE),
        ("adaptive.ingest_anything", INGEST_QUEUE),
        (LEARN_TASK, LEARN_QUEUE),
        ("adaptive.learn_sweep", LEARN_QUEUE),
        ("adaptive.retention", MAINTENANCE_QUEUE),
        ("adaptive.rebuild_agent", MAINTENANCE_QUEUE),
        ("celery.backend_cleanup", MAINTENANCE_QUEUE),  # the default queue
    ],
)
def test_routes(task: str, queue: str) -> None:
    app = create_app(settings_for())
    assert app.amqp.router.route({}, task)["queue"].name == queue
    assert {q.name for q in app.conf.task_queues} == set(QUEUES)


def test_configure_applies_to_any_app() -> None:
    from celery import Celery

    app = Celery("other", set_as_current=False)
    configure(app, settings_for(broker_url="redis://127.0.0.1:6379/9"))
    assert app.conf.broker_url == "redis://127.0.0.1:6379/9"
    assert app.conf.task_acks_late is True


# ------------------------------------------------------------- behaviour


def test_memory_broker_round_trip() -> None:
    """The embedded default: publish and consume in one process, no server."""
    app = create_app(settings_for())
    agent = f"agent-{uuid.uuid4().hex[:6]}"
    app.send_task(LEARN_TASK, args=[agent], argsrepr=f"<agent {agent}>")
    with app.connection_for_read() as conn:
        q = conn.SimpleQueue(LEARN_QUEUE)
        message = q.get(timeout=2)
        message.ack()
        q.close()
    assert message.headers["task"] == LEARN_TASK
    assert message.decode()[0] == [agent]


@pytest.mark.redis
def test_a_worker_consumes_the_clients_runs_and_not_pickle(
    redis_prefix: str, tmp_path: Any
) -> None:
    settings = settings_for(
        redis_url=REDIS, key_prefix=redis_prefix, client_spool_dir=tmp_path / "spool"
    )
    app = create_app(settings, name="adaptive-test")
    app.conf.include = []  # only the task below; tasks.jobs binds to the module app
    received: list[list[str]] = []
    done = threading.Event()

    @app.task(name=INGEST_TASK, shared=False)  # shared, it would replace the real task
    def ingest(payloads: list[str]) -> None:
        received.append(payloads)
        done.set()

    # A pickle message with the same task name, straight onto the queue.
    with Connection(REDIS, transport_options=app.conf.broker_transport_options) as conn:
        conn.Producer().publish(
            ((["pickled"],), {}, {}),
            serializer="pickle",
            routing_key=INGEST_QUEUE,
            exchange=INGEST_QUEUE,
            declare=[next(q for q in app.conf.task_queues if q.name == INGEST_QUEUE)],
            headers={"task": INGEST_TASK, "id": str(uuid.uuid4()), "lang": "py"},
        )
    client = RunClient(settings)
    try:
        runs = [f'{{"id":"{uuid.uuid4()}","agent_id":"w","seq":{i}}}' for i in range(3)]
        client.submit_runs(runs)
        assert client.flush(10)
        r = redis.Redis.from_url(REDIS)
        broker = f"{redis_prefix}adaptive_worker:celery:"
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
            assert done.wait(15), "the worker never ran the ingest task"
            # Both messages consumed (the pickle one first: it is older) and acked.
            deadline = time.monotonic() + 10
            while r.llen(f"{broker}{INGEST_QUEUE}") or r.hlen(f"{broker}unacked"):
                assert time.monotonic() < deadline, "messages left unconsumed or unacked"
                time.sleep(0.05)
    finally:
        client.close(timeout=2)

    assert received == [runs]  # one call: the pickled message never ran


@pytest.mark.redis
def test_redelivery_after_the_visibility_timeout_works_under_the_key_prefix(
    redis_prefix: str,
) -> None:
    """A message whose consumer died is put back: kombu's restore sees the prefixed keys."""
    settings = settings_for(
        redis_url=REDIS,
        key_prefix=redis_prefix,
        broker_visibility_timeout_s=2,
        task_time_limit_s=1,
        broker_restore_throttle=1,
    )
    app = create_app(settings)
    app.send_task(LEARN_TASK, args=["agent-vt"])
    r = redis.Redis.from_url(REDIS)
    broker = f"{redis_prefix}adaptive_worker:celery:"
    with app.connection_for_read() as dead, app.connection_for_read() as alive:
        delivered = dead.default_channel.basic_get(LEARN_QUEUE, no_ack=False)
        assert delivered is not None  # delivered, never acked: its worker "died"
        assert (r.llen(f"{broker}{LEARN_QUEUE}"), r.hlen(f"{broker}unacked")) == (0, 1)
        time.sleep(2.2)
        alive.default_channel.qos.restore_visible(num=10, interval=1)
        assert (r.llen(f"{broker}{LEARN_QUEUE}"), r.hlen(f"{broker}unacked")) == (1, 0)
        again = alive.default_channel.basic_get(LEARN_QUEUE, no_ack=True)
    assert again is not None and again.decode()[0] == ["agent-vt"]
