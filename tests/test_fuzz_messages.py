"""Fuzzing whole broker messages through ONE real `celery worker` (the worker's door).

hypothesis draws complete messages as any publisher with broker access
could send them (content type, encoding, headers of every type Celery
reads, bodies that are or are not Celery's `[args, kwargs, embed]` triple,
random and invalid bytes, nesting up to ~1,000 levels, huge strings,
argument shapes of `adaptive.ingest_runs` and `adaptive.learn_agent`, and
ingest payloads mixing good runs, exact and conflicting duplicates, the
shared violations of tests/hostile.py and random junk), plus raw Redis
list entries kombu itself has to unpack. Each one is published to the real
Redis broker of a single worker process started once for the test, and
judged message by message.

The oracle is this file's own construction, never what the worker decided:
each drawn element is known to be fine or known to be poison (a rule the
README's "Failure modes" states: JSON only, UTF-8 only, a protocol-2 task
of ours, header types Celery reads, the body size and nesting limits, the
argument shapes of the tasks), and sizes and depths are measured here on
the bytes and values built here. A few elements whose handling is a
judgement call (dates Celery may fail to convert, a string where Celery
iterates a list) are "either": the message must then be dead-lettered
once OR processed, never both, never neither. So, per message:

- poison: exactly one dead letter (stage `message`), nothing stored;
- well-formed: its new good runs stored once, each bad or conflicting item
  one dead letter (stage `ingest`), duplicates nothing;
- the worker's main process is the same one, alive, and takes the next
  message (a worker that is alive but no longer runs tasks fails too);

and at the end: every stored run learned once (cursor, index, root
accumulator count, counters), nothing queued or unacked, the dead-letter
list within its cap and its memory within cap x (raw limit + overhead),
and no error or traceback in the worker's log.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from kombu import Connection

from storage.store import Store
from tests.conftest import REDIS_URL
from tests.hostile import good_run, json_depth, nested, violations
from tests.pipeline import Worker, celery_workers, wait_until, worker_env
from worker.celery import (
    DISCOVER_TASK,
    INGEST_QUEUE,
    INGEST_TASK,
    LEARN_QUEUE,
    LEARN_TASK,
    QUEUES,
    broker_key_prefix,
    transport_options,
)
from worker.settings import Settings, load_settings

# ------------------------------------------------------- the worker's limits

# Small limits, so that big and deep inputs are cheap to make; the oracle
# below applies the same numbers, as the README states them.
MAX_MESSAGE_BYTES = 256 * 1024
MAX_RUN_BYTES = 32 * 1024
MAX_JSON_DEPTH = 100
RAW_MAX_BYTES = 1024
DEAD_LETTER_CAP = 40
# README "Failure modes": a body nested more than 300 levels is refused whole
# (what pickling for the prefork pool survives), whatever the depth setting.
BODY_DEPTH_LIMIT = 300
# What one dead letter may cost beyond its raw bytes: the reason (at most
# 2,000 characters), short context fields and Redis' own list overhead.
# The kept raw bytes are JSON-escaped in the entry: at worst 6 bytes each
# (`\u0000`, or an invalid byte written as `\\xff`).
DEAD_LETTER_OVERHEAD = 16 * 1024
RAW_ESCAPE_FACTOR = 6

EXAMPLES = int(os.environ.get("ADAPTIVE_FUZZ_MESSAGES", "400"))  # drawn, besides REPRODUCED
MESSAGE_TIMEOUT_S = 20.0
JSON = "application/json"
MISSING = "<missing>"  # a header left out of the message
GOOD, EITHER, POISON = "good", "either", "poison"
RANK = {GOOD: 0, EITHER: 1, POISON: 2}

# Agent ids of the good runs: odd, all valid (no `::`). Recipes name them by
# index, and long ids by a short token, so that a failure stays readable.
LONG = {"<2,000 L>": "fz-" + "L" * 2000, "<10,000 L>": "L" * 10_000}
AGENTS = ("fz-a", "fz b", "fz[c]*?", "fz{d}", "fz:e", "fz\u00e9\u4e2d", "fz\x00g", "<2,000 L>")
VIOLATIONS = tuple(violations())
NO_CANVAS = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
# A byte never in UTF-8, a bad continuation, an encoded surrogate, a 5-byte form, a cut one.
INVALID_UTF8 = (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82")


# ------------------------------------------------------------------ helpers


@contextmanager
def deep_recursion() -> Iterator[None]:
    """Room to build and encode values ~1,000 levels deep in THIS process (the test's side)."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 20_000))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def utf8_ok(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def worst(*verdicts: str) -> str:
    return max(verdicts, key=RANK.__getitem__, default=GOOD)


# ----------------------------------------------------------------- recipes
#
# hypothesis draws recipes; the test materializes them (fresh run ids, the
# body bytes) so that every run id is new unless a recipe asks for a
# duplicate of a run the oracle knows to be stored.


@dataclass(frozen=True)
class Item:
    """One element of an ingest message's payload list."""

    kind: str  # new | dup | conflict | violation | junk | deep | big
    agent: int = 0  # index in AGENTS
    form: str = "text"  # dict | text | ascii | pretty
    ref: int = 0  # dup/conflict: which known run
    value: Any = None  # violation name, junk value, deep levels or big size


@dataclass(frozen=True)
class Deep:
    """A header value `levels` objects deep, built only when sent (short reprs)."""

    levels: int


@dataclass(frozen=True)
class Field:
    """One header: its value (or MISSING) and what it must get."""

    verdict: str
    value: Any


@dataclass(frozen=True)
class Recipe:
    target: str  # ingest | learn | discover | raw
    queue: str
    headers: tuple[tuple[str, Field], ...] = ()
    content_type: Field = Field(GOOD, JSON)
    encoding: Field = Field(GOOD, "utf-8")
    shape: str = "args"  # how the arguments are passed, or the shape fault
    args: Any = None  # learn: the agent id; a fault's own arguments
    items: tuple[Item, ...] = ()
    embed: Field = Field(GOOD, {})
    body: tuple[str, Any] = ("triple", None)  # or a body fault
    ensure_ascii: bool = True
    compact: bool = False
    faults: tuple[str, ...] = ()


def choice(verdict: str, *values: Any) -> st.SearchStrategy[Field]:
    return st.sampled_from(values).map(lambda v: Field(verdict, v))


def weighted(*options: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, picked with the given weights (the first is the simplest)."""
    slots = [i for i, (weight, _) in enumerate(options) for _ in range(weight)]
    return st.sampled_from(slots).flatmap(lambda i: options[i][1])


OFFSETS = st.integers(-14 * 60 + 1, 14 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))


def iso_texts(low: datetime, high: datetime) -> st.SearchStrategy[str]:
    """ISO 8601 dates as publishers write them (naive, offsets, Z, date only, space)."""

    def fmt(args: tuple[datetime, int, Any]) -> str:
        moment, style, tz = args
        aware = moment.replace(tzinfo=tz)
        return [
            moment.isoformat(),
            aware.isoformat(),
            aware.isoformat(timespec="seconds"),
            moment.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z"),
            moment.date().isoformat(),
            aware.isoformat(sep=" "),
        ][style]

    return st.tuples(st.datetimes(low, high), st.integers(0, 5), OFFSETS).map(fmt)


PAST = iso_texts(datetime(1900, 1, 2), datetime(2020, 1, 1))
FUTURE = iso_texts(datetime(2900, 1, 1), datetime(9000, 1, 1))
LETTERS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz -_!?", max_size=20)
ODD_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=30)
SHALLOW_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),  # NaN and Infinity included
    st.text(max_size=40),
    st.tuples(st.text(max_size=20), st.sampled_from(["\ud800", "\udfff", "\udbff"])).map("".join),
    SHALLOW_JSON,
)


def header_fields(
    target: str, faults: frozenset[str]
) -> st.SearchStrategy[tuple[tuple[str, Field], ...]]:
    """The headers Celery reads, each optional; a faulted one always present and wrong."""
    task_name = {"ingest": INGEST_TASK, "learn": LEARN_TASK, "discover": DISCOVER_TASK}[target]
    pools: dict[str, tuple[st.SearchStrategy[Field], st.SearchStrategy[Field]]] = {
        # name: (fine values, poison values)
        "eta": (
            weighted(
                (3, choice(GOOD, None)),
                (6, PAST.map(lambda v: Field(GOOD, v))),
                # Years Celery may fail to convert (an offset past year 1):
                # dead-lettered or run, never dropped without a trace.
                (
                    2,
                    iso_texts(datetime(1, 1, 1), datetime(1899, 1, 1)).map(
                        lambda v: Field(EITHER, v)
                    ),
                ),
                (1, choice(EITHER, "0001-01-01T00:00:00+14:00")),
            ),
            st.one_of(
                choice(POISON, 42, 1.5, True, [], {}, ""),
                LETTERS.filter(bool).map(lambda v: Field(POISON, v)),
                # Held unacked and redelivered after every visibility timeout.
                FUTURE.map(lambda v: Field(POISON, v)),
            ),
        ),
        "expires": (
            weighted(
                (3, choice(GOOD, None)),
                (6, FUTURE.map(lambda v: Field(GOOD, v))),
                (1, choice(EITHER, "9999-12-31T23:59:59-14:00", "9999-12-31")),
            ),
            st.one_of(
                choice(POISON, 42, [], True),
                LETTERS.filter(bool).map(lambda v: Field(POISON, v)),
                # Expired before a worker took it: the runs must leave a trace.
                *([PAST.map(lambda v: Field(POISON, v))] if target == "ingest" else []),
            ),
        ),
        "timelimit": (
            # A sender's limits are ignored (the workers' own apply): a tiny
            # soft limit used to make ingest raise mid-store and lose its runs.
            choice(GOOD, None, [None, None], [300, 270], [600.5, None], [None, 500], [None, 0.001]),
            choice(
                POISON, "5", 5, [1], [1, 2, 3], ["5", None], [0, None], [-1, None], [None, "x"], {}
            ),
        ),
        "retries": (choice(GOOD, 0, 3), choice(POISON, -1, "1", 1.5, None, [])),
        "ignore_result": (choice(GOOD, None, True, False), choice(POISON, "yes", 1, [])),
        "argsrepr": (choice(GOOD, "<fuzz>", ""), choice(POISON, 42, "r" * 5000)),
        "kwargsrepr": (choice(GOOD, "{}"), choice(POISON, [1], "k" * 5000)),
        "shadow": (choice(GOOD, None, "fuzz-shadow"), choice(POISON, 42, "s" * 300)),
        "root_id": (choice(GOOD, None, "root-1"), choice(POISON, 42, [1])),
        "parent_id": (choice(GOOD, None, "parent-1"), choice(POISON, {}, 1.5)),
        "group": (choice(GOOD, None, "group-1"), choice(POISON, 7, ["g"])),
        "stamped_headers": (
            weighted((4, choice(GOOD, None, [], ["fz"])), (1, choice(EITHER, "fz"))),
            choice(POISON, 42, [[1]], {"a": 1}),
        ),
        "stamps": (choice(GOOD, None, {}, {"fz": "x"}), choice(POISON, 42, "x", [1])),
        "x-fz-extra": (SHALLOW_JSON.map(lambda v: Field(GOOD, v)), st.nothing()),
        # A header table nested `levels` deep (+1 for the table itself).
        "x-fz-deep": (
            st.integers(1, MAX_JSON_DEPTH - 1).map(lambda n: Field(GOOD, Deep(n))),
            st.integers(MAX_JSON_DEPTH, 1000).map(lambda n: Field(POISON, Deep(n))),
        ),
    }

    task = weighted(
        (
            1,
            choice(
                POISON, MISSING, "", 42, None, [task_name], {"name": task_name}, task_name.upper()
            ),
        ),
        (1, choice(POISON, task_name + " ", "celery.ping", "celery.chord_unlock", "adaptive.nope")),
        (1, choice(POISON, "x" * 300, task_name + "\ud800", "adaptive.ingest_runs.x")),
    )
    ident = choice(POISON, MISSING, "", 42, None, [1], {"a": 1}, "i" * 257, "id-\ud800")

    @st.composite
    def build(draw: st.DrawFn) -> tuple[tuple[str, Field], ...]:
        out = [
            ("task", draw(task) if "task" in faults else Field(GOOD, task_name)),
            ("id", draw(ident) if "id" in faults else Field(GOOD, draw(ODD_TEXT))),
        ]
        header_faults = [name for name in pools if name in faults]
        for name, (fine, bad) in pools.items():
            if name in header_faults:
                out.append((name, draw(bad)))
            elif draw(st.integers(0, 9)) < 2:
                out.append((name, draw(fine)))
        return tuple(out)

    return build()


HEADER_FAULTS = ("eta", "expires", "timelimit", "retries", "ignore_result", "argsrepr",
                 "kwargsrepr", "shadow", "root_id", "parent_id", "group", "stamped_headers",
                 "stamps", "x-fz-deep")  # fmt: skip
FAULTS = ("task", "id", "content type", "encoding", "body", "shape", "embed", *HEADER_FAULTS)


@st.composite
def items(draw: st.DrawFn) -> Item:
    kind = draw(
        st.sampled_from(
            ["new"] * 7 + ["dup"] * 2 + ["conflict"] * 2 + ["violation"] * 3 + ["junk"] * 3
            + ["deep"] * 2 + ["big"]
        )
    )  # fmt: skip
    agent = draw(st.integers(0, len(AGENTS) - 1))
    form = draw(st.sampled_from(["text", "dict", "ascii", "pretty"]))
    ref = draw(st.integers(0, 10**6))
    if kind == "violation":
        return Item(kind, agent, form, ref, draw(st.sampled_from(VIOLATIONS)))
    if kind == "junk":
        return Item(kind, agent, form, ref, draw(JUNK))
    if kind == "deep":  # levels of an extra field: near the limit, or far past it
        levels = draw(
            st.integers(MAX_JSON_DEPTH - 3, MAX_JSON_DEPTH + 1)
            | st.integers(1, BODY_DEPTH_LIMIT + 5)
            | st.integers(BODY_DEPTH_LIMIT - 6, BODY_DEPTH_LIMIT - 2)
            | st.integers(BODY_DEPTH_LIMIT, 1000)
        )
        return Item(kind, agent, form, ref, levels)
    if kind == "big":  # an extra string: well under, or well over, the run limit
        return Item(
            kind, agent, form, ref, draw(st.integers(0, 8000) | st.integers(40_000, 100_000))
        )
    return Item(kind, agent, form, ref)


@st.composite
def recipes(draw: st.DrawFn) -> Recipe:
    target = draw(st.sampled_from(["ingest"] * 6 + ["learn"] * 2 + ["discover", "raw"]))
    queue = draw(st.sampled_from(QUEUES))
    if target == "raw":
        return Recipe("raw", queue, body=draw(raw_entries()), faults=("raw entry",))
    hostile = draw(st.booleans())
    faults = frozenset(
        draw(st.sets(st.sampled_from(FAULTS), min_size=1, max_size=2)) if hostile else ()
    )
    headers = draw(header_fields(target, faults))
    content_type = (
        draw(
            choice(POISON, "application/x-python-serialize", "application/x-yaml",
                   "application/x-msgpack", "application/data", "application/text", "text/plain",
                   "APPLICATION/JSON", "application/json; charset=utf-8", "", None)
            | st.text(max_size=20).filter(lambda t: t != JSON).map(lambda t: Field(POISON, t))
        )
        if "content type" in faults
        else Field(GOOD, JSON)
    )  # fmt: skip
    encoding = (
        draw(
            choice(POISON, "binary", "latin-1", "ascii", "utf-16", "", None)
            | st.text(max_size=12)
            .filter(lambda t: t.lower() not in ("utf-8", "utf8"))
            .map(lambda t: Field(POISON, t))
        )
        if "encoding" in faults
        else draw(choice(GOOD, "utf-8", "UTF-8", "utf8"))
    )
    embed = (
        draw(
            choice(POISON, {"callbacks": [{"task": LEARN_TASK}]}, {"chain": [{"task": "x"}]},
                   {"errbacks": ["x"]}, {"chord": {"task": "x"}}, 42, "x", [])
        )
        if "embed" in faults
        else draw(
            choice(GOOD, {}, None, NO_CANVAS)
            | SHALLOW_JSON.map(lambda v: Field(GOOD, {"x-fz": v}))
        )
    )  # fmt: skip
    body: tuple[str, Any] = ("triple", None)
    if "body" in faults:
        body = draw(body_faults())
    shape = "args"
    args: Any = None
    if "shape" in faults:
        shape, args = draw(shape_faults(target))
    else:
        shape = draw(st.sampled_from(["args", "kwargs"]))
        if target == "learn":
            args = draw(st.sampled_from(AGENTS) | ODD_TEXT | st.just("<10,000 L>"))
    payload = tuple(draw(st.lists(items(), max_size=8))) if target == "ingest" else ()
    return Recipe(
        target,
        queue,
        headers,
        content_type,
        encoding,
        shape,
        args,
        payload,
        embed,
        body,
        ensure_ascii=draw(st.booleans()),
        compact=draw(st.booleans()),
        faults=tuple(sorted(faults)),
    )


def shape_faults(target: str) -> st.SearchStrategy[tuple[str, Any]]:
    """Arguments of the wrong shape for the task: (how they are passed, the raw args)."""
    common = [
        ("args", [42]),
        ("args", [None]),
        ("args", "abc"),
        ("args", {"a": 1}),
        ("args", [[1], [2]]),
        ("args", [{"a": 1}, 2]),
    ]
    if target == "ingest":
        return st.one_of(
            st.sampled_from(
                [*common, ("missing", None), ("extra arg", "extra"), ("extra kwarg", {"sneaky": 1}),
                 ("both", None), ("kwargs not an object", [])]
            ),
            st.integers(1, 20_000).map(lambda n: ("args", ["x" * n])),
        )  # fmt: skip
    if target == "learn":
        return st.sampled_from(
            [*common, ("missing", None), ("args", [["a"]]), ("args", ["a", "b"]),
             ("kwargs", {"agent_id": 1}), ("kwargs", {"agent": "x"}),
             ("args", ["agent-\ud800"]), ("args", ["\udfff"])]
        )  # fmt: skip
    return st.sampled_from([("args", [1]), ("kwargs", {"x": 1}), ("args", "abc")])


def body_faults() -> st.SearchStrategy[tuple[str, Any]]:
    """Bodies that are not a decodable triple at all."""
    not_triple = SHALLOW_JSON.filter(lambda v: not (isinstance(v, list) and len(v) == 3))
    return st.one_of(
        st.sampled_from([("json", {}), ("json", 42), ("json", "text"), ("json", None),
                         ("json", []), ("json", [1]), ("json", [[], {}]),
                         ("json", [[], {}, {}, {}]), ("json", {"args": [], "kwargs": {}})]),
        not_triple.map(lambda v: ("json", v)),
        st.binary(max_size=64).map(lambda b: ("bytes", b)),
        st.just(("bytes", b"")),
        st.sampled_from(INVALID_UTF8)
        .map(lambda b: ("invalid utf-8", b)),
        st.integers(BODY_DEPTH_LIMIT + 1, 2000).map(lambda n: ("brackets", n)),
        st.integers(MAX_MESSAGE_BYTES + 1, MAX_MESSAGE_BYTES + 150_000).map(lambda n: ("huge", n)),
    )  # fmt: skip


def raw_entries() -> st.SearchStrategy[tuple[str, Any]]:
    """Redis list entries kombu cannot unpack (the broker's own envelope)."""
    props = {"delivery_tag": "t", "delivery_info": {"exchange": "", "routing_key": "q"}}
    return st.one_of(
        st.binary(max_size=64).map(lambda b: ("raw", b)),
        SHALLOW_JSON.filter(lambda v: not isinstance(v, dict)).map(lambda v: ("raw json", v)),
        st.sampled_from([
            ("raw json", {"body": "e30="}),
            ("raw json", {"body": "e30=", "properties": {**props, "delivery_tag": ["t"]}}),
            ("raw json", {"body": "e30=", "properties": {**props, "body_encoding": "rot13"}}),
            ("raw json", {"body": "e30", "properties": {**props, "body_encoding": "base64"}}),
            ("raw json", {"body": "e30=", "properties": {"delivery_tag": "t"}}),
            ("raw json", {"body": "e30=", "headers": [1], "properties": props}),
        ]),
        st.integers(BODY_DEPTH_LIMIT, 1500).map(lambda n: ("raw deep", n)),
    )  # fmt: skip


def _ingest(*extra: tuple[str, Field], **fields: Any) -> Recipe:
    headers = (("task", Field(GOOD, INGEST_TASK)), ("id", Field(GOOD, "case")), *extra)
    items = fields.pop("items", (Item("new"), Item("new", 1, "dict")))
    return Recipe("ingest", INGEST_QUEUE, headers, items=items, **fields)


# Each case reproduced on older code, run first in every session (explicit
# examples): the issue's own, and what this fuzz found (see the comments).
REPRODUCED: dict[str, Recipe] = {
    "issue 9: a run nested 500 deep": _ingest(items=(Item("new"), Item("deep", 0, "dict", 0, 499))),
    "issue 9: application/data": _ingest(content_type=Field(POISON, "application/data")),
    "issue 9: application/text": _ingest(content_type=Field(POISON, "application/text")),
    "issue 9: not the triple": _ingest(body=("json", {"payloads": []}), faults=("body",)),
    "issue 9: a 20 KB string as args": _ingest(
        shape="args", args=["x" * 20_000], faults=("shape",)
    ),
    "issue 9: args=[42]": _ingest(shape="args", args=[42], faults=("shape",)),
    "issue 9: args=[null]": _ingest(shape="args", args=[None], faults=("shape",)),
    "headers 1,000 deep": _ingest(("x-fz-deep", Field(POISON, Deep(1000)))),
    "a body of 2,000 brackets": _ingest(body=("brackets", 2000), faults=("body",)),
    # Raised after Celery reserved a pool slot: one message stopped a -c 1
    # worker from running anything (alive, consuming, idle for good).
    "stamped_headers 42": _ingest(
        ("stamped_headers", Field(POISON, 42)), faults=("stamped_headers",)
    ),
    # Passed the door, then failed in the task on the Redis key: a traceback, no dead letter.
    "learn of an agent id with a lone surrogate": Recipe(
        "learn",
        LEARN_QUEUE,
        (("task", Field(GOOD, LEARN_TASK)), ("id", Field(GOOD, "case"))),
        shape="args",
        args=["agent-\ud800"],
        faults=("shape",),
    ),
    # Celery could not convert it, logged an error and dropped the message and its runs.
    "an eta Celery cannot convert": _ingest(
        ("eta", Field(EITHER, "0001-01-01T00:00:00+14:00")), faults=("eta",)
    ),
    # Celery discarded it as expired: its runs gone with one INFO line.
    "an expired ingest message": _ingest(
        ("expires", Field(POISON, "2001-01-01T00:00:00+00:00")), faults=("expires",)
    ),
    # Decoded to None, which the guard read as "already dead-lettered": vanished.
    "the Redis list entry null": Recipe(
        "raw", INGEST_QUEUE, body=("raw json", None), faults=("raw entry",)
    ),
}


# ------------------------------------------------------------------ oracle


@dataclass
class Sent:
    """A materialized message and what it must get."""

    recipe: Recipe
    verdict: str
    why: list[str]
    task_id: str | None
    new_runs: list[dict[str, Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    conflicts: int = 0
    size: int = 0

    def summary(self) -> str:
        return (
            f"{self.verdict} ({', '.join(self.why) or 'well-formed'}) {self.recipe.target}"
            f" id={self.task_id!r} size={self.size} new={len(self.new_runs)}"
            f" refused={self.refused} conflicts={self.conflicts}"
        )


@dataclass
class Oracle:
    """What the test itself sent and decided, never read back from the worker."""

    next_run: int = 1_000_000
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)  # run id -> run
    by_agent: dict[str, set[str]] = field(default_factory=dict)
    poison: int = 0
    item_dead: int = 0
    conflicts: int = 0
    tally: Counter[str] = field(default_factory=Counter)
    cases: Counter[str] = field(default_factory=Counter)  # messages per fault drawn

    def fresh_run(self, agent: int) -> dict[str, Any]:
        self.next_run += 1
        return good_run(self.next_run, agent=LONG.get(AGENTS[agent], AGENTS[agent]))

    def commit(self, sent: Sent) -> None:
        for run in sent.new_runs:
            self.stored[run["id"]] = run
            self.by_agent.setdefault(run["agent_id"], set()).add(run["id"])
        self.item_dead += len(sent.refused) + sent.conflicts
        self.conflicts += sent.conflicts
        self.tally["runs stored"] += len(sent.new_runs)
        self.tally["items dead-lettered"] += len(sent.refused) + sent.conflicts


def encode_item(value: Any, form: str) -> Any:
    if form == "dict":
        return value
    if isinstance(value, str):  # already JSON text (a violation given as text)
        return value
    if form == "pretty":
        return json.dumps(value, indent=2, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=form == "ascii")


def materialize(recipe: Recipe, oracle: Oracle) -> tuple[Sent, bytes, dict[str, Any]]:
    """The body bytes, the headers, and the verdict of `recipe`, by this file's rules."""
    why: list[str] = []
    verdict = GOOD
    headers: dict[str, Any] = {}
    for name, fld in recipe.headers:
        if isinstance(fld.value, Deep):
            headers[name] = nested(fld.value.levels)
        elif fld.value is not MISSING:
            headers[name] = fld.value
        if fld.verdict != GOOD:
            why.append(f"{fld.verdict} {name}={str(fld.value)[:60]!r}")
        verdict = worst(verdict, fld.verdict)
    task_id = None
    if dict(recipe.headers)["id"].verdict == GOOD:
        task_id = f"{headers['id']}:{uuid.uuid4().hex}"  # findable in the log, unique
        headers["id"] = task_id
    for name, fld in (("content type", recipe.content_type), ("encoding", recipe.encoding),
                      ("embed", recipe.embed)):  # fmt: skip
        if fld.verdict != GOOD:
            why.append(f"{fld.verdict} {name}={str(fld.value)[:60]!r}")
        verdict = worst(verdict, fld.verdict)
    sent = Sent(recipe, verdict, why, task_id)

    # The arguments, and for ingest the payload list with what each item must get.
    payloads: list[Any] = []
    pending: dict[str, dict[str, Any]] = {}
    for item in recipe.items:
        known = list(oracle.stored.values()) + list(pending.values())
        kind = item.kind if known or item.kind not in ("dup", "conflict") else "new"
        if kind in ("new", "dup", "conflict"):
            if kind == "new":
                run = oracle.fresh_run(item.agent)
                pending[run["id"]] = run
                sent.new_runs.append(run)
            elif kind == "dup":
                run = known[item.ref % len(known)]
            else:
                oracle.next_run += 1
                run = {**known[item.ref % len(known)], "x_conflict": oracle.next_run}
                sent.conflicts += 1
            encoded = encode_item(run, item.form)
            if isinstance(encoded, str) and len(encoded.encode()) > MAX_RUN_BYTES - 2048:
                # A run sent as text is measured as sent: a stored run with a
                # deep or big field, pretty-printed, may pass the limit that way.
                encoded = encode_item(run, "text")
                assert len(encoded.encode()) < MAX_RUN_BYTES - 2048
            payloads.append(encoded)
        elif kind == "violation":
            payloads.append(encode_item(violations(oracle.next_run)[item.value], item.form))
            sent.refused.append(f"violation: {item.value}")
        elif kind == "junk":
            payloads.append(item.value)
            sent.refused.append(f"junk {str(item.value)[:40]!r}")
        elif kind == "deep":
            run = {**oracle.fresh_run(item.agent), "x_deep": nested(item.value)}
            # Pretty-printed, 100 levels of indentation alone pass the size
            # limit (a run sent as text is measured as sent): not this case.
            form = "text" if item.form == "pretty" else item.form
            with deep_recursion():
                levels = json_depth(run)
                payloads.append(encode_item(run, form))
            if levels > MAX_JSON_DEPTH:
                sent.refused.append(f"run nested {levels} deep")
            else:
                pending[run["id"]] = run
                sent.new_runs.append(run)
        else:  # big
            run = {**oracle.fresh_run(item.agent), "x_big": "x" * item.value}
            encoded = encode_item(run, item.form)
            payloads.append(encoded)
            # Encoded, and as sent when sent as text: never near the limit.
            sizes = [len(json.dumps(run, ensure_ascii=False, separators=(",", ":")).encode())]
            if isinstance(encoded, str):
                sizes.append(len(encoded.encode()))
            size = max(sizes)
            assert all(abs(n - MAX_RUN_BYTES) > 2048 for n in sizes), sizes
            assert (min(sizes) > MAX_RUN_BYTES) == (size > MAX_RUN_BYTES), sizes
            if size > MAX_RUN_BYTES:
                sent.refused.append(f"run of {size} bytes")
            else:
                pending[run["id"]] = run
                sent.new_runs.append(run)

    args: Any
    kwargs: Any = {}
    if recipe.target == "ingest":
        args = [payloads]
    elif recipe.target == "learn":
        args = [LONG.get(recipe.args, recipe.args) if isinstance(recipe.args, str) else None]
    else:
        args = []
    if recipe.shape == "kwargs" and recipe.target != "discover" and "shape" not in recipe.faults:
        name = "payloads" if recipe.target == "ingest" else "agent_id"
        args, kwargs = [], {name: args[0]}
    elif "shape" in recipe.faults:
        why.append(f"poison arguments {recipe.shape}: {str(recipe.args)[:60]!r}")
        sent.verdict = POISON
        if recipe.shape == "args":
            args = recipe.args
        elif recipe.shape == "kwargs":
            args, kwargs = [], recipe.args
        elif recipe.shape == "missing":
            args = []
        elif recipe.shape == "extra arg":
            args = [*args, recipe.args]
        elif recipe.shape == "extra kwarg":
            kwargs = recipe.args
        elif recipe.shape == "both":
            kwargs = {"payloads": payloads}
        elif recipe.shape == "kwargs not an object":
            kwargs = recipe.args
    triple = [args, kwargs, recipe.embed.value]

    kind, value = recipe.body
    with deep_recursion():
        if kind == "triple":
            text = json.dumps(
                triple,
                ensure_ascii=recipe.ensure_ascii,
                separators=(",", ":") if recipe.compact else None,
            )
            body = text.encode("utf-8", "surrogatepass")
            body_depth = json_depth(triple)
        else:
            sent.verdict = POISON
            why.append(f"poison body {kind}")
            body_depth = 0
            if kind == "json":
                body = json.dumps(value).encode()
            elif kind == "bytes":
                body = value
            elif kind == "invalid utf-8":
                body = json.dumps(triple).encode()
                body = body[:2] + value + body[2:]
            elif kind == "brackets":
                body = b"[" * value + b"]" * value
                body_depth = value
            else:  # huge
                body = json.dumps([["h" * value], {}, {}]).encode()
    sent.size = len(body)
    if len(body) > MAX_MESSAGE_BYTES:
        sent.verdict = POISON
        why.append(f"poison body of {len(body)} bytes")
    if not utf8_ok(body):
        sent.verdict = POISON
        why.append("poison body not UTF-8")
    if body_depth > BODY_DEPTH_LIMIT:
        sent.verdict = POISON
        why.append(f"poison body nested {body_depth} deep")
    if sent.verdict == POISON:
        sent.new_runs, sent.refused, sent.conflicts = [], [], 0
    return sent, body, headers


def raw_entry(recipe: Recipe) -> bytes:
    kind, value = recipe.body
    if kind == "raw":
        return bytes(value)
    if kind == "raw json":
        return json.dumps(value).encode()
    return b'{"body": "e30=", "x": ' + b"[" * value + b"]" * value + b"}"  # raw deep


# --------------------------------------------------------------- the worker


@dataclass
class Door:
    """The worker under test, its broker and its Redis, seen from outside."""

    store: Store
    worker: Worker
    pid: int
    channel: Any
    broker_prefix: str
    log_at: int = 0
    history: list[str] = field(default_factory=list)

    def counters(self) -> Counter[str]:
        return Counter(self.store.counters())

    def read_log(self) -> str:
        with self.worker.log.open("rb") as log:
            log.seek(self.log_at)
            data = log.read()
        self.log_at += len(data)
        return data.decode("utf-8", "replace")

    def alive(self) -> bool:
        return self.worker.proc.pid == self.pid and self.worker.proc.poll() is None

    def publish(self, recipe: Recipe, body: bytes, headers: dict[str, Any]) -> None:
        if recipe.target == "raw":
            self.store.client.lpush(self.broker_prefix + recipe.queue, body)
            return
        message = self.channel.prepare_message(
            body, 0, recipe.content_type.value, recipe.encoding.value, headers, {}
        )
        with deep_recursion():
            self.channel.basic_publish(message, "", recipe.queue)

    def outcome(self, sent: Sent, before: Counter[str]) -> tuple[str, str]:
        """("poisoned" | "processed" | what went wrong, the worker's log meanwhile)."""
        deadline = time.monotonic() + MESSAGE_TIMEOUT_S
        log = ""
        while True:
            log += self.read_log()
            if self.counters()["poison_messages"] > before["poison_messages"]:
                return "poisoned", log
            if sent.task_id is not None:
                tag = f"[{sent.task_id}]"
                if f"{tag} succeeded" in log:
                    return "processed", log
                if f"{tag} raised" in log or f"{tag} retry" in log:
                    return "the task failed", log
                if "Discarding revoked task: " in log and tag in log:
                    return "dropped as revoked or expired", log
            if "ERROR/" in log or "CRITICAL/" in log:
                return "an error in the worker's log", log
            if not self.alive():
                return "the worker died", log
            if time.monotonic() > deadline:
                return f"nothing within {MESSAGE_TIMEOUT_S:.0f} s (worker wedged?)", log
            time.sleep(0.01)

    def probe(self) -> str:
        """'' if the worker still RUNS tasks (a learn of an agent without runs), else its log.

        A poison message can leave the worker alive but idle for good (it
        once kept a pool slot reserved): that must show on the message
        that did it, not on whichever comes next.
        """
        task_id = f"probe:{uuid.uuid4().hex}"
        body = json.dumps([["fz-probe"], {}, {}]).encode()
        headers = {"task": LEARN_TASK, "id": task_id}
        message = self.channel.prepare_message(body, 0, JSON, "utf-8", headers, {})
        self.channel.basic_publish(message, "", LEARN_QUEUE)
        deadline = time.monotonic() + MESSAGE_TIMEOUT_S
        log = ""
        while time.monotonic() < deadline:
            log += self.read_log()
            if f"[{task_id}] succeeded" in log:
                return ""
            time.sleep(0.01)
        return log or "(nothing logged)"


def judge(door: Door, oracle: Oracle, sent: Sent, before: Counter[str]) -> None:
    """Per message: the outcome the oracle allows, and exactly its effects."""
    got, log = door.outcome(sent, before)
    context = (
        f"\nmessage: {sent.summary()}\nrecipe: {sent.recipe!r}"[:3000]
        + "\nlast messages before it:\n  "
        + "\n  ".join(door.history[-8:])
        + f"\nworker log meanwhile:\n{log[-4000:]}"
    )
    allowed = {GOOD: ("processed",), POISON: ("poisoned",), EITHER: ("processed", "poisoned")}
    assert got in allowed[sent.verdict], f"expected {sent.verdict}, got: {got}{context}"
    assert door.alive(), f"worker process {door.pid} is gone{context}"
    if got == "poisoned":
        sent.new_runs, sent.refused, sent.conflicts = [], [], 0
        oracle.poison += 1
    oracle.commit(sent)
    oracle.tally[got] += 1
    oracle.cases.update(sent.recipe.faults or ["well-formed"])
    if got == "poisoned":
        stuck = door.probe()
        assert not stuck, f"the worker stopped running tasks{context}\nthen:\n{stuck[-3000:]}"
    after = door.counters()
    dead = 1 if got == "poisoned" else len(sent.refused) + sent.conflicts
    delta = {k: after[k] - before[k] for k in ("poison_messages", "dead_letters", "runs_ingested",
                                             "conflicting_duplicates")}  # fmt: skip
    want = {
        "poison_messages": int(got == "poisoned"),
        "dead_letters": dead,
        "runs_ingested": len(sent.new_runs),
        "conflicting_duplicates": sent.conflicts,
    }
    assert delta == want, f"counters moved by {delta}, expected {want}{context}"
    if dead:
        stage = "message" if got == "poisoned" else "ingest"
        entries = [json.loads(e) for e in door.store.dead_letters(-min(dead, DEAD_LETTER_CAP))]
        for entry in entries:
            assert entry["stage"] == stage, (entry["stage"], entry["reason"], context)
            assert entry["reason"] and "\n" not in entry["reason"], (entry["reason"], context)
            assert bool(entry.get("raw_truncated")) == (entry["raw_bytes"] > RAW_MAX_BYTES), entry
            assert len(entry["raw"].encode()) <= RAW_ESCAPE_FACTOR * RAW_MAX_BYTES, context
        if got == "poisoned" and sent.recipe.target != "raw":
            assert entries[-1]["raw_bytes"] >= min(sent.size, 1), (entries[-1], context)


# -------------------------------------------------------------------- test


def _worker_settings(prefix: str) -> Settings:
    return load_settings(_env_file=None, redis_url=REDIS_URL, key_prefix=prefix)


def _root_count(store: Store, agent: str) -> int:
    raw = store.client.get(store.keys.accumulators(agent))
    assert raw is not None, f"no accumulators for {agent!r}"
    return int(json.loads(raw)["nodes"][""]["remaining_calls"]["1"]["count"])


@pytest.mark.slow
def test_no_broker_message_crashes_loses_or_escapes_the_worker(
    real_store: Store, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    prefix = real_store.keys.prefix
    cfg = _worker_settings(prefix)
    env = worker_env(
        prefix,
        REDIS_URL,
        max_message_bytes=MAX_MESSAGE_BYTES,
        max_run_bytes=MAX_RUN_BYTES,
        max_json_depth=MAX_JSON_DEPTH,
        dead_letter_raw_max_bytes=RAW_MAX_BYTES,
        dead_letter_max_entries=DEAD_LETTER_CAP,
        metrics_port=0,
        learn_linger_s=0,
        discover_interval_s=0,
    )
    oracle = Oracle()
    conn = Connection(REDIS_URL, transport_options=transport_options(cfg))
    try:
        with celery_workers(env, tmp_path) as workers:
            worker = workers.start("fuzz-messages", concurrency=1)
            door = Door(real_store, worker, worker.proc.pid, conn.channel(), broker_key_prefix(cfg))
            door.read_log()  # the banner

            def one_message(recipe: Recipe) -> None:
                # No shrinking: it would re-send messages to a worker that a
                # failure may have wedged; a failure names its message and the
                # ones before it instead.
                before = door.counters()
                if recipe.target == "raw":
                    sent = Sent(recipe, POISON, ["poison raw entry"], None)
                    body, headers = raw_entry(recipe), dict[str, Any]()
                else:
                    sent, body, headers = materialize(recipe, oracle)
                door.publish(recipe, body, headers)
                judge(door, oracle, sent, before)
                door.history.append(sent.summary()[:300])

            run = given(recipe=recipes())(one_message)
            for case in REPRODUCED.values():
                run = example(recipe=case)(run)
            settings(
                max_examples=max(EXAMPLES, 1),
                deadline=None,
                # ADAPTIVE_FUZZ_MESSAGES=0: the reproduced cases alone.
                phases=(Phase.explicit, Phase.reuse, Phase.generate)[: 3 if EXAMPLES else 1],
                suppress_health_check=list(HealthCheck),
            )(run)()

            expected = {agent: len(ids) for agent, ids in oracle.by_agent.items()}
            wait_until(
                lambda: all(
                    real_store.cursor(a).learned == real_store.cursor(a).index_length == n
                    for a, n in expected.items()
                ),
                60,
                "every stored run to be learned",
                lambda: f": {[(a[:20], real_store.cursor(a)) for a in expected]}",
            )
            queues = [door.broker_prefix + q for q in QUEUES]

            def settled() -> bool:
                pipe = real_store.client.pipeline()
                for q in queues:
                    pipe.llen(q)
                pipe.hlen(door.broker_prefix + "unacked")
                return sum(pipe.execute()) == 0

            wait_until(settled, 20, "no message queued or unacked")
            time.sleep(0.3)
            assert settled()
            assert door.alive(), "the worker's main process is not the one that started"
            log = worker.log.read_text(errors="replace")
    finally:
        conn.release()

    for bad in ("Unrecoverable error", "Traceback", "ERROR/", "CRITICAL/", "Logging error",
                "Connection to broker lost"):  # fmt: skip
        assert bad not in log, f"{bad!r} in the worker's log:\n{log[log.find(bad) - 2000 :][:6000]}"

    # Every valid run stored and learned exactly once; nothing else stored.
    assert set(real_store.agent_ids()) == set(expected)
    for agent, ids in oracle.by_agent.items():
        index = real_store.run_ids(agent)
        assert len(index) == len(set(index)) == len(ids) and set(index) == ids, agent[:40]
        cursor = real_store.cursor(agent)
        assert cursor.learned == cursor.index_length == len(ids)
        assert _root_count(real_store, agent) == len(ids)
    counters = Counter(real_store.counters())
    total = sum(expected.values())
    assert counters["runs_ingested"] == counters["runs_learned"] == total
    # Every poison message and every bad item dead-lettered exactly once,
    # counted by stage: `poison_messages` counts stage `message` alone.
    assert counters["poison_messages"] == oracle.poison
    assert counters["dead_letters"] - counters["poison_messages"] == oracle.item_dead
    assert counters["conflicting_duplicates"] == oracle.conflicts
    # The list is capped, trims are counted, and its memory is bounded.
    length = real_store.dead_letter_count()
    assert length == min(DEAD_LETTER_CAP, counters["dead_letters"])
    assert counters["dead_letters_trimmed"] == counters["dead_letters"] - length
    memory = int(real_store.client.memory_usage(real_store.keys.dead_letters(), samples=0) or 0)
    bound = DEAD_LETTER_CAP * (RAW_ESCAPE_FACTOR * RAW_MAX_BYTES + DEAD_LETTER_OVERHEAD)
    assert memory <= bound, (memory, bound)

    cases = sum(oracle.tally[k] for k in ("processed", "poisoned"))
    summary = {
        "messages": cases,
        "crashes": 0,
        **oracle.tally,
        "dead letters": counters["dead_letters"],
        "dead-letter list bytes": memory,
        "messages per fault": dict(sorted(oracle.cases.items())),
    }
    record_property("fuzz_messages", json.dumps(summary))
    print(f"\nbroker-message fuzz: {json.dumps(summary)}")
    # The draw must have exercised both sides of the door.
    assert oracle.tally["poisoned"] >= EXAMPLES // 5 and oracle.tally["processed"] >= EXAMPLES // 5
    # Runs stored vary from draw to draw (58-94 of 400 messages seen): a tenth
    # of the messages is a floor that still proves runs got through.
    assert oracle.tally["runs stored"] >= EXAMPLES // 10
    assert oracle.tally["items dead-lettered"] >= EXAMPLES // 10
