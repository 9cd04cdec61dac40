"""Redis Sentinel for state and broker, and `WAIT`: acknowledged means on a replica.

The failover test runs a primary, a replica and three sentinels of its own
(tests/sentinel_cluster.py), a real `celery worker` and the agent-side
client, both configured with the sentinels only, and `kill -9`s the primary
while runs arrive; the killed node rejoins only as the new primary's empty
replica, once every sentinel agrees (why: tests/sentinel_cluster.py). A
second cluster checks that every other reader of the state (CLI, metrics,
tasks.mixed, the client's StateReader and receipts) follows a promotion.
Skipped only when no `redis-server` binary exists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import redirect_stdout, suppress
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import redis

from adaptive_worker_client import RunClient
from adaptive_worker_client.broker import publisher_app
from bench.workload import synthetic_runs
from storage.connection import connect_state, relay_address_problem
from storage.models import RunRecord
from storage.store import NotDurable, Store
from tests.pipeline import celery_workers, wait_until, worker_env
from tests.private_redis import PrivateRedis
from tests.sentinel_cluster import sentinel_cluster
from worker.celery import create_app
from worker.settings import SettingsError, load_settings

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------ settings


def test_sentinels_win_over_redis_urls_for_state_and_broker() -> None:
    s = load_settings(
        _env_file=None,
        redis_url="redis://10.0.0.9:6379/0",
        redis_sentinels="10.0.0.1:26379, 10.0.0.2:26380",
        redis_sentinel_service="adaptive",
        redis_sentinel_password="p@ss",
    )
    assert not s.embedded
    assert s.effective_broker_url == (
        "sentinel://:p%40ss@10.0.0.1:26379;sentinel://:p%40ss@10.0.0.2:26380"
    )
    for conf in (create_app(s).conf, publisher_app(s).conf):
        options = conf.broker_transport_options
        assert options["master_name"] == "adaptive"
        assert options["sentinel_kwargs"] == {"password": "p@ss"}
        assert options["global_keyprefix"] == "nemo_relay:adaptive_worker:celery:"
        assert conf.broker_use_ssl is None
    # A RabbitMQ broker stays: Sentinel only replaces Redis addresses.
    amqp = load_settings(
        _env_file=None, redis_sentinels="h:1", broker_url="amqp://guest:guest@h:5672//"
    )
    assert amqp.effective_broker_url == "amqp://guest:guest@h:5672//"


def test_sentinel_tls_reuses_the_tls_settings() -> None:
    s = load_settings(_env_file=None, redis_sentinels="h:1", redis_sentinel_tls=True)
    options = create_app(s).conf.broker_transport_options["sentinel_kwargs"]
    assert options == {"ssl": True, "ssl_cert_reqs": "required", "ssl_check_hostname": True}
    assert create_app(s).conf.broker_use_ssl["ssl_check_hostname"] is True


@pytest.mark.parametrize(
    ("value", "bad"), [("h", "h"), ("h:port", "h:port"), (":26379", ":26379"), ("a:1,,b:0", "b:0")]
)
def test_a_bad_sentinel_list_names_the_variable_and_entry(value: str, bad: str) -> None:
    expected = f"ADAPTIVE_REDIS_SENTINELS: expected host:port, got '{bad}'"
    with pytest.raises(SettingsError, match=expected):
        load_settings(_env_file=None, redis_sentinels=value)


# ---------------------------------------------------------------- durability


def _run(i: int, agent: str = "agent-d") -> RunRecord:
    payload = next(iter(synthetic_runs(1, agent_id=agent, seed=i)))
    return RunRecord.model_validate(payload)


@pytest.fixture
def primary_and_replica(tmp_path: Path) -> Iterator[tuple[PrivateRedis, PrivateRedis]]:
    primary = PrivateRedis(tmp_path / "p", extra=["--repl-diskless-sync-delay", "0"])
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    replica = PrivateRedis(tmp_path / "r", extra=["--replicaof", "127.0.0.1", str(primary.port)])
    try:
        primary.start()
        replica.start()
        # The primary counts the replica for WAIT only once it acknowledged.
        probe = primary.client()
        probe.set("sync-probe", "1")
        wait_until(lambda: probe.wait(1, 200) >= 1, 10, "the replica to sync")
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


def test_store_and_commit_wait_for_a_replica_or_refuse(
    primary_and_replica: tuple[PrivateRedis, PrivateRedis],
) -> None:
    primary, replica = primary_and_replica
    client = redis.Redis(port=primary.port, decode_responses=True)
    store = Store(client, "dur:", durability_replicas=1, durability_timeout_ms=300)
    first = _run(1)
    assert store.store_runs([first]) == [True]
    # WAIT returned: the replica has the run now, not eventually.
    on_replica = redis.Redis(port=replica.port, decode_responses=True)
    assert on_replica.lrange(store.keys.runs_index(first.agent_id), 0, -1) == [first.id]

    assert replica.proc is not None
    replica.proc.send_signal(signal.SIGSTOP)  # a replica that stopped acknowledging
    try:
        second = _run(2)
        started = time.monotonic()
        with pytest.raises(NotDurable, match="storing runs: 0 of 1 replica"):
            store.store_runs([second])
        assert 0.25 <= time.monotonic() - started < 3
        with pytest.raises(NotDurable, match="learn commit: 0 of 1 replica"):
            store.commit(first.agent_id, 0, 1, {store.keys.plan(first.agent_id): "{}"})
        # Off (N=0), the same writes return at once, as before.
        loose = Store(client, "dur:")
        assert loose.store_runs([_run(3)]) == [True]
    finally:
        replica.proc.send_signal(signal.SIGCONT)
    # The refused store is on the primary (a retry is idempotent).
    assert store.store_runs([second]) == [False]


# ------------------------------------------------------------------ failover


def _root_count(client: redis.Redis, store: Store, agent: str) -> int:
    raw = client.get(store.keys.accumulators(agent))
    if raw is None:
        return 0
    count: int = json.loads(raw)["nodes"][""]["remaining_calls"]["1"]["count"]
    return count


def _index(client: redis.Redis, store: Store, agents: list[str]) -> list[str]:
    ids: list[str] = []
    for agent in agents:
        ids += client.lrange(store.keys.runs_index(agent), 0, -1)
    return ids


def _node_store(node: PrivateRedis, prefix: str) -> Store:
    """A store on one node, not through the sentinels: what THAT node holds."""
    return Store(redis.Redis(port=node.port, decode_responses=True), prefix)


def _frozen_replica_index(node: PrivateRedis, prefix: str, agents: list[str]) -> set[str]:
    """The run ids a replica holds right after its primary was killed.

    A replica takes no writes of its own and its primary is gone, so until
    it is promoted its data is exactly what it had at the kill: a superset
    of every store acknowledged with `WAIT 1` (the only replica had it when
    WAIT returned). `ROLE` before and after the read proves no promotion
    happened in between.
    """
    client = _node_store(node, prefix).client
    assert client.execute_command("ROLE")[0] == "slave"
    ids = set(_index(client, Store(client, prefix), agents))
    assert client.execute_command("ROLE")[0] == "slave", "promoted while being read: too slow"
    return ids


def test_failover_under_load_loses_nothing_acknowledged_and_learns_once(
    tmp_path: Path, prefix: str
) -> None:
    """`kill -9` of the primary while runs arrive, the real guarantee checked:

    - every run on the replica at the kill (a superset of everything
      acknowledged with WAIT 1) is on the promoted node right after the
      promotion, and still there once the killed node rejoined;
    - learning resumes on the new primary without a worker restart;
    - no run is learned twice, and (the client's receipts read the state
      through the sentinels too, and republish what the broker lost with its
      primary) none is lost.

    The killed node rejoins only as it does in production done right: after
    every sentinel names the new primary, empty, as that primary's replica
    (`SentinelCluster.rejoin`); WAIT 1 needs a replica again from then on.
    """
    agents = ["agent-0", "agent-1"]
    runs: list[dict[str, Any]] = []
    for i, agent in enumerate(agents):
        runs += list(synthetic_runs(600, agent_id=agent, seed=40 + i))
    runs.sort(key=lambda r: r["id"])  # interleave the agents
    with sentinel_cluster(tmp_path / "cluster") as cluster:
        settings = load_settings(
            _env_file=None,
            redis_sentinels=cluster.sentinels,
            key_prefix=prefix,
            client_spool_dir=tmp_path / "spool",
            client_retry_interval_s=0.2,
            client_linger_ms=20,
            # Runs the broker lost with its primary are republished after this.
            client_receipt_timeout_s=3,
        )
        # What NeMo Relay agents would be given: nothing (warned), a node (warned).
        assert relay_address_problem(settings) is not None
        primary_url = f"redis://127.0.0.1:{cluster.primary.port}/0"
        node = settings.model_copy(update={"redis_url": primary_url})
        assert "a node Sentinel may demote" in (relay_address_problem(node) or "")
        proxy = settings.model_copy(update={"redis_url": "redis://10.9.9.9:6379/0"})
        assert relay_address_problem(proxy) is None

        env = worker_env(
            prefix,
            "",
            redis_sentinels=cluster.sentinels,
            durability_replicas=1,
            durability_timeout_ms=500,
            broker_visibility_timeout_s=20,
            task_time_limit_s=10,
            broker_restore_interval_s=1,
            broker_restore_throttle=1,
            learn_batch_size=100,
            learn_linger_s=0.1,
            # A learn message lost with the primary (its retry could not be
            # published either) is found again by the discover sweep once its
            # pending marker expires: both short here.
            learn_pending_ttl_s=4,
            # A learner that lost its connection mid-step keeps its lease
            # (budget + 10 s) on the new primary: a short budget bounds that.
            learn_time_budget_s=2,
            discover_interval_s=2,
            rebuild_interval_s=0,
            retention_interval_s=0,
            metrics_port=0,
        )
        env.pop("ADAPTIVE_REDIS_URL")
        state = connect_state(settings)  # the test's own view, through the sentinels
        store = Store(state, prefix)
        with celery_workers(env, tmp_path) as workers:
            beat = ("-B", "-s", str(tmp_path / "beat-schedule"))
            worker = workers.start("w1", concurrency=2, extra=beat)
            client = RunClient(settings)
            assert client.stats()["receipts"] is True, "receipts must follow Sentinel"
            stop = threading.Event()

            def submit() -> None:
                for start in range(0, len(runs), 20):
                    client.submit_runs(runs[start : start + 20])
                    time.sleep(0.04)  # ~500 runs/s offered
                stop.set()

            feeder = threading.Thread(target=submit)
            feeder.start()
            wait_until(lambda: len(_index(state, store, agents)) >= 300, 30, "runs stored")
            old = cluster.master_address()
            assert old == ("127.0.0.1", cluster.primary.port)
            replica = cluster.replica
            killed = time.monotonic()
            dead = cluster.kill_primary()
            acked = _frozen_replica_index(replica, prefix, agents)

            probe = Store(connect_state(settings), prefix)
            while True:  # kill -> first successful write through the sentinels
                try:
                    probe.client.set(f"{prefix}probe", "1")
                    break
                except redis.RedisError:
                    assert time.monotonic() - killed < 45, "no write succeeded after failover"
                    time.sleep(0.05)
            failover_s = time.monotonic() - killed
            new = cluster.wait_promoted(old)
            agreed_s = time.monotonic() - killed
            assert new == ("127.0.0.1", replica.port)
            promoted = _node_store(replica, prefix)
            on_promoted = set(_index(promoted.client, promoted, agents))
            assert acked <= on_promoted, f"{len(acked - on_promoted)} replicated runs gone"
            learned_at_promotion = sum(promoted.cursor(a).learned for a in agents)

            # Only now, and only as a replica of the new primary, empty.
            rejoin_s = cluster.rejoin(dead, new)
            on_promoted = set(_index(promoted.client, promoted, agents))
            assert acked <= on_promoted, "the rejoining node wiped the new primary"

            feeder.join(60)
            assert client.flush(60)

            def settled() -> bool:
                stored = _index(state, store, agents)
                return all(store.cursor(a).lag == 0 for a in agents) and len(stored) == len(runs)

            # The client stays open meanwhile: its receipts republish lost runs.
            settled_s = -1.0
            with suppress(TimeoutError):  # measured and asserted below
                settled_s = wait_until(settled, 60, "every run stored and learned")
            stats = client.stats()
            client.close(5)
            assert worker.proc.poll() is None, "the worker must survive the failover"
            # Warned once, at start, by the main process (not once per child).
            warning = "Sentinel is configured but ADAPTIVE_REDIS_URL is not"
            assert worker.log.read_text().count(warning) == 1
            stored = _index(state, store, agents)
            learned = sum(store.cursor(a).learned for a in agents)
            root = sum(_root_count(state, store, a) for a in agents)
            counts = {
                "submitted": len(runs),
                "published": stats["published"],
                "stored": len(set(stored)),
                "learned": root,
                "lost": len(runs) - len(set(stored)),
                "duplicated": len(stored) - len(set(stored)),
                "learned_twice": root - len(set(stored)),
                "on_replica_at_kill": len(acked),
                "failover_s": round(failover_s, 2),
                "sentinels_agreed_s": round(agreed_s, 2),
                "rejoin_s": round(rejoin_s, 2),
                "all_learned_s_after_kill": round(time.monotonic() - killed, 1)
                if settled_s >= 0
                else None,
                "receipts_republished": stats["republished"],
                "not_durable_retries": worker.log.read_text().count("NotDurable"),
            }
            print("sentinel failover:", counts)
            (tmp_path / "counts.json").write_text(json.dumps(counts))
            if os.environ.get("ADAPTIVE_TEST_REPORT"):
                Path(os.environ["ADAPTIVE_TEST_REPORT"]).write_text(json.dumps(counts))
            assert acked <= set(stored), "a run on the replica at the kill was lost"
            assert settled_s >= 0, f"not every run stored and learned: {counts}"
            assert counts["lost"] == 0 and counts["duplicated"] == 0, counts
            assert learned > learned_at_promotion, "learning did not resume on the new primary"
            for agent in agents:
                ids = state.lrange(store.keys.runs_index(agent), 0, -1)
                cursor = store.cursor(agent)
                assert cursor.learned == cursor.end == len(ids)
                assert _root_count(state, store, agent) == len(ids), "a run was learned twice"


# ------------------------------------------------- readers follow the sentinels


def test_every_reader_follows_a_failover(
    tmp_path: Path, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI, the metrics scrape, `tasks.mixed`, the client's StateReader and
    its receipts all read the primary the sentinels name, before and after a
    promotion: state learned on the old primary (replicated) and state
    written only on the new one are both seen, although ADAPTIVE_REDIS_URL
    still names the killed node (as NeMo Relay agents wrongly given a node
    address would have it). Expected plans are the real runtime's captures.
    """
    from typer.testing import CliRunner

    from adaptive_worker_client.config import load_client_settings
    from adaptive_worker_client.reader import StateReader, state_client
    from adaptive_worker_client.receipts import ReceiptLedger, receipts_enabled
    from tasks import mixed
    from tests.goldens import load_capture
    from worker.cli import EXIT_UNAVAILABLE, app
    from worker.metrics import metrics_store, snapshot
    from worker.samples import sample_runs
    from worker.settings import use_settings

    captures = {"travel-openai": "relay-openai", "travel-anthropic": "relay-anthropic"}
    samples = sample_runs()
    assert sorted(samples) == sorted(captures)
    with sentinel_cluster(tmp_path / "cluster") as cluster:
        first = cluster.master_address()
        old_url = f"redis://127.0.0.1:{first[1]}/0"
        for var in [v for v in os.environ if v.startswith("ADAPTIVE_")]:
            monkeypatch.delenv(var)
        monkeypatch.setenv("ADAPTIVE_REDIS_SENTINELS", cluster.sentinels)
        monkeypatch.setenv("ADAPTIVE_REDIS_URL", old_url)
        monkeypatch.setenv("ADAPTIVE_KEY_PREFIX", prefix)
        monkeypatch.setenv("ADAPTIVE_CLIENT_SPOOL_DIR", str(tmp_path / "spool"))

        def cli(*args: str) -> Any:
            result = CliRunner().invoke(app, [*args, "--json"])
            assert result.exit_code == 0, result.output
            return json.loads(result.stdout)

        def replay(agent: str) -> None:
            path = tmp_path / f"{agent}.jsonl"
            path.write_text("".join(run + "\n" for run in samples[agent]))
            summary = cli("replay", str(path))
            assert summary["runs_stored"] == summary["learned"] == len(samples[agent]) == 4

        replay("travel-openai")  # on the first primary, through the sentinels
        writer = cluster.node_at(first).client()
        writer.set(f"{prefix}sync-probe", "1")  # WAIT counts replicas that acked THIS write
        assert writer.wait(1, 5000) == 1, "the replica did not take the first agent's state"
        cluster.kill_primary()
        new = cluster.wait_promoted(first)
        replay("travel-anthropic")  # only the new primary ever held this agent

        # CLI: the current primary, whatever ADAPTIVE_REDIS_URL says.
        rows = {row["agent_id"]: row for row in cli("agents")}
        assert sorted(rows) == sorted(captures)
        for agent, capture in captures.items():
            row = rows[agent]
            assert (row["runs"], row["learned"], row["lag"]) == (4, 4, 0), row
            expected = load_capture(capture).value("plan")["parallel_groups"]
            assert cli("plan", agent)["parallel_groups"] == expected
        # `--redis-url` names one server, not the service: the dead node.
        dead = CliRunner().invoke(app, ["agents", "--redis-url", old_url])
        assert dead.exit_code == EXIT_UNAVAILABLE, dead.output

        # Server readers outside the CLI: the metrics scrape and tasks.mixed.
        settings = load_settings()
        numbers = snapshot(metrics_store(settings))
        assert numbers["agent_count"] == 2 and numbers["lag_total"] == 0
        assert {a: n["learned"] for a, n in numbers["agents"].items()} == dict.fromkeys(captures, 4)
        use_settings(settings)
        try:
            out = tmp_path / "mixed.out"
            with out.open("w") as sink, redirect_stdout(sink):
                assert mixed.main([]) == 0  # our own writes: nothing foreign
        finally:
            use_settings(None)
        reports = [json.loads(line) for line in out.read_text().splitlines()]
        assert sorted(r["agent_id"] for r in reports) == sorted(captures)
        assert all(r["verified"] and r["learned"] == 4 for r in reports), reports

        # The agent side, from its own settings loader.
        client_settings = load_client_settings(env_file=None)
        assert client_settings.redis_sentinels == cluster.sentinels
        reader = StateReader(client_settings, ttl_s=0, strict=True)
        for agent, capture in captures.items():
            plan = reader.load_plan(agent)
            assert plan is not None, agent
            expected = load_capture(capture).value("plan")["parallel_groups"]
            got = plan.model_dump(mode="json", by_alias=True)["parallel_groups"]
            assert [g["group_id"] for g in got] == [g["group_id"] for g in expected]
        assert reader.stats()["errors"] == 0

        # Receipts: runs stored on the new primary are confirmed, a run never
        # stored is republished (it was published before the confirmed ones).
        assert receipts_enabled(client_settings), "auto: on for the Sentinel broker"
        # ... also with no ADAPTIVE_REDIS_URL at all: the sentinels suffice.
        assert receipts_enabled(dataclasses.replace(client_settings, redis_url=None))
        now = [0.0]
        ledger = ReceiptLedger(
            client_settings, lambda: state_client(client_settings), clock=lambda: now[0]
        )
        never = json.dumps({**json.loads(samples["travel-anthropic"][0]), "id": str(uuid4())})
        stored_runs = samples["travel-anthropic"] + samples["travel-openai"]
        ledger.track([(raw, None, len(raw)) for raw in [never, *stored_runs]])
        now[0] += client_settings.client_receipt_timeout_s + 1
        republish = ledger.check()
        assert [r[0] for r in republish] == [never]
        assert ledger.stats()["confirmed"] == len(stored_runs) == 8
        assert ledger.errors == 0, ledger.last_error
        assert new == cluster.master_address()


