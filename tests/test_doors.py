"""The ingest door and the storage layer under hostile and unlucky input (real Redis).

Each test reproduces one fault of issue 9 on the plain functions the Celery
tasks call; the broker door (whole messages) is tests/test_poison.py.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.keys import Keys
from storage.store import Store
from tasks.learning import catch_up, dead_letter, ingest
from tasks.maintenance import apply_retention, rebuild
from tests.conftest import REDIS_URL
from tests.goldens import load_capture
from tests.hostile import good_run, nested, violations
from worker.engine.fold import EngineConfig

CONFIG = EngineConfig()
MAX = 8 << 20


def _learn(store: Store, agent: str) -> None:
    assert catch_up(store, agent, max_runs=50, config=CONFIG).caught_up


def _dead(store: Store) -> list[dict[str, Any]]:
    return [json.loads(entry) for entry in store.dead_letters()]


# ------------------------------------------------------- one item, one verdict


def test_each_bad_run_is_dead_lettered_alone_and_its_neighbours_are_learned(
    real_store: Store,
) -> None:
    bad = violations()
    payloads: list[Any] = [json.dumps(good_run(1)), *bad.values(), good_run(2)]
    result = ingest(real_store, payloads, MAX)
    assert [r.id for r in result.stored] == [good_run(1)["id"], good_run(2)["id"]]
    assert [pos for pos, _ in result.rejected] == list(range(1, len(bad) + 1))
    dead = _dead(real_store)
    assert len(dead) == len(bad)
    for entry, name in zip(dead, bad, strict=True):
        assert entry["stage"] == "ingest" and entry["reason"], name
    reasons = " | ".join(entry["reason"] for entry in dead)
    for word in ("NaN", "surrogate", "nested more than 128", "'::'", "infinity"):
        assert word.lower() in reasons.lower()
    _learn(real_store, "door-agent")
    assert real_store.cursor("door-agent").learned == 2


def test_a_lone_surrogate_in_text_costs_only_its_own_run(real_store: Store) -> None:
    """json.loads happily produces "\\ud800" from LLM output; the run holding it
    is refused with a reason, and no other run of the message is lost."""
    text = json.dumps(good_run(3))[:-1] + ', "extra": "' + "\ud800" + '"}'
    result = ingest(real_store, [json.dumps(good_run(1)), text, json.dumps(good_run(2))], MAX)
    assert len(result.stored) == 2
    (entry,) = _dead(real_store)
    assert "surrogate" in entry["reason"] and "\\ud800" in entry["raw"]


def test_the_size_limit_applies_to_the_encoded_run_whatever_its_form(real_store: Store) -> None:
    big = {**good_run(1), "padding": "x" * 20_000}
    result = ingest(real_store, [big, json.dumps(big), good_run(2)], 10_000)
    assert [r.id for r in result.stored] == [good_run(2)["id"]]
    assert all("limit is 10000" in reason for _, reason in result.rejected)
    assert len(result.rejected) == 2


def test_a_string_instead_of_a_list_is_one_dead_letter(real_store: Store) -> None:
    result = ingest(real_store, "x" * 20_000, MAX)  # type: ignore[arg-type]
    assert len(result.rejected) == 1
    (entry,) = _dead(real_store)
    assert entry["reason"] == "expected a list of runs, got str"
    assert entry["raw_bytes"] == 20_000


# ------------------------------------------------------- conflicting duplicates


def test_a_run_id_resent_with_other_content_keeps_the_first_and_says_so(
    real_store: Store,
) -> None:
    first = good_run(1)
    ingest(real_store, [first], MAX)
    same = ingest(real_store, [json.dumps(first, indent=2)], MAX)  # same value, other layout
    assert len(same.duplicates) == 1 and not same.conflicts
    other = {**first, "extra": "edited"}
    result = ingest(real_store, [other], MAX)
    assert [r.id for r in result.conflicts] == [first["id"]] and not result.stored
    (entry,) = _dead(real_store)
    assert entry["reason"].startswith("conflicting duplicate")
    assert entry["run_id"] == first["id"] and json.loads(entry["raw"])["extra"] == "edited"
    stored = real_store.client.get(real_store.keys.run("door-agent", first["id"]))
    assert "extra" not in json.loads(stored)
    assert real_store.counters()["conflicting_duplicates"] == 1


# ------------------------------------------------------------- bounded letters


def test_a_dead_letter_keeps_a_bounded_prefix_and_the_full_size(real_store: Store) -> None:
    huge = json.dumps({**good_run(1), "id": "nope", "padding": "y" * 9_000_000})
    ingest(real_store, [huge], 16 << 20, max_raw=65_536)
    (entry,) = _dead(real_store)
    assert entry["raw_bytes"] == len(huge) and entry["raw_truncated"] is True
    assert len(entry["raw"].encode()) == 65_536
    assert huge.startswith(entry["raw"])


def test_truncation_never_splits_or_crashes_on_odd_text() -> None:
    for raw in ["é" * 40_000, b"\xff\xfe" * 40_000, "\ud800" * 40_000]:
        entry = json.loads(dead_letter(raw, "reason \udc00", "ingest", max_raw=1001))
        assert len(entry["raw"].encode()) <= 4 * 1001  # escapes may widen, never unbounded
        assert entry["raw_truncated"] is True


def test_the_dead_letter_list_is_capped_and_trims_are_counted(
    real_redis: redis.Redis, prefix: str
) -> None:
    store = Store(real_redis, prefix, dead_letter_cap=50)
    try:
        for i in range(12):
            ingest(store, [f"not json {i}-{j}" for j in range(10)], MAX)
        assert store.dead_letter_count() == 50
        assert store.counters()["dead_letters_trimmed"] == 70
        assert store.counters()["dead_letters"] == 120
        assert _dead(store)[-1]["raw"] == "not json 11-9"  # the newest are kept
        # the learn commit's dead letters obey the same cap
        real_redis.rpush(store.keys.runs_index("ghost"), *[f"id-{i}" for i in range(30)])
        _learn(store, "ghost")
        assert store.dead_letter_count() == 50
        assert store.counters()["dead_letters_trimmed"] == 100
    finally:
        store.delete_prefix()


def test_a_flood_of_huge_bad_input_cannot_grow_redis_past_the_cap(
    real_redis: redis.Redis, prefix: str
) -> None:
    cap, raw_max = 20, 4096
    store = Store(real_redis, prefix, dead_letter_cap=cap)
    try:
        junk = "z" * 500_000
        for _ in range(10):
            ingest(store, [junk] * 10, MAX, max_raw=raw_max)
        used = real_redis.memory_usage(store.keys.dead_letters())
        assert store.counters()["dead_letters"] == 100
        assert used is not None and used < cap * (raw_max + 2048)  # of 50 MB sent
    finally:
        store.delete_prefix()


# --------------------------------------------------------- agents stay apart


def test_rebuild_never_touches_keys_of_an_agent_whose_id_extends_this_one(
    real_store: Store,
) -> None:
    """`rebuild trav` used to delete `trav::zzz`'s windows (a `trav::*` glob)."""
    ingest(real_store, [good_run(1, agent="trav")], MAX)
    _learn(real_store, "trav")
    k = real_store.keys
    # state of an agent `trav::zzz` written by a NeMo Relay agent itself
    foreign = {
        k.acg_observations("trav::zzz"): "[]",
        k.acg_stability("trav::zzz::model=m::seed=s::system=x::tools=y"): "{}",
    }
    for key, value in foreign.items():
        real_store.client.set(key, value)
    result = rebuild(real_store, "trav", config=CONFIG)
    assert not set(result.deleted) & set(foreign)
    assert all(real_store.client.get(key) == value for key, value in foreign.items())


