"""The product, end to end: agents submit, real `celery worker` processes learn.

Real Redis as broker and store, real worker processes started here (their
own sessions, so a crash test can SIGKILL a whole process group), and the
agent-side client publishing from threads. Learning must be exactly once:
counts equal the distinct runs, and the state equals a sequential replay of
the same runs in index order.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from adaptive_worker_client import RunClient
from bench.workload import synthetic_runs
from storage.models import RunRecord, parse_wire
from storage.store import Store
from tests.conftest import REDIS_URL, needs_rabbitmq, vhost_url
from tests.pipeline import caught_up, celery_workers, dump_state, wait_until, worker_env
from worker.cli import app as cli
from worker.settings import load_settings

pytestmark = pytest.mark.slow


def _client(prefix: str, tmp_path: Path) -> RunClient:
    settings = load_settings(
        _env_file=None,
        redis_url=REDIS_URL,
        key_prefix=prefix,
        client_spool_dir=tmp_path / "spool",
        client_retry_interval_s=0.2,
    )
    return RunClient(settings)


def _root_call1_count(store: Store, agent: str) -> int:
    acc = json.loads(store.client.get(store.keys.accumulators(agent)))
    return acc["nodes"][""]["remaining_calls"]["1"]["count"]


def _replay_in_index_order(store: Store, agents: list[str], tmp_path: Path, prefix: str) -> None:
    lines = []
    for agent in agents:
        lines += [raw for _, raw in store.read_runs(agent, 0, 100_000)]
    records = tmp_path / "replay.jsonl"
    records.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(
        cli, ["replay", str(records), "--redis-url", REDIS_URL, "--prefix", prefix, "--json"]
    )
    assert result.exit_code == 0, result.output


def test_exactly_once_under_concurrency_and_duplicates(
    real_store: Store, real_redis: redis.Redis, tmp_path: Path
) -> None:
    prefix = real_store.keys.prefix
    agents = ["agent-0", "agent-1", "agent-2"]
    runs: list[dict[str, Any]] = []
    for i, agent in enumerate(agents):
        runs += list(synthetic_runs(667 if i < 2 else 666, agent_id=agent, seed=10 + i))
    assert len(runs) == 2000
    rng = random.Random(5)
    payloads: list[Any] = runs + rng.sample(runs, 200)  # 10% submitted twice
    malformed = [
        {"id": "not-a-uuid", "agent_id": "agent-0", "calls": [], "started_at": "x"},
        '{"agent_id": "agent-1", "calls": "nope"}',
    ]
    payloads += malformed
    rng.shuffle(payloads)
    expected = Counter(r["agent_id"] for r in runs)

    env = worker_env(prefix, REDIS_URL, learn_batch_size=200)
    with celery_workers(env, tmp_path) as workers:
        started = [workers.start(name, concurrency=2) for name in ("w1", "w2")]
        client = _client(prefix, tmp_path)
        chunks = [payloads[i::4] for i in range(4)]
        threads = [
            threading.Thread(target=lambda c=c: [client.submit_run(p) for p in c]) for c in chunks
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert client.flush(60)
        client.close(5)
        wait_until(lambda: caught_up(real_store, agents, expected), 300, "learning to catch up")

    for w in started:  # the main process and both pool children (worker/gc_tuning.py)
        assert len(set(re.findall(rb"gc tuned in process (\d+)", w.log.read_bytes()))) == 3
        # The hand-off found what it reads of Celery's pool (worker/handoff.py).
        assert b"hand-off on: jobs in flight watched; pool pipes of [1048576]" in w.log.read_bytes()
    for agent in agents:
        index = real_store.run_ids(agent)
        assert len(index) == len(set(index)) == expected[agent]
        assert _root_call1_count(real_store, agent) == expected[agent]
    counters = real_store.counters()
    assert counters["runs_learned"] == 2000
    # Both learn paths ran: ingest learned runs from memory, and the learn
    # task took what it could not (four processes racing on three agents).
    assert 0 < counters["fast_path_runs"] < 2000
    dead = [json.loads(d) for d in real_store.dead_letters()]
    assert len(dead) == len(malformed)
    assert all(d["stage"] == "ingest" and d["reason"] for d in dead)

    replay_prefix = prefix.rstrip(":") + "-replay:"
    try:
        _replay_in_index_order(real_store, agents, tmp_path, replay_prefix)
        assert dump_state(real_redis, prefix) == dump_state(real_redis, replay_prefix)
    finally:
        Store(real_redis, replay_prefix).delete_prefix()


def test_nothing_is_reserved_behind_a_long_learn(real_store: Store, tmp_path: Path) -> None:
    """A worker reserves the next ingest message while one runs (prefetch 2),
    but never behind a long task: while its only pool process learns a
    10,000-run backlog, an ingest message published meanwhile stays in the
    broker's queue, where an idle worker could take it (worker/prefetch.py)."""
    prefix = real_store.keys.prefix
    queue = f"{prefix}adaptive_worker:celery:adaptive.ingest"
    backlog = [
        parse_wire(RunRecord, run) for run in synthetic_runs(10_000, agent_id="backlog", seed=31)
    ]
    real_store.store_runs(backlog[:-1])  # stored, never learned: one long learn ahead
    client = _client(prefix, tmp_path)
    env = worker_env(prefix, REDIS_URL, ingest_fast_path=False)
    try:
        with celery_workers(env, tmp_path) as workers:
            workers.start("w", concurrency=1)
            client.submit_run(backlog[-1].to_json())  # its ingest schedules the learn
            assert client.flush(30)
            wait_until(
                lambda: 0 < real_store.cursor("backlog").learned < 4000,
                60,
                "learn under way",
                poll=0.01,
            )
            client.submit_runs(list(synthetic_runs(5, agent_id="late", seed=32)))
            assert client.flush(10)
            time.sleep(0.5)
            assert real_store.cursor("backlog").learned < 10_000  # the learn still runs
            assert real_store.client.llen(queue) == 1  # and the message waits for anyone
            expected = {"backlog": 10_000, "late": 5}
            wait_until(lambda: caught_up(real_store, list(expected), expected), 120, "learned")
    finally:
        client.close(5)


