"""Ingest and learn as plain functions: what the Celery tasks and `replay` call.

Kept free of Celery so the same code runs in a worker, in `adaptive-worker
replay` (in-process, no broker) and in tests. Exactly-once learning rests on
two facts from the storage layer: storing a run is idempotent, and a learn
commit is a compare-and-set on the agent's learned offset. A learner that
crashes, is redelivered, or races another simply re-reads and retries; a
batch is applied once or not at all.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson

from storage import strictjson
from storage.errors import InvalidRecord
from storage.keys import agent_id_problem
from storage.models import RunRecord, parse_wire
from storage.store import Cursor, Store, dumps, loads_or_none
from storage.strictjson import DEFAULT_MAX_DEPTH
from storage.timestamps import format_ns, parse_ns
from worker.engine.fold import AgentState, Changes, EngineConfig, fold, required_windows
from worker.engine.records import Call, Run, RunLike

if TYPE_CHECKING:
    from worker.settings import Settings

log = logging.getLogger(__name__)


def engine_config(settings: Settings) -> EngineConfig:
    """The engine's knobs from the settings (the workers', the CLI's and checks' alike)."""
    return EngineConfig(observation_window=settings.observation_window)


# ---------------------------------------------------------------- dead letters

DEFAULT_DEAD_LETTER_RAW_BYTES = 64 * 1024


def _text(value: str | bytes) -> str:
    """Text that can always be stored: invalid UTF-8 and lone surrogates are
    written as escapes (dead letters keep what was sent, never crash on it)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="backslashreplace")
    return value.encode("utf-8", errors="backslashreplace").decode("utf-8")


def dead_letter(
    raw: str | bytes,
    reason: str,
    stage: str,
    *,
    max_raw: int | None = None,
    **context: str | None,
) -> str:
    """One dead-letter entry: the raw input (truncated), why it was rejected, and when.

    Only the first `max_raw` bytes of the input are kept (setting
    `dead_letter_raw_max_bytes`), with its full size in `raw_bytes`: a dead
    letter is for finding out what went wrong, and a 9 MB rejected run must
    not become a 9 MB entry.
    """
    limit = max_raw if max_raw is not None else _default_raw_limit()
    data = raw if isinstance(raw, bytes | bytearray) else _text(raw).encode("utf-8")
    entry: dict[str, object] = {
        "reason": _text(reason)[:2000],
        "stage": stage,
        "at": format_ns(time.time_ns()),
        "raw": _text(data[:limit]),
        "raw_bytes": len(data),
    }
    if len(data) > limit:
        entry["raw_truncated"] = True
    entry.update({k: _text(v)[:1000] for k, v in context.items() if v is not None})
    return dumps(entry)


def _default_raw_limit() -> int:
    try:
        from worker.settings import get_settings

        return get_settings().dead_letter_raw_max_bytes
    except Exception:  # a bad setting must not stop a dead letter from being written
        return DEFAULT_DEAD_LETTER_RAW_BYTES


# ---------------------------------------------------------------------- ingest


@dataclass(slots=True)
class IngestResult:
    stored: list[RunRecord] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # each stored run's index offset
    duplicates: list[RunRecord] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (position, reason)
    conflicts: list[RunRecord] = field(default_factory=list)  # same id, other content

    @property
    def agents(self) -> list[str]:
        """Every agent with a valid run in the payload, new or already stored.

        Duplicates count too: a redelivered ingest whose runs were stored
        before a crash must still make sure a learn gets scheduled.
        """
        return list(dict.fromkeys(r.agent_id for r in [*self.stored, *self.duplicates]))


def check_agent_id(agent_id: str) -> None:
    """InvalidRecord when the id could make two agents share a key (storage.keys)."""
    problem = agent_id_problem(agent_id)
    if problem:
        raise InvalidRecord("RunRecord", [("agent_id", problem)])


