"""The operator actions of `tasks.operations`, called as plain functions.

They used to exist only inside the CLI; here they are driven directly,
with explicit settings, on the real Redis and the embedded fakeredis.
Expected values come from the captures of the real runtime (the bundled
samples are their runs under new agent ids) or are written out here.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from storage.store import Store
from tasks.learning import dead_letter
from tasks.operations import (
    read_records,
    rebuild_and_catch_up,
    replay_dead_letters,
    replay_records,
)
from tests.goldens import load_capture
from worker.samples import sample_runs
from worker.settings import Settings, load_settings

AGENT = "travel-openai"
CAPTURE = "relay-openai"


@pytest.fixture
def settings(store: Store) -> Settings:
    """Settings whose prefix is NOT the store's: operations must use the store given."""
    return load_settings(key_prefix="not-this-one:", learn_batch_size=2)


def _groups(store: Store, agent: str) -> list[dict[str, Any]]:
    plan = store.get_plan(agent)
    assert plan is not None
    return [g.model_dump() for g in plan.parallel_groups]


def test_replay_records_stores_learns_and_names_what_it_skipped(
    store: Store, settings: Settings
) -> None:
    runs = sample_runs()[AGENT]
    not_a_run = json.dumps({"id": "x"})
    lines = [runs[0], "{not json", runs[1], not_a_run, runs[2], runs[3]]
    records = read_records("\n".join(lines).encode(), max_depth=64, max_bytes=1 << 20)

    report = replay_records(store, records, settings, source="file.jsonl")

    assert [(r.where, r.number) for r in report.skipped] == [("line 2", 2), ("line 4", 4)]
    assert "JSON" in str(report.skipped[0].problem)
    summary = report.summary()
    assert (summary["runs_stored"], summary["learned"], summary["rejected"]) == (4, 4, 2)
    assert summary["agents"] == [AGENT]
    assert _groups(store, AGENT) == load_capture(CAPTURE).value("plan")["parallel_groups"]
    entries = [json.loads(e) for e in store.dead_letters()]
    assert sorted(e.get("source", e["stage"]) for e in entries) == ["file.jsonl line 2", "ingest"]


def test_rebuild_and_catch_up_learns_runs_that_arrive_during_the_rebuild(
    store: Store, settings: Settings
) -> None:
    runs = sample_runs()[AGENT]
    replay_records(store, read_records("\n".join(runs[:3]), max_depth=64, max_bytes=1 << 20),
                   settings, source="first")  # fmt: skip
    arrived: list[int] = []

    def progress(done: int, total: int) -> None:
        if not arrived:  # a run stored while the rebuild folds
            from tasks.operations import ingest_payloads

            arrived.append(len(ingest_payloads(store, [runs[3]], settings).stored))

    report = rebuild_and_catch_up(store, AGENT, settings, progress=progress)

    assert arrived == [1]
    assert (report.runs, report.learned_after, report.learned) == (3, 1, 4)
    cursor = store.cursor(AGENT)
    assert (cursor.index_length, cursor.lag) == (4, 0)
    assert _groups(store, AGENT) == load_capture(CAPTURE).value("plan")["parallel_groups"]


def test_replay_dead_letters_stores_what_validates_now_and_keeps_the_rest(
    store: Store, settings: Settings
) -> None:
    run = sample_runs()[AGENT][0]
    store.push_dead_letters(
        [
            dead_letter(run, "was too big then", "ingest"),
            dead_letter("{}", "not a run", "ingest"),
        ]
    )
    selected = [(i, e.encode()) for i, e in enumerate(store.dead_letters())]

    report = replay_dead_letters(store, selected, settings)

    assert (report.selected, report.removed, report.learned, report.remaining) == (2, 1, 1, 1)
    assert [item["index"] for item in report.invalid] == [1]
    assert json.loads(store.dead_letters()[0])["raw"] == "{}"
    assert store.cursor(AGENT).learned == 1
