"""Property: learning does not depend on how a stream of runs is batched.

Random streams of synthetic runs (overlapping calls, unfinished calls,
missing tokens, runs with no end, names with `/` or empty, recorded prompts
from the captures) are folded all at once and in random batches, with the
state going through JSON between batches exactly as it does through Redis.
The stored state must be identical.
"""

from __future__ import annotations

import itertools
import json
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.models import RunRecord, parse_wire
from storage.timestamps import format_ns
from tests.goldens import CAPTURES, load_capture
from worker.engine.fold import AgentState, EngineConfig, fold

AGENT = "prop-agent"
BASE = 1_790_000_000_000_000_000

REQUESTS = [
    call["annotated_request"]
    for cap in CAPTURES
    for raw in load_capture(cap).runs
    for call in json.loads(raw)["calls"]
    if "annotated_request" in call
]


def _ts(ns: int) -> str:
    return format_ns(ns).replace("+00:00", "Z")


@st.composite
def calls(draw: st.DrawFn, run_start: int) -> dict[str, Any]:
    kind = draw(st.sampled_from(["llm", "llm", "tool"]))
    start = run_start + draw(st.integers(0, 5_000)) * 1_000_000
    call: dict[str, Any] = {
        "kind": kind,
        "name": draw(st.sampled_from(["plan", "plan", "act", "a/b", "", "search", "fetch"])),
        "started_at": _ts(start),
    }
    if draw(st.integers(0, 9)) > 0:  # 10% never finish
        call["ended_at"] = _ts(start + draw(st.integers(0, 3_000)) * 1_000_000)
    if kind == "llm":
        if draw(st.booleans()):
            call["output_tokens"] = draw(st.integers(0, 2_000))
        if draw(st.integers(0, 2)) == 0:
            call["annotated_request"] = draw(st.sampled_from(REQUESTS))
    return call


@st.composite
def runs(draw: st.DrawFn) -> dict[str, Any]:
    start = BASE + draw(st.integers(0, 10**6)) * 1_000_000_000
    run: dict[str, Any] = {
        "id": str(uuid.UUID(int=draw(st.integers(0, 2**128 - 1)))),
        "agent_id": AGENT,
        "calls": draw(st.lists(calls(start), max_size=8)),
        "started_at": _ts(start),
    }
    if draw(st.booleans()):
        run["ended_at"] = _ts(start + draw(st.integers(0, 9_000)) * 1_000_000)
    return run


def _learn(records: list[RunRecord], cuts: list[int]) -> dict[str, Any]:
    ids = (f"00000000-0000-4000-8000-{n:012d}" for n in itertools.count())
    config = EngineConfig(observation_window=5)  # small, so trimming is exercised
    state = AgentState(AGENT)
    last: dict[str, Any] = {}
    bounds = [0, *sorted(set(cuts)), len(records)]
    for lo, hi in itertools.pairwise(bounds):
        changes = fold(
            state,
            records[lo:hi],
            config=config,
            clock=lambda: "2026-01-01T00:00:00.000000000+00:00",
            new_id=lambda: next(ids),
        )
        for kind, key in changes.changed():
            value = {
                "accumulators": changes.accumulators,
                "trie": changes.trie,
                "plan": changes.plan,
            }.get(kind)
            if kind == "acg_observations":
                value = changes.observations[key]
            elif kind == "acg_stability":
                value = changes.stability[key]
            last[f"{kind}:{key}"] = json.loads(json.dumps(value))
        # Through JSON, as through Redis.
        state = AgentState(
            AGENT,
            accumulators=json.loads(json.dumps(state.accumulators)),
            plan=json.loads(json.dumps(state.plan)),
            windows=json.loads(json.dumps(state.windows)),
        )
    return last


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=st.lists(runs(), min_size=1, max_size=12), data=st.data())
def test_any_batching_gives_identical_state(stream: list[dict[str, Any]], data) -> None:
    records = [parse_wire(RunRecord, r) for r in stream]
    cuts = data.draw(st.lists(st.integers(0, len(records)), max_size=len(records)))
    assert _learn(records, cuts) == _learn(records, [])
    assert _learn(records, list(range(len(records)))) == _learn(records, [])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=st.lists(runs(), min_size=1, max_size=12), data=st.data())
def test_twin_nodes_sharing_gives_the_same_bits(stream: list[dict[str, Any]], data) -> None:
    """Sharing one object between equal nodes fed equal samples is only an
    optimisation: state must equal updating every node on its own."""
    from worker.engine.latency import Accumulators

    records = [parse_wire(RunRecord, r) for r in stream]
    cuts = set(data.draw(st.lists(st.integers(0, len(records)), max_size=4)))
    shared, plain = Accumulators(share=True), Accumulators(share=False)
    for i, run in enumerate(records):
        if i in cuts:  # through the stored form, where twins are re-detected
            shared = Accumulators.from_wire(json.loads(json.dumps(shared.to_wire())))
            plain = Accumulators.from_wire(json.loads(json.dumps(plain.to_wire())), share=False)
        shared.add_run(run)
        plain.add_run(run)
        assert shared.to_wire() == plain.to_wire()
