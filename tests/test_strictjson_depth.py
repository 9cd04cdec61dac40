"""The nesting check every door applies to parsed runs (`strictjson.too_deep`),
against the recursive reference `json_depth` (tests/hostile.py)."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_worker_client import strictjson
from adaptive_worker_client.strictjson import too_deep
from tests.hostile import json_depth

# Strings and keys full of what the indented text is searched for: brackets,
# quotes, backslashes, colons, spaces and newlines.
_TRICKY = st.text(alphabet='[]{}"\\: \n\ta', max_size=12)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | _TRICKY,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TRICKY, inner, max_size=3),
    max_leaves=40,
)


@settings(max_examples=600, deadline=None)
@given(value=json_values, limit=st.integers(min_value=0, max_value=10))
def test_too_deep_is_exactly_the_reference(value: Any, limit: int) -> None:
    assert too_deep(value, limit) == (json_depth(value) > limit)


def _nested(depth: int, leaf: Any = 1, key: str | None = None) -> Any:
    value = leaf
    for i in range(depth):
        value = {key or f"k{i}": value} if i % 2 else [value]
    return value


@pytest.mark.parametrize("limit", [1, 2, 7, 128, 254])
@pytest.mark.parametrize("leaf", [1, [], {}, "[{", '": [', "x\n  ["])
def test_at_and_just_past_the_limit(limit: int, leaf: Any) -> None:
    # A container leaf adds its own level; an empty one is still a level.
    extra = 1 if isinstance(leaf, list | dict) else 0
    at = _nested(limit - extra, leaf)
    past = _nested(limit - extra + 1, leaf)
    assert not too_deep(at, limit)
    assert too_deep(past, limit)


def test_a_key_that_looks_like_an_opening_does_not_count() -> None:
    value = {"a": {'b": [': 1, "c": 'd": {'}}
    assert json_depth(value) == 2
    assert not too_deep(value, 2)
    assert too_deep(value, 1)


@pytest.mark.parametrize("depth", [254, 255, 256, 1000])
def test_values_orjson_cannot_encode_are_walked(depth: int) -> None:
    value = orjson.loads("[" * depth + "]" * depth)
    assert too_deep(value, 128)
    assert too_deep(value, depth - 1)
    assert not too_deep(value, depth)  # limits past 254 are walked, not encoded


def test_an_integer_past_64_bits_is_walked() -> None:
    value = [[[2**70]]]
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(value)
    assert too_deep(value, 2)
    assert not too_deep(value, 3)


def test_loads_refuses_past_the_limit_and_accepts_at_it() -> None:
    text = json.dumps(_nested(128))
    assert strictjson.loads(text, max_depth=128, max_bytes=1 << 20) == json.loads(text)
    with pytest.raises(ValueError, match="more than 127 levels"):
        strictjson.loads(text, max_depth=127, max_bytes=1 << 20)
