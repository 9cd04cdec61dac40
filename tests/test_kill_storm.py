"""Kill storm: workers SIGKILLed again and again during heavy ingest and learning.

Eight agents, each with its own RunClient (receipts on, a short receipt
timeout), submit 5,000 capture-shaped runs at a steady pace while the worker
group is killed with SIGKILL (whole process groups: main process and pool
children, as a crash or an OOM kill does) every few seconds, 20 times, and
restarted each time; every fifth kill takes both workers down at once. On
each broker the outcome must be exact:

- 0 runs lost: every submitted run is stored, and nothing else is;
- 0 learned twice: per agent the root accumulator count, the learned cursor
  and the index length equal the distinct runs, and `runs_learned` equals
  the distinct runs overall;
- the learned state equals `adaptive-worker replay` of the stored runs in
  index order into another prefix.

Why both brokers: the Redis broker loses a message popped (BRPOP) but not yet
recorded as unacked when the worker dies between the two steps; only the
client's receipts bring those runs back. RabbitMQ (quorum queues, publisher
confirms) returns a dead consumer's unacked messages itself.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from adaptive_worker_client import RunClient
from adaptive_worker_client.contract import DISCOVER_TASK
from bench.workload import synthetic_runs
from storage.store import Store
from tests.conftest import REDIS_URL, amqp_up, vhost_url
from tests.pipeline import Worker, Workers, celery_workers, dump_state, wait_until, worker_env
from worker.celery import create_app
from worker.cli import app as cli
from worker.settings import load_settings

pytestmark = pytest.mark.slow

AGENTS = 8
RUNS = 5000
KILLS = 20
BOTH_EVERY = 5  # every fifth kill takes the whole group down at once
KILL_EVERY_S = (2.0, 3.0)  # the pause before each kill, drawn uniformly
SUBMIT_S = 40.0  # the agents spread their runs over about this long
RECEIPT_TIMEOUT_S = 3.0
SETTLE_S = 150.0  # the longest wait for receipts and learning after the storm
# Nothing moved this long and no receipt is pending: stop waiting. Above the Redis broker's restore
# (10 s visibility timeout + 1 s cadence), the pending-learn TTL (10 s) and
# the receipts' backoff at its usual depth (3 + 6 + 12 s).
QUIET_S = 30.0

# Fast redelivery on the Redis broker (a message unacked for 10 s is restored,
# checked every second), tasks well inside that, and a pending-learn marker
# whose learn died with its worker expires after 10 s instead of 2 min.
WORKER_SETTINGS: dict[str, Any] = {
    "broker_visibility_timeout_s": 10,
    "broker_restore_interval_s": 1,
    "broker_restore_throttle": 1,
    "task_time_limit_s": 5,
    "learn_time_budget_s": 2,
    "learn_pending_ttl_s": 10,
    "learn_batch_size": 100,
    "metrics_port": 0,
}


@dataclass
class Kill:
    at_s: float
    victims: list[str]
    stored: int  # runs stored (all agents) just before the kill
    learned: int  # runs learned (all agents) just before the kill


@dataclass
class Storm:
    workers: Workers
    live: list[Worker] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)  # workers that died on their own
    _made: int = 0

    def spawn(self) -> Worker:
        self._made += 1
        worker = self.workers.spawn(f"s{self._made}", concurrency=2)
        self.live.append(worker)
        return worker

    def replace_crashed(self) -> None:
        for worker in list(self.live):
            if worker.proc.poll() is not None:
                self.crashes.append(f"{worker.name} exited with {worker.proc.returncode}")
                self.live.remove(worker)
                self.spawn()

    def wait_ready(self, worker: Worker, timeout: float = 60.0) -> None:
        wait_until(lambda: worker.ready() or worker.proc.poll() is not None, timeout, worker.name)

    def kill(self, victims: list[Worker], started: float, store: Store, agents: list[str]) -> None:
        cursors = [store.cursor(a) for a in agents]
        self.kills.append(
            Kill(
                at_s=time.monotonic() - started,
                victims=[v.name for v in victims],
                stored=sum(c.index_length for c in cursors),
                learned=sum(c.learned for c in cursors),
            )
        )
        for victim in victims:
            victim.kill_group()
            self.live.remove(victim)
        for _ in victims:
            self.spawn()  # restarted at once; it boots while the other one works


class Agent(threading.Thread):
    """Submits its runs at a steady pace from its own thread, as an agent process would."""

    def __init__(self, client: RunClient, runs: list[dict[str, Any]], pace_s: float) -> None:
        super().__init__(name=f"agent-{runs[0]['agent_id']}", daemon=True)
        self.client = client
        self.runs = runs
        self.pace_s = pace_s
        self.errors: list[BaseException] = []

    def run(self) -> None:
        start = time.monotonic()
        for i, run in enumerate(self.runs):
            try:
                self.client.submit_run(run)
            except BaseException as exc:  # the assertion: this list stays empty
                self.errors.append(exc)
            # Paced against the clock, so a slow submit does not stretch the schedule.
            delay = start + (i + 1) * self.pace_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest) -> Iterator[tuple[str, str | None]]:
    """(name, broker URL): None means the state Redis under the test's prefix."""
    if request.param == "redis":
        yield "redis", None
        return
    if not amqp_up():
        pytest.skip("no RabbitMQ on 127.0.0.1:5672")
    yield "rabbitmq", vhost_url(request.getfixturevalue("vhost"))


