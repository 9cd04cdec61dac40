"""Golden: `adaptive-worker replay` of the captured runs reproduces the capture.

The 4 runs the real runtime (nemo-relay 0.10.4) learned, replayed in
`runs_index` order into an empty prefix on the real Redis, must give every
key of the capture and no other key of the runtime's kinds; values equal
(floats to 1e-9 relative), except the trie's `generated_at` and each ACG
observation's `ir_id`/`created_at`, which the runtime takes from the clock
and random UUIDs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis
from typer.testing import CliRunner

from storage.store import Store
from tasks.learning import catch_up, ingest
from tests.conftest import REDIS_URL
from tests.goldens import (
    CAPTURES,
    Capture,
    assert_matches_capture,
    dump_runtime_keys,
    load_capture,
    without_volatile_key,
)
from worker.cli import app
from worker.engine.fold import EngineConfig


@pytest.fixture
def cleanup(real_redis: redis.Redis) -> Iterator[list[str]]:
    prefixes: list[str] = []
    yield prefixes
    for p in prefixes:
        Store(real_redis, p).delete_prefix()


@pytest.mark.parametrize("capture", CAPTURES)
def test_replay_reproduces_the_capture(
    capture: str, real_redis: redis.Redis, prefix: str, cleanup: list[str], tmp_path
) -> None:
    cap: Capture = load_capture(capture)
    cleanup.append(prefix)
    records = tmp_path / "runs.jsonl"
    records.write_text("\n".join(cap.runs) + "\n")
    result = CliRunner().invoke(
        app, ["replay", str(records), "--redis-url", REDIS_URL, "--prefix", prefix, "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["runs_stored"] == 4 and summary["learned"] == 4

    assert_matches_capture(real_redis, prefix, cap)


@pytest.mark.parametrize("capture", CAPTURES)
def test_batching_does_not_change_the_result(
    capture: str, real_redis: redis.Redis, cleanup: list[str]
) -> None:
    cap = load_capture(capture)
    results = []
    for size in (1, 2, 4):
        prefix = f"{cleanup.__class__.__name__}:{id(cleanup)}:{size}:"
        cleanup.append(prefix)
        store = Store(real_redis, prefix)
        ingest(store, cap.runs, 8 << 20)
        summary = catch_up(
            store,
            cap.agent_id,
            max_runs=size,
            config=EngineConfig(),
            clock=lambda: "2026-01-01T00:00:00.000000000+00:00",
        )
        assert summary.learned == 4 and summary.commits == 4 // size
        results.append(
            {
                k: without_volatile_key(k, v)
                for k, v in dump_runtime_keys(real_redis, prefix).items()
            }
        )
    assert results[0] == results[1] == results[2]
