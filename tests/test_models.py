"""Wire models against every value the real runtime stored in the captures."""

from __future__ import annotations

import json

import pytest

from storage.errors import InvalidRecord
from storage.models import (
    AccumulatorState,
    ExecutionPlan,
    RunRecord,
    StabilityAnalysisResult,
    TrieEnvelope,
    observations_json,
    parse_observations,
    parse_wire,
)
from tests.goldens import CAPTURES, assert_json_close, load_capture

MODELS = {
    "runs": RunRecord,
    "plan": ExecutionPlan,
    "trie": TrieEnvelope,
    "accumulators": AccumulatorState,
    "acg_stability": StabilityAnalysisResult,
}

ALL_ENTRIES = [
    pytest.param(cap, entry, id=f"{cap}:{entry.kind}:{i}")
    for cap in CAPTURES
    for i, entry in enumerate(load_capture(cap).keys)
    if entry.kind != "runs_index"
]


def _round_trip(kind: str, raw: str) -> str:
    if kind == "acg_observations":
        return observations_json(parse_observations(raw))
    return parse_wire(MODELS[kind], raw).to_json()


@pytest.mark.parametrize(("capture", "entry"), ALL_ENTRIES)
def test_every_captured_value_round_trips(capture: str, entry) -> None:
    out = _round_trip(entry.kind, entry.raw)
    # Type-strict: `20.0` must stay a float, `4` an int, "1" a string key.
    assert_json_close(json.loads(out), json.loads(entry.raw), rel=0.0)
    assert "null" not in out or "null" in entry.raw


def test_all_kinds_are_covered() -> None:
    kinds = {e.kind for cap in CAPTURES for e in load_capture(cap).keys}
    assert kinds == {*MODELS, "acg_observations", "runs_index"}


def _run(**overrides) -> dict:
    raw = json.loads(load_capture("relay-openai").runs[0])
    raw.update(overrides)
    return raw


def test_null_optional_fields_are_absent_on_output() -> None:
    raw = _run(ended_at=None)
    raw["calls"][0]["output_tokens"] = None
    out = json.loads(parse_wire(RunRecord, raw).to_json())
    assert "ended_at" not in out
    assert "output_tokens" not in out["calls"][0]
    assert out["calls"][1] == raw["calls"][1]


def test_unknown_fields_survive() -> None:
    raw = _run(future_field={"nested": [1, 2.5, "x"]})
    raw["calls"][0]["vendor_extra"] = "kept"
    out = json.loads(parse_wire(RunRecord, raw).to_json())
    assert out["future_field"] == {"nested": [1, 2.5, "x"]}
    assert out["calls"][0]["vendor_extra"] == "kept"


@pytest.mark.parametrize(
    "stamp",
    [
        "2026-11-29T07:00:04Z",
        "2026-11-29T07:00:04.028Z",
        "2026-11-29T07:00:04.028940Z",
        "2026-11-29T07:00:04.028940237Z",
        "2026-11-29T07:00:04.028940237+00:00",
    ],
)
def test_timestamps_are_kept_exactly(stamp: str) -> None:
    out = json.loads(parse_wire(RunRecord, _run(started_at=stamp)).to_json())
    assert out["started_at"] == stamp


def test_integer_looking_map_keys_stay_strings() -> None:
    raw = load_capture("relay-openai").value("trie")
    trie = parse_wire(TrieEnvelope, raw)
    keys = list(trie.to_wire()["root"]["children"]["openai"]["predictions_by_call_index"])
    assert keys and all(isinstance(k, str) and k.isdigit() for k in keys)


def test_missing_latency_sensitivity_is_written_as_null() -> None:
    """Rust's `Option<u32>` without skip_serializing_if is written as null."""
    raw = load_capture("relay-openai").value("trie")
    node = raw["root"]["children"]["openai"]["predictions_by_call_index"]["1"]
    node.pop("latency_sensitivity")
    node = raw["root"]["children"]["openai"]["predictions_by_call_index"]["1"]
    out = parse_wire(TrieEnvelope, raw).to_wire()
    assert (
        out["root"]["children"]["openai"]["predictions_by_call_index"]["1"]["latency_sensitivity"]
        is None
    )


@pytest.mark.parametrize(
    ("mutate", "path", "needle"),
    [
        (lambda r: r.update(id="not-a-uuid"), "id", "not a UUID"),
        (lambda r: r["calls"][1].update(started_at="yesterday"), "calls.1.started_at", "RFC 3339"),
        (lambda r: r["calls"][0].update(kind="robot"), "calls.0.kind", "'llm' or 'tool'"),
        (lambda r: r["calls"][0].update(output_tokens=-3), "calls.0.output_tokens", "greater"),
        (lambda r: r.pop("agent_id"), "agent_id", "Field required"),
        (
            lambda r: r["calls"][0]["annotated_request"]["messages"][1].update(role="robot"),
            "calls.0.annotated_request",
            "messages.1",
        ),
    ],
)
def test_invalid_input_names_the_field(mutate, path: str, needle: str) -> None:
    raw = _run()
    mutate(raw)
    with pytest.raises(InvalidRecord) as info:
        parse_wire(RunRecord, json.dumps(raw))
    assert any(p == path for p, _ in info.value.problems), info.value.problems
    assert needle in str(info.value)


def test_not_json_is_an_invalid_record() -> None:
    with pytest.raises(InvalidRecord, match="Invalid JSON"):
        parse_wire(RunRecord, "{not json")
