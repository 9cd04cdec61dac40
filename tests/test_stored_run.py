"""Reading stored runs for learning without the wire model: the same runs, the same values.

`learnable_run` takes runs in canonical form (what the model writes) straight
from JSON and hands anything else to the model. The reference here is the
model path alone (`model_run`: `parse_wire(trusted=True)` + `engine_run`,
what learning did before the shortcut); for every
input, mutated in the ways a runtime, an older release or a hand-written
record could differ, both must learn the same run or give the same reason.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.workload import synthetic_runs
from storage.models import CallRecord, RunRecord, parse_wire
from tasks.learning import canonical_stored_run, learnable_run, model_run
from tests.goldens import CAPTURES, load_capture


def test_captured_and_synthetic_runs_take_the_shortcut_with_equal_values() -> None:
    raws = [raw for name in CAPTURES for raw in load_capture(name).runs]
    raws += [json.dumps(r) for r in synthetic_runs(50, agent_id="cap-agent", seed=9)]
    for raw in raws:
        agent = json.loads(raw)["agent_id"]
        canonical = parse_wire(RunRecord, raw).to_json()  # what ingest stores
        fast = canonical_stored_run(agent, canonical)
        assert fast is not None
        assert (
            repr(fast) == repr(model_run(agent, canonical)) == repr(learnable_run(agent, canonical))
        )
        # As the runtime stored it (its own layout):
        assert repr(learnable_run(agent, raw)) == repr(model_run(agent, raw))


BASE = json.loads(parse_wire(RunRecord, load_capture("relay-openai").runs[0]).to_json())
AGENT = BASE["agent_id"]

# Values a field may hold instead of its canonical one: other JSON types,
# coercible forms, out-of-range numbers, nulls, odd strings.
ODD = [
    None,
    True,
    False,
    0,
    -1,
    7,
    4294967295,
    4294967296,
    5.0,
    5.5,
    "5",
    "",
    "llm",
    "tool",
    "agent",
    "2026-11-29T07:00:04.028940237Z",
    "2026-11-29T07:00:04+02:00",
    "2026-02-30T00:00:00Z",
    "not a time",
    "01A2261A-8FEA-7CD0-A00D-029C88FB6686",
    "{01a2261a-8fea-7cd0-a00d-029c88fb6686}",
    [],
    {},
    {"role": "user"},
    [1, 2],
]
ODD_VALUES = st.sampled_from(ODD)
# Every field the models know, and one they do not: a field added to the
# model later is covered without touching this test.
RUN_FIELDS = [*RunRecord.model_fields, "extra_field"]
CALL_FIELDS = [*CallRecord.model_fields, "extra_field"]


def _mutate(draw: st.DrawFn, target: dict[str, Any], fields: list[str]) -> None:
    field = draw(st.sampled_from(fields))
    if draw(st.integers(0, 4)) == 0:
        target.pop(field, None)
    else:
        target[field] = draw(ODD_VALUES)


@st.composite
def mutated_runs(draw: st.DrawFn) -> dict[str, Any]:
    """The captured run with 1-4 fields of its calls, then of itself, changed or removed."""
    run = json.loads(json.dumps(BASE))
    for _ in range(draw(st.integers(0, 3))):
        _mutate(draw, run["calls"][draw(st.integers(0, len(run["calls"]) - 1))], CALL_FIELDS)
    for _ in range(draw(st.integers(0 if run != BASE else 1, 2))):
        _mutate(draw, run, RUN_FIELDS)
    return run


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_runs())
def test_any_record_is_learned_as_the_model_would(run: dict[str, Any]) -> None:
    raw = json.dumps(run)
    # repr, not ==: True == 1 and 5.0 == 5, but the engine must get the int.
    assert repr(learnable_run(AGENT, raw)) == repr(model_run(AGENT, raw))


def test_every_single_field_change_is_learned_as_the_model_would() -> None:
    """Each field of the run and of each of its calls, set to each odd value or
    removed: exhaustive for one change (the property test combines several)."""
    cases = 0
    for call in [None, *range(len(BASE["calls"]))]:
        for field in RUN_FIELDS if call is None else CALL_FIELDS:
            for value in [*ODD, "<removed>"]:
                run = json.loads(json.dumps(BASE))
                target = run if call is None else run["calls"][call]
                if value == "<removed>":
                    target.pop(field, None)
                else:
                    target[field] = value
                raw = json.dumps(run)
                assert repr(learnable_run(AGENT, raw)) == repr(model_run(AGENT, raw)), (
                    call,
                    field,
                    value,
                )
                cases += 1
    assert cases > 1000
