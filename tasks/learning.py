"""Ingest and learn as plain functions: what the Celery tasks and `replay` call.

Kept free of Celery so the same code runs in a worker, in `adaptive-worker
replay` (in-process, no broker) and in tests. Exactly-once learning rests on
two facts from the storage layer: storing a run is idempotent, and a learn
commit is a compare-and-set on the agent's learned offset. A learner that
crashes, is redelivered, or races another simply re-reads and retries; a
batch is applied once or not at all.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from storage.errors import InvalidRecord
from storage.models import RunRecord, parse_wire
from storage.store import Store, dumps, loads_or_none
from storage.timestamps import format_ns
from worker.engine.fold import AgentState, Changes, EngineConfig, fold, required_windows

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- dead letters


def dead_letter(raw: str | bytes, reason: str, stage: str, **context: str | None) -> str:
    """One dead-letter entry: the raw payload, why it was rejected, and when."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    entry = {"reason": reason, "stage": stage, "at": format_ns(time.time_ns()), "raw": raw}
    entry.update({k: v for k, v in context.items() if v is not None})
    return dumps(entry)


# ---------------------------------------------------------------------- ingest


@dataclass(slots=True)
class IngestResult:
    stored: list[RunRecord] = field(default_factory=list)
    duplicates: list[RunRecord] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (position, reason)

    @property
    def agents(self) -> list[str]:
        """Every agent with a valid run in the payload, new or already stored.

        Duplicates count too: a redelivered ingest whose runs were stored
        before a crash must still make sure a learn gets scheduled.
        """
        return list(dict.fromkeys(r.agent_id for r in [*self.stored, *self.duplicates]))


def validate_payload(payload: str | bytes | dict, max_bytes: int) -> RunRecord:
    """A run record from one submitted payload, or InvalidRecord saying why not."""
    if isinstance(payload, dict):
        return parse_wire(RunRecord, payload)
    if not isinstance(payload, str | bytes):  # e.g. 42 or null from another publisher
        got = type(payload).__name__
        raise InvalidRecord("RunRecord", [("", f"expected JSON text, got {got}")])
    size = len(payload.encode() if isinstance(payload, str) else payload)
    if size > max_bytes:
        raise InvalidRecord("RunRecord", [("", f"run is {size} bytes, limit is {max_bytes}")])
    return parse_wire(RunRecord, payload)


def ingest(store: Store, payloads: Sequence[str | bytes | dict], max_bytes: int) -> IngestResult:
    """Validate and store payloads; bad ones go to the dead-letter list, the rest are kept."""
    result = IngestResult()
    valid: list[RunRecord] = []
    dead: list[str] = []
    for pos, payload in enumerate(payloads):
        try:
            valid.append(validate_payload(payload, max_bytes))
        except InvalidRecord as exc:
            result.rejected.append((pos, str(exc)))
            raw = payload if isinstance(payload, str | bytes) else json.dumps(payload)
            dead.append(dead_letter(raw, str(exc), "ingest"))
    store.push_dead_letters(dead)
    for run, new in zip(valid, store.store_runs(valid), strict=True):
        (result.stored if new else result.duplicates).append(run)
    if result.stored:
        store.incr_counter("runs_ingested", len(result.stored))
    return result


# ----------------------------------------------------------------------- learn


@dataclass(frozen=True, slots=True)
class StepResult:
    """One learn step: how many index entries it consumed, and whether it committed."""

    consumed: int
    learned: int
    dead: int
    committed: bool
    caught_up: bool
    changed: tuple[tuple[str, str], ...] = ()


def state_writes(store: Store, agent: str, changes: Changes) -> dict[str, str]:
    """Redis key -> JSON for every value a fold changed."""
    k = store.keys
    writes: dict[str, str] = {}
    if changes.accumulators is not None:
        writes[k.accumulators(agent)] = dumps(changes.accumulators)
    if changes.trie is not None:
        writes[k.trie(agent)] = dumps(changes.trie)
    if changes.plan is not None:
        writes[k.plan(agent)] = dumps(changes.plan)
    for key, window in changes.observations.items():
        writes[k.acg_observations(key)] = dumps(window)
    for key, result in changes.stability.items():
        writes[k.acg_stability(key)] = dumps(result)
    return writes


