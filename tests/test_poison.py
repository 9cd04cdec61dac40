"""Poison messages: no message a publisher can put in a queue stops a worker.

Two layers:

- unit tests of the door's checks (worker/guard.py) on kombu Message objects
  built here, including messages made by Celery's own producer, which must
  pass untouched;
- real `celery worker` processes (tests/pipeline.py), one on Redis and one on
  RabbitMQ (a vhost of its own): each poison message reproduced on the old
  code (it killed the worker's main process, or a KeyError made it reconnect
  and lose the message) is published raw, then a good run; the worker must
  still be the same process, the good run learned, exactly one dead letter
  per poison message with a reason naming the problem, and nothing left in
  the queue or unacked.
"""

from __future__ import annotations

import bz2
import inspect
import json
import os
import pickle
import subprocess
import sys
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from amqp.serialization import dumps as amqp_dumps
from hypothesis import given, settings
from hypothesis import strategies as st
from kombu import Connection, Exchange, Producer
from kombu.message import Message
from kombu.serialization import dumps as kombu_dumps

from adaptive_worker_client import RunClient
from bench.workload import synthetic_runs
from storage.store import Store
from tasks import jobs
from tests.conftest import AMQP_URL, REDIS_URL, needs_rabbitmq
from tests.hostile import json_depth
from tests.pipeline import Worker, celery_workers, wait_until, worker_env
from worker import guard
from worker.celery import (
    DISCOVER_TASK,
    INGEST_QUEUE,
    INGEST_TASK,
    LEARN_QUEUE,
    LEARN_TASK,
    REBUILD_TASK,
    app,
    broker_key_prefix,
    create_app,
    transport_options,
)
from worker.guard import MAX_MESSAGE_DEPTH, Poison
from worker.settings import Settings, load_settings

JSON = "application/json"


# ------------------------------------------------------------------ helpers


class FakeChannel:
    """Records how a message was settled (what kombu's Message.ack/reject call)."""

    no_ack_consumers = None

    def __init__(self) -> None:
        self.acked: list[str] = []
        self.rejected: list[tuple[str, bool]] = []

    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        self.acked.append(delivery_tag)

    def basic_reject(self, delivery_tag: str, requeue: bool = False) -> None:
        self.rejected.append((delivery_tag, requeue))


def message(
    body: Any,
    *,
    task: str = INGEST_TASK,
    content_type: str | None = JSON,
    encoding: str | None = "utf-8",
    headers: Any = None,
    **extra_headers: Any,
) -> Message:
    """A received message as kombu hands it to the consumer (a non-text `body` is JSON-encoded)."""
    if not isinstance(body, bytes | str):
        body = json.dumps(body)
    if headers is None:
        headers = {"task": task, "id": str(uuid.uuid4()), **extra_headers}
    return Message(
        body=body,
        delivery_tag="tag-1",
        content_type=content_type,
        content_encoding=encoding,
        delivery_info={"exchange": INGEST_QUEUE, "routing_key": INGEST_QUEUE},
        properties={},
        headers=headers,
        channel=FakeChannel(),
    )


def _replace_headers(msg: Message, headers: Any) -> Message:
    msg.headers = headers
    return msg


def check(msg: Message, max_bytes: int = 1 << 20, max_depth: int = 128) -> str:
    return guard.check_message(msg, max_bytes=max_bytes, max_depth=max_depth)


def nested(depth: int) -> Any:
    """A JSON value exactly `depth` containers deep (a scalar is depth 0)."""
    value: Any = "leaf"
    for i in range(depth):
        value = {"k": value} if i % 2 else [value]
    return value


# kombu's JSON decoder turns this object into a uuid.UUID.
MARKER = {"__type__": "uuid", "__value__": "3f1c7e0e-0000-4000-8000-000000000001"}


def run_json(agent: str, seed: int) -> str:
    return json.dumps(next(synthetic_runs(1, agent_id=agent, seed=seed)))


# ---------------------------------------------------------- unit: the checks

RUN = run_json("unit-agent", 1)

