"""Hostile and unlucky inputs shared by the door tests (client, ingest, CLI, broker).

Each is a run that is fine apart from one thing the strict-JSON rule of
storage/strictjson.py (or the agent-id rule of storage/keys.py) refuses, so
that every door can be checked against the same list: one rule everywhere.
"""

from __future__ import annotations

import json
from typing import Any

from tests.goldens import load_capture


def good_run(i: int = 0, agent: str = "door-agent") -> dict[str, Any]:
    """A real captured run under a new id and agent (valid at every door)."""
    run = json.loads(load_capture("relay-openai").runs[i % 4])
    run["id"] = f"00000000-0000-4000-8000-{i:012d}"
    run["agent_id"] = agent
    return run


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def _with(i: int, **fields: Any) -> dict[str, Any]:
    return {**good_run(i), **fields}


def violations(base: int = 100) -> dict[str, dict[str, Any] | str]:
    """name -> a run (dict or JSON text) that every door must refuse."""
    text = json.dumps(good_run(base + 5))
    return {
        "nan in a dict": _with(base + 0, extra=float("nan")),
        "infinity in a dict": _with(base + 1, extra=float("-inf")),
        "lone surrogate in a dict": _with(base + 2, extra="llm said \ud800"),
        "nested 200 deep in a dict": _with(base + 3, extra=nested(200)),
        "agent id with ::": _with(base + 4, agent_id="door-agent::model=x"),
        "NaN literal in text": text[:-1] + ', "extra": NaN}',
        "lone surrogate escape in text": json.dumps(_with(base + 6, extra="x\ud800y")),
        "nested 200 deep in text": json.dumps(_with(base + 7, extra=nested(200))),
        "number overflowing a double in text": json.dumps(good_run(base + 8))[:-1]
        + ', "extra": 1e999}',
    }


def json_depth(value: Any) -> int:
    """Reference nesting depth of a parsed JSON value (recursive: for test values)."""
    if isinstance(value, dict):
        return 1 + max(map(json_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(json_depth, value), default=0)
    return 0
