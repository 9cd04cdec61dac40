"""Rebuild, retention and discover, on the real Redis."""

from __future__ import annotations

import json
import time

import pytest

from bench.workload import synthetic_runs
from storage.store import Store
from tasks.learning import catch_up, ingest, state_writes
from tasks.maintenance import (
    apply_retention,
    lagging_agents,
    plan_retention,
    rebuild,
    refold,
)
from tests.goldens import load_capture
from tests.pipeline import dump_state
from worker.engine.fold import EngineConfig, without_volatile

CONFIG = EngineConfig()
AGENT = "bench-agent"


def _learn(store: Store, agent: str = AGENT, batch: int = 7) -> None:
    summary = catch_up(store, agent, max_runs=batch, config=CONFIG)
    assert summary.caught_up


def test_rebuild_equals_incremental(real_store: Store) -> None:
    runs = list(synthetic_runs(60, agent_id=AGENT, seed=4))
    ingest(real_store, runs, 8 << 20)
    _learn(real_store)
    incremental = dump_state(real_store.client, real_store.keys.prefix)
    before = real_store.cursor(AGENT)
    result = rebuild(real_store, AGENT, config=CONFIG, chunk=13)
    assert result.runs == 60 and result.learned == 60
    assert dump_state(real_store.client, real_store.keys.prefix) == incremental
    after = real_store.cursor(AGENT)
    assert after.learned == before.learned and after.version == before.version + 1
    staging = real_store.keys.prefix + "adaptive_worker:staging*"
    assert not list(real_store.client.scan_iter(staging))


def test_runs_arriving_during_rebuild_are_learned_once(real_store: Store, prefix: str) -> None:
    runs = list(synthetic_runs(40, agent_id=AGENT, seed=5))
    ingest(real_store, runs[:30], 8 << 20)
    _learn(real_store)

    def late_arrivals(done: int, total: int) -> None:
        if done == total:  # after the fold read everything, before the swap
            ingest(real_store, runs[30:], 8 << 20)
            _learn(real_store)

    rebuild(real_store, AGENT, config=CONFIG, chunk=10, progress=late_arrivals)
    assert real_store.cursor(AGENT).learned == 30  # the swap covers what it folded
    _learn(real_store)
    assert real_store.cursor(AGENT).learned == 40
    acc = json.loads(real_store.client.get(real_store.keys.accumulators(AGENT)))
    assert acc["nodes"][""]["remaining_calls"]["1"]["count"] == 40

    fresh = Store(real_store.client, prefix.rstrip(":") + "-fresh:")
    try:
        ingest(fresh, [json.loads(r) for _, r in real_store.read_runs(AGENT, 0, 100)], 8 << 20)
        _learn(fresh)
        assert dump_state(real_store.client, real_store.keys.prefix) == dump_state(
            fresh.client, fresh.keys.prefix
        )
    finally:
        fresh.delete_prefix()


def test_rebuild_drops_keys_the_runs_no_longer_produce(real_store: Store) -> None:
    cap = load_capture("relay-openai")
    ingest(real_store, cap.runs, 8 << 20)
    _learn(real_store, cap.agent_id)
    stale = f"{cap.agent_id}::model=gone::seed=stable-scaffold::system=x::tools=y"
    real_store.client.set(real_store.keys.acg_stability(stale), "{}")
    # as an earlier commit of this agent would have recorded it
    real_store.client.sadd(real_store.keys.learning_key_set(cap.agent_id), stale)
    result = rebuild(real_store, cap.agent_id, config=CONFIG)
    assert real_store.keys.acg_stability(stale) in result.deleted
    assert real_store.client.get(real_store.keys.acg_stability(stale)) is None
    assert real_store.client.get(real_store.keys.acg_stability(cap.learning_key())) is not None


