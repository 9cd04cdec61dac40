"""Latency-sensitivity learner: golden captures, NAT's builder, SPEC 4 / 6b edges.

Expected values come from the captured runtime output (`relay-*`), from NAT's
builder output (`nat-trie`), or are worked out by hand from the SPEC's rules in
the test itself; none is produced by the code under test.
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import pytest

from adaptive_worker_client.hints import agent_hints, default_hints, lookup
from storage.models import RunRecord
from tests.goldens import CAPTURES, FIXTURES, assert_json_close, load_capture
from worker.engine.latency import (
    Accumulators,
    SensitivityConfig,
    build_trie,
    extract_contexts,
    round_half_away,
)

NAT = FIXTURES / "nat-trie"


def _runs(capture: str) -> list[RunRecord]:
    return [RunRecord.model_validate_json(raw) for raw in load_capture(capture).runs]


def _fold(runs: list[RunRecord]) -> Accumulators:
    acc = Accumulators()
    for run in runs:
        acc.add_run(run)
    return acc


def _ts(seconds: float, digits: int = 9) -> str:
    """2026-01-01T00:00:SS[.fff...]Z with `digits` fractional digits (0/3/6/9)."""
    whole = int(seconds)
    frac = round((seconds - whole) * 1e9)
    base = f"2026-01-01T00:{whole // 60:02d}:{whole % 60:02d}"
    if digits == 0:
        assert frac == 0
        return base + "Z"
    text = f"{frac:09d}"
    assert text[digits:] == "0" * (9 - digits)
    return f"{base}.{text[:digits]}Z"


def _run(calls: list[dict[str, Any]], start: float = 0.0, end: float | None = 10.0) -> RunRecord:
    return RunRecord.model_validate(
        {
            "id": str(uuid.uuid4()),
            "agent_id": "edge-agent",
            "started_at": _ts(start),
            "ended_at": None if end is None else _ts(end),
            "calls": calls,
        }
    )


def _llm(name: str, start: float, end: float | None, tokens: int | None = 10) -> dict[str, Any]:
    call: dict[str, Any] = {"kind": "llm", "name": name, "started_at": _ts(start)}
    if end is not None:
        call["ended_at"] = _ts(end)
    if tokens is not None:
        call["output_tokens"] = tokens
    return call


def _tool(name: str, start: float, end: float) -> dict[str, Any]:
    return {"kind": "tool", "name": name, "started_at": _ts(start), "ended_at": _ts(end)}


# ------------------------------------------------------------------ golden captures


@pytest.mark.parametrize("capture", CAPTURES)
def test_accumulators_match_capture_bit_for_bit(capture: str) -> None:
    got = _fold(_runs(capture)).to_wire()
    expected = load_capture(capture).value("accumulators")
    assert_json_close(got, expected, rel=0.0)  # exact, ints stay ints, floats floats
    assert got == expected
    # Field order as the runtime writes it (node, stats, sorted digest keys).
    node = got["nodes"][""]
    assert list(node) == list(expected["nodes"][""])
    stats = node["all_remaining_calls"]
    assert list(stats) == ["count", "mean", "m2", "digest"]
    assert list(stats["digest"]) == ["centroids", "count", "max", "max_size", "min", "sum"]


@pytest.mark.parametrize("capture", CAPTURES)
def test_trie_matches_capture(capture: str) -> None:
    cap = load_capture(capture)
    expected = cap.value("trie")
    got = build_trie(_fold(_runs(capture)), cap.agent_id, "2000-01-01T00:00:00+00:00")
    assert got["generated_at"] == "2000-01-01T00:00:00+00:00"
    got["generated_at"] = expected["generated_at"]
    assert_json_close(got, expected, rel=0.0)
    assert got == expected
    assert list(got) == ["version", "generated_at", "workflow_name", "root"]
    assert list(got["root"]) == ["name", "children", "predictions_by_call_index",
                                 "predictions_any_index"]  # fmt: skip


@pytest.mark.parametrize("capture", CAPTURES)
def test_captured_accumulators_survive_a_round_trip(capture: str) -> None:
    expected = load_capture(capture).value("accumulators")
    assert Accumulators.from_wire(expected).to_wire() == expected


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("batches", [[1, 1, 1, 1], [2, 2], [1, 3], [3, 1], [4]])
def test_batching_cannot_change_a_bit(capture: str, batches: list[int]) -> None:
    """The runtime learns one run at a time through stored JSON (load, add,
    store); any batching through a JSON round trip gives identical state."""
    runs = _runs(capture)
    whole = _fold(runs).to_wire()
    acc, i = Accumulators(), 0
    for size in batches:
        acc = Accumulators.from_wire(json.loads(json.dumps(acc.to_wire())))
        for run in runs[i : i + size]:
            acc.add_run(run)
        i += size
    final = json.loads(json.dumps(acc.to_wire()))
    assert final == whole
    assert final == load_capture(capture).value("accumulators")


# ------------------------------------------------------------- hints and lookups


@pytest.mark.parametrize("capture", CAPTURES)
def test_injected_hints_are_reproduced(capture: str) -> None:
    """`observed_llm_requests.json` holds the hints the runtime injected into
    each request from its in-process trie, rebuilt after every run.  Its
    intercept numbers requests 1, 2, ... per process, looks the trie up along
    the one-element scope path (prefix_id `{agent}-d1`), and its
    `total_requests` is round(remaining mean) + that counter.  The scope's
    name is not in the capture: any name that is not a trie child lands on the
    root, and the only child (the provider call) holds the same samples here.
    The first run's requests carry no hints: there was no trie yet."""
    cap = load_capture(capture)
    observed = json.loads((FIXTURES / capture / "observed_llm_requests.json").read_text())
    acc = Accumulators()
    trie: dict[str, Any] | None = None
    counter = 0
    for run in _runs(capture):
        for call in run.calls:
            if call.kind != "llm":
                continue
            request = observed[counter]
            counter += 1
            body_hints = (request["body"].get("nvext") or {}).get("agent_hints")
            header_hints = request["headers"].get("x-nemo-relay-adaptive-agent-hints")
            assert body_hints == header_hints
            if trie is None:
                assert body_hints is None
                continue
            got = agent_hints(trie, ["scope-not-in-trie"], counter, cap.agent_id)
            assert got == body_hints
            defaults = default_hints(trie)
            assert defaults is not None
            assert {k: defaults[k] for k in ("osl", "iat", "priority", "latency_sensitivity")} == {
                k: body_hints[k] for k in ("osl", "iat", "priority", "latency_sensitivity")
            }
            assert defaults["prefix_id"] == "default"
            assert defaults["total_requests"] == body_hints["total_requests"] - counter + 1
        acc.add_run(run)
        trie = build_trie(acc, cap.agent_id, "t")
    assert counter == len(observed)


