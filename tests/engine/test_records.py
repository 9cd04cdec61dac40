"""The engine's own run type, the edge that converts to it, and the volatile fields.

Expected values are worked out by hand (epoch arithmetic, literal dicts) or
come from folding the captured runs the way the engine always did (the wire
model directly), never from the code under test alone.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from storage.models import RunRecord, parse_wire
from tasks.learning import engine_run, learnable_run
from tests.goldens import CAPTURES, load_capture
from worker.engine.fold import AgentState, EngineConfig, fold, without_volatile
from worker.engine.records import Call, Run, format_stamp

# 2026-01-01T00:00:00Z is 1_767_225_600 s after the epoch.
JAN_1_2026_NS = 1_767_225_600 * 1_000_000_000
RUN = {
    "id": "00000000-0000-4000-8000-000000000001",
    "agent_id": "a",
    "started_at": "2026-01-01T00:00:00Z",
    "ended_at": "2026-01-01T00:00:02.000000001+00:00",
    "calls": [
        {
            "kind": "llm",
            "name": "plan",
            "started_at": "2026-01-01T01:00:01.5+01:00",
            "ended_at": "2026-01-01T00:00:01.75Z",
            "output_tokens": 7,
            "annotated_request": {"messages": [{"role": "user", "content": "hi"}]},
        },
        {"kind": "tool", "name": "search", "started_at": "2026-01-01T00:00:01Z"},
    ],
}


def test_engine_run_carries_what_the_learners_read_with_times_in_ns() -> None:
    record = parse_wire(RunRecord, RUN)
    run = engine_run(record)
    assert run == Run(
        id="00000000-0000-4000-8000-000000000001",
        start_ns=JAN_1_2026_NS,
        end_ns=JAN_1_2026_NS + 2_000_000_001,
        calls=(
            Call(
                kind="llm",
                name="plan",
                start_ns=JAN_1_2026_NS + 1_500_000_000,
                end_ns=JAN_1_2026_NS + 1_750_000_000,
                output_tokens=7,
                annotated_request={"messages": [{"role": "user", "content": "hi"}]},
            ),
            Call(kind="tool", name="search", start_ns=JAN_1_2026_NS + 1_000_000_000),
        ),
    )
    # The very request object: the ACG learner caches its work per object.
    assert run.calls[0].annotated_request is record.calls[0].annotated_request


def test_learnable_run_says_why_learning_skips_a_run() -> None:
    assert learnable_run("a", None) == "run key missing"
    assert learnable_run("b", parse_wire(RunRecord, RUN).to_json()) == (
        "run belongs to agent 'a', found in 'b''s index"
    )
    reason = learnable_run("a", '{"id": "x"}')
    assert isinstance(reason, str) and reason.startswith("invalid RunRecord: id: not a UUID")
    assert isinstance(learnable_run("a", parse_wire(RunRecord, RUN).to_json()), Run)


@pytest.mark.parametrize("capture", CAPTURES)
def test_folding_converted_runs_equals_folding_wire_records(capture: str) -> None:
    """The edge conversion loses nothing the learners read: the same state,
    bit for bit, as folding the wire records themselves."""
    raws = load_capture(capture).runs
    agent = parse_wire(RunRecord, raws[0]).agent_id
    results = []
    for convert in (False, True):
        ids = (f"00000000-0000-4000-8000-{n:012d}" for n in itertools.count())
        records = [parse_wire(RunRecord, raw) for raw in raws]
        runs: list[Any] = [engine_run(r) for r in records] if convert else records
        changes = fold(
            AgentState(agent),
            runs,
            config=EngineConfig(),
            clock=lambda: "2026-01-01T00:00:00.000000000+00:00",
            new_id=ids.__next__,
        )
        results.append(changes)
    assert results[0] == results[1]
    assert results[1].trie is not None and results[1].accumulators is not None


def test_without_volatile_blanks_exactly_the_fields_a_fold_writes_anew() -> None:
    trie = {"version": "1.0", "generated_at": "2026-01-01T00:00:00Z", "root": {"name": "root"}}
    assert without_volatile("trie", trie) == {
        "version": "1.0",
        "generated_at": None,
        "root": {"name": "root"},
    }
    assert trie["generated_at"] == "2026-01-01T00:00:00Z"  # the input is left alone
    window = [{"ir_id": "x", "created_at": "t", "blocks": [1]}, "odd"]
    assert without_volatile("acg_observations", window) == [
        {"ir_id": None, "created_at": None, "blocks": [1]},
        "odd",
    ]
    plan = {"agent_id": "a", "generated_at": "kept: not volatile in a plan"}
    assert without_volatile("plan", plan) is plan
    assert without_volatile("trie", "not an object") == "not an object"


def test_default_stamps_are_the_runtimes_layout() -> None:
    assert format_stamp(0) == "1970-01-01T00:00:00.000000000+00:00"
    assert format_stamp(JAN_1_2026_NS + 1_500_000_007) == "2026-01-01T00:00:01.500000007+00:00"