def test_retention_trims_only_learned_runs_and_keeps_offsets(real_store: Store) -> None:
    runs = list(synthetic_runs(50, agent_id=AGENT, seed=6))
    ingest(real_store, runs[:30], 8 << 20)
    _learn(real_store)
    ingest(real_store, runs[30:], 8 << 20)  # 20 not learned yet
    plan = plan_retention(real_store, AGENT, max_runs=5, max_age_s=None)
    assert plan.to_drop == 30  # the policy wants 45 gone, but only learned runs may go
    dropped = apply_retention(real_store, AGENT, max_runs=5, max_age_s=None, tombstones=1000)
    assert dropped == 30
    c = real_store.cursor(AGENT)
    assert (c.base, c.learned, c.index_length) == (30, 30, 20)
    assert real_store.get_run(AGENT, runs[0]["id"]) is None
    _learn(real_store)
    assert real_store.cursor(AGENT).learned == 50
    acc = json.loads(real_store.client.get(real_store.keys.accumulators(AGENT)))
    assert acc["nodes"][""]["remaining_calls"]["1"]["count"] == 50  # state kept
    # A late duplicate of a trimmed run is not stored (and learned) again.
    assert ingest(real_store, [runs[0]], 8 << 20).duplicates


def _set_stored_at(store: Store, agent: str, times: dict[str, float]) -> None:
    store.client.zadd(store.keys.stored_at(agent), times, xx=True)


def test_retention_by_age_goes_by_when_runs_were_stored(real_store: Store) -> None:
    runs = list(synthetic_runs(20, agent_id=AGENT, seed=7))
    ingest(real_store, runs, 8 << 20)
    _learn(real_store)
    ids = [r["id"] for r in runs]
    _set_stored_at(real_store, AGENT, {run_id: 1000.0 + 10 * i for i, run_id in enumerate(ids)})
    now_ns = int((1000 + 10 * 12 + 1) * 1e9)
    plan = plan_retention(real_store, AGENT, max_runs=None, max_age_s=1, now_ns=now_ns)
    assert plan.to_drop == 12
    store_time = real_store.stored_at(AGENT, ids[12:13])[0]
    assert store_time == 1120.0
    assert real_store.trim(AGENT, plan.to_drop, now_s=2000, tombstones=100) == 12
    assert real_store.stored_at(AGENT, ids[:13]) == [None] * 12 + [1120.0]


def test_a_run_dated_in_2099_cannot_pin_age_retention(real_store: Store) -> None:
    runs = list(synthetic_runs(10, agent_id=AGENT, seed=3))
    runs[0]["started_at"] = "2099-01-01T00:00:00Z"
    runs[0]["ended_at"] = "2099-01-01T00:00:01Z"
    before = time.time()
    ingest(real_store, runs, 8 << 20)
    after = time.time()
    _learn(real_store)
    stored = real_store.stored_at(AGENT, [r["id"] for r in runs])
    assert all(before - 1 <= t <= after + 1 for t in stored)  # the server's clock, not the run's
    a_day_later = int((after + 86_400) * 1e9)
    plan = plan_retention(real_store, AGENT, max_runs=None, max_age_s=3600, now_ns=a_day_later)
    assert plan.to_drop == 10


def test_runs_the_runtime_wrote_itself_age_from_when_retention_first_sees_them(
    real_store: Store,
) -> None:
    cap = load_capture("relay-openai")
    for raw in cap.runs:
        run_id = json.loads(raw)["id"]
        real_store.client.set(real_store.keys.run(cap.agent_id, run_id), raw)
        real_store.client.rpush(real_store.keys.runs_index(cap.agent_id), run_id)
    _learn(real_store, cap.agent_id)
    first_seen = time.time()
    now_ns = int(first_seen * 1e9)
    plan = plan_retention(real_store, cap.agent_id, max_runs=None, max_age_s=60, now_ns=now_ns)
    assert plan.to_drop == 0  # no store time yet: from now on
    later = int((first_seen + 61) * 1e9)
    plan = plan_retention(real_store, cap.agent_id, max_runs=None, max_age_s=60, now_ns=later)
    assert plan.to_drop == len(cap.runs)


def _agent_bytes(store: Store, agent: str) -> int:
    keys = list(store.client.scan_iter(f"{store.keys.prefix}*{agent}*"))
    return sum(store.client.memory_usage(k) or 0 for k in keys)