# name -> (message, a fragment the reason must contain)
BAD_MESSAGES: dict[str, tuple[Callable[[], Message], str]] = {
    "args=[42]": (lambda: message([[42], {}, {}]), "payloads: Input should be a valid list"),
    "args=[null]": (lambda: message([[None], {}, {}]), "got null"),
    "a string instead of the payload list": (
        lambda: message([["x" * 20_000], {}, {}]),
        "got a string of 20000 characters",
    ),
    "args a string": (lambda: message(["abc", {}, {}]), "task args are a string"),
    "missing argument": (lambda: message([[], {}, {}]), "payloads: Field required"),
    "extra argument": (lambda: message([[[RUN], "more"], {}, {}]), "takes 1 positional"),
    "unknown keyword": (
        lambda: message([[], {"payloads": [RUN], "sneaky": 1}, {}]),
        "sneaky: Extra inputs are not permitted",
    ),
    "argument twice": (lambda: message([[[RUN]], {"payloads": [RUN]}, {}]), "given both"),
    "learn with a number": (lambda: message([[42], {}, {}], task=LEARN_TASK), "agent_id"),
    "sweep with an argument": (lambda: message([[1], {}, {}], task=DISCOVER_TASK), "takes 0"),
    "unknown task": (lambda: message([[], {}, {}], task="adaptive.nope"), "unknown task"),
    "Celery's own task": (lambda: message([[], {}, {}], task="celery.chord_unlock"), "unknown"),
    "protocol 1": (
        lambda: message(
            {"task": INGEST_TASK, "id": "p1", "args": [[RUN]], "kwargs": {}}, headers={}
        ),
        "no task header",
    ),
    # kombu's Message refuses such headers itself; a transport could still hand them on.
    "headers not a table": (lambda: _replace_headers(message([[[RUN]], {}, {}]), ["x"]), "table"),
    "body an object": (lambda: message({"args": [[RUN]]}), "body is an object, not the task"),
    "body a number": (lambda: message(42), "body is a number"),
    "body of two": (lambda: message([[[RUN]], {}]), "body is a list of 2"),
    "kwargs a list": (lambda: message([[[RUN]], [], {}]), "kwargs are a list"),
    "a callback": (
        lambda: message([[[RUN]], {}, {"callbacks": [{"task": LEARN_TASK}]}]),
        "callbacks are not accepted",
    ),
    "pickle": (
        lambda: message(
            pickle.dumps(([[RUN]], {}, {})),
            content_type="application/x-python-serialize",
            encoding="binary",
        ),
        "content type 'application/x-python-serialize' refused",
    ),
    "application/data": (
        lambda: message(b"raw", content_type="application/data", encoding="binary"),
        "content type 'application/data' refused",
    ),
    "application/text": (
        lambda: message("raw", content_type="application/text"),
        "content type 'application/text' refused",
    ),
    "no content type": (lambda: message(b"[[], {}, {}]", content_type=None), "content type None"),
    "latin-1": (lambda: message(b"[[], {}, {}]", encoding="latin-1"), "encoding 'latin-1'"),
    "invalid UTF-8": (lambda: message(b'[["\xff\xfe"], {}, {}]'), "not valid UTF-8"),
    "not JSON": (lambda: message(b"[[[{"), "does not decode"),
    "body too big": (lambda: message([["x" * (2 << 20)], {}, {}]), "the limit is 1048576"),
    "body 5,000 deep (too deep to decode)": (
        lambda: message(b"[[[" + b"[" * 5000 + b"]" * 5000 + b"]], {}, {}]"),
        "more than 300 levels",
    ),
    "run nested 500 deep": (lambda: message([[[nested(500)]], {}, {}]), "more than 300 levels"),
    "headers nested 200 deep": (
        lambda: message([[[RUN]], {}, {}], deep=nested(200)),
        "headers nested deeper than 128",
    ),
    "id a list": (
        lambda: message([[[RUN]], {}, {}], headers={"task": INGEST_TASK, "id": [1]}),
        "id",
    ),
    "eta not a date": (lambda: message([[[RUN]], {}, {}], eta="tomorrow"), "ISO 8601"),
    "time limit a string": (lambda: message([[[RUN]], {}, {}], timelimit=["5", None]), "timelimit"),
    "huge argsrepr": (lambda: message([[[RUN]], {}, {}], argsrepr="x" * 10_000), "argsrepr"),
    "compressed": (
        lambda: message(b"x", **{guard.COMPRESSION_REFUSED: "application/x-gzip"}),
        "compressed body",
    ),
}