def test_kill_9_mid_learn_loses_and_doubles_nothing(
    real_store: Store, real_redis: redis.Redis, tmp_path: Path
) -> None:
    prefix = real_store.keys.prefix
    agent = "crash-agent"
    runs = list(synthetic_runs(3000, agent_id=agent, seed=99))
    # The learn task's crash: with the fast path on, ingest learns each
    # batch as it lands, so "all stored, learning behind" is a race the test
    # would win or lose by timing. The kill storm kills the fast path.
    env = worker_env(
        prefix,
        REDIS_URL,
        ingest_fast_path=0,
        learn_batch_size=50,
        learn_time_budget_s=2,
        task_time_limit_s=5,
        broker_visibility_timeout_s=10,
        broker_restore_interval_s=1,
        broker_restore_throttle=1,
    )
    with celery_workers(env, tmp_path) as workers:
        first = workers.start("w1", concurrency=2)
        client = _client(prefix, tmp_path)
        client.submit_runs(runs)
        assert client.flush(60)
        client.close(5)

        def mid_learn() -> bool:
            # Every run stored, learning under way. Killing while an ingest
            # message is between kombu's BRPOP and its unacked record would
            # lose that message (a window of the Redis transport, see the
            # README's delivery guarantees); this test is about learning.
            c = real_store.cursor(agent)
            return c.index_length == 3000 and 0 < c.learned < 2500

        wait_until(mid_learn, 120, "learning to start")
        first.kill_group()
        killed_at = time.monotonic()
        learned_at_kill = real_store.cursor(agent).learned
        assert learned_at_kill < 3000

        workers.start("w2", concurrency=2)
        wait_until(
            lambda: caught_up(real_store, [agent], {agent: 3000}),
            120,
            "learning to resume",
            lambda: f": {real_store.cursor(agent)}, counters {real_store.counters()}",
        )
        resumed_in = time.monotonic() - killed_at

    assert resumed_in < 120
    assert real_store.cursor(agent).learned == 3000
    assert _root_call1_count(real_store, agent) == 3000
    assert real_store.counters()["runs_learned"] == 3000
    assert real_store.dead_letter_count() == 0


@needs_rabbitmq
def test_rabbitmq_broker_learns_the_same(
    real_store: Store, real_redis: redis.Redis, tmp_path: Path, vhost: str
) -> None:
    """Broker on RabbitMQ (a vhost of its own), state on Redis: same runs, same counts."""
    amqp = vhost_url(vhost)
    prefix = real_store.keys.prefix
    agent = "amqp-agent"
    runs = list(synthetic_runs(120, agent_id=agent, seed=3))
    env = worker_env(prefix, REDIS_URL, broker_url=amqp)
    with celery_workers(env, tmp_path) as workers:
        workers.start("w1", concurrency=2)
        settings = load_settings(
            _env_file=None,
            redis_url=REDIS_URL,
            broker_url=amqp,
            key_prefix=prefix,
            client_spool_dir=tmp_path / "spool",
        )
        client = RunClient(settings)
        client.submit_runs(runs + runs[:20])
        assert client.flush(60)
        client.close(5)
        wait_until(lambda: caught_up(real_store, [agent], {agent: 120}), 120, "learning")
    assert _root_call1_count(real_store, agent) == 120


def test_beat_discover_learns_runs_the_runtime_wrote_itself(
    real_store: Store, tmp_path: Path
) -> None:
    """A NeMo Relay agent with learners off only writes runs and runs_index:
    nobody enqueues a learn, the beat's discover sweep must find them."""
    from tests.goldens import load_capture

    cap = load_capture("relay-openai")
    env = worker_env(real_store.keys.prefix, REDIS_URL, discover_interval_s=1)
    with celery_workers(env, tmp_path) as workers:
        workers.start("w1", concurrency=1, extra=("-B", "-s", str(tmp_path / "beat-schedule")))
        for raw in cap.runs:
            run_id = json.loads(raw)["id"]
            real_store.client.set(real_store.keys.run(cap.agent_id, run_id), raw)
            real_store.client.rpush(real_store.keys.runs_index(cap.agent_id), run_id)
        wait_until(lambda: caught_up(real_store, [cap.agent_id], {cap.agent_id: 4}), 60, "discover")
    assert json.loads(real_store.client.get(real_store.keys.plan(cap.agent_id))) == cap.value(
        "plan"
    )
