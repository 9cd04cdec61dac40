"""Ingest's fast path: learning an ingest's runs from memory, on the real Redis.

The fast path must be invisible in the result: the same state as the learn
task (the captured runtime state, for the fixtures), each run learned once.
Where it cannot fold from memory (a gap before the batch, runs interleaved
with another ingest's, a learner that moved the offset meanwhile) it writes
nothing of its own and, holding the lease, learns from Redis as the learn
task would; with the lease held elsewhere it leaves the runs to the learn task.
"""

from __future__ import annotations

import json
import uuid

import pytest
import redis

from storage.models import RunRecord, parse_wire
from storage.store import LearnBatch, Store
from tasks.learning import (
    IngestResult,
    catch_up,
    contiguous_batches,
    ingest,
    learn_ingested,
    learn_stored,
)
from tests.goldens import CAPTURES, assert_matches_capture, load_capture
from worker.engine.fold import EngineConfig

CONFIG = EngineConfig()
MAX_BYTES = 8 << 20


def _fresh(real_redis: redis.Redis) -> Store:
    return Store(real_redis, f"test-fast:{uuid.uuid4().hex[:12]}:")


@pytest.fixture
def stores(real_redis: redis.Redis):  # type: ignore[no-untyped-def]
    made: list[Store] = []

    def make() -> Store:
        made.append(_fresh(real_redis))
        return made[-1]

    yield make
    for store in made:
        store.delete_prefix()


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("size", [1, 2, 4])
def test_fast_path_reproduces_the_capture(
    capture: str, size: int, real_redis: redis.Redis, stores
) -> None:  # type: ignore[no-untyped-def]
    """Runs ingested `size` at a time, each batch learned from memory: the
    runtime's own state, every run learned once, no learn task needed."""
    cap = load_capture(capture)
    store = stores()
    for start in range(0, 4, size):
        result = ingest(store, cap.runs[start : start + size], MAX_BYTES)
        assert result.positions == list(range(start, start + size))
        assert learn_ingested(store, result, config=CONFIG, max_runs=500) == {cap.agent_id: True}
        assert store.cursor(cap.agent_id).learned == start + size
    assert_matches_capture(real_redis, store.keys.prefix, cap)
    counters = store.counters()
    assert counters["fast_path_runs"] == counters["runs_learned"] == 4
    assert counters["commits"] == 4 // size
    assert store.cursor(cap.agent_id).learned == 4
    assert store.client.get(store.keys.lease(cap.agent_id)) is None  # released


def test_a_gap_before_the_batch_is_learned_from_redis(stores) -> None:  # type: ignore[no-untyped-def]
    """Runs 1-2 stored but not learned (their ingest found the lease taken):
    the next ingest cannot fold its runs 3-4 from memory alone, so under the
    lease it learns all four from Redis, in index order, once."""
    cap = load_capture("relay-openai")
    store = stores()
    ingest(store, cap.runs[:2], MAX_BYTES)  # stored, not learned
    result = ingest(store, cap.runs[2:], MAX_BYTES)
    assert result.positions == [2, 3]
    assert learn_stored(store, cap.agent_id, 2, result.stored, config=CONFIG) is None
    assert store.client.get(store.keys.accumulators(cap.agent_id)) is None  # wrote nothing
    assert learn_ingested(store, result, config=CONFIG, max_runs=500) == {cap.agent_id: True}
    counters = store.counters()
    assert counters["runs_learned"] == 4 and "fast_path_runs" not in counters
    assert_matches_capture(store.client, store.keys.prefix, cap)


def test_a_held_lease_leaves_the_runs_to_the_learn_task(stores) -> None:  # type: ignore[no-untyped-def]
    cap = load_capture("relay-openai")
    store = stores()
    assert store.acquire_lease(cap.agent_id, "someone-else", 60_000)
    result = ingest(store, cap.runs, MAX_BYTES)
    assert learn_ingested(store, result, config=CONFIG, max_runs=500) == {}
    assert store.cursor(cap.agent_id).learned == 0
    assert store.client.get(store.keys.lease(cap.agent_id)) == "someone-else"