@pytest.mark.parametrize("name", list(BAD_MESSAGES))
def test_each_bad_message_is_refused_with_a_reason_naming_the_problem(name: str) -> None:
    build, fragment = BAD_MESSAGES[name]
    with pytest.raises(Poison) as caught:
        check(build())
    reason = str(caught.value)
    assert fragment in reason, reason
    assert "\n" not in reason and len(reason) <= guard.MAX_REASON


def test_a_kombu_type_marker_that_is_no_date_is_plain_json_not_a_decode_error() -> None:
    """kombu's decoder raised on this body, so the whole message was refused;
    decoded as plain JSON (worker/body_json.py) it is one run, for ingest to judge."""
    body = '[[[{"__type__": "datetime", "__value__": "never"}]], {}, {}]'
    assert check(message(body)) == INGEST_TASK


def test_inflate_stops_at_the_message_limit() -> None:
    """zlib bodies (what agents send) inflate up to the limit and not a byte past it."""
    body = json.dumps([[["r" * 1000]], {}, {}]).encode()
    previous = guard._inflate_limit
    try:
        guard.set_inflate_limit(len(body))
        assert guard.inflate(zlib.compress(body)) == body
        guard.set_inflate_limit(len(body) - 1)
        with pytest.raises(guard.Poison, match="inflates past"):
            guard.inflate(zlib.compress(body))
        guard.set_inflate_limit(len(body))
        with pytest.raises(guard.Poison, match="not one complete"):
            guard.inflate(zlib.compress(body)[:-4])
    finally:
        guard.set_inflate_limit(previous)


def test_kombu_inflates_zlib_bodies_only_through_the_bounded_decoder() -> None:
    """The worker registers `inflate` for kombu's zlib, so a Message never holds
    more than the limit, whatever its headers say."""
    bomb = zlib.compress(b"\0" * (4 << 20))
    previous = guard._inflate_limit
    try:
        guard.set_inflate_limit(1 << 20)
        msg = Message(body=bomb, headers={"compression": guard.ACCEPTED_COMPRESSION})
        assert msg.errors and "inflates past" in str(msg.errors[0][1])
        assert len(msg.body) == len(bomb)  # left compressed
    finally:
        guard.set_inflate_limit(previous)


def _celery_message(name: str, args: list[Any], **options: Any) -> Message:
    """A message exactly as Celery's own producer makes it, after a broker round trip."""
    made = app.amqp.as_task_v2(str(uuid.uuid4()), name, args=args, kwargs={}, **options)
    content_type, encoding, body = kombu_dumps(made.body, serializer="json")
    headers = json.loads(json.dumps(made.headers, default=str))
    return message(body, content_type=content_type, encoding=encoding, headers=headers)


@pytest.mark.parametrize(
    ("name", "args", "options"),
    [
        (INGEST_TASK, [[RUN, RUN]], {"argsrepr": "<2 runs>"}),
        (INGEST_TASK, [[RUN, 42, None, {"a": 1}]], {}),  # bad items: the ingest check's
        (INGEST_TASK, [[json.dumps(nested(200))]], {}),  # too deep, but only as text
        (INGEST_TASK, [[nested(200)]], {}),  # too deep for a run, one dead letter of its own
        (LEARN_TASK, ["agent-1"], {"countdown": 0.25}),
        (REBUILD_TASK, ["agent::with:colons"], {"time_limit": 30, "soft_time_limit": 20}),
        (DISCOVER_TASK, [], {"expires": 30.0}),
    ],
)
def test_messages_from_celerys_own_producer_pass(
    name: str, args: list[Any], options: dict[str, Any]
) -> None:
    assert check(_celery_message(name, args, **options)) == name


