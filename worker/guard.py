"""The worker's door for whole broker messages: poison messages are dead-lettered, not fatal.

Celery 5.7 trusts the envelope of every task message it receives. In the
worker's MAIN process (the one that consumes from the broker) it decodes
the body, reads the headers, builds a request and pickles it for the
prefork pool, and any exception there (a body that is not the
`[args, kwargs, embed]` triple, a content type kombu passes through raw such
as `application/data`, a value nested deeper than pickle can recurse) is
an "Unrecoverable error": the process dies, the message is restored, and
the next worker dies the same way.

`GuardedConsumer` (installed with Celery's `worker_consumer` setting) checks
each message before Celery sees it, cheapest check first and nothing
recursive before the nesting is known to be bounded:

1. headers form a table nested at most ADAPTIVE_MAX_JSON_DEPTH levels, with
   a `task` header of ours (protocol 2; protocol 1 puts everything in the
   body and is refused) and the types Celery's request reads (id, eta, ...);
2. the raw body is bytes or text within ADAPTIVE_MAX_MESSAGE_BYTES;
3. content type `application/json` and encoding UTF-8 (kombu would
   otherwise hand `application/data` through raw; the body's UTF-8 is
   checked by the decode in step 4); a
   body compressed with zlib (what agents send) is inflated first, and only
   up to ADAPTIVE_MAX_MESSAGE_BYTES (`inflate`); any other compression is
   refused still compressed;
4. kombu decodes it exactly as Celery will (with the plain-JSON decoder of
   `worker/body_json.py`; a body too deep for the decoder is refused by its
   RecursionError), and an iterative walk bounds
   its nesting by `MAX_MESSAGE_DEPTH` before anything recursive (pickling
   for the prefork pool, repr, logging) sees it;
5. it is `[list, dict, dict]` with no callbacks, errbacks, chain or chord;
6. its arguments bind to the shape declared next to the task in
   `tasks/jobs.py` (`TaskArgs` models: strict JSON types, no missing, extra
   or unknown arguments).

A message failing any check, and any message on which Celery's own handling
raises, becomes ONE dead letter (stage `message`, the reason, the raw body
truncated by `tasks.learning.dead_letter`) and is acked: never redelivered
forever, never dropped without a trace. Celery's own refusal paths (decode
error, unknown message, unknown or invalid task) dead-letter the same way
instead of only logging and dropping. Per-item validation (each run of an
ingest message) is not done here but in `tasks.learning.ingest`, so one bad
run never costs its neighbours.

Below the message, each broker has its own envelope that kombu unpacks in
the event loop first: on Redis a JSON document per list entry
(`GuardedRedisTransport` checks it), on RabbitMQ an AMQP header table that
py-amqp decodes recursively (`install_amqp_header_guard`). Both are
guarded too, so no bytes a publisher can put in a queue stop the worker.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
import zlib
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from queue import Empty
from typing import Annotated, Any, Literal, TypeVar

import kombu.compression
import redis
from celery.utils.time import maybe_iso8601, maybe_make_aware
from celery.worker.consumer import Consumer
from kombu.message import Message
from kombu.transport import pyamqp as kombu_amqp
from kombu.transport import redis as kombu_redis
from kombu.utils import json as kombu_json
from kombu.utils.encoding import bytes_to_str
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from storage.store import Store
from storage.strictjson import text_too_deep, value_depth
from worker import prefetch
from worker.handoff import HandOff

log = logging.getLogger(__name__)
E = TypeVar("E", bound=BaseException)

STAGE = "message"
JSON = "application/json"
UTF8 = frozenset({"utf-8", "utf8"})
# Deepest JSON text (a message body, a Redis envelope) the worker decodes.
# Not a policy but what is safe: pickle spends two recursion levels per
# nesting level when Celery hands a request to the prefork pool, and the
# interpreter allows 1,000 minus the consumer's own stack, so ~450 levels
# crash the main process. Runs nested deeper than ADAPTIVE_MAX_JSON_DEPTH
# (128) but less than this are refused one by one by the ingest check,
# so their neighbours in the message are kept; deeper ones cost the message.
MAX_MESSAGE_DEPTH = 300
# kombu decompresses a body named compressed by its headers while building
# the Message, before anything can look at it: a 64 MiB zlib body of zeros
# is 64 GiB once inflated. One compression is accepted, kombu's zlib (what
# agents send, ADAPTIVE_BROKER_COMPRESSION), and its decoder is replaced by
# `inflate`, which stops at ADAPTIVE_MAX_MESSAGE_BYTES. For any other the
# guarded transports below move the header here instead, so the message is
# refused (and recorded) still compressed.
ACCEPTED_COMPRESSION = "application/x-gzip"
COMPRESSION_REFUSED = "x-adaptive-compression-refused"
# Celery's own argsrepr is at most 1024 characters plus an ellipsis; a
# longer one would only be copied into every log line and task event.
MAX_REPR = 4096
# Our own delayed learns are due within a few seconds (linger, lease recheck).
MAX_ETA_AHEAD_S = 300
MAX_REASON = 500
# Canvas options a protocol-2 message may carry; our tasks use none, and
# each would make the worker publish further messages of the sender's choice.
EMBED_KEYS = ("callbacks", "errbacks", "chain", "chord")


class Poison(ValueError):
    """A message the worker must not hand to Celery; the text is the dead letter's reason."""


