"""Scheduled upkeep as plain functions: discover, rebuild, retention.

The beat tasks in `tasks.jobs` are thin wrappers around these; the CLI calls
them directly. Each is idempotent, so a beat that fires twice (or two beats)
costs CPU, never correctness.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from storage.models import RunRecord, parse_wire
from storage.store import Cursor, Store
from storage.timestamps import parse_ns
from tasks.learning import state_writes
from worker.engine.fold import AgentState, Changes, EngineConfig, fold


# -------------------------------------------------------------------- discover
def lagging_agents(store: Store) -> dict[str, Cursor]:
    """Agents whose index is longer than their learned offset, found with SCAN.

    That includes agents whose runs we never ingested: NeMo Relay agents that
    write runs and `runs_index` themselves with their learners off.
    """
    cursors = store.cursors(store.agent_ids())
    return {agent: c for agent, c in cursors.items() if c.lag > 0}


# --------------------------------------------------------------------- rebuild
@dataclass(frozen=True, slots=True)
class RebuildResult:
    agent_id: str
    runs: int
    learned: int
    version: int
    deleted: list[str]


def rebuild(
    store: Store,
    agent: str,
    *,
    config: EngineConfig,
    chunk: int = 500,
    clock: Callable[[], str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RebuildResult:
    """Recompute the agent's state from its retained runs and swap it in atomically.

    Folds every retained run from empty state (the fold is the same one
    incremental learning uses, so the result equals learning those runs
    incrementally), then stages the values and swaps them in together with
    the offset they cover. Runs appended meanwhile lie past that offset and
    are learned on top by the next learn, each exactly once. ACG learning
    keys the retained runs no longer produce are deleted.
    """
    start = store.cursor(agent)
    total = start.index_length
    state = AgentState(agent)
    changes = Changes()
    pos = 0
    while pos < total:
        rows = store.read_runs(agent, pos, min(chunk, total - pos))
        if not rows:
            break
        runs = [parse_wire(RunRecord, raw) for _, raw in rows if raw is not None]
        kwargs = {"clock": clock} if clock else {}
        batch = [r for r in runs if r.agent_id == agent]
        changes = changes.then(fold(state, batch, config=config, **kwargs))
        pos += len(rows)
        if progress:
            progress(pos, total)
    values = state_writes(store, agent, changes)
    k = store.keys
    stale = [k.plan(agent), k.accumulators(agent), k.trie(agent)]
    stale += [k.acg_observations(agent), k.acg_stability(agent)]
    for key in store.learning_keys(agent):
        stale += [k.acg_observations(key), k.acg_stability(key)]
    deleted = [key for key in stale if key not in values]
    version = store.swap_state(agent, values, start.base + pos, deleted)
    return RebuildResult(agent, pos, start.base + pos, version, deleted)


# ------------------------------------------------------------------- retention
@dataclass(frozen=True, slots=True)
class RetentionPlan:
    agent_id: str
    index_length: int
    learned_unretained: int  # learned runs that could go
    to_drop: int


def plan_retention(
    store: Store,
    agent: str,
    *,
    max_runs: int | None,
    max_age_s: int | None,
    now_ns: int | None = None,
    scan_chunk: int = 500,
) -> RetentionPlan:
    """How many of the oldest runs the policy drops (only learned runs ever go)."""
    c = store.cursor(agent)
    learned_in_index = max(0, c.learned - c.base)
    drop = 0
    if max_runs is not None:
        drop = max(drop, c.index_length - max_runs)
    if max_age_s is not None:
        cutoff = (now_ns or time.time_ns()) - max_age_s * 1_000_000_000
        old = 0
        while old < learned_in_index:
            rows = store.read_runs(agent, old, min(scan_chunk, learned_in_index - old))
            if not rows:
                break
            for _, raw in rows:
                if raw is None:
                    old += 1
                    continue
                run = parse_wire(RunRecord, raw)
                if parse_ns(run.ended_at or run.started_at) >= cutoff:
                    break
                old += 1
            else:
                continue
            break
        drop = max(drop, old)
    drop = min(drop, learned_in_index)
    return RetentionPlan(agent, c.index_length, learned_in_index, drop)


def apply_retention(
    store: Store,
    agent: str,
    *,
    max_runs: int | None,
    max_age_s: int | None,
    tombstones: int,
) -> int:
    plan = plan_retention(store, agent, max_runs=max_runs, max_age_s=max_age_s)
    if plan.to_drop <= 0:
        return 0
    return store.trim(agent, plan.to_drop, now_s=time.time(), tombstones=tombstones)


__all__ = [
    "RebuildResult",
    "RetentionPlan",
    "apply_retention",
    "lagging_agents",
    "plan_retention",
    "rebuild",
]