def test_an_agent_id_that_could_collide_is_refused_at_ingest(real_store: Store) -> None:
    victim = good_run(1, agent="trav")
    ingest(real_store, [victim], MAX)
    _learn(real_store, "trav")
    (key,) = [key for key in real_store.learning_keys("trav") if key != "trav"]
    before = real_store.client.get(real_store.keys.acg_observations(key))
    result = ingest(real_store, [good_run(2, agent=key)], MAX)
    assert not result.stored and "'::'" in result.rejected[0][1]
    assert real_store.client.get(real_store.keys.acg_observations(key)) == before


ODD_IDS = st.one_of(
    st.sampled_from(
        [
            ":",
            ":a",
            "a:",
            "*",
            "?",
            "[",
            "]",
            "[a-z]",
            "{",
            "}",
            "{x}",
            " ",
            "a b",
            "\n",
            "\x00",
            "a\x00b",
            "ü",
            "智能体",
            "🤖",
            "\\",
            "x" * 10_000,
            "runs",
            "plan:x",
        ]
    ),
    st.text(alphabet=st.sampled_from(list(":*?[]{} \n\x00\\aZ9ü智🤖")), min_size=1, max_size=12),
).filter(lambda agent: "::" not in agent)


def _snapshot(raw: redis.Redis, keys: set[str]) -> dict[str, bytes | None]:
    return {key: raw.dump(key) for key in sorted(keys)}


