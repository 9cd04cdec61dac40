"""Scheduled upkeep as plain functions: discover, rebuild, retention.

The beat tasks in `tasks.jobs` are thin wrappers around these; the CLI calls
them directly. Each is idempotent, so a beat that fires twice (or two beats)
costs CPU, never correctness.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from storage.store import Cursor, Store
from tasks.learning import learnable_run, state_writes, written_learning_keys
from worker.engine.fold import AgentState, Changes, EngineConfig, fold, required_windows
from worker.engine.records import Run


# -------------------------------------------------------------------- discover
def lagging_agents(store: Store) -> dict[str, Cursor]:
    """Agents whose index is longer than their learned offset, found with SCAN.

    That includes agents whose runs we never ingested: NeMo Relay agents that
    write runs and `runs_index` themselves with their learners off.
    """
    cursors = store.cursors(store.agent_ids())
    return {agent: c for agent, c in cursors.items() if c.lag > 0}


# ---------------------------------------------------------------- agent's keys
def owned_learning_keys(store: Store, agent: str, chunk: int = 500) -> list[str]:
    """Every ACG learning key the agent owns, named exactly, never by a glob.

    The agent's own set holds the keys our commits wrote; a NeMo Relay agent
    that learned by itself wrote no set, so the keys its retained runs
    produce (the runtime's deterministic `{agent}::model=...` names) are
    added. Reads every retained run: for checks and tools, not the hot path.
    """
    keys = dict.fromkeys(store.learning_keys(agent))
    total = store.cursor(agent).index_length
    for pos in range(0, total, chunk):
        rows = store.read_runs(agent, pos, chunk)
        keys.update(dict.fromkeys(required_windows(agent, _learnable(agent, rows))))
    return sorted(keys)


# --------------------------------------------------------------------- re-fold
def _learnable(agent: str, rows: list[tuple[str, str | None]]) -> list[Run]:
    """The runs among `rows` that learning learns (`learning.learnable_run`)."""
    runs = [learnable_run(agent, raw) for _, raw in rows]
    return [run for run in runs if not isinstance(run, str)]


def refold(
    store: Store,
    agent: str,
    upto: int,
    *,
    config: EngineConfig,
    chunk: int = 500,
    clock: Callable[[], str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Changes, int]:
    """Fold the agent's first `upto` retained index entries from empty state.

    Returns what the fold produced and how many entries it read (fewer than
    `upto` if the index is shorter). Chunked, so memory stays bounded by
    `chunk` runs; the fold is the one incremental learning uses, and runs
    learning skips are skipped here too, so the result equals learning those
    runs. Rebuild and the foreign-write check both re-fold with this.
    """
    state = AgentState(agent)
    changes = Changes()
    kwargs = {"clock": clock} if clock else {}
    pos = 0
    while pos < upto:
        rows = store.read_runs(agent, pos, min(chunk, upto - pos))
        if not rows:
            break
        changes = changes.then(fold(state, _learnable(agent, rows), config=config, **kwargs))
        pos += len(rows)
        if progress:
            progress(pos, upto)
    return changes, pos


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

    Folds every retained run from empty state (`refold`: the result equals
    learning those runs incrementally), then stages the values and swaps
    them in together with the offset they cover. Runs appended meanwhile lie
    past that offset and are learned on top by the next learn, each exactly
    once. ACG learning keys the retained runs no longer produce are deleted.
    """
    start = store.cursor(agent)
    changes, pos = refold(
        store,
        agent,
        start.index_length,
        config=config,
        chunk=chunk,
        clock=clock,
        progress=progress,
    )
    values = state_writes(store, agent, changes)
    stale = store.state_keys(agent)  # its own set of learning keys: never another agent's
    deleted = [key for key in stale if key not in values]
    version = store.swap_state(
        agent, values, start.base + pos, deleted, learning_keys=written_learning_keys(changes)
    )
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
        now_s = (now_ns or time.time_ns()) / 1e9
        drop = max(drop, _stored_before(store, agent, now_s - max_age_s, learned_in_index, now_s))
    drop = min(drop, learned_in_index)
    return RetentionPlan(agent, c.index_length, learned_in_index, drop)


def _stored_before(
    store: Store, agent: str, cutoff_s: float, limit: int, now_s: float, chunk: int = 500
) -> int:
    """How many runs at the head of the index were stored before `cutoff_s`.

    Goes by when WE stored each run (Redis server time, recorded at ingest),
    never by the run's own timestamps: one client with a clock set to 2099
    must not pin an agent's history. Runs the runtime wrote itself have no
    such record; they get one now, so their age counts from today.
    """
    old = 0
    while old < limit:
        ids = store.run_ids_range(agent, old, min(chunk, limit - old))
        if not ids:
            break
        times = store.stored_at(agent, ids)
        missing = [run_id for run_id, t in zip(ids, times, strict=True) if t is None]
        store.mark_stored_at(agent, missing, now_s)
        for t in times:
            if t is None or t >= cutoff_s:
                return old
            old += 1
    return old


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
    "owned_learning_keys",
    "plan_retention",
    "rebuild",
    "refold",
]