def _root_count(store: Store, agent: str) -> int:
    raw = store.client.get(store.keys.accumulators(agent))
    if raw is None:
        return 0
    return int(json.loads(raw)["nodes"][""]["remaining_calls"]["1"]["count"])


def _replay(store: Store, agents: list[str], records: Path, prefix: str) -> None:
    lines = []
    for agent in agents:
        lines += [raw for _, raw in store.read_runs(agent, 0, 100_000) if raw is not None]
    records.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(
        cli, ["replay", str(records), "--redis-url", REDIS_URL, "--prefix", prefix, "--json"]
    )
    assert result.exit_code == 0, result.output


def test_kill_storm_loses_nothing_and_learns_nothing_twice(
    broker: tuple[str, str | None],
    real_store: Store,
    real_redis: redis.Redis,
    tmp_path: Path,
) -> None:
    name, broker_url = broker
    prefix = real_store.keys.prefix
    agents = [f"storm-{i}" for i in range(AGENTS)]
    per_agent = RUNS // AGENTS
    runs = {
        a: list(synthetic_runs(per_agent, agent_id=a, seed=500 + i)) for i, a in enumerate(agents)
    }
    expected = {a: {r["id"] for r in rs} for a, rs in runs.items()}
    assert sum(len(ids) for ids in expected.values()) == RUNS

    over: dict[str, Any] = {} if broker_url is None else {"broker_url": broker_url}
    env = worker_env(prefix, REDIS_URL, **WORKER_SETTINGS, **over)
    clients = [
        RunClient(
            load_settings(
                _env_file=None,
                redis_url=REDIS_URL,
                key_prefix=prefix,
                client_spool_dir=tmp_path / f"spool-{i}",
                client_retry_interval_s=0.2,
                client_receipts="on",
                client_receipt_timeout_s=RECEIPT_TIMEOUT_S,
                # Runs may wait in a backlog behind killed workers: keep
                # republishing (with backoff) rather than give a run up.
                client_receipt_max_republish=10,
                **over,
            )
        )
        for i in range(AGENTS)
    ]
    rng = random.Random(11)
    started = time.monotonic()
    with celery_workers(env, tmp_path) as workers:
        storm = Storm(workers)
        for _ in range(2):
            storm.spawn()
        for worker in list(storm.live):
            storm.wait_ready(worker)
        senders = [
            Agent(c, runs[a], SUBMIT_S / per_agent) for c, a in zip(clients, agents, strict=True)
        ]
        for sender in senders:
            sender.start()
        try:
            for k in range(KILLS):
                time.sleep(rng.uniform(*KILL_EVERY_S))
                storm.replace_crashed()
                victims = list(storm.live) if k % BOTH_EVERY == BOTH_EVERY - 1 else storm.live[:1]
                for victim in victims:  # a kill lands on a worker at work, not one booting
                    storm.wait_ready(victim)
                time.sleep(rng.uniform(0.0, 0.5))
                storm.kill(victims, started, real_store, agents)
        finally:
            for sender in senders:
                sender.join(SUBMIT_S + 60)
        storm_s = time.monotonic() - started
        for worker in list(storm.live):
            storm.wait_ready(worker)

        flushed = [c.flush(60) for c in clients]
        # What beat's discover sweep does in production (every 30 s by
        # default): a learn message lost in the Redis broker's
        # pop-to-unacked window is only ever re-triggered by it, as no
        # ingest follows the storm. Sent every 2 s here, as a fast beat.
        beat = create_app(
            load_settings(_env_file=None, redis_url=REDIS_URL, key_prefix=prefix, **over),
            name="kill-storm-beat",
        )
        next_sweep = 0.0

        def progress() -> tuple[int, ...] | None:
            """None once settled; else what moves while the pipeline still works."""
            storm.replace_crashed()
            pending = sum(int(c.stats()["receipts_pending"]) for c in clients)
            cursors = [real_store.cursor(a) for a in agents]
            if not pending and all(c.index_length >= per_agent and not c.lag for c in cursors):
                return None
            return (pending, *(c.index_length for c in cursors), *(c.learned for c in cursors))

        # Wait while anything moves; a run no one will ever bring back (a
        # loss) stops the movement, and the tally below names it.
        last, last_change, deadline = progress(), time.monotonic(), time.monotonic() + SETTLE_S
        while last is not None and time.monotonic() < deadline:
            time.sleep(0.5)
            if time.monotonic() >= next_sweep:
                beat.send_task(DISCOVER_TASK)
                next_sweep = time.monotonic() + 2.0
            now = progress()
            if now != last:
                last, last_change = now, time.monotonic()
            elif now is not None and not now[0] and time.monotonic() - last_change > QUIET_S:
                break  # (runs with a pending receipt: the client still acts on them)
        settled = last is None
        beat.close()
        time.sleep(1)  # a learn or republish still in flight would land now
        stats = [c.stats() for c in clients]
        for c in clients:
            c.close(5)
        alive = [w.name for w in storm.live if w.proc.poll() is None]
    settle_s = time.monotonic() - started - storm_s

    # The tally, before any assertion, so a failure still reports it.
    stored = {a: real_store.run_ids(a) for a in agents}
    lost = sum(len(expected[a] - set(stored[a])) for a in agents)
    strays = sum(len(set(stored[a]) - expected[a]) for a in agents)
    duplicated = sum(len(stored[a]) - len(set(stored[a])) for a in agents)
    roots = {a: _root_count(real_store, a) for a in agents}
    learned_twice = sum(max(0, roots[a] - len(set(stored[a]))) for a in agents)
    counters = real_store.counters()
    total = sum(len(set(s)) for s in stored.values())
    during_ingest = sum(1 for kill in storm.kills if kill.stored < RUNS)
    during_learning = sum(1 for kill in storm.kills if kill.learned < kill.stored)
    print(
        f"\nkill storm [{name}]: {RUNS} runs submitted by {AGENTS} agents, {total} stored,"
        f" {counters.get('runs_learned', 0)} learned, {lost} lost, {duplicated} stored twice,"
        f" {learned_twice} learned twice; {len(storm.kills)} kills"
        f" ({sum(len(kill.victims) for kill in storm.kills)} worker groups;"
        f" {during_ingest} during ingest, {during_learning} with learning behind),"
        f" crashes {storm.crashes}; storm {storm_s:.1f} s, settle {settle_s:.1f} s;"
        f" republished {sum(int(s['republished']) for s in stats)},"
        f" unconfirmed {sum(int(s['unconfirmed']) for s in stats)},"
        f" learn tasks {counters.get('learn_tasks')},"
        f" fast path runs {counters.get('fast_path_runs', 0)}, dead letters"
        f" {real_store.dead_letter_count()}"
    )
    for kill in storm.kills:
        print(
            f"  kill at {kill.at_s:5.1f} s {kill.victims}:"
            f" stored {kill.stored}, learned {kill.learned}"
        )

    assert [s.errors for s in senders] == [[]] * AGENTS
    assert len(storm.kills) == KILLS and len(alive) == 2
    # The storm hit both stages: kills while runs were still arriving and
    # while learning was behind what was stored.
    assert storm.kills[0].stored < RUNS and during_ingest >= KILLS // 2
    assert during_learning >= KILLS // 2
    assert all(flushed)
    for s in stats:
        assert (s["receipts_pending"], s["unconfirmed"], s["dropped"], s["spool_runs"]) == (
            0,
            0,
            0,
            0,
        ), s
    assert (lost, strays, duplicated, learned_twice) == (0, 0, 0, 0)
    assert settled, f"still moving or stuck after the storm: {last}"
    for agent in agents:
        assert set(stored[agent]) == expected[agent]
        cursor = real_store.cursor(agent)
        assert cursor.learned == cursor.end == cursor.index_length == per_agent
        assert roots[agent] == per_agent
    assert counters["runs_learned"] == RUNS
    # Kills fell on both learn paths: ingest learning from memory and the
    # learn task catching up what the fast path could not take.
    assert 0 < counters.get("fast_path_runs", 0) < RUNS
    assert real_store.dead_letter_count() == 0

    replay_prefix = prefix.rstrip(":") + "-replay:"
    try:
        _replay(real_store, agents, tmp_path / "replay.jsonl", replay_prefix)
        assert dump_state(real_redis, prefix) == dump_state(real_redis, replay_prefix)
    finally:
        Store(real_redis, replay_prefix).delete_prefix()