# ----------------------------------------------------------- argument shapes


class TaskArgs(BaseModel):
    """Base of every task's argument shape: JSON types exactly, nothing unknown.

    Strict, so `"42"` is not an int and `42` not a string: what a task gets
    is what its code expects, never a coercion a publisher relied on.
    Fields are in the order of the task's parameters, so positional
    arguments bind to them as they would to the function.
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    @field_validator("*", mode="after")
    @classmethod
    def _unicode(cls, value: Any) -> Any:
        # The strict JSON rule: a lone surrogate (`"\ud800"` in the JSON text)
        # cannot be encoded, so an agent id holding one failed inside the task
        # (a Redis key) with a traceback, and the message left no dead letter.
        # Run payloads are not checked here: each is its own dead letter.
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("holds a lone surrogate: not valid Unicode") from None
        return value


class NoArgs(TaskArgs):
    """A task that takes nothing (beat sweeps)."""


# Task name -> its argument shape; filled by `declare` next to each task.
ARG_SHAPES: dict[str, type[TaskArgs]] = {}
# Tasks whose messages carry data: expired, they are dead-lettered, not
# silently discarded (a sweep that expired in a backlog is meant to be dropped).
KEPT_ON_EXPIRY = frozenset({"adaptive.ingest_runs"})


def declare(name: str, shape: type[TaskArgs]) -> None:
    """Record the argument shape of task `name`; a task without one is refused."""
    ARG_SHAPES[name] = shape


def bind_args(name: str, shape: type[TaskArgs], args: list[Any], kwargs: dict[str, Any]) -> None:
    """Bind positional and keyword arguments to `shape` as Python would to the task."""
    names = list(shape.model_fields)
    if len(args) > len(names):
        raise Poison(
            f"{name} takes {len(names)} positional argument(s), the message has {len(args)}"
        )
    bound = dict(zip(names, args, strict=False))
    twice = sorted(bound.keys() & kwargs.keys())
    if twice:
        raise Poison(f"{name}: argument {twice[0]!r} given both by position and by name")
    bound.update(kwargs)
    try:
        shape.model_validate(bound)
    except ValidationError as exc:
        raise Poison(f"{name}: bad arguments: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    """pydantic's first complaint on one line: where, what, and the type it got."""
    err = exc.errors(include_url=False, include_context=False)[0]
    # Union members show up in the location as `list[...]`: not a place.
    where = ".".join(str(p) for p in err["loc"] if "[" not in str(p))
    got = "" if err["type"] == "missing" else f", got {_kind(err.get('input'))}"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {err['msg']}{got}{more}"


# ------------------------------------------------------------------- headers


TimeLimit = Annotated[float, Field(gt=0)] | None


