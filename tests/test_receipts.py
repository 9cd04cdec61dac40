"""End-to-end receipts on the Redis broker: a run the broker lost is republished.

The loss itself (kombu pops a message, a SIGKILL lands before it is recorded
as unacked) cannot be provoked on demand, so these tests cause its effect
directly: the ingest message is deleted from the broker's queue after the
client published it. Real Redis, real `celery worker` processes.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis

from adaptive_worker_client import RunClient
from adaptive_worker_client.config import ClientSettings
from adaptive_worker_client.contract import INGEST_QUEUE, broker_key_prefix
from adaptive_worker_client.receipts import ReceiptLedger
from bench.workload import synthetic_runs
from storage.keys import Keys
from storage.store import Store
from tests.conftest import REDIS_URL
from tests.pipeline import (
    Workers,
    caught_up,
    celery_workers,
    message_body,
    wait_until,
    worker_env,
)
from worker.settings import Settings, load_settings


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test passes counts, not the developer's ADAPTIVE_* variables."""
    for var in [v for v in os.environ if v.startswith("ADAPTIVE_")]:
        monkeypatch.delenv(var)


def make_settings(prefix: str, spool: Path, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": REDIS_URL,
        "key_prefix": prefix,
        "client_spool_dir": spool,
        "client_retry_interval_s": 0.2,
        "client_linger_ms": 0.0,
        "client_receipt_timeout_s": 1.0,
    }
    values.update(over)
    return load_settings(_env_file=None, **values)


def queued_bodies(r: redis.Redis, prefix: str) -> list[tuple[str | None, bytes]]:
    """(compression header, body inflated) of each ingest message on the broker."""
    out = []
    for raw in r.lrange(broker_key_prefix(prefix) + INGEST_QUEUE, 0, -1):
        envelope = json.loads(raw)
        out.append((envelope["headers"].get("compression"), message_body(envelope)))
    return out


def queued_run_ids(r: redis.Redis, prefix: str) -> list[str]:
    """Run ids in the ingest queue's messages, as they are on the broker."""
    ids = []
    for _compression, body in queued_bodies(r, prefix):
        args, _kwargs, _embed = json.loads(body)
        ids += [json.loads(text)["id"] for text in args[0]]
    return ids


@pytest.mark.parametrize(("setting", "header"), [("zlib", "application/x-gzip"), ("none", None)])
def test_ingest_bodies_are_compressed_unless_turned_off(
    real_redis: redis.Redis, tmp_path: Path, client_factory: Any, setting: str, header: str | None
) -> None:
    """ADAPTIVE_BROKER_COMPRESSION: zlib (the default) shrinks a batch's body
    several times over; either way it carries the same runs."""
    prefix = f"test-compress:{uuid.uuid4().hex[:8]}:"
    runs = list(synthetic_runs(50, agent_id="agent-z", seed=5))
    client = client_factory(make_settings(prefix, tmp_path / "spool", broker_compression=setting))
    client.submit_runs(runs)
    assert client.flush(10)
    try:
        [(compression, body)] = queued_bodies(real_redis, prefix)
        raw = real_redis.lindex(broker_key_prefix(prefix) + INGEST_QUEUE, 0)
        assert compression == header
        assert sorted(queued_run_ids(real_redis, prefix)) == sorted(r["id"] for r in runs)
        on_wire = len(base64.b64decode(json.loads(raw)["body"]))
        if header is None:
            assert on_wire == len(body)
        else:
            assert on_wire * 5 < len(body)  # 50 runs of one agent repeat their prompts
    finally:
        real_redis.delete(broker_key_prefix(prefix) + INGEST_QUEUE)


def root_count(store: Store, agent: str) -> int:
    acc = json.loads(store.client.get(store.keys.accumulators(agent)))
    return int(acc["nodes"][""]["remaining_calls"]["1"]["count"])


@pytest.fixture
def client_factory() -> Iterator[Any]:
    made: list[RunClient] = []

    def make(settings: Settings) -> RunClient:
        c = RunClient(settings)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close(timeout=2.0)


@pytest.fixture(scope="module")
def shared_worker(
    real_redis: redis.Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Store, Workers]]:
    """One worker for the tests that only need one running (each uses its own agents)."""
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    store = Store(real_redis, prefix)
    try:
        with celery_workers(worker_env(prefix, REDIS_URL), tmp_path_factory.mktemp("w")) as ws:
            ws.start("receipts", concurrency=1)
            yield store, ws
    finally:
        store.delete_prefix()