def test_default_hints_from_captured_trie() -> None:
    """relay-openai's final root any-index prediction: output_tokens p90 213.0,
    interarrival mean 133.666..., remaining mean 0.8, sensitivity 3."""
    trie = load_capture("relay-openai").value("trie")
    assert default_hints(trie) == {
        "osl": 213,
        "iat": 134,
        "priority": 2,
        "latency_sensitivity": 3.0,
        "prefix_id": "default",
        "total_requests": 2,
    }
    assert list(default_hints(trie) or {}) == [
        "osl", "iat", "priority", "latency_sensitivity", "prefix_id", "total_requests"
    ]  # fmt: skip


def test_default_hints_round_half_away_from_zero() -> None:
    """Rust `f64::round`; Python's `round` would give 212, 0 and 2 (+1)."""
    metrics = {"sample_count": 1, "mean": 0.0, "p50": 0.0, "p90": 0.0, "p95": 0.0}
    pred = {
        "remaining_calls": {**metrics, "mean": 2.5},
        "interarrival_ms": {**metrics, "mean": 0.5},
        "output_tokens": {**metrics, "p90": 212.5},
        "latency_sensitivity": None,
    }
    root = {"name": "root", "children": {}, "predictions_by_call_index": {},
            "predictions_any_index": pred}  # fmt: skip
    hints = default_hints({"root": root})
    assert hints == {"osl": 213, "iat": 1, "priority": 4, "latency_sensitivity": 0.0,
                     "prefix_id": "default", "total_requests": 4}  # fmt: skip
    # Negative interarrival (possible: see test_time_to_next) saturates to 0 like `as u32`.
    pred["interarrival_ms"] = {**metrics, "mean": -40.0}
    assert (default_hints(root) or {})["iat"] == 0
    root["predictions_any_index"] = None
    assert default_hints(root) is None
    assert round_half_away(2.5) == 3.0
    assert round_half_away(-2.5) == -3.0
    assert round_half_away(0.49999999999999994) == 0.0
    assert round_half_away(-0.4) == 0.0