class Headers(BaseModel):
    """The protocol-2 headers Celery reads in the worker's main process.

    Each of these is read by `celery.worker.request.Request` before the
    task runs (the id as a dict key, eta/expires parsed as dates, the time
    limits unpacked as a pair and handed to the pool), so a wrong type
    there would raise in the consumer. Other headers pass through untouched
    (their nesting is bounded by `check_headers`).
    """

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)
    task: str = Field(min_length=1, max_length=256)
    id: str = Field(min_length=1, max_length=256)
    shadow: str | None = Field(default=None, max_length=256)
    root_id: str | None = Field(default=None, max_length=256)
    parent_id: str | None = Field(default=None, max_length=256)
    group: str | None = Field(default=None, max_length=256)
    eta: datetime | str | None = None
    expires: datetime | str | None = None
    retries: int = Field(default=0, ge=0)
    timelimit: Annotated[list[TimeLimit], Field(min_length=2, max_length=2)] | None = None
    argsrepr: str | None = Field(default=None, max_length=MAX_REPR)
    kwargsrepr: str | None = Field(default=None, max_length=MAX_REPR)
    ignore_result: bool | None = None
    # Read when the request is handed to the pool, AFTER Celery reserved a
    # pool slot for it: `stamped_headers: 42` raised there, and the slot was
    # never given back (one such message stopped a -c 1 worker for good).
    stamped_headers: list[str] | None = None
    stamps: dict[str, Any] | None = None

    @field_validator("eta", "expires")
    @classmethod
    def _iso8601(cls, value: datetime | str | None) -> datetime | str | None:
        # What Celery does with it in the consumer: `maybe_iso8601` (dateutil's
        # ISO parser, not the stdlib's), made aware, and for an eta a local
        # timestamp; a date that overflows there (year 1 at +14:00) made
        # Celery drop the message with only a log line.
        if value is None:
            return value
        try:
            moment = maybe_iso8601(value) if value != "" else None
            if moment is None:
                raise ValueError("empty")
            maybe_make_aware(moment).astimezone().timestamp()
        except (ValueError, TypeError, OverflowError, AttributeError):
            raise ValueError(f"not an ISO 8601 date: {_short(value, 60)}") from None
        return value

    def eta_ahead_s(self) -> float:
        """Seconds until the eta (0 without one or once it has passed)."""
        if self.eta is None:
            return 0.0
        moment = maybe_make_aware(maybe_iso8601(self.eta))  # checked above
        return max(0.0, (moment - datetime.now(UTC)).total_seconds())

    def expired(self) -> bool:
        """True once `expires` has passed (Celery would discard the message unseen)."""
        if self.expires is None:
            return False
        moment = maybe_make_aware(maybe_iso8601(self.expires))  # checked above
        return bool(moment < datetime.now(UTC))


# -------------------------------------------------------------------- checks


def check_headers(message: Message, max_depth: int) -> Headers:
    """The headers as Celery will read them, or Poison saying what is wrong."""
    headers = message.headers
    if not isinstance(headers, Mapping):
        raise Poison(f"headers are not a table (got {type(headers).__name__})")
    for part, value in (
        ("headers", headers),
        ("properties", message.properties),
        ("delivery info", message.delivery_info),
    ):
        if value_depth(value, max_depth) > max_depth:
            raise Poison(f"message {part} nested deeper than {max_depth} levels")
    if COMPRESSION_REFUSED in headers:
        raise Poison(
            f"compressed body ({_short(headers[COMPRESSION_REFUSED], 40)}) not accepted:"
            " it would be inflated before any size check"
        )
    if "task" not in headers:
        raise Poison(
            "no task header: not a Celery protocol 2 task message"
            " (protocol 1 and foreign messages are not accepted)"
        )
    try:
        checked = Headers.model_validate(dict(headers))
    except ValidationError as exc:
        raise Poison(f"bad header {_first_error(exc)}") from None
    if checked.eta_ahead_s() > MAX_ETA_AHEAD_S:
        # A worker holds an eta message unacked; on Redis it is delivered
        # again after every visibility timeout (kombu#337), so a far eta
        # would circulate forever. Ours are a few seconds at most.
        raise Poison(f"eta {_short(checked.eta, 40)} is more than {MAX_ETA_AHEAD_S} s ahead")
    if checked.timelimit not in (None, [None, None]) and isinstance(headers, dict):
        # The workers' own limits apply (ADAPTIVE_TASK_TIME_LIMIT_S): a sender's
        # tiny soft limit made ingest raise mid-store and lose its runs.
        headers["timelimit"] = [None, None]
    return checked


