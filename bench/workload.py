"""Capture-shaped synthetic runs: the real runtime's 4 captured runs, re-stamped.

Each synthetic run copies one captured run (3 LLM calls with full prompts,
tools that overlap) with a fresh id, a shifted clock and jittered durations
and token counts, so learning sees realistic variety without a network.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from storage.timestamps import format_ns, parse_ns

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def _templates(capture: str) -> list[dict[str, Any]]:
    root = FIXTURES / capture
    index = json.loads((root / "runs_index.json").read_text())["entries"][0]["raw"]
    runs = {
        json.loads(e["raw"])["id"]: json.loads(e["raw"])
        for e in json.loads((root / "run_record.json").read_text())["entries"]
    }
    return [runs[i] for i in index]


def _stamp(ns: int) -> str:
    return format_ns(ns).replace("+00:00", "Z")


def synthetic_runs(
    n: int, *, agent_id: str = "bench-agent", seed: int = 0, capture: str = "relay-openai"
) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    templates = _templates(capture)
    clock = parse_ns("2026-01-01T00:00:00Z")
    for i in range(n):
        tpl = templates[i % len(templates)]
        origin = parse_ns(tpl["started_at"])
        stretch = rng.uniform(0.8, 1.25)

        def shift(
            stamp: str, origin: int = origin, stretch: float = stretch, at: int = clock
        ) -> str:
            return _stamp(at + int((parse_ns(stamp) - origin) * stretch))

        calls = []
        for call in tpl["calls"]:
            c = dict(call)
            c["started_at"] = shift(call["started_at"])
            if "ended_at" in call:
                c["ended_at"] = shift(call["ended_at"])
            if "output_tokens" in call:
                c["output_tokens"] = max(0, call["output_tokens"] + rng.randint(-20, 20))
            calls.append(c)
        run = {
            "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "agent_id": agent_id,
            "calls": calls,
            "started_at": shift(tpl["started_at"]),
        }
        if "ended_at" in tpl:
            run["ended_at"] = shift(tpl["ended_at"])
        clock += 10_000_000_000
        yield run