def test_every_task_declares_a_shape_matching_its_signature() -> None:

    ours = {name: t for name, t in app.tasks.items() if name.startswith("adaptive.")}
    assert ours and set(ours) == set(guard.ARG_SHAPES)
    for name, task in ours.items():
        params = list(inspect.signature(task.run).parameters)
        assert list(guard.ARG_SHAPES[name].model_fields) == params, name
    assert jobs.IngestArgs is guard.ARG_SHAPES[INGEST_TASK]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab'),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text('[]{}"\\a'), inner, max_size=3)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(value=json_values, limit=st.integers(min_value=0, max_value=8))
def test_text_depth_matches_the_parsed_depth(value: Any, limit: int) -> None:
    """Brackets and quotes inside strings never count; escaped quotes do not end a string."""
    raw = json.dumps(value).encode()
    assert guard.text_too_deep(raw, limit) == (json_depth(value) > limit)
    assert (guard.value_depth(value, limit) > limit) == (json_depth(value) > limit)


def test_depth_checks_never_recurse() -> None:
    deep = b"[" * 200_000 + b"]" * 200_000
    assert guard.text_too_deep(deep, MAX_MESSAGE_DEPTH)
    assert guard.text_too_deep(b"[" * 50, 10)  # unbalanced: refused, not miscounted
    value: Any = []
    for _ in range(100_000):
        value = [value]
    assert guard.value_depth(value, 128) > 128
    # Megabytes with brackets everywhere, also inside strings; 7 levels:
    # [ [ {a: [ "...", [ 1, {b: [ 2 ] } ] ] } ], {}, {} ]
    big = json.dumps([[{"a": ["[{" * 50, [1, {"b": [2]}]]}] * 20_000, {}, {}]).encode()
    assert not guard.text_too_deep(big, 7)
    assert guard.text_too_deep(big, 6)
    # Objects and arrays alternating: each counts as a level of its own.
    assert guard.text_too_deep(json.dumps(nested(200)).encode(), 128)
    assert not guard.text_too_deep(json.dumps(nested(128)).encode(), 128)


def test_a_deep_amqp_header_table_decodes_once_the_guard_is_installed() -> None:
    from amqp import serialization
    from amqp.spec import Basic

    with _recursion_limit(50_000):
        table = amqp_dumps("F", [{"deep": nested(5_000)}])
    buf = b"\x20\x00" + table  # property flags: headers only
    with pytest.raises(RecursionError):  # py-amqp as shipped
        serialization.decode_properties_basic(buf, 0)
    guard.install_amqp_header_guard()
    guard.install_amqp_header_guard()  # idempotent
    before = sys.getrecursionlimit()
    props, _ = serialization.PROPERTY_CLASSES[Basic.CLASS_ID](buf, 0)
    assert guard.value_depth(props["application_headers"], 128) > 128
    assert sys.getrecursionlimit() == before  # raised for the decode only


@contextmanager
def _recursion_limit(limit: int) -> Iterator[None]:
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(limit)
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ([], "envelope is a list"),
        ({"body": "x"}, "properties: Field required"),
        ({"properties": {"delivery_tag": ["t"], "delivery_info": {}}}, "delivery_tag"),
        (
            {"properties": {"delivery_tag": "t", "delivery_info": {"exchange": "e"}}},
            "routing_key: Field required",
        ),
        (
            {
                "properties": {
                    "delivery_tag": "t",
                    "body_encoding": "rot13",
                    "delivery_info": {"exchange": "e", "routing_key": "r"},
                }
            },
            "body_encoding",
        ),
        (
            {
                "headers": [1],
                "properties": {
                    "delivery_tag": "t",
                    "delivery_info": {"exchange": "", "routing_key": "r"},
                },
            },
            "headers",
        ),
    ],
)
def test_redis_envelopes_kombu_cannot_unpack_are_refused(raw: Any, fragment: str) -> None:
    with pytest.raises(Poison, match=fragment):
        guard.check_envelope(raw)


# ------------------------------------------------- unit: dead letter and ack