def check_body(message: Message, *, max_bytes: int) -> bytes:
    """The raw body once its size, type, encoding and nesting are known to be safe."""
    body = message.body
    if isinstance(body, str):
        size = len(body)  # characters: a lower bound of its bytes, checked before encoding
        if size > max_bytes:
            raise Poison(f"body of {size}+ bytes, the limit is {max_bytes}")
        try:
            body = body.encode("utf-8")
        except UnicodeEncodeError:
            raise Poison("body holds a lone surrogate: not valid UTF-8") from None
    elif isinstance(body, bytes | bytearray | memoryview):
        body = bytes(body)
    elif body is None:
        body = b""
    else:
        raise Poison(f"body is a {type(body).__name__}, not bytes")
    if len(body) > max_bytes:
        raise Poison(f"body of {len(body)} bytes, the limit is {max_bytes}")
    content_type = message.content_type
    if content_type != JSON:
        raise Poison(f"content type {_short(content_type)} refused (only {JSON})")
    encoding = message.content_encoding
    if not isinstance(encoding, str) or encoding.lower() not in UTF8:
        raise Poison(f"content encoding {_short(encoding)} refused (only utf-8)")
    # UTF-8 validity is checked by the decode that follows (orjson checks it
    # as it parses; a second pass here cost ~2.7 ms per 5 MB body while the
    # pool process waited): see `check_message`.
    return body


def _cause(exc: BaseException | None, kind: type[E]) -> E | None:
    """The `kind` error behind a decoder failure, if that is what it was
    (kombu's DecodeError wraps the decoder's own: a short chain, walked boundedly)."""
    for _ in range(8):
        if exc is None or isinstance(exc, kind):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def check_payload(name: str, payload: Any) -> None:
    """The decoded body is Celery's protocol-2 triple and its arguments fit the task."""
    if not isinstance(payload, list | tuple) or len(payload) != 3:
        what = f"a list of {len(payload)}" if isinstance(payload, list | tuple) else _kind(payload)
        raise Poison(f"body is {what}, not the task triple [args, kwargs, embed]")
    args, kwargs, embed = payload
    if not isinstance(args, list | tuple):
        raise Poison(f"task args are {_kind(args)}, not a list")
    if not isinstance(kwargs, dict):
        raise Poison(f"task kwargs are {_kind(kwargs)}, not an object")
    if embed is not None:
        if not isinstance(embed, dict):
            raise Poison(f"task options are {_kind(embed)}, not an object")
        used = [key for key in EMBED_KEYS if embed.get(key)]
        if used:
            raise Poison(f"{used[0]} are not accepted on our tasks")
    shape = ARG_SHAPES.get(name)
    if shape is None:
        raise Poison(f"unknown task {_short(name)}")
    bind_args(name, shape, list(args), kwargs)


def check_message(message: Message, *, max_bytes: int, max_depth: int) -> str:
    """Every check, in order; returns the task name, or raises Poison."""
    headers = check_headers(message, max_depth)
    if headers.task not in ARG_SHAPES:
        raise Poison(f"unknown task {_short(headers.task)}")
    if headers.task in KEPT_ON_EXPIRY and headers.expired():
        # Celery discards an expired message with an INFO line only: for an
        # ingest message that is runs lost without a trace.
        raise Poison(f"expired ({_short(headers.expires, 60)}) before a worker took it")
    check_body(message, max_bytes=max_bytes)
    too_deep = f"body JSON nested more than {MAX_MESSAGE_DEPTH} levels deep"
    try:
        # kombu's decoder, as Celery will use it (the result is cached on the
        # message). It recurses, but in C under the interpreter's recursion
        # check: too deep text raises RecursionError, never a crash.
        payload = message.decode()
    except Exception as exc:  # any decoder failure is the message's fault
        # kombu wraps the decoder's exceptions in its DecodeError.
        if _cause(exc, RecursionError) is not None:
            raise Poison(too_deep) from None
        bad_utf8 = _cause(exc, UnicodeDecodeError)
        if bad_utf8 is not None:
            raise Poison(f"body is not valid UTF-8 (byte {bad_utf8.start})") from None
        raise Poison(f"body does not decode: {_one_line(exc)}") from None
    # Before anything else recursive (pickling for the pool, repr, logging).
    if value_depth(payload, MAX_MESSAGE_DEPTH) > MAX_MESSAGE_DEPTH:
        raise Poison(too_deep)
    check_payload(headers.task, payload)
    return headers.task


