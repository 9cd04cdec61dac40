"""Fuzzing the ingest door with hypothesis: runs mutated the way a hostile or
buggy producer would, mixed with known-good runs, through the real ingest
path on the real Redis.

The oracle does not come from the code under test: a mutation is known to be
refused (it breaks a rule any reader of the runtime's format must enforce:
NaN, a lone surrogate, nesting past 128, `::` in the agent id, a missing or
mistyped required field) or known to be harmless (an unknown field with a
plain value), and every item must end up exactly once either stored or
dead-lettered, never both, never raising, with every good neighbour stored
and learned once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.store import Store
from tasks.learning import catch_up, ingest
from tests.hostile import good_run, nested
from worker.engine.fold import EngineConfig

CONFIG = EngineConfig()
CASES = {"n": 0}


@dataclass
class Item:
    payload: Any
    verdict: str  # "refused" or "stored"
    why: str


BAD_VALUES = st.sampled_from(
    [
        ("nan", float("nan")),
        ("inf", float("inf")),
        ("surrogate", "text \ud800 text"),
        ("surrogate key", {"\udfff": 1}),
        ("deep", nested(140)),
    ]
)
PLAIN_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
WRONG_TYPES = st.sampled_from([None, 42, "x", [], {}, True])


@st.composite
def items(draw: st.DrawFn, index: int) -> Item:
    run = good_run(1000 + index, agent=draw(st.sampled_from(["fz-a", "fz-b", "fz c", "fz[d]"])))
    kind = draw(st.sampled_from(["good", "extra", "bad value", "bad agent", "missing", "wrong"]))
    verdict, why = "stored", kind
    if kind == "extra":
        run[f"x_{draw(st.text(alphabet='abc', min_size=1, max_size=5))}"] = draw(PLAIN_VALUES)
    elif kind == "bad value":
        name, value = draw(BAD_VALUES)
        where = draw(st.sampled_from(["top", "call", "request"]))
        if where == "top":
            run["x_bad"] = value
        elif where == "call":
            run["calls"][0]["x_bad"] = value
        else:
            run["calls"][0].setdefault("annotated_request", {})["x_bad"] = value
        verdict, why = "refused", f"{name} in {where}"
    elif kind == "bad agent":
        run["agent_id"] = draw(st.sampled_from(["a::b", "::", "fz-a::model=x", ""]))
        verdict = "refused"
    elif kind == "missing":
        del run[draw(st.sampled_from(["id", "agent_id", "calls", "started_at"]))]
        verdict = "refused"
    elif kind == "wrong":
        field = draw(st.sampled_from(["id", "agent_id", "calls", "started_at"]))
        valid = {"calls": [[]], "agent_id": ["x"]}.get(field, [])
        run[field] = draw(WRONG_TYPES.filter(lambda v, ok=valid: v not in ok))
        verdict = "refused"
    form = draw(st.sampled_from(["dict", "text", "ascii text", "bytes"]))
    if form == "dict":
        return Item(run, verdict, why)
    try:
        text = json.dumps(run, ensure_ascii=form == "ascii text")
    except RecursionError:
        return Item(run, verdict, why)
    if form == "bytes":
        return Item(text.encode("utf-8", "surrogatepass"), verdict, why)
    return Item(text, verdict, why)


@st.composite
def batches(draw: st.DrawFn) -> list[Item]:
    n = draw(st.integers(1, 12))
    return [draw(items(i)) for i in range(n)]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch=batches())
def test_every_item_is_stored_or_dead_lettered_exactly_once(
    real_redis: redis.Redis, batch: list[Item]
) -> None:
    CASES["n"] += len(batch)
    store = Store(real_redis, f"test:fuzz:{CASES['n']}:", dead_letter_cap=1000)
    try:
        result = ingest(store, [item.payload for item in batch], 8 << 20)
        stored_ids = [run.id for run in result.stored]
        rejected = dict(result.rejected)
        assert len(stored_ids) + len(rejected) + len(result.duplicates) == len(batch)
        pos_of_stored = [i for i in range(len(batch)) if i not in rejected]
        for i, item in enumerate(batch):
            if item.verdict == "refused":
                assert i in rejected, item.why
            elif item.verdict == "stored":
                assert i not in rejected, (item.why, rejected.get(i))
        assert store.dead_letter_count() == len(rejected)
        for agent in {run.agent_id for run in result.stored}:
            summary = catch_up(store, agent, max_runs=50, config=CONFIG)
            assert summary.caught_up and summary.dead == 0
        assert store.counters().get("runs_learned", 0) == len(stored_ids) == len(pos_of_stored)
        again = ingest(store, [item.payload for item in batch], 8 << 20)
        assert not again.stored and len(again.rejected) == len(rejected)  # idempotent
    finally:
        store.delete_prefix()
