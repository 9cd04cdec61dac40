"""Operator actions as plain functions: replay, dead-letter replay, rebuild then catch up.

They used to live inside the command line, so the only way to run (or
test) them was through `adaptive-worker`. Here they take a `Store` and the
`Settings` to apply, explicitly, and return what happened as data: the CLI
renders it, tests assert on it, and nothing is re-read from the process
environment (a `--prefix` given on the command line is the prefix used).

Reading a records file (a JSON array or JSON Lines) is here too: replay
needs the position of every record to name what it skipped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from storage.errors import InvalidRecord
from storage.store import Store
from storage.strictjson import check_depth, check_text, check_value
from tasks.learning import (
    IngestResult,
    catch_up,
    dead_letter,
    engine_config,
    ingest,
    validate_payload,
)
from tasks.maintenance import rebuild
from worker.settings import Settings

__all__ = [
    "BadInput",
    "DeadLetterReplay",
    "RebuildReport",
    "Record",
    "ReplayReport",
    "ingest_payloads",
    "json_text",
    "learn_agents",
    "parse_dead_letter",
    "read_records",
    "rebuild_and_catch_up",
    "replay_dead_letters",
    "replay_records",
    "run_problem",
]


_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def json_text(data: Any, indent: int | None = 2) -> str:
    """JSON text that can always be written out: a lone surrogate (which a
    dead letter's payload may hold) is written as its `\\udXXX` escape, which
    reads back as the same string, instead of failing the write."""
    text = json.dumps(data, indent=indent, ensure_ascii=False)
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


# ------------------------------------------------------------- records files


class BadInput(ValueError):
    """A records file that cannot be read at all (nothing in it is usable)."""


@dataclass(frozen=True, slots=True)
class Record:
    """One record of a records file: where it is, its JSON text, and what is
    wrong with it (None: it reads as JSON within the limits; whether it is a
    valid run is for `run_problem` to say)."""

    where: str  # "line 3" (JSON Lines) or "item 3" (a JSON array)
    number: int
    text: str | bytes
    problem: str | None = None

    @property
    def position(self) -> dict[str, int]:
        """Where, for `--json`: {"line": 3} or {"item": 3}."""
        return {self.where.split()[0]: self.number}


def read_records(data: str | bytes, *, max_depth: int, max_bytes: int) -> list[Record]:
    """The records of a JSON array or JSON Lines file, in file order.

    Each JSON line is judged on its own (a bad one is reported with its line
    number, the others stay usable). Nesting is checked before anything
    recursive parses a record (`storage.strictjson`), so a hostile file gets
    a reason, not a RecursionError. A JSON array is one document: if it
    cannot be parsed at all, BadInput.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
    if raw.lstrip().startswith(b"["):
        return _array_records(raw, max_depth=max_depth, max_bytes=max_bytes)
    records: list[Record] = []
    # Split bytes, on \n only: str.splitlines would also split inside a JSON
    # string holding an unescaped U+2028 or U+0085.
    for number, line in enumerate(raw.split(b"\n"), start=1):
        line = line.removesuffix(b"\r")
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            problem = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
            records.append(Record(where, number, line, problem))
            continue
        records.append(Record(where, number, text, _json_problem(text, max_depth, max_bytes)))
    return records


def _json_problem(text: str, max_depth: int, max_bytes: int) -> str | None:
    """Why `text` is not one JSON value the runtime could read back (None: it is)."""
    try:
        check_text(text, max_depth=max_depth, max_bytes=max_bytes)
    except ValueError as exc:
        return str(exc)
    try:
        json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or a number Python cannot convert
        return f"not valid JSON: {exc}"
    return None


def _array_records(raw: bytes, *, max_depth: int, max_bytes: int) -> list[Record]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        check_depth(raw, max_depth=max_depth + 1)  # the array itself is one level
    except ValueError:
        raise BadInput(f"a record is nested more than {max_depth} levels deep") from None
    try:
        items = json.loads(text)
    except ValueError as exc:
        raise BadInput(f"not a valid JSON array: {exc}") from None
    if not isinstance(items, list):
        raise BadInput("not a JSON array")
    records = []
    for number, item in enumerate(items, start=1):
        where = f"item {number}"
        try:
            check_value(item, max_depth=max_depth)
        except ValueError as exc:  # NaN, a lone surrogate...: kept as text with escapes
            records.append(Record(where, number, json.dumps(item), str(exc)))
            continue
        # An item is a record as an object, or as JSON text in a string.
        text = item if isinstance(item, str) else json_text(item, indent=None)
        records.append(Record(where, number, text, _json_problem(text, max_depth, max_bytes)))
    return records


def run_problem(payload: str | bytes, settings: Settings) -> str | None:
    """Why `payload` is not a run record the workers would store (None: it is one)."""
    try:
        validate_payload(payload, settings.max_run_bytes, max_depth=settings.max_json_depth)
    except (InvalidRecord, ValueError) as exc:
        return str(exc)
    return None


# ------------------------------------------------------------ store and learn


def ingest_payloads(
    store: Store, payloads: Sequence[str | bytes], settings: Settings
) -> IngestResult:
    """`tasks.learning.ingest` with the limits of `settings` (the workers' rule)."""
    return ingest(
        store,
        payloads,
        settings.max_run_bytes,
        max_depth=settings.max_json_depth,
        max_raw=settings.dead_letter_raw_max_bytes,
    )


@dataclass(slots=True)
class LearnTotals:
    learned: int = 0
    keys_written: set[str] = field(default_factory=set)


def learn_agents(store: Store, agents: Sequence[str], settings: Settings) -> LearnTotals:
    """Learn each agent until it is caught up, in this process (no broker)."""
    config = engine_config(settings)
    totals = LearnTotals()
    for agent in agents:
        summary = catch_up(store, agent, max_runs=settings.learn_batch_size, config=config)
        totals.learned += summary.learned
        totals.keys_written |= summary.keys_written
    return totals


@dataclass(slots=True)
class ReplayReport:
    """What `replay_records` did; `skipped` holds every record not stored, in file order."""

    result: IngestResult
    skipped: list[Record]
    learned: int
    keys_written: set[str]

    def summary(self) -> dict[str, Any]:
        return {
            "runs_stored": len(self.result.stored),
            "already_known": len(self.result.duplicates),
            "rejected": len(self.skipped),
            "conflicting_duplicates": len(self.result.conflicts),
            "learned": self.learned,
            "agents": sorted(self.result.agents),
            "keys_written": sorted(self.keys_written),
        }


def replay_records(
    store: Store, records: Sequence[Record], settings: Settings, *, source: str
) -> ReplayReport:
    """Store and learn `records` in order; dead-letter each one that cannot be used.

    A record that does not even read as JSON is dead-lettered here, with
    `source` and its position; `ingest` dead-letters the ones that are not
    valid runs itself. Every other record is stored and its agent learned.
    """
    good = [r for r in records if r.problem is None]
    bad = [r for r in records if r.problem is not None]
    store.push_dead_letters(
        [
            dead_letter(
                r.text,
                str(r.problem),
                "replay",
                max_raw=settings.dead_letter_raw_max_bytes,
                source=f"{source} {r.where}",
            )
            for r in bad
        ]
    )
    result = ingest_payloads(store, [r.text for r in good], settings)
    bad += [
        Record(good[pos].where, good[pos].number, "", reason) for pos, reason in result.rejected
    ]
    bad.sort(key=lambda r: r.number)
    totals = learn_agents(store, result.agents, settings)
    return ReplayReport(result, bad, totals.learned, totals.keys_written)


# --------------------------------------------------------------- dead letters


def parse_dead_letter(index: int, entry: bytes) -> dict[str, Any]:
    """One dead-letter entry as a dict; an entry that is not ours is shown as raw.

    Anyone who can write to Redis can push to the list, so an entry may be
    any bytes: not UTF-8, not JSON, or JSON nested past the recursion limit.
    """
    try:
        text = entry.decode("utf-8")
    except UnicodeDecodeError as exc:
        reason = f"not a dead-letter entry: not UTF-8 text ({exc.reason} at byte {exc.start})"
        return {"index": index, "reason": reason, "raw": entry.decode("utf-8", "backslashreplace")}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        return {"index": index, "reason": "not a dead-letter entry", "raw": text}
    return {**value, "index": index}


@dataclass(slots=True)
class DeadLetterReplay:
    """What `replay_dead_letters` did; `invalid` names the entries left in the list."""

    selected: int
    result: IngestResult
    removed: int
    learned: int
    remaining: int
    invalid: list[dict[str, Any]]

    def summary(self) -> dict[str, Any]:
        return {
            "selected": self.selected,
            "stored": len(self.result.stored),
            "already_stored": len(self.result.duplicates),
            "removed": self.removed,
            "still_invalid": len(self.invalid),
            "learned": self.learned,
            "agents": sorted(self.result.agents),
            "remaining": self.remaining,
        }


def replay_dead_letters(
    store: Store, selected: Sequence[tuple[int, bytes]], settings: Settings
) -> DeadLetterReplay:
    """Ingest the raw payloads of `selected` (position, stored entry) again and learn them.

    Payloads that validate now (after an upgrade, or a limit raised) are
    stored and their entries leave the list; a run stored already counts as
    done too. The others stay where they are, and are reported with the
    reason they fail now.
    """
    valid: list[tuple[str, str]] = []  # (entry, payload)
    invalid: list[dict[str, Any]] = []
    for pos, entry in selected:
        item = parse_dead_letter(pos, entry)
        raw = item.get("raw")
        try:
            text = entry.decode("utf-8")
        except UnicodeDecodeError:
            invalid.append({"index": pos, "reason": str(item["reason"])})
            continue
        if not isinstance(raw, str) or not raw:
            invalid.append({"index": pos, "reason": "no payload to replay"})
            continue
        problem = run_problem(raw, settings)
        if problem is not None:
            invalid.append({"index": pos, "reason": problem})
            continue
        valid.append((text, raw))
    result = ingest_payloads(store, [payload for _, payload in valid], settings)
    removed = store.remove_dead_letters([entry for entry, _ in valid])
    learned = learn_agents(store, result.agents, settings).learned
    return DeadLetterReplay(
        selected=len(selected),
        result=result,
        removed=removed,
        learned=learned,
        remaining=store.dead_letter_count(),
        invalid=invalid,
    )


# ------------------------------------------------------------------- rebuild


@dataclass(frozen=True, slots=True)
class RebuildReport:
    agent_id: str
    runs: int
    learned: int
    version: int
    deleted_keys: int
    learned_after: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "runs": self.runs,
            "learned": self.learned,
            "version": self.version,
            "deleted_keys": self.deleted_keys,
            "learned_after": self.learned_after,
        }


def rebuild_and_catch_up(
    store: Store,
    agent: str,
    settings: Settings,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> RebuildReport:
    """Rebuild the agent's state from its retained runs, then learn what arrived meanwhile.

    The rebuild swaps in state covering the runs it saw; runs appended
    during it lie past that offset and are learned right after, in this
    process, so the agent is caught up when this returns.
    """
    config = engine_config(settings)
    result = rebuild(
        store, agent, config=config, chunk=settings.learn_batch_size, progress=progress
    )
    if progress is not None:
        progress(result.runs, result.runs)
    caught_up = catch_up(store, agent, max_runs=settings.learn_batch_size, config=config)
    return RebuildReport(
        agent_id=agent,
        runs=result.runs,
        learned=result.learned + caught_up.learned,
        version=result.version,
        deleted_keys=len(result.deleted),
        learned_after=caught_up.learned,
    )