def test_a_broadcast_too_deep_to_decode_is_dead_lettered_and_dropped(
    real_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kombu decodes pub/sub data catching only TypeError/ValueError: not RecursionError."""
    monkeypatch.setattr(guard, "store_factory", lambda: real_store)
    channel = guard.GuardedRedisChannel.__new__(guard.GuardedRedisChannel)
    deep = b'{"m": "bc-1", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    fine = b'{"m": "bc-2", "x": [[1]]}'
    payload = channel._handle_message(None, [b"message", b"/0.celery.pidbox", deep])
    assert payload["data"] is None  # kombu skips a message without data
    payload = channel._handle_message(None, [b"message", b"/0.celery.pidbox", fine])
    assert payload["data"] == fine
    [entry] = [json.loads(d) for d in real_store.dead_letters()]
    assert "more than 300 levels" in entry["reason"] and "bc-1" in entry["raw"]


def test_a_poison_message_is_one_dead_letter_and_acked(
    real_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guard, "store_factory", lambda: real_store)
    msg = message([["x" * 20_000], {}, {}])
    with pytest.raises(Poison) as caught:
        check(msg)
    guard.quarantine(msg, str(caught.value))
    assert msg.channel.acked == ["tag-1"] and msg.channel.rejected == []
    [entry] = [json.loads(d) for d in real_store.dead_letters()]
    assert entry["stage"] == "message"
    assert entry["task"] == INGEST_TASK and entry["task_id"] == msg.headers["id"]
    assert "got a string of 20000 characters" in entry["reason"]
    assert entry["raw"].startswith('[["xxx')
    assert real_store.counters()["poison_messages"] == 1


def test_a_poison_message_is_requeued_while_redis_cannot_record_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    down = Store(redis.Redis(port=1, socket_connect_timeout=0.2), "down:")
    monkeypatch.setattr(guard, "store_factory", lambda: down)
    monkeypatch.setattr(guard, "REQUEUE_PAUSE_S", 0.0)
    msg = message(b"\xff", content_type="application/data", encoding="binary")
    guard.quarantine(msg, "content type refused")
    assert msg.channel.acked == []
    assert msg.channel.rejected == [("tag-1", True)]


def test_an_error_in_celerys_own_handling_is_dead_lettered(
    real_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What Celery raises after the checks passed must not reach the event loop either."""
    from celery.worker.consumer import Consumer

    def celery_handler(*args: Any, **kwargs: Any) -> Callable[[Any], None]:
        def on_task_received(message: Any) -> None:
            raise TypeError("something Celery did not expect")

        return on_task_received

    monkeypatch.setattr(Consumer, "create_task_handler", celery_handler)
    monkeypatch.setattr(guard, "store_factory", lambda: real_store)
    consumer = guard.GuardedConsumer.__new__(guard.GuardedConsumer)
    consumer.max_message_bytes, consumer.max_json_depth = 1 << 20, 128
    handler = consumer.create_task_handler()
    good = _celery_message(INGEST_TASK, [[RUN]])
    handler(good)  # must not raise
    assert good.channel.acked == ["tag-1"]
    [entry] = [json.loads(d) for d in real_store.dead_letters()]
    assert "something Celery did not expect" in entry["reason"]


def test_celerys_own_refusals_are_dead_lettered_not_just_logged(
    real_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery 5.7 only logs and rejects (on Redis: drops) in these paths."""
    from celery.exceptions import InvalidTaskError

    monkeypatch.setattr(guard, "store_factory", lambda: real_store)
    consumer = guard.GuardedConsumer.__new__(guard.GuardedConsumer)
    invalid, unknown = message([[], {}, {}]), message([[], {}, {}])
    consumer.on_invalid_task(None, invalid, InvalidTaskError("bad eta"))
    consumer.on_unknown_task(None, unknown, KeyError("adaptive.gone"))
    consumer.on_decode_error({"not": "a kombu message"}, ValueError("no properties"))
    assert invalid.channel.acked == ["tag-1"] and unknown.channel.acked == ["tag-1"]
    reasons = sorted(json.loads(d)["reason"] for d in real_store.dead_letters())
    assert reasons == [
        "body does not decode: ValueError: no properties",
        "invalid task message: InvalidTaskError: bad eta",
        "unknown task: KeyError: 'adaptive.gone'",
    ]


# --------------------------------------------------------- real workers


@dataclass
class Case:
    name: str
    fragment: str  # in the dead letter's reason
    marker: str  # finds its dead letter: the message id, or a text in the raw body


class Publisher:
    """Publishes raw messages (any body, content type, encoding, headers) with kombu."""

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self.conn = Connection(url, transport_options=options)
        self.producer = Producer(self.conn.channel())

    def publish(
        self,
        body: bytes | str,
        *,
        queue: str = INGEST_QUEUE,
        content_type: str | None = JSON,
        encoding: str | None = "utf-8",
        headers: dict[str, Any] | None = None,
        task: str = INGEST_TASK,
    ) -> str:
        """Returns the message's id (its dead letter's `task_id`), if it has one."""
        if headers is None:
            headers = {"task": task, "id": str(uuid.uuid4())}
        self.producer.publish(
            body,
            exchange=Exchange(queue, "direct"),
            routing_key=queue,
            content_type=content_type,
            content_encoding=encoding,
            headers=headers,
        )
        return str(headers.get("id", ""))

    def close(self) -> None:
        self.conn.release()


def _body(args: Any, kwargs: Any = None) -> str:
    return json.dumps([args, {} if kwargs is None else kwargs, {}])


def message_cases(pub: Publisher) -> list[Case]:
    """The reproduced cases and the bad argument shapes, published as any sender could."""
    cases: list[Case] = []

    def add(name: str, fragment: str, body: bytes | str, **kw: Any) -> None:
        cases.append(Case(name, fragment, pub.publish(body, **kw)))

    add("run nested 500 deep", "more than 300 levels", _body([[nested(500)]]))
    add("body 5,000 deep", "more than 300 levels", "[[[" + "[" * 5000 + "]" * 5000 + "]], {}, {}]")
    add(
        "application/data",
        "'application/data' refused",
        b"\x00\x01",
        content_type="application/data",
        encoding="binary",
    )
    add("application/text", "'application/text' refused", "hello", content_type="application/text")
    add("body not the triple", "not the task triple", json.dumps({"payloads": []}))
    add("args=[42]", "payloads: Input should be a valid list", _body([42]))
    add("args=[null]", "got null", _body([None]))
    add("20 KB string as args[0]", "got a string of 20000 characters", _body(["x" * 20_000]))
    add("missing argument", "Field required", _body([]))
    add("extra argument", "takes 1 positional", _body([[], "extra"]))
    add("unknown task", "unknown task", _body([]), task="adaptive.nope")
    add("learn with a list", "agent_id", _body([["a"]]), queue=LEARN_QUEUE, task=LEARN_TASK)
    add(
        "pickle",
        "'application/x-python-serialize' refused",
        pickle.dumps(([[]], {}, {})),
        content_type="application/x-python-serialize",
        encoding="binary",
    )
    add("invalid UTF-8", "not valid UTF-8", b'[["\xc3\x28"], {}, {}]')
    add("huge body", "the limit is 1048576", _body([["y" * (3 << 19)]]))
    add(
        "headers nested 200 deep",
        "headers nested deeper",
        _body([[]]),
        headers={"task": INGEST_TASK, "id": "deep-headers", "x": nested(200)},
    )
    add(
        "bad eta",
        "ISO 8601",
        _body([[]]),
        headers={"task": INGEST_TASK, "id": "bad-eta", "eta": "soon"},
    )
    add(
        "zip bomb",
        "compressed body inflates past",
        zlib.compress(b"\0" * (8 << 20)),
        headers={"task": INGEST_TASK, "id": "bomb", "compression": "application/x-gzip"},
    )
    add(
        "bz2 body",
        "compressed body ('application/x-bz2') not accepted",
        bz2.compress(_body([[]]).encode()),
        headers={"task": INGEST_TASK, "id": "bz2", "compression": "application/x-bz2"},
    )
    add(
        "zlib body that is not zlib",
        "decompressing",
        b"plainly not zlib",
        headers={"task": INGEST_TASK, "id": "not-zlib", "compression": "application/x-gzip"},
    )
    add(
        "zlib body with trailing bytes",
        "not one complete zlib stream",
        zlib.compress(_body([[]]).encode()) + b"tail",
        headers={"task": INGEST_TASK, "id": "zlib-tail", "compression": "application/x-gzip"},
    )
    proto1 = {"task": INGEST_TASK, "id": "proto-1", "args": [[]], "kwargs": {}}
    pub.publish(json.dumps(proto1), headers={})
    cases.append(Case("protocol 1", "no task header", "proto-1"))  # found in the raw body
    return cases


def redis_envelope_cases(client: redis.Redis, settings: Settings) -> list[Case]:
    """Redis broker only: list entries kombu itself cannot unpack (each holds its marker)."""
    queue = broker_key_prefix(settings) + INGEST_QUEUE
    info = {"exchange": INGEST_QUEUE, "routing_key": INGEST_QUEUE}

    def envelope(marker: str, body: str = "e30=", **properties: Any) -> str:
        properties["delivery_info"] = info
        return json.dumps({"body": body, "headers": {"m": marker}, "properties": properties})

    entries = {  # name -> (list entry, reason fragment, marker)
        "envelope not JSON": ("not json {env-1", "does not decode", "env-1"),
        "envelope without properties": (json.dumps({"body": "env-2"}), "properties", "env-2"),
        "envelope with a list as tag": (
            envelope("env-3", delivery_tag=["t"]),
            "delivery_tag",
            "env-3",
        ),
        "envelope with an unknown body encoding": (
            envelope("env-4", delivery_tag="t4", body_encoding="rot13"),
            "body_encoding",
            "env-4",
        ),
        "envelope with a body that is not base64": (
            envelope("env-5", body="e30", delivery_tag="t5", body_encoding="base64"),
            "does not unpack",
            "env-5",
        ),
        "envelope nested 2000 deep": (
            '{"body": "env-6", "x": ' + "[" * 2000 + "]" * 2000 + "}",
            "more than 300 levels",
            "env-6",
        ),
    }
    cases = []
    for name, (entry, fragment, marker) in entries.items():
        client.lpush(queue, entry)
        cases.append(Case(name, fragment, marker))
    return cases


def _dead_letters(store: Store) -> list[dict[str, Any]]:
    return [json.loads(d) for d in store.dead_letters()]


def _assert_one_dead_letter_each(store: Store, cases: list[Case]) -> None:
    dead = _dead_letters(store)
    assert all(d["stage"] == "message" for d in dead), [d["reason"] for d in dead]
    for case in cases:
        mine = [d for d in dead if d.get("task_id") == case.marker or case.marker in d["raw"]]
        assert len(mine) == 1, (case.name, [d["reason"] for d in mine])
        assert case.fragment in mine[0]["reason"], (case.name, mine[0]["reason"])
    assert len(dead) == len(cases)
    assert store.counters()["poison_messages"] == len(cases)


def _assert_same_process_never_restarted(worker: Worker, pid: int) -> None:
    assert worker.proc.pid == pid and worker.proc.poll() is None
    os.kill(pid, 0)  # the very process that started is alive
    log = worker.log.read_text(errors="replace")
    assert "Unrecoverable error" not in log
    assert "Connection to broker lost" not in log  # no reconnect that drops a message


def _client_settings(prefix: str, tmp_path: Path, **over: Any) -> Settings:
    return load_settings(
        _env_file=None,
        redis_url=REDIS_URL,
        key_prefix=prefix,
        client_spool_dir=tmp_path / "spool",
        **over,
    )


WORKER_SETTINGS: dict[str, Any] = {
    "max_message_bytes": 1 << 20,
    "metrics_port": 0,
    "learn_linger_s": 0,
    "discover_interval_s": 0,
}


@pytest.mark.slow
def test_a_redis_worker_survives_every_poison_message(real_store: Store, tmp_path: Path) -> None:
    prefix = real_store.keys.prefix
    cfg = _client_settings(prefix, tmp_path)
    agent = "poison-redis-agent"
    env = worker_env(prefix, REDIS_URL, **WORKER_SETTINGS)
    pub = Publisher(REDIS_URL, transport_options(cfg))
    client = RunClient(cfg)  # the good run comes the way agents send it
    with celery_workers(env, tmp_path) as workers:
        worker = workers.start("poison-redis", concurrency=1)
        pid = worker.proc.pid
        try:
            cases = message_cases(pub)
            cases += redis_envelope_cases(real_store.client, cfg)
            good = run_json(agent, 3)
            client.submit_run(good)
            assert client.flush(30)
            # A run sent as an object (not text) whose metadata looks like one
            # of kombu's type markers: plain JSON, stored as sent
            # (worker/body_json.py), never turned into a UUID and refused.
            marked = json.loads(run_json(agent, 4))
            marked["calls"][0]["metadata_snapshot"] = MARKER
            pub.publish(_body([[marked]]))
        finally:
            pub.close()
            client.close(5)
        wait_until(
            lambda: real_store.cursor(agent).learned == 2 or worker.proc.poll() is not None,
            60,
            "the good runs to be learned",
        )
        wait_until(
            lambda: real_store.dead_letter_count() >= len(cases) or worker.proc.poll() is not None,
            30,
            "a dead letter per poison message",
        )
        broker = broker_key_prefix(cfg)
        keys = [broker + queue for queue in (INGEST_QUEUE, LEARN_QUEUE)]

        def settled() -> bool:  # the last ack may trail the learn commit a little
            return (
                sum(map(real_store.client.llen, keys)) + real_store.client.hlen(broker + "unacked")
                == 0
            )

        wait_until(settled, 10, "no message queued or unacked")
        _assert_same_process_never_restarted(worker, pid)

    assert real_store.cursor(agent).learned == 2
    assert real_store.get_run(agent, json.loads(good)["id"]) is not None
    stored = real_store.get_run(agent, marked["id"])
    assert stored is not None and stored.calls[0].metadata_snapshot == MARKER
    _assert_one_dead_letter_each(real_store, cases)


@pytest.fixture
def vhost() -> Iterator[str]:
    name = f"poison-{uuid.uuid4().hex[:10]}"

    def ctl(*args: str) -> None:
        subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)

    ctl("add_vhost", name)
    try:
        ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        ctl("delete_vhost", name)


def _amqp_queue_counts(vhost: str) -> dict[str, tuple[int, int]]:
    out = subprocess.run(
        [
            "rabbitmqctl",
            "list_queues",
            "-q",
            "-p",
            vhost,
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    counts = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit():
            counts[parts[0]] = (int(parts[1]), int(parts[2]))
    return counts


@pytest.mark.slow
@needs_rabbitmq
def test_a_rabbitmq_worker_survives_poison_messages(
    real_store: Store, tmp_path: Path, vhost: str
) -> None:
    prefix = real_store.keys.prefix
    url = f"{AMQP_URL.rstrip('/')}/{vhost}"
    cfg = _client_settings(prefix, tmp_path, broker_url=url)
    agent = "poison-amqp-agent"
    env = worker_env(prefix, REDIS_URL, broker_url=url, **WORKER_SETTINGS)
    pub = Publisher(url, transport_options(cfg, url))
    producer_app = create_app(cfg)
    with celery_workers(env, tmp_path) as workers:
        worker = workers.start("poison-amqp", concurrency=1)
        pid = worker.proc.pid
        try:
            cases = message_cases(pub)
            # py-amqp decodes header tables recursively while reading the
            # socket: 5,000 levels killed the worker and every one after it.
            deep = {"task": INGEST_TASK, "id": "amqp-deep", "x": nested(5000)}
            with _recursion_limit(50_000):
                pub.publish(_body([[]]), headers=deep)
            cases.append(Case("AMQP headers 5,000 deep", "headers nested", "amqp-deep"))
            good = run_json(agent, 4)
            producer_app.send_task(INGEST_TASK, args=[[good]])
        finally:
            pub.close()
        wait_until(
            lambda: real_store.cursor(agent).learned == 1 or worker.proc.poll() is not None,
            60,
            "the good run to be learned",
        )
        wait_until(
            lambda: real_store.dead_letter_count() >= len(cases) or worker.proc.poll() is not None,
            30,
            "a dead letter per poison message",
        )

        def settled() -> bool:
            counts = _amqp_queue_counts(vhost)
            return all(counts.get(q) == (0, 0) for q in (INGEST_QUEUE, LEARN_QUEUE))

        wait_until(
            settled, 20, "no message ready or unacked", lambda: f": {_amqp_queue_counts(vhost)}"
        )
        _assert_same_process_never_restarted(worker, pid)

    assert real_store.cursor(agent).learned == 1
    _assert_one_dead_letter_each(real_store, cases)