@pytest.mark.slow
def test_a_lost_ingest_message_is_republished_and_learned_once(
    real_store: Store, real_redis: redis.Redis, tmp_path: Path, client_factory: Any
) -> None:
    prefix = real_store.keys.prefix
    agent = "agent-lost"
    runs = list(synthetic_runs(3, agent_id=agent, seed=3))
    ids = sorted(r["id"] for r in runs)
    client = client_factory(make_settings(prefix, tmp_path / "spool"))
    client.submit_runs(runs)
    assert client.flush(10)
    assert sorted(queued_run_ids(real_redis, prefix)) == ids
    # The lost pop: the message leaves the queue and reaches no worker.
    assert real_redis.delete(broker_key_prefix(prefix) + INGEST_QUEUE) == 1
    assert client.stats()["receipts_pending"] == 3

    wait_until(lambda: client.stats()["republished"] == 3, 15, "the client to republish")
    assert sorted(queued_run_ids(real_redis, prefix)) == ids

    with celery_workers(worker_env(prefix, REDIS_URL), tmp_path) as workers:
        workers.start("w1", concurrency=1)
        wait_until(lambda: caught_up(real_store, [agent], {agent: 3}), 60, "learning")
        wait_until(lambda: client.stats()["receipts_pending"] == 0, 15, "the receipts")
    stats = client.stats()
    assert (stats["confirmed"], stats["unconfirmed"]) == (3, 0)
    assert sorted(real_store.run_ids(agent)) == ids
    assert real_store.counters()["runs_learned"] == 3
    assert root_count(real_store, agent) == 3


@pytest.mark.slow
def test_stored_and_trimmed_runs_leave_the_ledger_without_republishing(
    shared_worker: tuple[Store, Workers], tmp_path: Path, client_factory: Any
) -> None:
    store, _ = shared_worker
    prefix = store.keys.prefix
    agents = ["agent-s0", "agent-s1"]
    runs = [r for i, a in enumerate(agents) for r in synthetic_runs(50, agent_id=a, seed=20 + i)]
    # One run retention already trimmed: the worker refuses it (tombstone), so
    # only the tombstone can tell the client it arrived.
    trimmed = next(synthetic_runs(1, agent_id=agents[0], seed=99))
    store.client.zadd(store.keys.tombstones(agents[0]), {trimmed["id"]: time.time()})
    # A timeout well above the worker's storing time even on a busy machine:
    # a republish here would be a false alarm.
    client = client_factory(make_settings(prefix, tmp_path / "spool", client_receipt_timeout_s=3.0))
    client.submit_runs([*runs, trimmed])
    assert client.flush(10)
    wait_until(lambda: client.stats()["receipts_pending"] == 0, 20, "the receipts")
    stats = client.stats()
    assert (stats["confirmed"], stats["republished"], stats["unconfirmed"]) == (101, 0, 0)
    assert stats["receipts_pending_bytes"] == 0
    assert trimmed["id"] not in store.run_ids(agents[0])
    # Amortised: two ZMSCORE per agent per check, no per-run command.
    assert stats["receipt_checks"] >= 1
    assert stats["receipt_commands"] <= 2 * len(agents) * stats["receipt_checks"]
    print(
        f"\nreceipts: {stats['confirmed']} runs confirmed in {stats['receipt_checks']} round"
        f" trips, {stats['receipt_commands']} commands"
        f" ({stats['receipt_commands'] / stats['confirmed']:.3f} per run)"
    )


@pytest.mark.slow
def test_a_dead_lettered_run_is_republished_at_most_k_times_then_given_up(
    shared_worker: tuple[Store, Workers], tmp_path: Path, client_factory: Any
) -> None:
    store, _ = shared_worker
    prefix = store.keys.prefix
    agent = "agent-dead"
    good = next(synthetic_runs(1, agent_id=agent, seed=7))
    bad = {"id": str(uuid.uuid4()), "agent_id": agent, "calls": "nope", "started_at": "x"}
    before = len(store.dead_letters())
    settings = make_settings(
        prefix, tmp_path / "spool", client_receipt_timeout_s=0.3, client_receipt_max_republish=2
    )
    client = client_factory(settings)
    client.submit_run(good)
    assert client.flush(10)
    # Stored before its first check (short timeout): never republished.
    wait_until(lambda: store.run_ids(agent) == [good["id"]], 20, "the good run to be stored")
    client.submit_run(bad)
    assert client.flush(10)
    wait_until(lambda: client.stats()["unconfirmed"] == 1, 20, "the bad run to be given up")
    time.sleep(1.5)  # and it stays given up: no republish after that
    stats = client.stats()
    assert (stats["confirmed"], stats["republished"], stats["unconfirmed"]) == (1, 2, 1)
    assert stats["receipts_pending"] == 0
    # The worker saw the bad run three times (sent once, republished twice): three dead letters.
    dead = [json.loads(d) for d in store.dead_letters()[before:]]
    assert len([d for d in dead if bad["id"] in d.get("raw", "")]) == 3
    assert store.run_ids(agent) == [good["id"]]


