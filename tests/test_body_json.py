"""Task bodies decode as plain JSON (worker/body_json.py).

The worker-level case (a run holding a kombu type marker stored as sent) is
in tests/test_poison.py; here, the decoder against Python's own `json`.
"""

from __future__ import annotations

import json
import math
from typing import Any

import kombu.serialization
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kombu.message import Message

import worker.celery  # noqa: F401 - installs the decoder, as every worker process does
from worker.body_json import loads

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=30,
)


@given(JSON_VALUES)
def test_strict_json_decodes_as_pythons_json_decodes_it(value: Any) -> None:
    text = json.dumps(value, ensure_ascii=False)
    assert loads(text.encode("utf-8")) == json.loads(text)
    assert loads(text) == json.loads(text)
    assert loads(memoryview(text.encode("utf-8"))) == json.loads(text)


@pytest.mark.parametrize(
    "text",
    [
        "[NaN, 1]",
        "[-Infinity]",
        '["\\ud800"]',  # a lone surrogate escape
        f"[{2**70}]",  # past 64 bits
        '{"a": 1, "a": 2}',  # duplicate key: the last wins, as in Python
    ],
)
def test_what_orjson_refuses_python_decides(text: str) -> None:
    got, want = loads(text.encode("utf-8")), json.loads(text)
    if isinstance(want, list) and isinstance(want[0], float) and math.isnan(want[0]):
        assert math.isnan(got[0]) and got[1:] == want[1:]
    else:
        assert got == want


def test_text_too_deep_still_raises_recursion_error_for_the_guard() -> None:
    with pytest.raises(RecursionError):
        loads(b"[" * 100_000 + b"]" * 100_000)


def test_invalid_utf8_is_refused() -> None:
    with pytest.raises(UnicodeDecodeError):
        loads(b'["\xff"]')


def test_kombu_type_markers_stay_json_objects() -> None:
    marker = {"__type__": "uuid", "__value__": "3f1c7e0e-0000-4000-8000-000000000001"}
    body = json.dumps([[{"metadata": marker}], {}, {}]).encode()
    message = Message(body=body, content_type="application/json", content_encoding="utf-8")
    assert message.decode() == [[{"metadata": marker}], {}, {}]
    assert kombu.serialization.registry._decoders["application/json"] is loads