def test_duplicates_are_not_learned_again(stores) -> None:  # type: ignore[no-untyped-def]
    cap = load_capture("relay-openai")
    store = stores()
    learn_ingested(store, ingest(store, cap.runs, MAX_BYTES), config=CONFIG, max_runs=500)
    again = ingest(store, cap.runs, MAX_BYTES)  # a redelivered message
    assert again.stored == [] and len(again.duplicates) == 4
    assert learn_ingested(store, again, config=CONFIG, max_runs=500) == {}
    assert store.counters()["runs_learned"] == 4
    assert_matches_capture(store.client, store.keys.prefix, cap)


def test_interleaved_runs_are_left_out() -> None:
    """Positions 5 and 7: the index holds another ingest's run at 6, which this
    ingest does not have in memory, so the agent is not fast-pathed."""
    cap = load_capture("relay-openai")
    a, b, c = (parse_wire(RunRecord, raw) for raw in cap.runs[:3])
    other = b.model_copy(update={"agent_id": "other-agent"})
    result = IngestResult(stored=[a, other, c], positions=[5, 0, 7])
    assert contiguous_batches(result) == {"other-agent": (0, [other])}
    # Reordered but contiguous: taken in index order.
    result = IngestResult(stored=[c, a], positions=[8, 7])
    assert contiguous_batches(result) == {cap.agent_id: (7, [a, c])}


class _RacedStore(Store):
    """A store on which another learner commits right after the fast path reads."""

    rival: Store

    def read_state(self, agent_id: str, state_keys) -> LearnBatch:  # type: ignore[no-untyped-def,override]
        batch = super().read_state(agent_id, state_keys)
        catch_up(self.rival, agent_id, max_runs=500, config=CONFIG)
        return batch


def test_a_rival_commit_fences_the_fast_path_off(real_redis: redis.Redis, stores) -> None:  # type: ignore[no-untyped-def]
    """The learn task commits between the fast path's read and its commit: the
    compare-and-set refuses the fast path's commit, and nothing it computed
    is applied (the state is the runtime's, each run counted once)."""
    cap = load_capture("relay-openai")
    plain = stores()
    store = _RacedStore(real_redis, plain.keys.prefix)
    store.rival = plain
    result = ingest(store, cap.runs, MAX_BYTES)
    step = learn_stored(store, cap.agent_id, 0, result.stored, config=CONFIG)
    assert step is not None and not step.committed and step.learned == 0
    counters = plain.counters()
    assert counters["runs_learned"] == 4 and counters["conflicts"] == 1
    assert_matches_capture(real_redis, plain.keys.prefix, cap)
    # Nothing left to learn: caught up, nothing written again.
    assert learn_ingested(store, result, config=CONFIG, max_runs=500) == {cap.agent_id: True}
    assert plain.counters()["runs_learned"] == 4 and "fast_path_runs" not in plain.counters()


def test_mixed_agents_each_learned_from_memory(stores) -> None:  # type: ignore[no-untyped-def]
    """One message with runs of two agents: each agent's runs are one batch."""
    cap = load_capture("relay-openai")
    store = stores()
    mixed = []
    for raw in cap.runs:
        run = json.loads(raw)
        mixed.append(raw)
        mixed.append(json.dumps({**run, "id": str(uuid.uuid4()), "agent_id": "twin"}))
    result = ingest(store, mixed, MAX_BYTES)
    learned = learn_ingested(store, result, config=CONFIG, max_runs=500)
    assert learned == {cap.agent_id: True, "twin": True}
    assert store.counters()["fast_path_runs"] == 8
    assert store.cursor("twin").learned == store.cursor(cap.agent_id).learned == 4
    # The twin learned the same runs under its own id: the same parallel groups.
    twin = json.loads(store.client.get(store.keys.plan("twin")))["metadata_template"]
    captured = load_capture("relay-openai").value("plan")["metadata_template"]
    assert twin["agent_id"] == "twin"
    assert twin["parallel_hints"] == captured["parallel_hints"]