def test_lookup_on_captured_trie() -> None:
    trie = load_capture("relay-openai").value("trie")
    root = trie["root"]
    child = root["children"]["openai"]
    assert lookup(trie, ["openai"], 2) == child["predictions_by_call_index"]["2"]
    assert lookup(trie, ["openai"], 2) is child["predictions_by_call_index"]["2"]
    # unknown index at the deepest node: that node's any-index
    assert lookup(trie, ["openai"], 9) is child["predictions_any_index"]
    # path leaves the trie: deepest matching node
    assert lookup(trie, ["openai", "deeper"], 1) is child["predictions_by_call_index"]["1"]
    assert lookup(trie, ["elsewhere", "openai"], 3) is root["predictions_by_call_index"]["3"]
    assert lookup(trie, [], 7) is root["predictions_any_index"]
    assert lookup(root, [], 1) is root["predictions_by_call_index"]["1"]  # bare node accepted
    empty = {"name": "root", "children": {}, "predictions_by_call_index": {},
             "predictions_any_index": None}  # fmt: skip
    assert lookup(empty, ["x"], 1) is None


# ---------------------------------------------------------------- NAT's builder


def _nat_runs() -> list[RunRecord]:
    return [RunRecord.model_validate(r) for r in json.loads((NAT / "runs.json").read_text())]


