"""The Redis layer on the real server and on fakeredis (same code path)."""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import threading
import uuid

import pytest
import redis

from storage.errors import InvalidRecord
from storage.models import (
    AccumulatorState,
    ExecutionPlan,
    RunRecord,
    StabilityAnalysisResult,
    TrieEnvelope,
    parse_observations,
    parse_wire,
)
from storage.store import Store
from tests.conftest import REDIS_URL
from tests.goldens import assert_json_close, load_capture


def make_run(agent: str = "agent-a", run_id: str | None = None) -> RunRecord:
    return parse_wire(
        RunRecord,
        {
            "id": run_id or str(uuid.uuid4()),
            "agent_id": agent,
            "calls": [
                {
                    "kind": "llm",
                    "name": "m",
                    "started_at": "2026-01-01T00:00:00.000000001Z",
                    "ended_at": "2026-01-01T00:00:01Z",
                    "output_tokens": 3,
                }
            ],
            "started_at": "2026-01-01T00:00:00Z",
            "ended_at": "2026-01-01T00:00:02Z",
        },
    )


def test_store_run_is_idempotent(store: Store) -> None:
    run = make_run()
    assert store.store_run(run) is True
    assert store.store_run(run) is False
    assert store.store_runs([run, run]) == [False, False]
    assert store.run_ids(run.agent_id) == [run.id]
    assert store.get_run(run.agent_id, run.id) == run


def test_duplicates_inside_one_batch_store_once(store: Store) -> None:
    a, b = make_run(), make_run()
    assert store.store_runs([a, b, a]) == [True, True, False]
    assert store.run_ids("agent-a") == [a.id, b.id]


def test_a_batch_of_two_agents_indexes_each_in_batch_order(store: Store) -> None:
    """The script indexes per agent at the end of the batch (in chunks of 500):
    each new run's position is still its absolute offset (base + place in the
    list) in batch order, past a chunk and after a trimmed past (base > 0); a
    run retention dropped (tombstoned) is neither stored nor indexed again."""
    k = store.keys
    store.client.hset(k.cursor("agent-b"), "base", 40)
    dropped = make_run("agent-b")
    store.client.zadd(k.tombstones("agent-b"), {dropped.id: 1.0})
    first = make_run("agent-a")
    assert store.store_runs([first]) == [True]
    runs = [make_run("agent-a") for _ in range(620)] + [make_run("agent-b") for _ in range(530)]
    random.Random(5).shuffle(runs)
    outcomes = store.store_runs_detailed([*runs, dropped, runs[3]])
    assert [o.new for o in outcomes] == [True] * len(runs) + [False, False]
    assert [o.position for o in outcomes[-2:]] == [None, None]
    indexed: dict[str, list[str]] = {"agent-a": [first.id], "agent-b": []}
    base = {"agent-a": 0, "agent-b": 40}
    for run, outcome in zip(runs, outcomes, strict=False):
        indexed[run.agent_id].append(run.id)
        assert outcome.position == base[run.agent_id] + len(indexed[run.agent_id]) - 1
    assert store.run_ids("agent-a") == indexed["agent-a"]
    assert store.run_ids("agent-b") == indexed["agent-b"]
    assert store.client.exists(k.run("agent-b", dropped.id)) == 0
    assert store.client.zcard(k.stored_at("agent-a")) == 621
    assert store.client.zcard(k.stored_at("agent-b")) == 530
    assert store.client.smembers(k.agents()) == {"agent-a", "agent-b"}


def test_a_run_id_stored_with_other_bytes_is_reported_with_them(store: Store) -> None:
    """The first bytes stay (runs are immutable) and are what the caller gets to
    compare: equal ones are a plain duplicate, other ones a conflict."""
    first = make_run()
    other = first.model_copy(update={"ended_at": "2026-01-01T00:00:09Z"})
    assert store.store_runs([first]) == [True]
    outcomes = store.store_runs_detailed([other, first])
    assert [(o.new, o.position) for o in outcomes] == [(False, None), (False, None)]
    assert outcomes[0].conflict == first.to_json()
    assert outcomes[1].conflict is None
    assert store.get_run(first.agent_id, first.id) == first
    assert store.run_ids(first.agent_id) == [first.id]