def test_retention_keeps_bytes_per_agent_flat(real_store: Store) -> None:
    runs = list(synthetic_runs(900, agent_id=AGENT, seed=8))
    sizes = []
    for i in range(0, 900, 150):
        ingest(real_store, runs[i : i + 150], 8 << 20)
        _learn(real_store, batch=150)
        apply_retention(real_store, AGENT, max_runs=100, max_age_s=None, tombstones=200)
        sizes.append(_agent_bytes(real_store, AGENT))
    print("bytes per agent after each round:", sizes)
    steady = sizes[2:]
    assert max(steady) <= 1.15 * min(steady), sizes
    assert real_store.cursor(AGENT).index_length == 100


def test_discover_finds_runs_written_by_the_runtime_itself(real_store: Store) -> None:
    """A NeMo Relay agent with learners off writes SET run + RPUSH index, nothing else."""
    cap = load_capture("relay-anthropic")
    for raw in cap.runs:
        run_id = json.loads(raw)["id"]
        real_store.client.set(real_store.keys.run(cap.agent_id, run_id), raw)
        real_store.client.rpush(real_store.keys.runs_index(cap.agent_id), run_id)
    lagging = lagging_agents(real_store)
    assert list(lagging) == [cap.agent_id] and lagging[cap.agent_id].lag == 4
    _learn(real_store, cap.agent_id)
    assert lagging_agents(real_store) == {}
    plan = json.loads(real_store.client.get(real_store.keys.plan(cap.agent_id)))
    assert plan == cap.value("plan")


@pytest.mark.parametrize("agent", ["plain", "we*ird[agent]?"])
def test_learning_keys_come_from_the_agents_own_set_not_a_glob(
    real_store: Store, agent: str
) -> None:
    cap = load_capture("relay-openai")
    run = json.loads(cap.runs[0])
    run["agent_id"] = agent
    ingest(real_store, [json.dumps(run)], 8 << 20)
    _learn(real_store, agent)
    own = real_store.learning_keys(agent)
    assert own and all(key == agent or key.startswith(f"{agent}::model=") for key in own)
    # keys that a `{agent}::*` glob would match but that this agent never wrote
    real_store.client.set(real_store.keys.acg_stability(f"{agent}::zzz"), "{}")
    real_store.client.set(real_store.keys.acg_stability("other::k"), "{}")
    assert real_store.learning_keys(agent) == own


def test_rebuild_skips_the_runs_learning_dead_letters(real_store: Store) -> None:
    """Rebuild re-folds exactly the runs learning learned: a stored run that no
    longer parses, or that names another agent, is skipped by both, so the
    rebuilt state equals the learned one (it used to stop the rebuild)."""
    runs = list(synthetic_runs(12, agent_id=AGENT, seed=9))
    ingest(real_store, runs, 8 << 20)
    ids = real_store.run_ids(AGENT)
    k = real_store.keys
    real_store.client.set(k.run(AGENT, ids[3]), '{"id": "not a run"}')
    other = json.loads(real_store.client.get(k.run(AGENT, ids[7])))
    real_store.client.set(k.run(AGENT, ids[7]), json.dumps({**other, "agent_id": "someone-else"}))
    summary = catch_up(real_store, AGENT, max_runs=5, config=CONFIG)
    assert summary.caught_up and summary.learned == 10 and summary.dead == 2
    learned = dump_state(real_store.client, real_store.keys.prefix)

    result = rebuild(real_store, AGENT, config=CONFIG, chunk=4)

    assert result.runs == 12 and result.learned == 12
    assert dump_state(real_store.client, real_store.keys.prefix) == learned


def test_refold_reads_only_up_to_the_offset_given(real_store: Store) -> None:
    runs = list(synthetic_runs(9, agent_id=AGENT, seed=2))
    ingest(real_store, runs[:5], 8 << 20)
    _learn(real_store)
    learned = dump_state(real_store.client, real_store.keys.prefix)
    ingest(real_store, runs[5:], 8 << 20)  # stored, not learned

    changes, read = refold(real_store, AGENT, 5, config=CONFIG, chunk=2)

    assert read == 5
    refolded = {
        key[len(real_store.keys.prefix) :]: without_volatile(
            real_store.keys.runtime_kind(key) or "", json.loads(v)
        )
        for key, v in state_writes(real_store, AGENT, changes).items()
    }
    assert refolded == learned