def test_contexts_against_nat_builder() -> None:
    """Per-call contexts and sensitivity scores vs NAT's `contexts_flat.json`.

    Where the two builders agree (checked): the set of completed LLM calls,
    their output tokens (missing -> 0), call durations and sensitivity scores
    (NAT's float-second timestamps carry noise of ~1e-7 s, hence the absolute
    tolerances; run 3's scores differ, see below), and in runs without
    overlapping calls (1, 4, 5) also call_index and remaining_calls.

    Where they differ, we follow the Rust runtime:
    * call order: NAT orders calls by end time, Rust keeps record order, so
      call_index / remaining_calls differ in the runs with overlaps (2, 3);
    * time_to_next_ms: Rust takes the next LLM call in the record (it can
      have started earlier: run 2 gives -2400 ms where NAT gives 100) and a
      call starting exactly at this call's end counts (run 5: Rust 0, NAT
      1500); NAT looks for the next start after the end.  Both count the
      unfinished call (run 3: 100 ms); run 1 and 4 agree;
    * workflow duration of a run without end (run 3): Rust uses the latest
      call end (3.0 s), NAT the latest event (3.1 s, the unfinished start);
    * step grouping: Rust compares whole-second span times, NAT fractional
      ones, so in run 3 the two sub-second planner calls in the same second
      are two steps for Rust and one for NAT, and the scores differ;
    * durations: Rust truncates to whole milliseconds (chrono), NAT keeps
      float seconds with float noise.
    """
    nat = json.loads((NAT / "contexts_flat.json").read_text())
    runs = _nat_runs()
    assert [r["run_id"] for r in nat] == [r.id for r in runs]
    for run, nat_run in zip(runs, nat, strict=True):
        ours = extract_contexts(run)
        theirs = nat_run["contexts"]
        n = run.id[-1]
        key = {(c.path[0], c.output_tokens): c for c in ours}
        assert len(key) == len(ours) == len(theirs)
        for t in theirs:
            c = key[(t["path"][0], t["output_tokens"])]
            assert c.path == t["path"]
            assert math.isclose(c.call_duration_s, t["call_duration_s"], abs_tol=1e-6)
            if n != "3":
                assert math.isclose(c.workflow_duration_s, t["workflow_duration_s"], abs_tol=1e-6)
                assert math.isclose(c.sensitivity_score, t["sensitivity_score"], abs_tol=1e-6)
        if n in "145":
            for c, t in zip(ours, theirs, strict=True):
                assert (c.call_index, c.remaining_calls) == (t["call_index"], t["remaining_calls"])
        if n in "14":
            for c, t in zip(ours, theirs, strict=True):
                if t["time_to_next_ms"] is None:
                    assert c.time_to_next_ms is None
                else:
                    assert c.time_to_next_ms is not None
                    assert math.isclose(c.time_to_next_ms, t["time_to_next_ms"], abs_tol=1e-3)

    # The documented differences, pinned to the Rust behaviour.
    by_run = {r.id[-1]: extract_contexts(r) for r in runs}
    run2 = by_run["2"]
    assert [(c.path[0], c.call_index, c.remaining_calls, c.output_tokens) for c in run2] == [
        ("planner_llm", 1, 3, 100),
        ("summarizer_llm", 1, 2, 200),
        ("summarizer_llm", 2, 1, 150),
        ("planner_llm", 2, 0, 0),
    ]
    assert [c.time_to_next_ms for c in run2] == [50.0, -2400.0, 1800.0, None]
    run3 = by_run["3"]
    assert [c.time_to_next_ms for c in run3] == [-400.0, 400.0, 100.0]
    assert {c.workflow_duration_s for c in run3} == {3.0}
    # whole-second spans: [0,0], [0,0], [1,3] -> three sequential steps
    # raw: 0.5*0.5/3 + 0.3 + 0.2, 0.5*0.3/3 + 0.15 + 0.1, 0.5*2/3 + 0 + 0.2
    raw = [0.5 * 0.5 / 3 + 0.5, 0.5 * 0.3 / 3 + 0.25, 0.5 * 2.0 / 3 + 0.2]
    lo, hi = min(raw), max(raw)
    for c, r in zip(run3, raw, strict=True):
        assert math.isclose(c.sensitivity_score, (r - lo) / (hi - lo), abs_tol=1e-12)
    assert by_run["5"][0].time_to_next_ms == 0.0


@pytest.mark.parametrize(
    ("fixture", "config"),
    [("trie_flat.json", SensitivityConfig()), ("trie_flat_nosens.json", SensitivityConfig(False))],
)
def test_trie_shape_against_nat_builder(fixture: str, config: SensitivityConfig) -> None:
    """Same nodes, same call indices and the same sample counts as NAT's trie
    (call order differences move samples between indices but not counts
    here); order-free means (remaining calls, output tokens) agree.  Without
    sensitivity every `latency_sensitivity` is null in both."""
    nat = json.loads((NAT / fixture).read_text())
    acc = Accumulators()
    for run in _nat_runs():
        acc.add_run(run, config)
    ours = build_trie(acc, "research_agent", "t", config)
    assert ours["workflow_name"] == nat["workflow_name"]

    def compare(a: dict[str, Any], b: dict[str, Any]) -> None:
        assert a["name"] == b["name"]
        assert set(a["children"]) == set(b["children"])
        assert set(a["predictions_by_call_index"]) == set(b["predictions_by_call_index"])
        pairs = [(a["predictions_any_index"], b["predictions_any_index"])] + [
            (a["predictions_by_call_index"][k], b["predictions_by_call_index"][k])
            for k in b["predictions_by_call_index"]
        ]
        for pa, pb in pairs:
            for metric in ("remaining_calls", "interarrival_ms", "output_tokens"):
                assert pa[metric]["sample_count"] == pb[metric]["sample_count"]
            if pb["latency_sensitivity"] is None:
                assert pa["latency_sensitivity"] is None
        any_a, any_b = a["predictions_any_index"], b["predictions_any_index"]
        for metric in ("remaining_calls", "output_tokens"):
            assert math.isclose(any_a[metric]["mean"], any_b[metric]["mean"], rel_tol=1e-12)
        for name in b["children"]:
            compare(a["children"][name], b["children"][name])

    compare(ours["root"], nat["root"])
    if not config.enabled:
        assert all(not node.sensitivity for node in acc.nodes.values())