def test_read_runs_in_index_order_in_one_round_trip(store: Store) -> None:
    runs = [make_run() for _ in range(7)]
    store.store_runs(runs)
    store.read_runs("agent-a", 0, 1)  # the first call also loads the script
    calls = []
    original = store.client.execute_command

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    store.client.execute_command = counting  # type: ignore[method-assign]
    try:
        got = store.read_runs("agent-a", 2, 3)
    finally:
        store.client.execute_command = original  # type: ignore[method-assign]
    assert [i for i, _ in got] == [r.id for r in runs[2:5]]
    assert [json.loads(raw)["id"] for _, raw in got] == [r.id for r in runs[2:5]]
    assert len(calls) == 1, calls


def test_stored_run_is_the_runtime_form(store: Store) -> None:
    raw = json.loads(load_capture("relay-anthropic").runs[1])
    run = parse_wire(RunRecord, raw)
    store.store_run(run)
    stored = store.client.get(store.keys.run(run.agent_id, run.id))
    assert_json_close(json.loads(stored), raw, rel=0.0)


@pytest.mark.parametrize(
    ("kind", "model", "getter", "putter"),
    [
        ("plan", ExecutionPlan, "get_plan", "put_plan"),
        ("trie", TrieEnvelope, "get_trie", "put_trie"),
        ("accumulators", AccumulatorState, "get_accumulators", "put_accumulators"),
    ],
)
def test_state_round_trip(store: Store, kind, model, getter, putter) -> None:
    cap = load_capture("relay-openai")
    value = parse_wire(model, cap.value(kind))
    if kind == "plan":
        store.put_plan(value)
    else:
        getattr(store, putter)(cap.agent_id, value)
    raw = store.client.get(getattr(store.keys, kind)(cap.agent_id))
    assert_json_close(json.loads(raw), cap.value(kind), rel=0.0)
    assert getattr(store, getter)(cap.agent_id) == value


def test_acg_round_trip(store: Store) -> None:
    cap = load_capture("relay-anthropic")
    key = cap.learning_key()
    (obs,) = [v for k, v in cap.entries("acg_observations") if k.endswith(key)]
    (stab,) = [v for k, v in cap.entries("acg_stability") if k.endswith(key)]
    store.put_observations(key, parse_observations(obs))
    store.put_stability(key, parse_wire(StabilityAnalysisResult, stab))
    assert_json_close(json.loads(store.client.get(store.keys.acg_observations(key))), obs, rel=0.0)
    assert store.get_stability(key) == parse_wire(StabilityAnalysisResult, stab)


def test_malformed_run_writes_nothing(store: Store) -> None:
    raw = json.loads(load_capture("relay-openai").runs[0])
    raw["calls"][2]["ended_at"] = "not a time"
    with pytest.raises(InvalidRecord, match=r"calls\.2\.ended_at"):
        store.store_run(parse_wire(RunRecord, raw))
    assert list(store.client.scan_iter(store.keys.prefix + "*")) == []


def test_commit_is_compare_and_set(store: Store) -> None:
    agent = "agent-a"
    store.store_runs([make_run(), make_run()])
    batch = store.read_learn_batch(agent, 10, [store.keys.plan(agent)])
    assert batch.cursor.learned == 0 and batch.cursor.index_length == 2
    assert batch.state == {store.keys.plan(agent): None}
    first = store.commit(agent, 0, 2, {store.keys.plan(agent): '{"v":1}'})
    assert first.committed and first.version == 1
    # A second learner that read offset 0 too must lose, and write nothing.
    second = store.commit(
        agent, 0, 2, {store.keys.plan(agent): '{"v":2}', "x": "y"}, dead_letters=["dl"]
    )
    assert not second.committed
    assert store.client.get(store.keys.plan(agent)) == '{"v":1}'
    assert store.client.get("x") is None
    assert store.dead_letter_count() == 0
    assert store.counters() == {"commits": 1, "conflicts": 1, "runs_learned": 0}
    assert store.cursor(agent).learned == 2
    assert store.read_learn_batch(agent, 10).run_ids == []


def _race_commit(url: str, prefix: str, value: str, barrier, results) -> None:
    store = Store(redis.Redis.from_url(url, decode_responses=True), prefix)
    barrier.wait()
    results.append(store.commit("agent-a", 0, 5, {store.keys.plan("agent-a"): value}).committed)


