"""RabbitMQ as the production broker: quorum queues, a delivery limit, confirms, delays.

Each test that talks to RabbitMQ gets a vhost of its own (made with
`rabbitmqctl`, deleted at the end), so queue arguments from other runs or
other tests can never meet ours. Skipped only where no RabbitMQ answers on
127.0.0.1:5672.
"""

from __future__ import annotations

import json
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import redis
from amqp.exceptions import MessageNacked
from kombu import Connection, Consumer, Exchange, Queue

from adaptive_worker_client.broker import (
    DEAD_LETTER_QUEUE,
    dead_letter_queue,
    delay_seconds,
    task_queues,
)
from adaptive_worker_client.contract import (
    INGEST_QUEUE,
    INGEST_TASK,
    LEARN_QUEUE,
    LEARN_TASK,
    QUEUES,
)
from adaptive_worker_client.publisher import RunClient
from bench.workload import synthetic_runs
from storage.store import Store
from tests.conftest import REDIS_URL, needs_rabbitmq, rabbitmqctl, vhost_url
from tests.pipeline import caught_up, celery_workers, wait_until, worker_env
from worker import delivery_limit, guard
from worker.celery import create_app
from worker.settings import Settings, load_settings


def settings_for(url: str, prefix: str, tmp_path: Path, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": REDIS_URL,
        "broker_url": url,
        "key_prefix": prefix,
        "client_spool_dir": tmp_path / "spool",
        "client_retry_interval_s": 60.0,
        "client_receipts": "off",
    }
    values.update(over)
    return load_settings(_env_file=None, **values)


def queue_table(vhost: str) -> dict[str, tuple[str, str]]:
    """name -> (type, arguments) as RabbitMQ itself reports them."""
    out = rabbitmqctl("list_queues", "-p", vhost, "name", "type", "arguments")
    table = {}
    for line in out.splitlines():
        name, kind, arguments = [*line.split("\t"), "", ""][:3]
        table[name] = (kind, arguments)
    return table


def run_text(i: int, agent: str) -> str:
    return json.dumps({"id": str(uuid.UUID(int=i + 1)), "agent_id": agent, "seq": i})


# ------------------------------------------------------------------ no broker


