"""Access to the captured fixtures in ../shared/fixtures (golden data).

Everything here was written by the real runtime; tests compare against it and
never against values produced by the code under test.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

FIXTURES = Path(
    os.environ.get(
        "ADAPTIVE_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
    )
)
CAPTURES = ("relay-openai", "relay-anthropic")


@dataclass(frozen=True)
class KeyEntry:
    key: str
    kind: str
    raw: str | list[str]

    @property
    def value(self) -> Any:
        return self.raw if isinstance(self.raw, list) else json.loads(self.raw)


@dataclass(frozen=True)
class Capture:
    name: str
    prefix: str
    agent_id: str
    keys: tuple[KeyEntry, ...]

    @property
    def runs(self) -> list[str]:
        """Raw run records in `runs_index` order (the order the runtime learned them)."""
        by_id = {json.loads(e.raw)["id"]: e.raw for e in self.keys if e.kind == "runs"}
        return [by_id[run_id] for run_id in self.index]

    @property
    def index(self) -> list[str]:
        (entry,) = [e for e in self.keys if e.kind == "runs_index"]
        return list(entry.raw)

    def entries(self, kind: str) -> list[tuple[str, Any]]:
        return [(e.key, e.value) for e in self.keys if e.kind == kind]

    def value(self, kind: str) -> Any:
        """The value of `kind` under the plain agent id (e.g. `plan:cap-agent`)."""
        key = f"{self.prefix}{kind}:{self.agent_id}"
        (value,) = [v for k, v in self.entries(kind) if k == key]
        return value

    def learning_key(self) -> str:
        """The ACG learning key the runtime derived (the non-seed acg_stability key)."""
        head = f"{self.prefix}acg_stability:"
        (key,) = [
            k[len(head) :]
            for k, _ in self.entries("acg_stability")
            if k != f"{head}{self.agent_id}"
        ]
        return key


@cache
def load_capture(name: str) -> Capture:
    root = FIXTURES / name
    manifest = json.loads((root / "manifest.json").read_text())
    keys = []
    for item in manifest["keys"]:
        if item["kind"] == "runs_index":
            (entry,) = json.loads((root / item["fixture"]).read_text())["entries"]
            raw: str | list[str] = entry["raw"]
        else:
            raw = (root / item["raw_file"]).read_bytes().decode()
        keys.append(KeyEntry(item["key"], item["kind"], raw))
    return Capture(name, manifest["prefix"], manifest["agent_id"], tuple(keys))


def assert_json_close(actual: Any, expected: Any, *, rel: float = 1e-9, path: str = "") -> None:
    """Structural equality that tells int from float and allows `rel` on floats."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{path}: expected object, got {type(actual).__name__}"
        assert actual.keys() == expected.keys(), (
            f"{path}: keys differ: missing {sorted(expected.keys() - actual.keys())}, "
            f"extra {sorted(actual.keys() - expected.keys())}"
        )
        for k in expected:
            assert_json_close(actual[k], expected[k], rel=rel, path=f"{path}.{k}")
    elif isinstance(expected, list):
        assert isinstance(actual, list), f"{path}: expected list, got {type(actual).__name__}"
        assert len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_json_close(a, e, rel=rel, path=f"{path}[{i}]")
    elif isinstance(expected, float):
        assert type(actual) is float, f"{path}: expected float {expected!r}, got {actual!r}"
        assert math.isclose(actual, expected, rel_tol=rel, abs_tol=0.0 if expected else 1e-12), (
            f"{path}: {actual!r} != {expected!r}"
        )
    else:
        assert type(actual) is type(expected) and actual == expected, (
            f"{path}: {actual!r} != {expected!r}"
        )


def dump_runtime_keys(client: Any, prefix: str) -> dict[str, object]:
    """Every runtime-kind key under the prefix, with its value, prefix stripped."""
    from storage.keys import OWN, RUNTIME_KINDS

    values: dict[str, object] = {}
    for key in client.scan_iter(prefix.replace("*", r"\*") + "*"):
        rest = key[len(prefix) :]
        if rest.startswith(OWN + ":"):
            continue
        assert rest.split(":", 1)[0] in RUNTIME_KINDS, key
        if client.type(key) == "list":
            values[rest] = client.lrange(key, 0, -1)
        else:
            values[rest] = json.loads(client.get(key))
    return values


def without_volatile_key(key: str, value: Any) -> Any:
    """`key` is without the prefix, so its kind is its first segment."""
    from worker.engine.fold import without_volatile

    return without_volatile(key.split(":", 1)[0], value)


def assert_matches_capture(client: Any, prefix: str, cap: Capture) -> None:
    """The runtime-kind keys under `prefix` equal the capture's: the same keys, the
    same values (run records and plans exactly, the rest to 1e-9 relative), apart
    from what the runtime takes from the clock and random UUIDs."""
    ours = dump_runtime_keys(client, prefix)
    theirs = {
        e.key[len(cap.prefix) :]: (e.raw if isinstance(e.raw, list) else json.loads(e.raw))
        for e in cap.keys
    }
    assert sorted(ours) == sorted(theirs)
    for key, expected in theirs.items():
        if key.startswith(("runs", "plan")):
            assert_json_close(ours[key], expected, rel=0.0, path=key)
        else:
            assert_json_close(
                without_volatile_key(key, ours[key]), without_volatile_key(key, expected), path=key
            )