def test_a_failover_while_restoring_unacked_is_a_connection_error_not_a_crash() -> None:
    """kombu's own channel raises AttributeError here and the worker exits."""
    from types import SimpleNamespace

    from kombu.transport.redis import SentinelChannel as KombuChannel

    from worker.kombu_sentinel import SentinelChannel, Transport

    closed = SimpleNamespace(connection=SimpleNamespace(client=None))
    with pytest.raises(AttributeError):
        KombuChannel._connparams(closed)
    with pytest.raises(redis.ConnectionError) as caught:
        SentinelChannel._connparams(closed)
    # kombu ignores exactly these while closing a channel.
    assert isinstance(caught.value, Transport.connection_errors)
    s = load_settings(_env_file=None, redis_sentinels="127.0.0.1:1")
    assert isinstance(create_app(s).connection_for_write().transport, Transport)


def test_an_empty_sentinel_service_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="ADAPTIVE_REDIS_SENTINEL_SERVICE: must be"):
        load_settings(_env_file=None, redis_sentinel_service=" ")


def test_the_agent_side_client_reads_the_same_sentinel_settings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from adaptive_worker_client.config import load_client_settings

    env = {"ADAPTIVE_REDIS_SENTINELS": "h1:1,h2:2", "ADAPTIVE_REDIS_SENTINEL_PASSWORD": "pw"}
    s = load_client_settings(env, env_file=None)
    assert not s.embedded
    assert s.effective_broker_url == "sentinel://:pw@h1:1;sentinel://:pw@h2:2"
    assert publisher_app(s).conf.broker_transport_options["master_name"] == "mymaster"
    # Inside an agent a bad value is logged and ignored, never raised.
    bad = load_client_settings({"ADAPTIVE_REDIS_SENTINELS": "h1"}, env_file=None)
    assert bad.redis_sentinels is None and bad.embedded
    assert "ignoring ADAPTIVE_REDIS_SENTINELS (expected host:port, got 'h1')" in caplog.text