# ------------------------------------------------------------ compression

_inflate_limit = 64 * 1024 * 1024  # set from ADAPTIVE_MAX_MESSAGE_BYTES by the consumer


def inflate(body: bytes | str) -> bytes:
    """kombu's zlib decoder, bounded: a body is inflated only up to the message
    size limit, so a small body of zeros never becomes gigabytes in memory.

    py-amqp hands a body over as text when it happens to decode with the
    message's content encoding; encoding it back gives the same bytes (any
    other encoding than UTF-8 fails the stream check or, later, the door).
    """
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    inflater = zlib.decompressobj()
    out = inflater.decompress(body, _inflate_limit + 1)
    if len(out) > _inflate_limit:
        raise Poison(f"compressed body inflates past {_inflate_limit} bytes, the limit")
    if not inflater.eof or inflater.unused_data:
        raise Poison("compressed body is not one complete zlib stream")
    return out


def set_inflate_limit(max_bytes: int) -> None:
    global _inflate_limit
    _inflate_limit = max_bytes


kombu.compression.register(zlib.compress, inflate, ACCEPTED_COMPRESSION, aliases=["zlib", "gzip"])


# ------------------------------------------------------------ dead letters


def _kind(value: Any) -> str:
    """A value's JSON kind in words, for reasons ("a string of 20000 characters")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)}"
    return f"a {type(value).__name__}"


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def _text(value: Any) -> str | None:
    """A short printable string for a dead letter's context field (never raises)."""
    if value is None:
        return None
    out = value if isinstance(value, str) else repr(value)
    return out[:200].encode("utf-8", "backslashreplace").decode("utf-8")


def _context(message: Any) -> dict[str, str | None]:
    """Where the message came from and what it claimed to be, as short strings."""
    headers = getattr(message, "headers", None)
    headers = headers if isinstance(headers, Mapping) else {}
    info = getattr(message, "delivery_info", None)
    info = info if isinstance(info, Mapping) else {}
    return {
        "task": _text(headers.get("task")),
        "task_id": _text(headers.get("id")),
        "content_type": _text(getattr(message, "content_type", None)),
        "content_encoding": _text(getattr(message, "content_encoding", None)),
        "queue": _text(info.get("routing_key")),
    }


def _raw_body(message: Any) -> str | bytes:
    body = getattr(message, "body", None) if isinstance(message, Message) else message
    if isinstance(body, str | bytes):
        return body
    if isinstance(body, bytearray | memoryview):
        return bytes(body)
    try:
        return json.dumps(body, default=repr)
    except (TypeError, ValueError, RecursionError):
        return f"<{type(body).__name__} that cannot be shown>"


def _jobs_store() -> Store:
    from tasks.jobs import _store

    return _store()


# The store dead letters go to: the tasks' own, one per process (tests swap it).
store_factory: Callable[[], Store] = _jobs_store

REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
REQUEUE_PAUSE_S = 1.0


def record(raw: str | bytes, reason: str, context: Mapping[str, str | None]) -> bool:
    """Write one dead letter for a poison message; False only if Redis is unreachable.

    `tasks.learning.dead_letter` truncates the raw body to a bounded size
    (recording the original size), so even a huge body costs little. Any
    other failure to record it is a bug, not something a retry would fix:
    it is logged with the reason (the trace left) and counts as handled.
    """
    from tasks import learning

    reason = reason[:MAX_REASON]
    fields = {key: value for key, value in context.items() if key != "max_raw"}
    try:
        entry = learning.dead_letter(raw, reason, STAGE, **fields)  # type: ignore[arg-type]
        store = store_factory()
        store.push_dead_letters([entry])
        store.incr_counter("poison_messages")
    except REDIS_DOWN as exc:
        log.error("poison message NOT recorded (%s): %s %s", exc, reason, fields)
        return False
    except Exception:
        log.exception("poison message NOT recorded, dropped: %s %s", reason, fields)
        return True
    log.warning("poison message dead-lettered: %s %s", reason, fields)
    return True