def test_two_committers_racing_from_one_offset(real_store: Store) -> None:
    for _ in range(20):
        real_store.delete_prefix()
        barrier = threading.Barrier(2)
        results: list[bool] = []
        threads = [
            threading.Thread(
                target=_race_commit, args=(REDIS_URL, real_store.keys.prefix, v, barrier, results)
            )
            for v in ("A", "B")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False, True]
        assert real_store.client.get(real_store.keys.plan("agent-a")) in {"A", "B"}
        assert real_store.cursor("agent-a").learned == 5
        assert real_store.cursor("agent-a").version == 1


def _store_worker(url: str, prefix: str, ids: list[str], seed: int) -> None:
    store = Store(redis.Redis.from_url(url, decode_responses=True), prefix)
    rng = random.Random(seed)
    rng.shuffle(ids)
    for i in range(0, len(ids), 7):
        store.store_runs([make_run("agent-a", run_id) for run_id in ids[i : i + 7]])


def test_eight_processes_store_overlapping_runs_exactly_once(real_store: Store) -> None:
    distinct = [str(uuid.uuid4()) for _ in range(1000)]
    rng = random.Random(7)
    hot = distinct[:50]  # stored by every process, many times
    work = [rng.sample(distinct, 400) + hot * 3 for _ in range(8)]
    covered = set().union(*map(set, work))
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_store_worker, args=(REDIS_URL, real_store.keys.prefix, w, i))
        for i, w in enumerate(work)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    index = real_store.run_ids("agent-a")
    assert len(index) == len(set(index)) == len(covered)
    assert set(index) == covered
    run_keys = list(real_store.client.scan_iter(real_store.keys.run_key_prefix("agent-a") + "*"))
    assert len(run_keys) == len(covered)


# ---------------------------------------------- what mixed.py and the CLI read


def test_verified_record_round_trip(store: Store) -> None:
    assert store.verified_record("a") is None
    store.record_verified("a", 7, {"p:plan:a": "d1", "p:trie:a": "d2"})
    assert store.verified_record("a") == (7, {"p:plan:a": "d1", "p:trie:a": "d2"})
    assert store.verified_record("b") is None
    store.forget_verified("a")
    assert store.verified_record("a") is None
    assert store.client.exists(f"{store.keys.prefix}adaptive_worker:verified:a") == 0


def test_state_keys_name_the_agents_own_learning_keys(store: Store) -> None:
    p = store.keys.prefix
    store.client.sadd(f"{p}adaptive_worker:learning_keys:a", "a::model=m")
    assert store.state_keys("a") == [
        f"{p}plan:a",
        f"{p}accumulators:a",
        f"{p}trie:a",
        f"{p}acg_observations:a",
        f"{p}acg_stability:a",
        f"{p}acg_observations:a::model=m",
        f"{p}acg_stability:a::model=m",
    ]


def test_state_presence_and_raw_values(store: Store) -> None:
    p = store.keys.prefix
    store.client.set(f"{p}plan:a", '{"x": 1}')
    store.client.set(f"{p}acg_stability:b", "{}")
    assert store.state_presence(["a", "b", "c"]) == {
        "a": {"plan": True, "trie": False, "stability": False},
        "b": {"plan": False, "trie": False, "stability": True},
        "c": {"plan": False, "trie": False, "stability": False},
    }
    assert store.state_presence([]) == {}
    assert store.get_raw(f"{p}plan:a") == '{"x": 1}'
    assert store.get_raw(f"{p}trie:a") is None


def test_dead_letters_raw_are_bytes_as_stored(real_store: Store) -> None:
    """An entry that is not UTF-8 does not make the list unreadable."""
    key = real_store.keys.dead_letters()
    raw = redis.Redis.from_url(REDIS_URL)  # no decoding, to store invalid UTF-8
    try:
        raw.rpush(key, b'{"reason": "ok"}', b"\xff\xfe not utf-8")
    finally:
        raw.close()
    assert real_store.dead_letters_raw() == [b'{"reason": "ok"}', b"\xff\xfe not utf-8"]
    assert real_store.dead_letters_raw(1, 1) == [b"\xff\xfe not utf-8"]
    assert real_store.dead_letter_raw_at(-1) == b"\xff\xfe not utf-8"
    assert real_store.dead_letter_raw_at(5) is None