def learn_step(
    store: Store,
    agent: str,
    *,
    max_runs: int,
    config: EngineConfig,
    clock: Callable[[], str] | None = None,
) -> StepResult:
    """Learn the next batch (at most `max_runs` index entries) past the learned offset.

    Round trips: one read of cursor, runs, accumulators and plan; one MGET of
    the ACG windows those runs need; one commit. The commit fails (and writes
    nothing) if another learner moved the offset meanwhile: the caller just
    calls again, which re-reads from the new offset.
    """
    k = store.keys
    batch = store.read_learn_batch(agent, max_runs, [k.accumulators(agent), k.plan(agent)])
    cursor = batch.cursor
    if not batch.run_ids:
        return StepResult(0, 0, 0, True, True)
    runs: list[RunRecord] = []
    dead: list[str] = []
    for run_id, raw in zip(batch.run_ids, batch.runs, strict=True):
        if raw is None:
            dead.append(dead_letter("", "run key missing", "learn", agent_id=agent, run_id=run_id))
            continue
        try:
            run = parse_wire(RunRecord, raw, trusted=True)
        except InvalidRecord as exc:
            dead.append(dead_letter(raw, str(exc), "learn", agent_id=agent, run_id=run_id))
            continue
        if run.agent_id != agent:
            reason = f"run belongs to agent {run.agent_id!r}, found in {agent!r}'s index"
            dead.append(dead_letter(raw, reason, "learn", agent_id=agent, run_id=run_id))
            continue
        runs.append(run)
    learning_keys = required_windows(agent, runs)
    window_raw = store.get_many([k.acg_observations(key) for key in learning_keys])
    state = AgentState(
        agent,
        accumulators=loads_or_none(batch.state[k.accumulators(agent)]),
        plan=loads_or_none(batch.state[k.plan(agent)]),
        windows={
            key: loads_or_none(window_raw[k.acg_observations(key)]) or [] for key in learning_keys
        },
    )
    changes = fold(state, runs, config=config, **({"clock": clock} if clock else {}))
    consumed = len(batch.run_ids)
    result = store.commit(
        agent,
        cursor.learned,
        cursor.learned + consumed,
        state_writes(store, agent, changes),
        runs_learned=len(runs),
        dead_letters=dead,
    )
    caught_up = cursor.learned + consumed >= cursor.end
    return StepResult(
        consumed,
        len(runs) if result.committed else 0,
        len(dead) if result.committed else 0,
        result.committed,
        caught_up and result.committed,
        tuple(changes.changed()) if result.committed else (),
    )


@dataclass(slots=True)
class LearnSummary:
    learned: int = 0
    dead: int = 0
    commits: int = 0
    conflicts: int = 0
    caught_up: bool = False
    keys_written: set[str] = field(default_factory=set)


def learn_agent(
    store: Store,
    agent: str,
    *,
    max_runs: int,
    config: EngineConfig,
    deadline: float | None = None,
    clock: Callable[[], str] | None = None,
) -> LearnSummary:
    """Learn until the agent is caught up (or `deadline`, a time.monotonic() value).

    Stopping at a deadline keeps a task well inside its time limit; the
    caller schedules the rest.
    """
    summary = LearnSummary()
    while True:
        step = learn_step(store, agent, max_runs=max_runs, config=config, clock=clock)
        if step.committed:
            if step.consumed:
                summary.commits += 1
            summary.learned += step.learned
            summary.dead += step.dead
            summary.keys_written.update(f"{kind}:{key or agent}" for kind, key in step.changed)
            if step.caught_up:
                summary.caught_up = True
                return summary
        else:
            summary.conflicts += 1
            log.info("learn conflict for agent %s: another learner committed first", agent)
        if deadline is not None and time.monotonic() >= deadline:
            return summary