def _settle(message: Any, *, requeue: bool) -> None:
    """Ack (or requeue) once; a message that is not a kombu Message cannot be settled."""
    if not isinstance(message, Message) or message.acknowledged:
        return
    try:
        if requeue:
            message.reject(requeue=True)
        else:
            message.ack()
    except Exception:  # the channel's trouble; the consumer recovers the connection
        log.exception("could not settle poison message %s", _context(message))


def quarantine(message: Any, reason: str) -> None:
    """Dead-letter and ack `message`; requeue it if Redis could not take the dead letter.

    Acking without the dead letter would drop it without a trace, so while
    Redis is unreachable the message goes back to its queue and is tried
    again; once Redis answers it is recorded and acked. The pause before
    requeueing keeps that from spinning: a worker without its Redis can do
    nothing else meanwhile anyway.
    """
    if record(_raw_body(message), reason, _context(message)):
        _settle(message, requeue=False)
    else:
        time.sleep(REQUEUE_PAUSE_S)
        _settle(message, requeue=True)


# ------------------------------------------------------------------ consumer


class GuardedConsumer(Consumer):
    """Celery's consumer with a door: see the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from worker.settings import get_settings

        super().__init__(*args, **kwargs)
        settings = get_settings()
        self.max_message_bytes = settings.max_message_bytes
        self.max_json_depth = settings.max_json_depth
        set_inflate_limit(settings.max_message_bytes)
        install_amqp_header_guard()

    _handoff: HandOff | None = None

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], None]:
        """The door, behind the hand-off to the pool (worker/handoff.py); also
        lets long tasks hold the prefetch window down (worker/prefetch.py)."""
        celery_handler = super().create_task_handler(*args, **kwargs)
        prefetch.bind(self)

        def on_task_received(message: Any) -> None:
            try:
                check_message(
                    message, max_bytes=self.max_message_bytes, max_depth=self.max_json_depth
                )
            except Poison as exc:
                return quarantine(message, str(exc))
            except Exception as exc:  # a check that breaks must not kill the worker
                return quarantine(message, f"message check failed: {_one_line(exc)}")
            try:
                celery_handler(message)
            except Exception as exc:  # Celery's own handling: the same rule
                if isinstance(message, Message) and not message.acknowledged:
                    quarantine(message, f"worker could not take it: {_one_line(exc)}")
                else:
                    log.exception("error after message %s was settled", _context(message))
            return None

        self._handoff = HandOff(self, on_task_received)
        return self._handoff

    def on_close(self) -> None:
        if self._handoff is not None:
            self._handoff.reset()
        super().on_close()

    def connection_for_read(self, heartbeat: float | None = None) -> Any:
        """The consuming connection, through a guarded transport (see below) where we have one.

        Only the class of the transport is swapped, on this connection
        object: kombu keeps treating it by its scheme (TLS for `rediss`, the
        URL shown in logs), and publishers are not affected.
        """
        conn = self.app.connection_for_read(heartbeat=heartbeat)
        guarded = GUARDED_TRANSPORTS.get(str(conn.transport_cls))
        if guarded is not None:
            conn.get_transport_cls = lambda: guarded
        return self.ensure_connected(conn)

    # Celery's own refusal paths only log and reject (drop): dead-letter instead.

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        quarantine(message, f"body does not decode: {_one_line(exc)}")

    def on_unknown_message(self, body: Any, message: Any) -> None:
        quarantine(message, "not a task message (no task name)")

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        quarantine(message, f"unknown task: {_one_line(exc)}")

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        quarantine(message, f"invalid task message: {_one_line(exc)}")


# ------------------------------------------------------ Redis broker envelope

# On a Redis broker a message is a JSON envelope in a list (body base64,
# headers, properties), which kombu decodes and unpacks in the consumer's
# event loop before any of the above runs: anyone who can LPUSH to a queue
# can make that raise (text that is not JSON, no `properties`, a list as
# delivery tag, an unknown body encoding), and kombu 5.7 lets it propagate
# to the worker's event loop, which dies (or, for a KeyError, reconnects
# and loses the message silently). The guarded channel below checks the
# envelope first and dead-letters what it cannot unpack.


class _DeliveryInfo(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    exchange: str
    routing_key: str


class _Properties(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    delivery_tag: str = Field(min_length=1, max_length=256)
    body_encoding: Literal["base64", "utf-8"] | None = None
    delivery_info: _DeliveryInfo


class RedisEnvelope(BaseModel):
    """What kombu's virtual `Message` and the Redis QoS read from an envelope."""

    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)
    body: str | None = None
    headers: dict[str, Any] | None = None
    properties: _Properties
    content_type: str | None = Field(default=None, alias="content-type")
    content_encoding: str | None = Field(default=None, alias="content-encoding")


