"""The engine's own view of a run: what the learners read, nothing more.

The engine is the bottom layer: it must not depend on how runs travel or are
stored (the wire model, its validation rules, timestamp text), so a change
there cannot change learning by accident, and the engine stays usable and
testable on its own. The learners need a handful of fields, with times
already as integer nanoseconds (all their arithmetic is on those); the edge
(`tasks.learning.engine_run`) converts validated wire records into `Run`.

`RunLike` / `CallLike` say exactly what a learner reads, so any object with
those attributes (e.g. the wire model, which has the same names) can be
folded directly, as the tests do.

`utc_now` also lives here: the clock only feeds the runtime-layout stamps
the engine writes (`generated_at`, `created_at`), which are the engine's
output format, not something it parses.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

__all__ = ["Call", "CallLike", "Run", "RunLike", "format_stamp", "utc_now"]


class CallLike(Protocol):
    """One LLM or tool call, as the learners read it."""

    @property
    def kind(self) -> str: ...  # "llm" or "tool"
    @property
    def name(self) -> str: ...
    @property
    def start_ns(self) -> int: ...
    @property
    def end_ns(self) -> int | None: ...  # None: the call did not finish
    @property
    def output_tokens(self) -> int | None: ...
    @property
    def annotated_request(self) -> dict[str, Any] | None: ...


class RunLike(Protocol):
    """One finished agent run, as the learners read it."""

    @property
    def id(self) -> str: ...
    @property
    def start_ns(self) -> int: ...
    @property
    def end_ns(self) -> int | None: ...
    @property
    def calls(self) -> Sequence[CallLike]: ...


@dataclass(frozen=True, slots=True)
class Call:
    kind: str
    name: str
    start_ns: int
    end_ns: int | None = None
    output_tokens: int | None = None
    # Kept as the very dict given (not copied): the ACG learner hashes it
    # exactly as recorded and caches its work per request object.
    annotated_request: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Run:
    id: str
    start_ns: int
    end_ns: int | None
    calls: tuple[Call, ...]


def format_stamp(ns: int) -> str:
    """The runtime's layout for the stamps it writes (`+00:00`, 9 fractional digits)."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    base = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{nanos:09d}+00:00"


def utc_now() -> str:
    """Default clock of a fold (the caller may inject its own)."""
    return format_stamp(time.time_ns())