def test_lookups_against_nat_builder() -> None:
    """`lookups_flat.out.json`: the same node/index is chosen for every query
    (identified by its sample counts; values differ as documented above)."""
    acc = Accumulators()
    for run in _nat_runs():
        acc.add_run(run)
    trie = build_trie(acc, "research_agent", "t")

    def counts(pred: dict[str, Any] | None) -> tuple[int, ...] | None:
        if pred is None:
            return None
        return tuple(pred[m]["sample_count"] for m in
                     ("remaining_calls", "interarrival_ms", "output_tokens"))  # fmt: skip

    queries = json.loads((NAT / "lookups_flat.out.json").read_text())
    assert len(queries) == 7
    for q in queries:
        got = lookup(trie, q["query"]["path"], q["query"]["call_index"])
        assert counts(got) == counts(q["prediction"]), q["query"]


# ------------------------------------------------------------------ SPEC 6b edges


def test_name_with_slash_is_one_key_split_in_the_trie() -> None:
    acc = Accumulators()
    acc.add_run(_run([_llm("a/b/c", 1.0, 2.0)]))
    assert set(acc.to_wire()["nodes"]) == {"", "a/b/c"}
    root = build_trie(acc, "edge-agent", "t")["root"]
    assert list(root["children"]) == ["a"]
    a = root["children"]["a"]
    b = a["children"]["b"]
    c = b["children"]["c"]
    for empty in (a, b):
        assert empty["predictions_by_call_index"] == {}
        assert empty["predictions_any_index"] is None
    assert c["children"] == {}
    assert c["predictions_any_index"]["output_tokens"]["sample_count"] == 1
    assert lookup(root, ["a", "b", "c"], 1) is c["predictions_by_call_index"]["1"]
    assert lookup(root, ["a/b/c"], 1) is root["predictions_by_call_index"]["1"]


def test_empty_name_is_the_root_key_counted_twice() -> None:
    acc = Accumulators()
    acc.add_run(_run([_llm("", 1.0, 2.0, tokens=7), _llm("", 3.0, 4.0, tokens=9)]))
    wire = acc.to_wire()
    assert list(wire["nodes"]) == [""]
    root = wire["nodes"][""]
    assert root["all_output_tokens"]["count"] == 4
    assert root["all_output_tokens"]["mean"] == 8.0
    assert root["output_tokens"]["1"]["count"] == 2  # call 1 twice
    trie = build_trie(acc, "edge-agent", "t")["root"]
    assert trie["children"] == {}
    assert trie["predictions_any_index"]["remaining_calls"]["sample_count"] == 4


def test_unfinished_call_is_not_learned_but_is_the_next_call() -> None:
    run = _run([_llm("p", 1.0, 2.0), _tool("t", 2.0, 2.2), _llm("p", 2.75, None)], end=None)
    (ctx,) = extract_contexts(run)
    assert ctx.remaining_calls == 0
    assert ctx.time_to_next_ms == 750.0
    # no run end: latest call end (the tool's 2.2 s) minus run start
    assert ctx.workflow_duration_s == 2.2
    assert ctx.sensitivity_score == 0.5  # one call: max == min
    acc = Accumulators()
    acc.add_run(run)
    node = acc.to_wire()["nodes"]["p"]
    assert node["all_interarrival_ms"]["count"] == 1
    assert node["all_remaining_calls"]["count"] == 1


def test_run_without_end_or_finished_calls_has_zero_workflow() -> None:
    run = _run([_llm("p", 1.0, None)], end=None)
    assert extract_contexts(run) == []
    acc = Accumulators()
    acc.add_run(run)
    assert acc.to_wire() == {"nodes": {}}
    assert build_trie(acc, "edge-agent", "t")["root"]["predictions_any_index"] is None