def check_envelope(raw: Any) -> None:
    """Poison unless kombu can unpack `raw` (a decoded envelope) without raising."""
    if not isinstance(raw, dict):
        raise Poison(f"broker envelope is {_kind(raw)}, not an object")
    if value_depth(raw, MAX_MESSAGE_DEPTH) > MAX_MESSAGE_DEPTH:
        raise Poison(f"broker envelope nested more than {MAX_MESSAGE_DEPTH} levels deep")
    try:
        RedisEnvelope.model_validate(raw)
    except ValidationError as exc:
        raise Poison(f"broker envelope: {_first_error(exc)}") from None


class GuardedRedisChannel(kombu_redis.Channel):
    """kombu's Redis channel that dead-letters envelopes it cannot unpack."""

    def _envelope(self, item: bytes | str, queue: str) -> Any:
        """The decoded envelope, or None once a poison one is dead-lettered."""
        raw = item if isinstance(item, bytes) else item.encode("utf-8", "surrogatepass")
        try:
            envelope = kombu_json.loads(raw.decode("utf-8"))
            if isinstance(envelope, dict):
                return envelope
            # Not only a kombu error: the entry `null` decoded to None, read
            # as "already dead-lettered", and vanished without a trace.
            reason = f"broker envelope is {_kind(envelope)}, not an object"
        except RecursionError:
            reason = f"broker envelope nested more than {MAX_MESSAGE_DEPTH} levels deep"
        except Exception as exc:  # any decoding failure is the envelope's fault
            reason = f"broker envelope does not decode: {_one_line(exc)}"
        record(raw, reason, {"queue": _text(queue)})
        return None

    def _brpop_read(self, **options: Any) -> bool:
        # kombu 5.7.0's `Channel._brpop_read`, with `_envelope` instead of a
        # bare `loads`: the popped item is in no unacked list yet, so a
        # decoding error there would lose it and kill the event loop.
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if dest__item:
                dest, item = dest__item
                dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
                self._queue_cycle.rotate(dest)
                envelope = self._envelope(item, dest)
                if envelope is not None:
                    self.connection._deliver(envelope, dest)
                return True
            raise Empty()
        finally:
            self._in_poll = None  # type: ignore[assignment]  # as kombu does
            self._flush_brpop_reauth()

    def _handle_message(self, client: Any, r: Any) -> dict[str, Any]:
        # Fanout (pub/sub: remote control broadcasts): kombu decodes the data
        # catching only TypeError/ValueError, so too deep text (RecursionError)
        # would kill the event loop; such data is dead-lettered and dropped.
        payload: dict[str, Any] = super()._handle_message(client, r)
        data = payload.get("data")
        if isinstance(data, bytes | str) and data:
            raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
            if text_too_deep(raw, MAX_MESSAGE_DEPTH):
                reason = f"broadcast nested more than {MAX_MESSAGE_DEPTH} levels deep"
                record(raw, reason, {"queue": _text(payload.get("channel"))})
                payload["data"] = None
        return payload

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Callable[[Any], Any], *args: Any, **kwargs: Any
    ) -> Any:
        tag = super().basic_consume(queue, no_ack, callback, *args, **kwargs)

        def guarded(raw: Any) -> Any:
            try:
                check_envelope(raw)
                defuse_compression(raw.get("headers"))
                # kombu's Message decodes the body (base64) and inflates it
                # here: what is left to fail must fail now, not inside the
                # event loop. (kombu keeps an inflate error on the message.)
                message = self.Message(raw, channel=self)
                if message.errors:
                    raise Poison(_one_line(message.errors[0][1]))
            except Poison as exc:
                return record(_raw_body(raw), str(exc), {"queue": _text(queue)})
            except Exception as exc:
                reason = f"broker envelope does not unpack: {_one_line(exc)}"
                return record(_raw_body(raw), reason, {"queue": _text(queue)})
            # kombu 5.7.0's own `_callback` (virtual Channel.basic_consume)
            # from here on, with the Message built once: decoding and
            # inflating a 4 MB body twice was a third of this process's work.
            if not no_ack:
                self.qos.append(message, message.delivery_tag)
            return callback(message)

        self.connection._callbacks[queue] = guarded
        return tag


