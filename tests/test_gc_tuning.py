"""The worker's garbage-collector tuning (worker/gc_tuning.py).

Real `celery worker` processes are checked in tests/test_pipeline.py (each
process logs its tuning); here, what `tune` does to the collector.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Iterator

import orjson
import pytest

from bench.workload import synthetic_runs
from storage.errors import InvalidRecord
from tasks.learning import validate_run
from worker.engine.fold import AgentState, fold
from worker.gc_tuning import tune


@pytest.fixture(autouse=True)
def restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_tune_freezes_the_heap_and_raises_the_young_threshold() -> None:
    _, older, oldest = gc.get_threshold()
    before = gc.get_freeze_count()
    alive = [[i] for i in range(5000)]  # containers the collector tracks
    assert tune(12_345)
    assert gc.get_threshold() == (12_345, older, oldest)
    assert gc.get_freeze_count() >= before + len(alive)


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def test_tune_frees_start_up_garbage_instead_of_freezing_it() -> None:
    gc.disable()  # no collection may happen before tune's own
    try:
        garbage = _Node()
        ref = weakref.ref(garbage)
        del garbage
        assert ref() is not None
        assert tune(5_000)
        assert ref() is None
    finally:
        gc.enable()


def test_zero_leaves_the_collector_alone() -> None:
    before = gc.get_threshold()
    assert not tune(0)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_ingesting_and_folding_runs_leaves_no_cyclic_garbage() -> None:
    """What the high threshold rests on: the hot path frees everything it
    allocates by reference counting, valid runs and rejected ones alike, so
    the collector has nothing to find after a message."""
    runs = [orjson.dumps(r).decode() for r in synthetic_runs(200, agent_id="gc", seed=3)]
    runs += ['{"id": "x"}', '{"agent_id": "a", "calls": [NaN]}', "[" * 200 + "]" * 200]
    gc.collect()
    gc.disable()
    try:
        records = []
        for text in runs:
            with contextlib.suppress(InvalidRecord):
                records.append(validate_run(text, 1 << 20)[0])
        assert len(records) == 200
        state = AgentState("gc")
        changes = fold(state, records[:100])
        changes = fold(state, records[100:])
        assert changes.trie is not None
        del records, state, changes
        assert gc.collect() == 0
    finally:
        gc.enable()