def validate_run(
    payload: object, max_bytes: int, *, max_depth: int = DEFAULT_MAX_DEPTH
) -> tuple[RunRecord, str]:
    """A run record and the JSON it will be stored as, or InvalidRecord saying why not.

    Every door applies this one rule (strictjson: no NaN/Infinity, no lone
    surrogates, nesting within `max_depth`); the size limit applies to the
    encoded run, whatever form it arrived in.
    """
    try:
        if isinstance(payload, dict):
            strictjson.check_value(payload, max_depth=max_depth)
            run = parse_wire(RunRecord, payload)
        elif isinstance(payload, str | bytes | bytearray):
            # orjson + validating the parsed value: cheaper than pydantic's
            # own JSON parser, and the parsed value is what the depth limit
            # is checked on.
            value = strictjson.loads(payload, max_depth=max_depth, max_bytes=max_bytes)
            if not isinstance(value, dict):
                raise ValueError(f"a run is a JSON object, got {_json_kind(value)}")
            run = parse_wire(RunRecord, value)
        else:  # e.g. 42 or null from another publisher
            got = "null" if payload is None else type(payload).__name__
            raise ValueError(f"expected a run (JSON text or an object), got {got}")
    except ValueError as exc:
        if isinstance(exc, InvalidRecord):
            raise
        raise InvalidRecord("RunRecord", [("", str(exc))]) from None
    check_agent_id(run.agent_id)
    encoded = run.to_json()
    size = len(encoded.encode("utf-8"))
    if size > max_bytes:
        raise InvalidRecord(
            "RunRecord", [("", f"run is {size} bytes encoded, limit is {max_bytes}")]
        )
    return run, encoded


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    kinds = {
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return kinds.get(type(value), type(value).__name__)


def validate_payload(
    payload: object, max_bytes: int, *, max_depth: int = DEFAULT_MAX_DEPTH
) -> RunRecord:
    """`validate_run` for callers that only need the record."""
    return validate_run(payload, max_bytes, max_depth=max_depth)[0]


def _raw_of(payload: object) -> str | bytes:
    if isinstance(payload, str | bytes | bytearray):
        return payload if not isinstance(payload, bytearray) else bytes(payload)
    try:
        return orjson.dumps(payload, option=orjson.OPT_PASSTHROUGH_SUBCLASS)
    except (TypeError, orjson.JSONEncodeError):
        return repr(payload)[:DEFAULT_DEAD_LETTER_RAW_BYTES]


def ingest(
    store: Store,
    payloads: Sequence[object],
    max_bytes: int,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_raw: int | None = None,
) -> IngestResult:
    """Validate and store payloads; bad ones go to the dead-letter list, the rest are kept.

    Each item is judged on its own, and any failure in judging it (not only
    a validation error) dead-letters that item alone: one bad run must never
    cost its neighbours. A run id already stored with other content keeps the
    first (runs are immutable) and the newcomer is dead-lettered as a
    `conflicting duplicate`.
    """
    result = IngestResult()
    if not isinstance(payloads, list | tuple):
        # The broker door refuses this shape first; here too it is ONE dead
        # letter (iterating a 20 KB string would make 20,000).
        got = "null" if payloads is None else type(payloads).__name__
        reason = f"expected a list of runs, got {got}"
        result.rejected.append((0, reason))
        store.push_dead_letters([dead_letter(_raw_of(payloads), reason, "ingest", max_raw=max_raw)])
        return result
    valid: list[RunRecord] = []
    encoded: list[str] = []
    dead: list[str] = []
    for pos, payload in enumerate(payloads):
        try:
            run, text = validate_run(payload, max_bytes, max_depth=max_depth)
        except Exception as exc:  # any failure rejects this item only
            reason = str(exc) if isinstance(exc, InvalidRecord) else f"{type(exc).__name__}: {exc}"
            result.rejected.append((pos, reason))
            dead.append(dead_letter(_raw_of(payload), reason, "ingest", max_raw=max_raw))
            continue
        valid.append(run)
        encoded.append(text)
    outcomes = store.store_runs_detailed(valid, encoded)
    for run, text, outcome in zip(valid, encoded, outcomes, strict=True):
        if outcome.new:
            result.stored.append(run)
            result.positions.append(outcome.position if outcome.position is not None else -1)
        elif outcome.conflict is not None and not _same_json(outcome.conflict, text):
            result.conflicts.append(run)
            reason = (
                f"conflicting duplicate: run {run.id} is stored with other content; kept the first"
            )
            dead.append(
                dead_letter(
                    text, reason, "ingest", max_raw=max_raw, agent_id=run.agent_id, run_id=run.id
                )
            )
        else:
            result.duplicates.append(run)
    store.push_dead_letters(dead)
    if result.stored:
        store.incr_counter("runs_ingested", len(result.stored))
    if result.conflicts:
        store.incr_counter("conflicting_duplicates", len(result.conflicts))
    return result


def _same_json(stored: str, submitted: str) -> bool:
    """Equal as JSON values (a run the runtime stored itself may differ in layout only)."""
    try:
        return bool(orjson.loads(stored) == orjson.loads(submitted))
    except orjson.JSONDecodeError:
        return False


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


def written_learning_keys(changes: Changes) -> list[str]:
    """The ACG keys whose windows or results `changes` writes (the agent's own set)."""
    return sorted({*changes.observations, *changes.stability})


def engine_run(record: RunRecord) -> Run:
    """The engine's view of a validated wire record (the engine knows no wire model)."""
    return Run(
        id=record.id,
        start_ns=record.start_ns,
        end_ns=record.end_ns,
        calls=tuple(
            Call(
                kind=c.kind,
                name=c.name,
                start_ns=c.start_ns,
                end_ns=c.end_ns,
                output_tokens=c.output_tokens,
                annotated_request=c.annotated_request,
            )
            for c in record.calls
        ),
    )


def learnable_run(agent: str, raw: str | None) -> Run | str:
    """The run as the engine folds it, or why learning skips it (a dead letter's reason).

    The one rule for which stored runs count: learning, rebuild and the
    foreign-write check all apply it, so a rebuild or a check re-folds
    exactly the runs learning learned. Runs in the index passed the full
    check on ingest (or were written by the runtime itself), so the deep
    check of recorded requests is skipped (`trusted`).
    """
    if raw is None:
        return "run key missing"
    fast = canonical_stored_run(agent, raw)
    return fast if fast is not None else model_run(agent, raw)


def model_run(agent: str, raw: str | bytes) -> Run | str:
    """`learnable_run` through the wire model: what decides every run that is not
    in canonical form (coerced, or refused with the model's reason)."""
    try:
        run = parse_wire(RunRecord, raw, trusted=True)
    except InvalidRecord as exc:
        return str(exc)
    if run.agent_id != agent:
        return f"run belongs to agent {run.agent_id!r}, found in {agent!r}'s index"
    return engine_run(run)


_U32_FIELDS = ("output_tokens", "prompt_tokens", "total_tokens", "tool_call_count")
_DICT_FIELDS = ("metadata_snapshot", "annotated_request", "annotated_response")


def canonical_stored_run(agent: str, raw: str | bytes) -> Run | None:
    """The engine's run straight from stored JSON in its canonical form, else None.

    Learning re-reads every run it learns; validating it again with the wire
    model cost a third of the learn task's CPU (~0.3 ms per capture-shaped
    run), although runs we stored are the model's own output. This accepts
    only what the model would accept unchanged: each field the model knows
    present with exactly the type it stores (ints as int, never bool, str or
    float; a UUID already in its normal form; timestamps that parse), the
    run of `agent`. Anything else, however harmless, returns None and takes
    the full model path, which decides the same way it always has (learned
    as coerced, or dead-lettered with its reason), so both paths learn the
    same runs with the same values (tests/test_stored_run.py).
    """
    try:
        value = orjson.loads(raw)
        if (
            type(value) is not dict
            or value.get("agent_id") != agent
            or type(value.get("calls")) is not list
        ):
            return None
        run_id = value.get("id")
        if type(run_id) is not str or str(uuid.UUID(run_id)) != run_id:
            return None
        start_ns, end_ns = _times(value)
        calls = []
        for call in value["calls"]:
            if type(call) is not dict or call.get("kind") not in ("llm", "tool"):
                return None
            name = call.get("name")
            if type(name) is not str or type(call.get("model_name", "")) not in (str, type(None)):
                return None
            for key in _U32_FIELDS:
                n = call.get(key)
                if n is not None and (type(n) is not int or not 0 <= n <= 0xFFFFFFFF):
                    return None
            for key in _DICT_FIELDS:
                if type(call.get(key, {})) not in (dict, type(None)):
                    return None
            call_start, call_end = _times(call)
            calls.append(
                Call(
                    kind=call["kind"],
                    name=name,
                    start_ns=call_start,
                    end_ns=call_end,
                    output_tokens=call.get("output_tokens"),
                    annotated_request=call.get("annotated_request"),
                )
            )
    except (ValueError, TypeError):  # a bad UUID or timestamp: the model says why
        return None
    return Run(id=run_id, start_ns=start_ns, end_ns=end_ns, calls=tuple(calls))


def _times(record: dict[str, object]) -> tuple[int, int | None]:
    """(start, end) in ns of a record in canonical form; TypeError/ValueError otherwise."""
    started, ended = record.get("started_at"), record.get("ended_at")
    if type(started) is not str or (ended is not None and type(ended) is not str):
        raise TypeError("not canonical")
    return parse_ns(started), None if ended is None else parse_ns(ended)


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
    if not batch.run_ids:
        return StepResult(0, 0, 0, True, True)
    runs: list[Run] = []
    dead: list[str] = []
    for run_id, raw in zip(batch.run_ids, batch.runs, strict=True):
        run = learnable_run(agent, raw)
        if isinstance(run, str):
            dead.append(dead_letter(raw or "", run, "learn", agent_id=agent, run_id=run_id))
        else:
            runs.append(run)
    learning_keys = required_windows(agent, runs)
    window_raw = store.get_many([k.acg_observations(key) for key in learning_keys])
    return _fold_and_commit(
        store,
        agent,
        batch.cursor,
        len(batch.run_ids),
        runs,
        dead,
        {**batch.state, **window_raw},
        learning_keys,
        config=config,
        clock=clock,
    )


def _fold_and_commit(
    store: Store,
    agent: str,
    cursor: Cursor,
    consumed: int,
    runs: Sequence[RunLike],
    dead: list[str],
    raw_state: Mapping[str, str | None],
    learning_keys: Sequence[str],
    *,
    config: EngineConfig,
    clock: Callable[[], str] | None,
) -> StepResult:
    """Fold `runs` into the state read at `cursor` and commit `consumed` index
    entries past `cursor.learned` with the compare-and-set (both learn paths)."""
    k = store.keys
    state = AgentState(
        agent,
        accumulators=loads_or_none(raw_state[k.accumulators(agent)]),
        plan=loads_or_none(raw_state[k.plan(agent)]),
        windows={
            key: loads_or_none(raw_state[k.acg_observations(key)]) or [] for key in learning_keys
        },
    )
    changes = fold(state, runs, config=config, **({"clock": clock} if clock else {}))
    result = store.commit(
        agent,
        cursor.learned,
        cursor.learned + consumed,
        state_writes(store, agent, changes),
        runs_learned=len(runs),
        dead_letters=dead,
        learning_keys=written_learning_keys(changes),
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


def contiguous_batches(result: IngestResult) -> dict[str, tuple[int, list[RunRecord]]]:
    """Per agent, the runs this ingest stored, when they sit together in its index.

    agent -> (first index offset, runs in index order). An agent whose new
    runs are interleaved with another ingest's (two publishers of one agent)
    is left out: its index between them holds runs this ingest does not
    have in memory.
    """
    by_agent: dict[str, list[tuple[int, RunRecord]]] = {}
    for run, position in zip(result.stored, result.positions, strict=True):
        if position >= 0:
            by_agent.setdefault(run.agent_id, []).append((position, run))
    batches: dict[str, tuple[int, list[RunRecord]]] = {}
    for agent, placed in by_agent.items():
        placed.sort(key=lambda item: item[0])
        first = placed[0][0]
        if all(position == first + i for i, (position, _) in enumerate(placed)):
            batches[agent] = (first, [run for _, run in placed])
    return batches


def learn_stored(
    store: Store,
    agent: str,
    first: int,
    records: Sequence[RunRecord],
    *,
    config: EngineConfig,
    clock: Callable[[], str] | None = None,
) -> StepResult | None:
    """Ingest's fast path: learn runs just stored at offsets `first`.. from memory.

    The common case is one agent's runs arriving in order: its learned
    offset stands right before the batch this ingest stored, and the runs
    are already validated in memory. Folding them here saves the learn
    message, re-reading the runs from Redis and parsing them again. It is
    the same fold and the same compare-and-set as `learn_step` (the offset
    fences it): a learner that moved the offset meanwhile makes the commit
    refuse, and then the runs are simply learned by the learn task. The
    caller holds the agent's lease.

    None when the learned offset is not at `first` (earlier runs still
    unlearned, or already learned past them): nothing was written.
    """
    k = store.keys
    # The validated records themselves: they have the fields the engine
    # reads (`RunLike`), so no copy into its `Run` (~10 us per run).
    runs = list(records)
    learning_keys = required_windows(agent, runs)
    # One round trip: cursor, accumulators, plan and the windows these runs need.
    batch = store.read_state(
        agent,
        [k.accumulators(agent), k.plan(agent), *(k.acg_observations(key) for key in learning_keys)],
    )
    if batch.cursor.learned != first:
        return None
    return _fold_and_commit(
        store,
        agent,
        batch.cursor,
        len(runs),
        runs,
        [],
        batch.state,
        learning_keys,
        config=config,
        clock=clock,
    )


# A fast-path fold is one ingest message's runs: short. A learner that
# outlives its lease only loses the compare-and-set, and a worker killed
# holding it blocks the agent's learning no longer than this.
FAST_PATH_LEASE_MS = 10_000


# After its own batch, the fast path learns what other ingests stored
# meanwhile for as long as this (their runs would otherwise wait for the
# learn task, which finds the lease taken and looks again 0.5 s later).
FAST_PATH_CATCH_UP_S = 2.0


def learn_ingested(
    store: Store,
    result: IngestResult,
    *,
    config: EngineConfig,
    max_runs: int,
    lease_ms: int = FAST_PATH_LEASE_MS,
    clock: Callable[[], str] | None = None,
) -> dict[str, bool]:
    """Learn each agent whose runs this ingest stored, while the runs are in memory.

    Per agent, when its lease is free: if its learned offset stands right
    before this ingest's runs, they are folded from memory (`learn_stored`);
    then whatever else is unlearned (runs other ingests stored meanwhile, or
    before, when this batch was not next) is learned from Redis like the
    learn task does, for up to FAST_PATH_CATCH_UP_S.

    An ingest that finds the lease taken does not wait (waiting blocked a
    pool process for every message of a busy agent, which capped one
    agent's rate): it leaves its runs to the holder. The holder looks at
    the agent's lag after letting go and, if runs are left, takes the lease
    again; a run stored before someone's failed try is therefore seen by
    the holder's look, which comes after its release. Returns, per agent
    learned here, whether it is caught up; every other agent of the ingest,
    and any not caught up, gets the learn task as a backstop (a holder that
    dies leaves those runs to it once the lease expires).
    """
    learned: dict[str, bool] = {}
    fast_runs = 0
    batches = contiguous_batches(result)
    for agent in dict.fromkeys(run.agent_id for run in result.stored):
        token = uuid.uuid4().hex
        deadline = time.monotonic() + FAST_PATH_CATCH_UP_S
        batch = batches.get(agent)
        while store.acquire_lease(agent, token, lease_ms):
            try:
                caught_up = False
                if batch is not None:
                    first, records = batch
                    batch = None
                    step = learn_stored(store, agent, first, records, config=config, clock=clock)
                    if step is not None and step.committed:
                        fast_runs += step.learned
                        caught_up = step.caught_up
                if not caught_up:
                    # Whatever else is unlearned (runs stored after the batch's
                    # read show in the look below, after the release).
                    caught_up = catch_up(
                        store,
                        agent,
                        max_runs=max_runs,
                        config=config,
                        deadline=deadline,
                        clock=clock,
                    ).caught_up
            finally:
                store.release_lease(agent, token)
            # Runs left to us by ingests that found the lease taken show as
            # lag now; not caught up means the learn task as a backstop,
            # unless we get the lease back before the deadline.
            learned[agent] = caught_up and store.cursor(agent).lag == 0
            if learned[agent] or not caught_up or time.monotonic() >= deadline:
                break
    if fast_runs:
        store.incr_counter("fast_path_runs", fast_runs)
    return learned


@dataclass(slots=True)
class LearnSummary:
    learned: int = 0
    dead: int = 0
    commits: int = 0
    conflicts: int = 0
    caught_up: bool = False
    keys_written: set[str] = field(default_factory=set)


def catch_up(
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