def _another_ingest(store: Store, runs: list[str]) -> None:
    """An ingest of the agent's next runs that finds the lease taken and leaves them."""
    plain = Store(store.client, store.keys.prefix)
    result = ingest(plain, runs, MAX_BYTES)
    assert learn_ingested(plain, result, config=CONFIG, max_runs=500) == {}


class _BusyStore(Store):
    """Another ingest stores the agent's next runs while the fast path folds
    its own (right after the fast path's read)."""

    others: list[str]

    def read_state(self, agent_id: str, state_keys) -> LearnBatch:  # type: ignore[no-untyped-def,override]
        batch = super().read_state(agent_id, state_keys)
        late, self.others = self.others, []
        if late:
            _another_ingest(self, late)
        return batch


class _LateStore(Store):
    """Another ingest stores the agent's next runs after the holder's last read
    and before it lets go. With `rival`, a third learner takes the lease the
    moment the holder lets go."""

    others: list[str]
    rival = False

    def release_lease(self, agent_id: str, token: str) -> bool:
        late, self.others = self.others, []
        if late:
            _another_ingest(self, late)
        released = super().release_lease(agent_id, token)
        if late and self.rival:
            assert Store(self.client, self.keys.prefix).acquire_lease(agent_id, "rival", 60_000)
        return released


@pytest.mark.parametrize("store_class", [_BusyStore, _LateStore])
def test_the_lease_holder_learns_what_arrived_meanwhile(
    real_redis: redis.Redis, stores, store_class: type[_BusyStore | _LateStore]
) -> None:  # type: ignore[no-untyped-def]
    """Runs 3-4 are stored while the fast path holds the lease for runs 1-2
    (during its fold, or as it lets go) and find the lease taken; the holder
    looks at the lag after releasing and learns them (not a learn task half a
    second later): caught up, each run once, the capture."""
    cap = load_capture("relay-openai")
    plain = stores()
    store = store_class(real_redis, plain.keys.prefix)
    store.others = cap.runs[2:]
    result = ingest(store, cap.runs[:2], MAX_BYTES)
    assert learn_ingested(store, result, config=CONFIG, max_runs=500) == {cap.agent_id: True}
    counters = plain.counters()
    assert counters["runs_learned"] == 4 and counters["fast_path_runs"] == 2
    assert counters["commits"] == 2
    assert plain.cursor(cap.agent_id).lag == 0
    assert_matches_capture(real_redis, plain.keys.prefix, cap)


def test_runs_left_behind_a_rival_get_the_backstop(real_redis: redis.Redis, stores) -> None:  # type: ignore[no-untyped-def]
    """If the lease is gone when the holder looks again, the agent is reported
    not caught up, so the ingest schedules the learn task."""
    cap = load_capture("relay-openai")
    plain = stores()
    store = _LateStore(real_redis, plain.keys.prefix)
    store.others = cap.runs[2:]
    store.rival = True
    result = ingest(store, cap.runs[:2], MAX_BYTES)
    assert learn_ingested(store, result, config=CONFIG, max_runs=500) == {cap.agent_id: False}
    assert plain.cursor(cap.agent_id).learned == 2 and plain.cursor(cap.agent_id).lag == 2


class _CountingStore(Store):
    """Counts the learn task's reads (`catch_up` -> `read_learn_batch`)."""

    batch_reads = 0

    def read_learn_batch(self, *args, **kwargs) -> LearnBatch:  # type: ignore[no-untyped-def,override]
        self.batch_reads += 1
        return super().read_learn_batch(*args, **kwargs)


def test_an_ingest_that_is_next_reads_nothing_more(real_redis: redis.Redis, stores) -> None:  # type: ignore[no-untyped-def]
    """The common case (its runs next, nothing else waiting) folds from memory
    and looks at the lag once after letting go: no learn-task read."""
    cap = load_capture("relay-openai")
    plain = stores()
    store = _CountingStore(real_redis, plain.keys.prefix)
    result = ingest(store, cap.runs, MAX_BYTES)
    assert learn_ingested(store, result, config=CONFIG, max_runs=500) == {cap.agent_id: True}
    assert store.batch_reads == 0
    assert plain.counters()["fast_path_runs"] == 4
    assert_matches_capture(real_redis, plain.keys.prefix, cap)