def test_queues_are_quorum_with_a_delivery_limit_on_rabbitmq_and_lists_on_redis() -> None:
    for queue in task_queues("amqp://h//", 7):
        assert queue.durable and queue.exchange.durable
        # topic: the only exchange type Celery's native delayed delivery routes back through
        assert queue.exchange.type == "topic"
        assert queue.queue_arguments == {
            "x-queue-type": "quorum",
            "x-delivery-limit": 7,
            "x-dead-letter-exchange": "adaptive.dead",
            "x-dead-letter-routing-key": "adaptive.dead",
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
    for queue in task_queues("redis://h/0"):
        assert queue.exchange.type == "direct"
        assert not queue.queue_arguments
    app = create_app(
        load_settings(_env_file=None, broker_url="amqp://h//", broker_delivery_limit=3)
    )
    assert {q.name: q.queue_arguments["x-delivery-limit"] for q in app.conf.task_queues} == {
        name: 3 for name in QUEUES
    }
    assert delivery_limit.DeliveryLimitConsumer in app.steps["consumer"]
    redis_app = create_app(load_settings(_env_file=None, broker_url="redis://h/0"))
    assert delivery_limit.DeliveryLimitConsumer not in redis_app.steps["consumer"]


@pytest.mark.parametrize(
    ("countdown", "url", "expected"),
    [
        (0.25, "amqp://h//", 1.0),
        (0.5, "amqps://h//", 1.0),
        (1.2, "pyamqp://h//", 2.0),
        (3.0, "amqp://h//", 3.0),
        (0.25, "redis://h/0", 0.25),
        (0.0, "amqp://h//", None),
        (None, "amqp://h//", None),
    ],
)
def test_countdowns_are_whole_seconds_on_rabbitmq_only(
    countdown: float | None, url: str, expected: float | None
) -> None:
    assert delay_seconds(countdown, url) == expected


# ------------------------------------------------------------- real RabbitMQ


@needs_rabbitmq
def test_the_clients_publish_declares_quorum_queues(
    vhost: str, real_store: Store, tmp_path: Path
) -> None:
    settings = settings_for(vhost_url(vhost), real_store.keys.prefix, tmp_path)
    client = RunClient(settings)
    try:
        client.submit_runs([run_text(0, "q")])
        assert client.flush(10), client.stats()
    finally:
        client.close(5)
    table = queue_table(vhost)
    kind, arguments = table[INGEST_QUEUE]
    assert kind == "quorum"
    assert '{"x-delivery-limit",20}' in arguments
    assert '{"x-dead-letter-exchange","adaptive.dead"}' in arguments


@needs_rabbitmq
@pytest.mark.parametrize("trouble", ["no write permission", "queue full"])
def test_a_publish_the_broker_did_not_confirm_is_not_counted_and_stays_spooled(
    vhost: str, real_store: Store, tmp_path: Path, trouble: str
) -> None:
    url = vhost_url(vhost)
    settings = settings_for(url, real_store.keys.prefix, tmp_path)
    # The queues exist (declared as a worker would), then publishing is refused.
    with Connection(url) as conn:
        for queue in task_queues(url):
            queue.bind(conn.default_channel).declare()
    if trouble == "no write permission":
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", "^$", ".*")
    else:
        # A policy, not queue arguments: the declaration stays equivalent, and
        # RabbitMQ answers each publish with a nack (reject-publish).
        rabbitmqctl(
            "set_policy", "-p", vhost, "--apply-to", "queues", "full", "^adaptive\\.ingest$",
            '{"max-length": 1, "overflow": "reject-publish"}',
        )  # fmt: skip
        # A quorum queue's limit is approximate (it takes one more): fill it
        # until RabbitMQ nacks, so the client's publish is the next one refused.
        with Connection(url, transport_options={"confirm_publish": True}) as conn:
            producer = conn.Producer()
            with pytest.raises(MessageNacked):
                for _ in range(10):
                    producer.publish({}, exchange=INGEST_QUEUE, routing_key=INGEST_QUEUE)
    client = RunClient(settings)
    try:
        client.submit_runs([run_text(i, "nack") for i in range(5)])
        assert client.flush(10) is False
        stats = client.stats()
    finally:
        client.close(1)
    assert stats["published"] == 0, stats
    assert stats["spooled"] == 5, stats
    assert stats["errors"] >= 1, stats


@needs_rabbitmq
def test_a_message_requeued_past_the_delivery_limit_becomes_one_dead_letter(
    vhost: str, real_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = vhost_url(vhost)
    body_marker = f"run-{uuid.uuid4().hex}"
    app = create_app(load_settings(_env_file=None, broker_url=url, broker_delivery_limit=2))
    with Connection(url) as conn:
        channel = conn.default_channel
        dead_letter_queue().bind(channel).declare()
        app.send_task(INGEST_TASK, args=[[body_marker]], connection=conn)
        queue = next(q for q in app.conf.task_queues if q.name == INGEST_QUEUE)
        taken = conn.SimpleQueue(queue)
        deliveries = 0
        with pytest.raises(taken.Empty):
            while True:
                message = taken.get(timeout=2)
                deliveries += 1
                message.reject(requeue=True)
        assert deliveries == 3  # the first delivery and two returns

        # Redis down: nothing is written and the message goes back, not away.
        def no_redis() -> Store:
            raise redis.ConnectionError("down")

        monkeypatch.setattr(guard, "store_factory", no_redis)
        monkeypatch.setattr(guard, "REQUEUE_PAUSE_S", 0.0)
        seen: list[Any] = []

        def consume_one() -> None:
            with Consumer(
                channel, queues=[dead_letter_queue()], on_message=lambda m: seen.append(m)
            ):
                conn.drain_events(timeout=5)

        consume_one()
        delivery_limit.on_message(seen.pop())
        assert real_store.dead_letter_count() == 0
        # Redis back: recorded once, acked.
        monkeypatch.setattr(guard, "store_factory", lambda: real_store)
        consume_one()
        delivery_limit.on_message(seen.pop())
        with pytest.raises(taken.Empty):
            conn.SimpleQueue(dead_letter_queue()).get(timeout=1)
    letters = [json.loads(x) for x in real_store.dead_letters()]
    assert len(letters) == 1
    (letter,) = letters
    assert letter["stage"] == "delivery_limit"
    assert letter["broker_reason"] == "delivery_limit"
    assert letter["queue"] == INGEST_QUEUE
    assert letter["task"] == INGEST_TASK
    assert body_marker in letter["raw"]
    assert "delivery limit reached" in letter["reason"]


@pytest.mark.slow
@needs_rabbitmq
def test_a_worker_on_rabbitmq_learns_every_run_once_with_delays_and_dead_letters(
    vhost: str, real_store: Store, tmp_path: Path
) -> None:
    """Two bursts; learns that must wait (a held lease, a linger: countdowns
    under 1 s, which Celery's native delayed delivery refuses); and one
    message that was returned past its delivery limit before the worker
    started."""
    url = vhost_url(vhost)
    prefix = real_store.keys.prefix
    knobs = {"broker_delivery_limit": 1, "learn_batch_size": 25, "learn_min_batch": 10_000}
    settings = settings_for(url, prefix, tmp_path, **knobs)
    app = create_app(settings)
    poison_id = str(uuid.uuid4())
    with Connection(url) as conn:
        dead_letter_queue().bind(conn.default_channel).declare()
        app.send_task(
            INGEST_TASK, args=[[run_text(999, "killer")]], task_id=poison_id, connection=conn
        )
        queue = next(q for q in app.conf.task_queues if q.name == INGEST_QUEUE)
        taken = conn.SimpleQueue(queue)
        for _ in range(2):  # delivered, returned; delivered, returned: past the limit of 1
            taken.get(timeout=5).reject(requeue=True)
    agents = ["rmq-a", "rmq-b"]
    runs = {a: [json.dumps(r) for r in synthetic_runs(120, agent_id=a, seed=7)] for a in agents}
    env = worker_env(prefix, REDIS_URL, broker_url=url, **knobs)
    with celery_workers(env, tmp_path) as workers:
        worker = workers.start("rmq", concurrency=2)
        # A spy on the way out of Celery's native delayed delivery (declared
        # by the worker at start): it gets a copy of every delayed learn.
        spy = Queue(
            f"spy-{uuid.uuid4().hex[:6]}",
            Exchange("celery_delayed_delivery", type="topic", passive=True),
            routing_key=f"#.{LEARN_QUEUE}",
        )
        with Connection(url) as conn:
            spy.bind(conn.default_channel).declare()

        def spied_count() -> int:
            with Connection(url) as conn:
                return int(conn.default_channel.queue_declare(spy.name, passive=True).message_count)

        # While "another learner" (this test) holds rmq-a's lease, each learn
        # of it re-checks after LEASE_RECHECK_S (0.5 s): a countdown under 1 s.
        token = uuid.uuid4().hex
        assert real_store.acquire_lease("rmq-a", token, 60_000)
        client = RunClient(settings)
        try:
            client.submit_runs([r for a in agents for r in runs[a][:60]])
            assert client.flush(30), client.stats()
            wait_until(lambda: spied_count() >= 2, 30, "delayed lease re-checks")
            assert real_store.cursor("rmq-a").learned == 0
            assert real_store.release_lease("rmq-a", token)
            wait_until(
                lambda: caught_up(real_store, agents, {a: 60 for a in agents}), 60, "burst 1"
            )
            client.submit_runs([r for a in agents for r in runs[a][60:]] + runs["rmq-a"][:10])
            assert client.flush(30), client.stats()
        finally:
            client.close(5)
        wait_until(lambda: caught_up(real_store, agents, {a: 120 for a in agents}), 90, "burst 2")
        wait_until(lambda: real_store.dead_letter_count() == 1, 30, "the dead letter")
        log = worker.log.read_text()
    for agent in agents:
        acc = json.loads(real_store.client.get(real_store.keys.accumulators(agent)))
        assert acc["nodes"][""]["remaining_calls"]["1"]["count"] == 120  # each run once
    assert real_store.counters()["runs_learned"] == 240
    (letter,) = [json.loads(x) for x in real_store.dead_letters()]
    assert (letter["stage"], letter["task_id"]) == ("delivery_limit", poison_id)
    assert real_store.cursor("killer").index_length == 0  # dead-lettered, never run
    # Learns lingered: countdown tasks came back through native delayed delivery.
    delayed = []
    with Connection(url) as conn:
        spied = conn.SimpleQueue(spy)
        with suppress(spied.Empty):
            while True:
                delayed.append(spied.get(timeout=1).headers)
    assert len(delayed) >= 2, "learns did not go through native delayed delivery"
    assert {h["task"] for h in delayed} == {LEARN_TASK}
    assert all(h["eta"] for h in delayed)
    assert "countdown must be a positive number" not in log
    assert "Traceback" not in log, log[-3000:]
    table = queue_table(vhost)
    assert {table[name][0] for name in (*QUEUES, DEAD_LETTER_QUEUE)} == {"quorum"}
    assert LEARN_QUEUE in table