class GuardedRedisTransport(kombu_redis.Transport):
    """kombu's Redis transport with `GuardedRedisChannel` (the worker's consumer only)."""

    Channel = GuardedRedisChannel


def defuse_compression(headers: Any) -> None:
    """Rename a `compression` header other than zlib so kombu does not inflate the
    body (see ACCEPTED_COMPRESSION); zlib is inflated by the bounded `inflate`."""
    if (
        isinstance(headers, dict)
        and "compression" in headers
        and headers["compression"] != ACCEPTED_COMPRESSION
    ):
        headers[COMPRESSION_REFUSED] = _text(headers.pop("compression")) or "?"


class GuardedAmqpChannel(kombu_amqp.Channel):
    """py-amqp channel whose messages are inflated by kombu only when zlib (bounded)."""

    def message_to_python(self, raw_message: Any) -> Any:
        defuse_compression(getattr(raw_message, "properties", {}).get("application_headers"))
        return super().message_to_python(raw_message)


class GuardedAmqpConnection(kombu_amqp.Connection):
    Channel = GuardedAmqpChannel


class GuardedAmqpTransport(kombu_amqp.Transport):
    """kombu's AMQP transport with `GuardedAmqpChannel` (the worker's consumer only)."""

    Connection = GuardedAmqpConnection


class GuardedAmqpsTransport(kombu_amqp.SSLTransport):
    Connection = GuardedAmqpConnection


# kombu's transport name (the broker URL's scheme) -> its guarded subclass.
GUARDED_TRANSPORTS: dict[str, type[Any]] = {
    "redis": GuardedRedisTransport,
    "rediss": GuardedRedisTransport,
    "amqp": GuardedAmqpTransport,
    "pyamqp": GuardedAmqpTransport,
    "amqps": GuardedAmqpsTransport,
}


# ------------------------------------------------------------ AMQP headers

# py-amqp decodes a message's header table recursively, one Python frame per
# level, while reading the frame off the socket: a table nested deeper than
# the recursion limit (a few kilobytes of headers) raises RecursionError
# inside the connection, the worker dies, and RabbitMQ hands the message to
# the next worker, which dies too. A header frame holds at most one level
# per 7 bytes (key, type, length), so decoding it with the limit raised by
# that much always succeeds; pure-Python recursion does not grow the C stack
# on Python 3.11+. The decoded (deep) headers then meet `check_headers`,
# which refuses them without recursing: one dead letter, one ack.
_LEVEL_BYTES = 7


def _deep_safe(decode: Callable[[Any, int], Any]) -> Callable[[Any, int], Any]:
    @functools.wraps(decode)
    def decode_properties(buf: Any, offset: int) -> Any:
        try:
            return decode(buf, offset)
        except RecursionError:
            limit = sys.getrecursionlimit()
            sys.setrecursionlimit(limit + len(buf) // _LEVEL_BYTES + 100)
            try:
                return decode(buf, offset)
            finally:
                sys.setrecursionlimit(limit)

    decode_properties.deep_safe = True  # type: ignore[attr-defined]
    return decode_properties


def install_amqp_header_guard() -> None:
    """Make py-amqp decode deep header tables instead of dying (idempotent)."""
    from amqp import serialization
    from amqp.spec import Basic

    current = serialization.PROPERTY_CLASSES[Basic.CLASS_ID]
    if not getattr(current, "deep_safe", False):
        serialization.PROPERTY_CLASSES[Basic.CLASS_ID] = _deep_safe(current)