def _owned(store: Store, agent: str) -> set[str]:
    """Every key the agent owns, named exactly (never by a glob)."""
    k = store.keys
    owned = {
        k.runs_index(agent),
        k.plan(agent),
        k.trie(agent),
        k.accumulators(agent),
        k.cursor(agent),
        k.learning_key_set(agent),
        k.stored_at(agent),
        k.tombstones(agent),
    }
    owned |= {k.run(agent, run_id) for run_id in store.run_ids(agent)}
    for key in store.learning_keys(agent):
        owned |= {k.acg_observations(key), k.acg_stability(key)}
    return owned


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(agents=st.lists(ODD_IDS, min_size=3, max_size=5, unique=True), seed=st.integers(0, 99))
def test_odd_agent_ids_never_touch_each_others_keys(
    real_redis: redis.Redis, agents: list[str], seed: int
) -> None:
    prefix = f"test:doors:{seed}:{abs(hash(tuple(agents))) % 10**9}:"
    store = Store(real_redis, prefix)
    raw = redis.Redis.from_url(REDIS_URL)
    try:
        runs = [good_run(i, agent=agents[(i + seed) % len(agents)]) for i in range(4 * len(agents))]
        for i in range(0, len(runs), 3):  # interleaved batches of mixed agents
            ingest(store, runs[i : i + 3], MAX)
        for agent in agents:
            _learn(store, agent)
        assert sorted(store.agent_ids()) == sorted(agents)
        rebuilt, retained, *others = agents
        watched = {agent: _owned(store, agent) for agent in others}
        before = {agent: _snapshot(raw, keys) for agent, keys in watched.items()}
        rebuild(store, rebuilt, config=CONFIG)
        apply_retention(store, retained, max_runs=1, max_age_s=None, tombstones=10)
        for agent in others:
            assert _snapshot(raw, watched[agent]) == before[agent], agent
            # the comparison covered learned state, not only keys that never existed
            assert before[agent][store.keys.accumulators(agent)] is not None, agent
        assert store.cursor(retained).index_length == 1
    finally:
        store.delete_prefix()
        raw.close()


def test_keys_of_odd_ids_are_distinct_per_agent() -> None:
    k = Keys("p:")
    ids = ["a", "a:", ":a", "a:b", "a b", "a\x00", "*", "[a]", "runs", "x" * 100]
    for name in (
        "runs_index",
        "plan",
        "trie",
        "accumulators",
        "cursor",
        "learning_key_set",
        "verified",
    ):
        built = [getattr(k, name)(agent) for agent in ids]
        assert len(set(built)) == len(ids), name


def test_the_depth_limit_is_a_setting_and_the_runtimes_by_default(real_store: Store) -> None:
    deep = {**good_run(1), "extra": nested(127)}  # the run's own level + 127 = 128
    assert ingest(real_store, [deep], MAX).stored
    deeper = {**good_run(2), "extra": nested(128)}
    assert ingest(real_store, [deeper], MAX).rejected
    assert ingest(real_store, [{**good_run(3), "extra": nested(20)}], MAX, max_depth=16).rejected
    assert orjson.loads(real_store.dead_letters()[-1])["reason"].endswith("16 levels")


def test_captured_runs_pass_every_door_unchanged(real_store: Store) -> None:
    cap = load_capture("relay-openai")
    result = ingest(real_store, cap.runs, MAX)
    assert len(result.stored) == len(cap.runs) and not result.rejected
    for raw_run in cap.runs:
        run_id = json.loads(raw_run)["id"]
        stored = real_store.client.get(real_store.keys.run(cap.agent_id, run_id))
        assert json.loads(stored) == json.loads(raw_run)


@pytest.mark.parametrize("bad", [42, None, [1, 2], 3.5, True])
def test_items_that_are_not_runs_are_refused_with_their_type(real_store: Store, bad: Any) -> None:
    result = ingest(real_store, [bad, good_run(1)], MAX)
    assert len(result.stored) == 1
    assert "expected a run" in result.rejected[0][1]
