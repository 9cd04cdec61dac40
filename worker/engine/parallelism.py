"""Tool-parallelism learner: which tools ran side by side (the execution plan).

Port of the runtime's `tool_parallelism_learner.rs` (nemo-relay 0.10.x). The
plan is a set union that only grows, so learning is order-insensitive except
for `metadata_template.run_id` (the last run that added cohorts).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from worker.engine.records import RunLike


def observed_cohorts(run: RunLike) -> list[tuple[str, ...]]:
    """Distinct sorted name tuples of tools that overlapped, sorted.

    Completed tool calls are stably sorted by start; a sweep keeps the calls
    still active (end strictly after the current start: back-to-back calls
    do not overlap) and every overlap yields active + current as a cohort.
    """
    # Stable sort by start alone, like Rust's `sort_by_key`: equal starts keep
    # record order, which decides cohorts when a zero-length call is involved.
    calls = sorted(
        (
            (c.start_ns, c.end_ns, c.name)
            for c in run.calls
            if c.kind == "tool" and c.end_ns is not None
        ),
        key=lambda t: t[0],
    )
    active: list[tuple[int, int, str]] = []
    cohorts: set[tuple[str, ...]] = set()
    for current in calls:
        start = current[0]
        active = [a for a in active if a[1] > start]
        if active:
            cohorts.add(tuple(sorted([*(a[2] for a in active), current[2]])))
        active.append(current)
    return sorted(cohorts)


def group_id(tool_names: Iterable[str]) -> str:
    """`fanout:` + the first 12 characters of `sha256:<hex>` (so 5 hex digits)."""
    digest = "sha256:" + hashlib.sha256("|".join(tool_names).encode()).hexdigest()
    return f"fanout:{digest[:12]}"


def empty_plan(agent_id: str, run_id: str) -> dict[str, Any]:
    return {
        "agent_id": agent_id,
        "parallel_groups": [],
        "metadata_template": {
            "run_id": run_id,
            "agent_id": agent_id,
            "parallel_hints": [],
            "extensions": {},
        },
    }


def merge_run(plan: dict[str, Any] | None, run: RunLike, agent_id: str) -> dict[str, Any] | None:
    """The plan after learning `run`, or `plan` itself (same object) if the run adds nothing.

    Groups are keyed by group id and hints by (tool, group), both emitted
    sorted, exactly as the runtime's BTreeMaps do: a starting agent uses the
    group of each tool's FIRST hint, so order is behaviour (SPEC 6c).
    """
    cohorts = observed_cohorts(run)
    if not cohorts:
        return plan
    if plan is None:
        plan = empty_plan(agent_id, run.id)
    template = dict(plan["metadata_template"])
    groups = {g["group_id"]: g for g in plan["parallel_groups"]}
    hints = {(h["tool_name"], h["group_id"]): h for h in template["parallel_hints"]}
    for cohort in cohorts:
        gid = group_id(cohort)
        for name in dict.fromkeys(cohort):
            hints[(name, gid)] = {"tool_name": name, "group_id": gid, "explicit": False}
        groups[gid] = {"group_id": gid, "tool_names": list(cohort)}
    template["agent_id"] = agent_id
    template["run_id"] = run.id
    template["parallel_hints"] = [hints[k] for k in sorted(hints)]
    return {
        **plan,
        "agent_id": agent_id,
        "parallel_groups": [groups[k] for k in sorted(groups)],
        "metadata_template": template,
    }