def test_missing_tokens_count_as_zero() -> None:
    acc = Accumulators()
    acc.add_run(_run([_llm("p", 1.0, 2.0, tokens=100), _llm("p", 3.0, 4.0, tokens=None)]))
    stats = acc.to_wire()["nodes"]["p"]["all_output_tokens"]
    assert stats["count"] == 2
    assert stats["mean"] == 50.0
    assert stats["digest"]["min"] == 0.0


@pytest.mark.parametrize("digits", [0, 3, 6, 9])
def test_timestamps_with_0_3_6_9_fractional_digits(digits: int) -> None:
    end = 3.0 if digits == 0 else 3.25
    if digits == 9:
        end = 3.250000001
    run = _run([
        {"kind": "llm", "name": "p", "started_at": _ts(1.0, digits), "ended_at": _ts(end, digits)},
        {"kind": "llm", "name": "p", "started_at": _ts(5.0, digits), "ended_at": _ts(6.0, digits)},
    ])  # fmt: skip
    first, second = extract_contexts(run)
    assert first.call_duration_s == {0: 2.0, 3: 2.25, 6: 2.25, 9: 2.25}[digits]
    assert first.time_to_next_ms == {0: 2000.0, 3: 1750.0, 6: 1750.0, 9: 1749.0}[digits]
    assert (first.span_start_time, first.span_end_time) == (1767225601.0, 1767225603.0)
    assert second.call_index == 2


def test_time_to_next_truncates_toward_zero() -> None:
    """chrono `num_milliseconds`: -1.5 ms is -1 (a floor would give -2)."""
    run = _run([_llm("a", 1.0, 2.0015), _llm("b", 2.0, 2.5), _llm("c", 2.9995, 3.5)])
    a, b, c = extract_contexts(run)
    assert a.time_to_next_ms == -1.0
    assert b.time_to_next_ms == 499.0
    assert c.time_to_next_ms is None
    assert a.call_duration_s == 1.001


def test_call_index_counts_per_name_in_record_order() -> None:
    run = _run([_llm("x", 1, 2), _llm("y", 3, 4), _llm("x", 5, 6), _llm("x", 7, 8)])
    assert [(c.path[0], c.call_index, c.remaining_calls) for c in extract_contexts(run)] == [
        ("x", 1, 3), ("y", 1, 2), ("x", 2, 1), ("x", 3, 0)
    ]  # fmt: skip


def test_sensitivity_groups_on_whole_seconds() -> None:
    """Two overlapping sub-second calls in the same second: whole-second spans
    [0,0] and [0,0] do not overlap (start < max end is false), so they are two
    steps.  raw A = 0.5*0.5/10 + 0.3*1 + 0.2*1, raw B = 0.5*0.6/10 + 0 + 0.2;
    A is the max (1.0), B the min (0.0).  Grouping on fractional times (NAT)
    would make one step and rank them the other way round."""
    run = _run([_llm("a", 0.1, 0.6), _llm("b", 0.3, 0.9)])
    a, b = extract_contexts(run)
    assert (a.sensitivity_score, b.sensitivity_score) == (1.0, 0.0)


def test_sensitivity_overlapping_group_and_u_shape() -> None:
    """Spans [1,2], [1,1] overlap (1 < 2) -> step 0; [3,4] -> step 1; [5,6] ->
    step 2.  S = 3.  raw = 0.5*crit + 0.3*(2-s)/2 + 0.2*max(1-s/2, s/2):
    crit = 1.5/10, 0.5/10, 1/10, 1/10."""
    run = _run([_llm("a", 1.0, 2.5), _llm("b", 1.2, 1.7), _llm("c", 3.0, 4.0),
                _llm("d", 5.0, 6.0)])  # fmt: skip
    raw = [
        0.5 * 0.15 + 0.3 * 1.0 + 0.2 * 1.0,
        0.5 * 0.05 + 0.3 * 1.0 + 0.2 * 1.0,
        0.5 * 0.10 + 0.3 * 0.5 + 0.2 * 0.5,
        0.5 * 0.10 + 0.3 * 0.0 + 0.2 * 1.0,
    ]
    lo, hi = min(raw), max(raw)
    got = [c.sensitivity_score for c in extract_contexts(run)]
    for g, r in zip(got, raw, strict=True):
        assert math.isclose(g, (r - lo) / (hi - lo), abs_tol=1e-12)