# ------------------------------------------------------------ the ledger alone


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ledger_for(client: redis.Redis, clock: Clock, **over: Any) -> tuple[ReceiptLedger, Keys]:
    settings = ClientSettings(
        redis_url="redis://unused", key_prefix="p:", client_receipt_timeout_s=1.0, **over
    )
    return ReceiptLedger(settings, lambda: client, clock=clock), Keys("p:")


def record(agent: str = "a", i: int = 1) -> tuple[str, str | None, int]:
    text = json.dumps({"id": str(uuid.UUID(int=i)), "agent_id": agent, "calls": []})
    return (text, agent, len(text))


def run_id(i: int) -> str:
    return str(uuid.UUID(int=i))


def test_a_run_the_runtime_wrote_itself_counts_as_arrived() -> None:
    """No stored-at entry (not stored by our script), but the run key exists."""
    fake = fakeredis.FakeRedis(decode_responses=True)
    clock = Clock()
    ledger, keys = ledger_for(fake, clock)
    ledger.track([record("a", 2), record("a", 1)])  # 1 published after 2
    fake.set(keys.run("a", run_id(1)), "{}")
    clock.now += 1.0
    republish = ledger.check()
    assert [json.loads(r[0])["id"] for r in republish] == [run_id(2)]
    assert (ledger.confirmed, ledger.republished, len(ledger)) == (1, 1, 1)


def test_a_missing_run_is_held_while_nothing_published_after_it_is_stored() -> None:
    """Workers behind (busy, killed, restarting) is not a loss: republishing then
    would only add load when workers are scarce. Once a run published later is
    seen stored, or after a few timeouts anyway, the missing run goes again."""
    fake = fakeredis.FakeRedis(decode_responses=True)
    clock = Clock()
    ledger, keys = ledger_for(fake, clock)
    ledger.track([record("a", 1), record("a", 2)])
    clock.now += 1.0
    assert ledger.check() == []  # neither stored: a backlog
    assert (ledger.held, ledger.republished) == (2, 0)
    fake.zadd(keys.stored_at("a"), {run_id(2): 1.0})  # the later one arrives
    clock.now += 1.0
    assert [json.loads(r[0])["id"] for r in ledger.check()] == [run_id(1)]
    ledger.track([record("b", 3)])  # alone, nothing after it will ever vouch
    republished = []
    for _ in range(8):
        clock.now += 1.0
        republished += [json.loads(r[0])["id"] for r in ledger.check()]
    assert run_id(3) in republished  # after at most 4 timeouts of holding


def test_redis_down_judges_no_run_lost() -> None:
    down = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    clock = Clock()
    ledger, _ = ledger_for(down, clock)
    ledger.track([record("a", 1)])
    clock.now += 5.0
    assert ledger.check() == []
    assert (ledger.errors, ledger.republished, ledger.unconfirmed, len(ledger)) == (1, 0, 0, 1)
    assert ledger.last_error is not None and "ConnectionError" in ledger.last_error


def test_a_full_ledger_checks_the_oldest_early_and_gives_up_the_missing() -> None:
    fake = fakeredis.FakeRedis(decode_responses=True)
    clock = Clock()
    size = record("a", 1)[2]
    ledger, keys = ledger_for(fake, clock, client_receipt_max_bytes=3 * size)
    fake.zadd(keys.stored_at("a"), {run_id(1): 1.0})  # run 1 stored, run 2 not (yet)
    ledger.track([record("a", i) for i in range(1, 6)])
    assert ledger.check() == []  # nothing is due: only the byte bound acts
    assert (ledger.confirmed, ledger.unconfirmed, len(ledger)) == (1, 1, 3)
    assert ledger.bytes == 3 * size
