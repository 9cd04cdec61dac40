"""Wire models against every value the real runtime stored in the captures."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


@settings(max_examples=300, deadline=None)
@given(
    moment=st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)),
    digits=st.sampled_from([0, 3, 6, 9]),
    offset_min=st.integers(-23 * 60, 23 * 60),
)
def test_timestamp_parsing_agrees_with_datetime(moment, digits, offset_min: int) -> None:
    """Our integer-arithmetic parser against Python's calendar, any offset."""
    from storage.timestamps import parse_ns

    frac = f"{moment.microsecond:06d}{'123'}"[:digits]
    sign = "+" if offset_min >= 0 else "-"
    hh, mm = divmod(abs(offset_min), 60)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S").rjust(19, "0")
    stamp = f"{text}{'.' + frac if digits else ''}{sign}{hh:02d}:{mm:02d}"
    aware = moment.replace(microsecond=0, tzinfo=timezone(timedelta(minutes=offset_min)))
    expected_s = (aware - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(seconds=1)
    expected = expected_s * 1_000_000_000 + (int(frac.ljust(9, "0")) if digits else 0)
    assert parse_ns(stamp) == expected


@pytest.mark.parametrize(
    "stamp",
    [
        "2026-02-29T00:00:00Z",
        "2026-13-01T00:00:00Z",
        "2026-01-01T24:00:00Z",
        "2026-01-01T00:60:00Z",
        "2026-01-01T00:00:60Z",
        "0000-01-01T00:00:00Z",
        "2026-01-01T00:00:00.1234567890Z",  # ten digits: serde keeps at most nine
        # serde's RFC 3339 parser, which reads our stored runs back, takes
        # neither of these; Python's `\d` and `$` used to let them through.
        "\uff12\uff10\uff12\uff16-01-01T00:00:00Z",  # fullwidth digits
        "2026-01-01T00:00:00.\u0663Z",  # an Arabic-Indic digit
        "2026-01-01T00:00:00Z\n",
    ],
)
def test_impossible_dates_are_rejected(stamp: str) -> None:
    from storage.timestamps import parse_ns

    with pytest.raises(ValueError, match="RFC 3339"):
        parse_ns(stamp)