def test_zero_workflow_duration_gives_full_critical_weight() -> None:
    run = _run([_llm("a", 1.0, 1.0), _llm("b", 3.0, 3.0)], start=1.0, end=1.0)
    a, b = extract_contexts(run)
    assert a.workflow_duration_s == 0.0
    # raw a = 0.5 + 0.3 + 0.2, raw b = 0.5 + 0 + 0.2
    assert (a.sensitivity_score, b.sensitivity_score) == (1.0, 0.0)


def test_latency_sensitivity_levels_and_scale() -> None:
    """level = clamp(round(mean*(scale-1)) + 1, 1, scale): a call scored 1.0
    every time is level 5 (scale 5) or 3 (scale 3); the other call, 0.0,
    level 1; any-index mean 0.5 -> round(2.0)+1 = 3 (scale 5)."""
    run = _run([_llm("a", 1.0, 4.0), _llm("b", 5.0, 6.0)])
    for scale, top in ((5, 5), (3, 3)):
        config = SensitivityConfig(scale=scale)
        acc = Accumulators()
        acc.add_run(run, config)
        root = build_trie(acc, "edge-agent", "t", config)["root"]
        assert root["children"]["a"]["predictions_by_call_index"]["1"]["latency_sensitivity"] == top
        assert root["children"]["b"]["predictions_by_call_index"]["1"]["latency_sensitivity"] == 1
        assert root["predictions_any_index"]["latency_sensitivity"] == (scale + 1) // 2


def test_latency_sensitivity_rounds_half_away_from_zero() -> None:
    """Call `a` scores 1.0 when it comes first and 0.0 when second; five runs
    a-first then three b-first give `a` index-1 scores 1,1,1,1,1,0,0,0, whose
    Welford mean is exactly 0.625: 0.625*4 = 2.5 rounds to 3 (Rust), level 4.
    Python's half-even round would give level 3."""
    first = _run([_llm("a", 1.0, 4.0), _llm("b", 5.0, 6.0)])
    second = _run([_llm("b", 1.0, 4.0), _llm("a", 5.0, 6.0)])
    acc = Accumulators()
    for run in [first] * 5 + [second] * 3:
        acc.add_run(run)
    assert acc.nodes["a"].sensitivity[1].mean == 0.625
    root = build_trie(acc, "edge-agent", "t")["root"]
    assert root["children"]["a"]["predictions_by_call_index"]["1"]["latency_sensitivity"] == 4


def test_missing_interarrival_index_reports_zeros() -> None:
    """A call index with remaining/output samples but no time_to_next gets an
    all-zero interarrival metric (SPEC 4: missing stat -> zeros)."""
    acc = Accumulators()
    acc.add_run(_run([_llm("a", 1.0, 2.0)]))
    pred = build_trie(acc, "edge-agent", "t")["root"]["predictions_by_call_index"]["1"]
    assert pred["interarrival_ms"] == {"sample_count": 0, "mean": 0.0, "p50": 0.0, "p90": 0.0,
                                       "p95": 0.0}  # fmt: skip
    assert pred["remaining_calls"]["sample_count"] == 1


def test_state_size_does_not_grow_with_history() -> None:
    """Per-run cost is bounded: after hundreds of runs every digest stays
    compressed and the set of stats depends only on (path, call index)."""
    runs = _runs("relay-openai")
    acc = Accumulators()
    for i in range(150):
        acc.add_run(runs[i % 4])
    size_150 = len(json.dumps(acc.to_wire()))
    for i in range(150):
        acc.add_run(runs[i % 4])
    size_300 = len(json.dumps(acc.to_wire()))
    assert size_300 < size_150 * 1.1
    for node in acc.nodes.values():
        assert set(node.remaining_calls) == {1, 2, 3}
        assert len(node.all_output_tokens.digest.means) <= 101
    assert node.all_remaining_calls.count == 750
