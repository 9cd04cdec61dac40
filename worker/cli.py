"""The `adaptive-worker` command line (typer + rich).

`run` is the main job. Every other command reads or maintains the state in
Redis under the key prefix (`--redis-url` and `--prefix` override
ADAPTIVE_REDIS_URL and ADAPTIVE_KEY_PREFIX). Output is for people; `--json`
prints one JSON document on stdout for scripts instead.

Exit codes: 0 done; 1 failed (timed out, a stored value is corrupt); 2 bad
input (unreadable file, invalid record, bad option or setting); 3
unavailable (Redis or the broker cannot be reached; for `submit`: runs were
spooled on disk instead of delivered); 4 not found (unknown agent, nothing
learned yet, no such dead letter). User mistakes end with one line on
stderr, never a traceback.

Everything that came from data (agent ids, tool names, payloads, reasons)
is printed literally: the consoles interpret no markup, and control
characters and lone surrogates are shown as escapes.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import click
import redis
import typer
from kombu.utils.url import maybe_sanitize_url
from redis.client import NEVER_DECODE
from rich.console import Console
from rich.highlighter import JSONHighlighter
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from storage.connection import connect
from storage.errors import InvalidRecord
from storage.models import ExecutionPlan, TrieEnvelope, parse_wire
from storage.store import Cursor, Store
from storage.strictjson import check_depth, check_text, check_value
from tasks.learning import IngestResult, dead_letter, ingest, learn_agent, validate_payload
from tasks.maintenance import apply_retention, plan_retention, rebuild
from worker.engine.fold import EngineConfig
from worker.engine.latency import agent_hints, default_hints
from worker.settings import ENV_PREFIX, Settings, SettingsError, get_settings, load_settings

if TYPE_CHECKING:
    from celery import Celery

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
dead_letters_app = typer.Typer(
    no_args_is_help=True,
    help="The dead-letter list: payloads and runs that could not be stored or learned.",
)
app.add_typer(dead_letters_app, name="dead-letters")

# Characters a terminal would act on rather than show (C0/C1 controls, among
# them ESC; line and paragraph separators; bidi overrides) and lone
# surrogates, which cannot even be written out as UTF-8.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_UNSAFE_OR_NEWLINE_OK = re.compile(
    r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _safe(value: object, *, newlines: bool = False) -> str:
    """`value` as text a terminal shows as it is: unsafe characters become escapes.

    Data (agent ids, payloads, reasons) can hold anything; an ESC sequence
    would drive the operator's terminal, a lone surrogate would make the
    write itself fail. Newlines are escaped too unless `newlines` (a
    multi-line payload), so an error stays one line.
    """
    text = value if isinstance(value, str) else str(value)
    return (_UNSAFE_OR_NEWLINE_OK if newlines else _UNSAFE).sub(_escape, text)


class LiteralConsole(Console):
    """A console that prints every string literally.

    Rich reads `[...]` in strings as markup, so an agent named `[/]` made
    every table listing it fail and `[bold]x` was shown bold. Here no string
    is markup or emoji code, and each one passes `_safe` on its way to the
    terminal (table cells and titles included: they are rendered through
    `render_str` too). Styling is done with `Text` objects, built from
    escaped parts.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(markup=False, emoji=False, highlight=False, **options)

    def render_str(self, text: str, **options: Any) -> Text:
        options["markup"] = False
        options["emoji"] = False
        return super().render_str(_safe(text, newlines=True), **options)


out = LiteralConsole()
err = LiteralConsole(stderr=True, soft_wrap=True)

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
EXIT_NOT_FOUND = 4

# Most per-record error lines one command prints (the rest: a count).
MAX_ERROR_LINES = 20

# The embedded default's in-memory broker is polled (kombu's virtual
# transport sleeps between empty polls, 1 s by default): a short interval
# lets the sample runs travel ingest -> learn in well under a second.
EMBEDDED_POLL_S = 0.02
U32_MAX = 0xFFFFFFFF

P = ParamSpec("P")
R = TypeVar("R")


# ------------------------------------------------------------------ helpers


def _error(message: str) -> None:
    """One `error:` line on stderr (newlines and control characters escaped)."""
    err.print(Text.assemble(("error:", "bold red"), " ", _safe(message)))


def _fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    """Print `message` as one `error:` line on stderr; raise what this returns."""
    _error(message)
    return typer.Exit(code)


def _note(message: str) -> None:
    """One `note:` line on stderr: something the operator should know, not a failure."""
    err.print(Text.assemble(("note:", "bold yellow"), " ", _safe(message)))


def _guard(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn what a user or hostile data can cause (Redis gone mid-command, a
    corrupt or undecodable stored value, a bad setting, a bug hit by odd
    data) into one line and a documented exit code instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # our own exits, and typer's usage errors
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise  # the same from Celery's command line (`run` starts a worker)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise _fail(f"lost the connection to Redis: {exc}", EXIT_UNAVAILABLE) from None
        except redis.RedisError as exc:
            raise _fail(f"Redis refused a command: {exc}", EXIT_FAILED) from None
        except InvalidRecord as exc:
            raise _fail(f"a stored value cannot be read: {exc}", EXIT_FAILED) from None
        except SettingsError as exc:
            raise _fail(str(exc), EXIT_BAD_INPUT) from None
        except UnicodeDecodeError as exc:
            message = f"a stored value is not UTF-8 text ({exc.reason} at byte {exc.start})"
            raise _fail(message, EXIT_FAILED) from None
        except RecursionError:
            raise _fail("a value is nested too deeply to process", EXIT_FAILED) from None
        except Exception as exc:  # the README promises one line, never a traceback
            raise _fail(f"unexpected {type(exc).__name__}: {exc}", EXIT_FAILED) from None

    return wrapper


def _overrides(redis_url: str | None, prefix: str | None) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if redis_url is not None:
        overrides["redis_url"] = redis_url
    if prefix is not None:
        overrides["key_prefix"] = prefix
    return overrides


def _settings(redis_url: str | None, prefix: str | None, **more: Any) -> Settings:
    try:
        return load_settings(**_overrides(redis_url, prefix), **more)
    except SettingsError as exc:
        message = str(exc)
        given = {"--redis-url": ("REDIS_URL", redis_url), "--prefix": ("KEY_PREFIX", prefix)}
        for option, (name, value) in given.items():
            if value is not None:  # the value came from the option, not the variable
                variable = f"{ENV_PREFIX}{name}"
                message = message.replace(f"{variable}:", f"{option} ({variable}):")
        raise _fail(message, EXIT_BAD_INPUT) from None


def _masked(url: str | None) -> str:
    """A URL fit for a message: no password (also when the URL does not parse)."""
    if url is None:
        return "the embedded Redis"
    try:
        return str(maybe_sanitize_url(url))
    except ValueError:
        return re.sub(r"(//[^/@]*?:)[^/@]*@", r"\1**@", url)


def _store(settings: Settings) -> Store:
    try:
        client = connect(settings.redis_url)
    except ValueError as exc:  # the URL itself: bad port, bad query option...
        raise _fail(f"bad Redis URL {_masked(settings.redis_url)}: {exc}", EXIT_BAD_INPUT) from None
    try:
        client.ping()
    except redis.RedisError as exc:
        message = f"cannot reach Redis at {_masked(settings.redis_url)}: {exc}"
        raise _fail(message, EXIT_UNAVAILABLE) from None
    return Store(client, settings.key_prefix)


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(observation_window=settings.observation_window)


_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _json_text(data: Any, indent: int | None = 2) -> str:
    """JSON text that can always be written out: a lone surrogate (which a
    dead letter's payload may hold) is written as its `\\udXXX` escape, which
    reads back as the same string, instead of failing the write."""
    text = json.dumps(data, indent=indent, ensure_ascii=False)
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _emit_json(data: Any) -> None:
    """One JSON document on stdout (plain text: no markup, no wrapping)."""
    typer.echo(_json_text(data))


def _wire(raw: str | bytes) -> Any:
    return json.loads(raw)


class BadInput(ValueError):
    """A records file that cannot be read at all (nothing in it is usable)."""


@dataclass(frozen=True, slots=True)
class Record:
    """One record of a records file: where it is, its JSON text, and what is
    wrong with it (None: it reads as JSON within the limits; whether it is a
    valid run is for `validate_payload` to say)."""

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
        text = item if isinstance(item, str) else _json_text(item, indent=None)
        records.append(Record(where, number, text, _json_problem(text, max_depth, max_bytes)))
    return records


def _records_or_exit(source: str, file: str, settings: Settings, consequence: str) -> list[Record]:
    """The file's records, or one line and exit 2 when the file cannot be read at all."""
    try:
        return read_records(
            _read_file(file), max_depth=settings.max_json_depth, max_bytes=settings.max_run_bytes
        )
    except BadInput as exc:
        raise _fail(f"{source}: {exc}; {consequence}", EXIT_BAD_INPUT) from None


def _run_problem(payload: str | bytes, settings: Settings) -> str | None:
    """Why `payload` is not a run record the workers would store (None: it is one)."""
    try:
        validate_payload(payload, settings.max_run_bytes, max_depth=settings.max_json_depth)
    except (InvalidRecord, ValueError) as exc:
        return str(exc)
    return None


def _ingest(store: Store, payloads: Sequence[str | bytes], settings: Settings) -> IngestResult:
    """`tasks.learning.ingest` with this command's limits (the workers' rule)."""
    return ingest(
        store,
        payloads,
        settings.max_run_bytes,
        max_depth=settings.max_json_depth,
        max_raw=settings.dead_letter_raw_max_bytes,
    )


def _read_file(file: str) -> bytes:
    if file == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(file).read_bytes()
    except OSError as exc:
        raise _fail(f"cannot read {file}: {exc.strerror}", EXIT_BAD_INPUT) from None


def _not_found(store: Store, agent: str, what: str) -> typer.Exit:
    """Exit 4, saying whether the agent is unknown or has only not learned `what` yet."""
    cursor = store.cursor(agent)
    if cursor.index_length or cursor.base or cursor.learned:
        return _fail(
            f"agent {agent!r} has no {what} yet ({cursor.end} runs, {cursor.learned} learned)",
            EXIT_NOT_FOUND,
        )
    known = store.agent_ids()
    shown = ", ".join(known[:10]) + (f" and {len(known) - 10} more" if len(known) > 10 else "")
    hint = f"known agents: {shown}" if known else "no agents at all"
    return _fail(
        f"unknown agent {agent!r} under prefix {store.keys.prefix!r} ({hint})", EXIT_NOT_FOUND
    )


def _require_agent(store: Store, agent: str) -> Cursor:
    cursor = store.cursor(agent)
    if not (cursor.index_length or cursor.base or cursor.learned):
        raise _not_found(store, agent, "runs")
    return cursor


def _trie(store: Store, agent: str) -> dict[str, Any] | None:
    """The stored trie as the JSON the lookup functions take, validated first."""
    raw = store.client.get(store.keys.trie(agent))
    if raw is None:
        return None
    parse_wire(TrieEnvelope, raw)
    trie: dict[str, Any] = _wire(raw)
    return trie


def _stable_prefix_spans(store: Store, agent: str, length: int) -> list[str]:
    """Span ids of the first `length` blocks of the latest seed observation.

    The seed observations (under the plain agent id) are what the stability
    was computed from; their latest prompt shows which blocks form the prefix.
    """
    if length <= 0:
        return []
    observations = store.get_observations(agent) or []
    if observations:
        return [block.span_id for block in observations[-1].blocks[:length]]
    return []


def _table(title: str | None, **options: Any) -> Table:
    """A table at least as wide as its title, so the title stays on one line."""
    width = len(_safe(title or ""))
    return Table(title=title, title_justify="left", min_width=width, **options)


def _kv_table(title: str | None, rows: dict[str, Any]) -> Table:
    table = _table(title, show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for name, value in rows.items():
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        table.add_row(str(name), "-" if shown is None else str(shown))
    return table


RedisUrl = Annotated[
    str | None,
    typer.Option("--redis-url", help="Redis URL (default: ADAPTIVE_REDIS_URL; unset: embedded)"),
]
Prefix = Annotated[
    str | None, typer.Option("--prefix", help="key prefix (default: ADAPTIVE_KEY_PREFIX)")
]
AsJson = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
AgentArg = Annotated[str, typer.Argument(help="agent id")]


# ----------------------------------------------------------------------- run


@contextmanager
def _process_settings(redis_url: str | None, prefix: str | None) -> Iterator[Settings]:
    """Make the command line's overrides the process settings while the worker runs.

    The Celery tasks read `get_settings()` (the environment), not our
    options, so the overrides go into the environment for the duration, and
    are taken back afterwards (tests run commands in one process).
    """
    saved = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
    for field, value in _overrides(redis_url, prefix).items():
        os.environ[f"{ENV_PREFIX}{field.upper()}"] = value
    get_settings.cache_clear()
    try:
        yield get_settings()
    finally:
        for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
            del os.environ[key]
        os.environ.update(saved)
        get_settings.cache_clear()


@app.command()
@_guard
def run(
    redis_url: RedisUrl = None,
    prefix: Prefix = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="embedded default: print the results as JSON")
    ] = False,
    timeout: Annotated[
        float, typer.Option(min=1, help="embedded default: seconds to wait for the learning")
    ] = 60.0,
    beat: Annotated[
        bool,
        typer.Option(
            help="with Redis: also run the beat scheduler (discover, rebuild, retention) "
            "in this worker; keep it on in one worker of a deployment only"
        ),
    ] = True,
    concurrency: Annotated[
        int | None,
        typer.Option("--concurrency", "-c", min=1, help="with Redis: pool processes (CPUs)"),
    ] = None,
    loglevel: Annotated[str, typer.Option(help="with Redis: the worker's log level")] = "INFO",
) -> None:
    """The main job: learn the bundled samples in-process, or, with Redis, run a worker.

    Without Redis (ADAPTIVE_REDIS_URL unset, the default): starts everything
    inside this process, an embedded Redis (fakeredis), an in-memory broker
    and a Celery worker thread; submits the bundled sample runs (two
    travel-planning agents, 4 runs each, captured from the real NeMo Relay
    runtime) through the agent-side client, waits until the worker has
    learned them, and prints per agent the tool-parallelism plan, the
    default latency hints and the stable prompt prefix. Then it exits: the
    embedded state lives only as long as the process.

    With Redis (ADAPTIVE_REDIS_URL or --redis-url): runs a real Celery worker
    on all three queues (what `celery -A worker worker -B` runs), with the
    beat scheduler unless --no-beat, until it is stopped (Ctrl-C, SIGTERM).
    Its broker is ADAPTIVE_BROKER_URL or the Redis URL; feed it with
    `adaptive-worker submit FILE` or `submit --samples`, or from agents with
    `tasks.client.submit_run`.
    """
    _settings(redis_url, prefix)  # report a bad setting before changing anything
    with _process_settings(redis_url, prefix) as settings:
        if settings.embedded:
            if settings.broker_url and not settings.broker_url.startswith("memory://"):
                raise _fail(
                    f"{ENV_PREFIX}BROKER_URL is set but {ENV_PREFIX}REDIS_URL is not: a worker "
                    "on a shared broker needs a shared Redis (set both, or neither)",
                    EXIT_BAD_INPUT,
                )
            _run_embedded(settings, as_json=as_json, timeout=timeout)
            return
        if as_json:
            raise _fail("--json applies to the embedded run only", EXIT_BAD_INPUT)
        code = _run_worker(settings, beat=beat, concurrency=concurrency, loglevel=loglevel)
    raise typer.Exit(code)


def _module_app(settings: Settings) -> Celery:
    """`worker.celery.app` (the one `tasks.jobs` registers on), configured for `settings`."""
    import tasks.jobs  # noqa: F401  (registers the tasks on the module's app)
    from worker.celery import app as celery_app
    from worker.celery import configure

    return configure(celery_app, settings)


def _run_worker(settings: Settings, *, beat: bool, concurrency: int | None, loglevel: str) -> int:
    """`celery worker` in this process, on the configured Redis and broker."""
    _store(settings)  # unreachable Redis: one line and exit 3, not a retry loop
    from worker.celery import QUEUES

    celery_app = _module_app(settings)
    argv = [
        "worker",
        "-Q",
        ",".join(QUEUES),
        f"--loglevel={loglevel}",
        "-n",
        f"adaptive-{os.getpid()}@%h",
    ]
    if concurrency:
        argv += ["-c", str(concurrency)]
    if beat:
        argv += ["-B", "-s", str(_beat_schedule_file(settings))]
    err.print(
        f"adaptive-worker: Celery worker on {_masked(settings.effective_broker_url)}, "
        f"state in {_masked(settings.redis_url)} under {settings.key_prefix!r}"
        f"{', with beat' if beat else ''}",
        highlight=False,
    )
    return int(celery_app.start(argv) or 0)


def _beat_schedule_file(settings: Settings) -> Path:
    """Beat's state file, out of the working directory (one per prefix)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in settings.key_prefix)
    for root in (Path.home() / ".cache" / "adaptive-worker", Path(tempfile.gettempdir())):
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        return root / f"celerybeat-schedule-{safe}"
    return Path(f"celerybeat-schedule-{safe}")


def _run_embedded(settings: Settings, *, as_json: bool, timeout: float) -> None:
    from celery.contrib.testing.worker import start_worker

    from tasks.client import RunClient
    from worker.samples import sample_runs

    # kombu warns about a memory URL without a host name.
    settings = settings.model_copy(update={"broker_url": "memory://localhost//"})
    celery_app = _module_app(settings)
    celery_app.conf.update(
        broker_transport_options={"polling_interval": EMBEDDED_POLL_S},
        # Nobody listens to events inside one process.
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    store = _store(settings)
    samples = sample_runs()
    total = sum(map(len, samples.values()))
    if not as_json:
        err.print(
            f"adaptive-worker: embedded default (no {ENV_PREFIX}REDIS_URL): in-process Redis, "
            f"in-memory broker, one worker thread; submitting {total} sample runs of "
            f"{len(samples)} agents",
            highlight=False,
        )
    started = time.monotonic()
    # A private spool: the client adopts orphaned spools it finds, and runs a
    # real client left behind must not be swallowed by a throwaway broker.
    with (
        tempfile.TemporaryDirectory(prefix="adaptive-run-spool-") as spool,
        start_worker(
            celery_app,
            pool="solo",
            loglevel="WARNING",
            perform_ping_check=False,
            shutdown_timeout=settings.worker_soft_shutdown_s + 20,
        ),
    ):
        client = RunClient(settings.model_copy(update={"client_spool_dir": Path(spool)}))
        try:
            client.submit_runs([run for runs in samples.values() for run in runs])
            delivered = client.flush(10.0)
            last_error = client.stats()["last_error"]
        finally:
            client.close(timeout=1.0)
        try:
            if not delivered:
                raise _fail(f"the in-memory broker did not take the sample runs ({last_error})")
            _wait_learned(store, {agent: len(runs) for agent, runs in samples.items()}, timeout)
        finally:
            _wake_to_stop(celery_app)
    elapsed = time.monotonic() - started
    report = {agent: _agent_report(store, agent) for agent in samples}
    if as_json:
        _emit_json({"elapsed_s": round(elapsed, 3), "agents": report})
        return
    for agent, item in report.items():
        _print_agent_report(agent, item)
    err.print(
        f"learned {total} runs in {elapsed:.2f} s. With {ENV_PREFIX}REDIS_URL set, "
        "`adaptive-worker run` starts a real worker instead.",
        highlight=False,
    )


def _wake_to_stop(celery_app: Celery) -> None:
    """Make the embedded worker stop now rather than seconds later.

    Celery's blocking loop checks the stop flag, then (in a `finally`) waits
    up to 2 s for one more message, and only then stops; a waiting loop is
    only woken by a message. So set the flag and send two harmless,
    idempotent messages (a discover sweep finds nothing to do).
    """
    from celery.worker import state

    from worker.celery import DISCOVER_TASK

    state.should_terminate = 0
    for _ in range(2):
        celery_app.send_task(DISCOVER_TASK)


def _wait_learned(store: Store, expected: dict[str, int], timeout: float) -> None:
    """Until every agent has its runs indexed and learned (lag 0)."""
    deadline = time.monotonic() + timeout
    while True:
        cursors = store.cursors(expected)
        if all(cursors[a].index_length >= n and cursors[a].lag == 0 for a, n in expected.items()):
            return
        if time.monotonic() > deadline:
            learned = sum(min(c.learned, expected[a]) for a, c in cursors.items())
            raise _fail(
                f"timed out after {timeout:.0f} s: the worker learned {learned} of "
                f"{sum(expected.values())} sample runs ({store.dead_letter_count()} dead letters)"
            )
        time.sleep(0.02)


def _agent_report(store: Store, agent: str) -> dict[str, Any]:
    """What `run` shows of one agent: plan groups, default hints, stable prefix."""
    cursor = store.cursor(agent)
    plan = store.get_plan(agent)
    trie = _trie(store, agent)
    stability = store.get_stability(agent)
    report: dict[str, Any] = {
        "runs": cursor.index_length,
        "learned": cursor.learned,
        "parallel_groups": (
            [g.model_dump() for g in plan.parallel_groups] if plan is not None else None
        ),
        "default_hints": default_hints(trie) if trie is not None else None,
        "stable_prefix": None,
    }
    if stability is not None:
        report["stable_prefix"] = {
            "stable_prefix_length": stability.stable_prefix_length,
            "total_observations": stability.total_observations,
            "stable_prefix_fingerprint": stability.stable_prefix_fingerprint,
            "span_ids": _stable_prefix_spans(store, agent, stability.stable_prefix_length),
        }
    return report


def _groups_table(title: str, groups: list[dict[str, Any]]) -> Table:
    table = _table(title)
    table.add_column("group", overflow="fold")
    table.add_column("tools run in parallel", overflow="fold")
    for group in groups:
        table.add_row(group["group_id"], ", ".join(group["tool_names"]))
    return table


def _print_agent_report(agent: str, item: dict[str, Any]) -> None:
    out.print()
    out.rule(
        Text.assemble((_safe(agent), "bold"), f": {item['learned']} of {item['runs']} runs learned")
    )
    groups = item["parallel_groups"]
    if groups:
        out.print(_groups_table("tool-parallelism plan", groups))
    else:
        out.print("tool-parallelism plan: none learned (no tools ran in parallel)")
    hints = item["default_hints"]
    if hints:
        out.print(_kv_table("default hints", hints))
    else:
        out.print("default hints: none (no finished LLM call learned)")
    prefix = item["stable_prefix"]
    if prefix is None:
        out.print("stable prompt prefix: none learned")
        return
    out.print(
        f"stable prompt prefix: {prefix['stable_prefix_length']} blocks over "
        f"{prefix['total_observations']} observations",
        highlight=False,
    )
    for n, span in enumerate(prefix["span_ids"], start=1):
        out.print(f"  {n}. {span}", highlight=False)
    fingerprint = prefix["stable_prefix_fingerprint"] or "-"
    out.print(f"  fingerprint {fingerprint}", highlight=False, soft_wrap=True)


# -------------------------------------------------------------------- submit


@app.command()
@_guard
def submit(
    file: Annotated[
        str | None,
        typer.Argument(help="run records: JSON array or JSON Lines; - for stdin"),
    ] = None,
    samples: Annotated[
        bool, typer.Option("--samples", help="submit the bundled sample runs instead of FILE")
    ] = False,
    redis_url: RedisUrl = None,
    prefix: Prefix = None,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="seconds to wait for the broker to take the runs")
    ] = 30.0,
    as_json: AsJson = False,
) -> None:
    """Hand run records to the workers through the broker, as an agent does.

    Uses the agent-side client (`tasks.client.RunClient`): the records are
    validated here first (an invalid one: nothing is sent, exit 2), then
    published in batches to the ingest queue; the workers store and learn
    them. If the broker cannot be reached the runs are not lost: they go to
    the client's spool directory (ADAPTIVE_CLIENT_SPOOL_DIR) and the exit
    status is 3; the next `submit` (or any client using that directory)
    sends them once the broker answers. Needs a broker: the embedded
    default's in-memory one lives inside `adaptive-worker run` only.
    """
    settings = _settings(redis_url, prefix)
    if settings.effective_broker_url.startswith("memory://"):
        raise _fail(
            f"submit needs a broker that workers share: set {ENV_PREFIX}REDIS_URL (or "
            "--redis-url); the embedded default's in-memory broker lives inside "
            "`adaptive-worker run` only",
            EXIT_BAD_INPUT,
        )
    if samples == (file is not None):
        raise _fail("give either FILE (or - for stdin) or --samples", EXIT_BAD_INPUT)
    if samples:
        from worker.samples import sample_runs

        runs = [run for runs in sample_runs().values() for run in runs]
        records = [Record(f"record {n}", n, run) for n, run in enumerate(runs, start=1)]
        source = "the bundled samples"
    else:
        assert file is not None
        source = "stdin" if file == "-" else file
        records = _records_or_exit(source, file, settings, "nothing submitted")
    if not records:
        raise _fail(f"{source}: no run records", EXIT_BAD_INPUT)
    for record in records:
        problem = record.problem or _run_problem(record.text, settings)
        if problem is not None:
            message = f"{source}: {record.where}: {problem}; nothing submitted"
            raise _fail(message, EXIT_BAD_INPUT)
    payloads = [str(record.text) for record in records]

    from tasks.client import RunClient, default_spool_dir

    # The client logs broker trouble as warnings, which Python prints to
    # stderr when logging is not set up; here the one-line summary says it.
    # A handler (that drops them) stops that fallback; configured logging
    # still gets them.
    client_log = logging.getLogger("tasks.client")
    if not any(isinstance(h, logging.NullHandler) for h in client_log.handlers):
        client_log.addHandler(logging.NullHandler())
    client = RunClient(settings)
    try:
        # In slices the buffer always has room for, so nothing is dropped.
        step = max(1, min(settings.client_buffer_max_runs, 1000))
        deadline = time.monotonic() + timeout
        for start in range(0, len(payloads), step):
            client.submit_runs(payloads[start : start + step])
            client.flush(max(0.1, deadline - time.monotonic()))
        stats = client.stats()
    finally:
        client.close(timeout=min(timeout, settings.client_exit_timeout_s))
    pending = int(stats["spool_runs"] or 0) + int(stats["buffered"] or 0)
    pending += int(stats["inflight"] or 0)
    dropped = int(stats["dropped"] or 0)
    summary = {
        "runs": len(payloads),
        "published": stats["published"],
        "messages": stats["messages"],
        "replayed_from_spool": stats["replayed"],
        "spooled": pending,
        "dropped": dropped,
        "broker": _masked(settings.effective_broker_url),
        "spool_dir": str(settings.client_spool_dir or default_spool_dir()),
    }
    if as_json:
        _emit_json(summary)
    else:
        table = _kv_table("submit", {k.replace("_", " "): v for k, v in summary.items()})
        out.print(table)
    if pending or dropped:
        raise _fail(
            f"broker {summary['broker']} did not take every run ({stats['last_error']}): "
            f"{pending} runs wait in {summary['spool_dir']}; the next submit (or client) using "
            "that spool directory sends them once the broker answers"
            + (f"; {dropped} dropped" if dropped else ""),
            EXIT_UNAVAILABLE,
        )


# -------------------------------------------------------------------- replay


@app.command()
@_guard
def replay(
    file: Annotated[str, typer.Argument(help="run records: JSON array or JSON Lines; - for stdin")],
    redis_url: RedisUrl = None,
    prefix: Prefix = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable summary")] = False,
) -> None:
    """Store and learn run records in file order, in-process (no broker).

    Uses the worker's own storage and commit code. A record that cannot be
    used (not JSON, nested too deep, not a valid run...) is skipped and
    dead-lettered, with its line number (item number in a JSON array) and
    reason on stderr and under `skipped` in --json; every other record is
    stored and learned. Exit status 2 if any record was skipped. A file that
    cannot be read at all (missing, or a JSON array that does not parse)
    stores nothing and exits 2.
    """
    settings = _settings(redis_url, prefix)
    store = _store(settings)
    source = "stdin" if file == "-" else file
    records = _records_or_exit(source, file, settings, "nothing stored")
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
    result = _ingest(store, [r.text for r in good], settings)
    # ingest dead-letters the records that are not valid runs itself.
    bad += [
        Record(good[pos].where, good[pos].number, "", reason) for pos, reason in result.rejected
    ]
    bad.sort(key=lambda r: r.number)
    config = engine_config(settings)
    learned = 0
    keys: set[str] = set()
    for agent in result.agents:
        s = learn_agent(store, agent, max_runs=settings.learn_batch_size, config=config)
        learned += s.learned
        keys |= s.keys_written
    summary = {
        "runs_stored": len(result.stored),
        "already_known": len(result.duplicates),
        "rejected": len(bad),
        "conflicting_duplicates": len(result.conflicts),
        "learned": learned,
        "agents": sorted(result.agents),
        "keys_written": sorted(keys),
    }
    if as_json:
        skipped = [{**r.position, "reason": r.problem} for r in bad]
        _emit_json({**summary, "skipped": skipped})
    else:
        shown = {name.replace("_", " "): value for name, value in summary.items()}
        shown["keys written"] = len(keys)
        out.print(_kv_table("replay", shown))
    problems = [f"{source}: {r.where}: {r.problem}; skipped and dead-lettered" for r in bad]
    if result.conflicts:
        ids = ", ".join(run.id for run in result.conflicts[:3])
        ids += ", ..." if len(result.conflicts) > 3 else ""
        problems.append(
            f"{source}: {len(result.conflicts)} runs ({ids}) "
            "reuse the id of a stored run with other content; the stored one is kept, these "
            "are dead-lettered"
        )
    for line in problems[:MAX_ERROR_LINES]:
        _error(line)
    if len(problems) > MAX_ERROR_LINES:
        more = len(problems) - MAX_ERROR_LINES
        _error(
            f"{source}: {more} more records skipped and dead-lettered (see --json, or "
            "`adaptive-worker dead-letters list`)"
        )
    if problems:
        raise typer.Exit(EXIT_BAD_INPUT)


# ------------------------------------------------------------ learned state


@app.command()
@_guard
def agents(redis_url: RedisUrl = None, prefix: Prefix = None, as_json: AsJson = False) -> None:
    """Agents with runs under the prefix, how far learning is, and what is learned."""
    settings = _settings(redis_url, prefix)
    store = _store(settings)
    ids = store.agent_ids()
    cursors = store.cursors(ids)
    k = store.keys
    pipe = store.client.pipeline(transaction=False)
    for agent in ids:
        pipe.exists(k.plan(agent))
        pipe.exists(k.trie(agent))
        pipe.exists(k.acg_stability(agent))
    flags = pipe.execute() if ids else []
    rows = []
    for i, agent in enumerate(ids):
        c = cursors[agent]
        rows.append(
            {
                "agent_id": agent,
                "runs": c.index_length,
                "learned": c.learned,
                "trimmed": c.base,
                "lag": c.lag,
                "plan": bool(flags[3 * i]),
                "trie": bool(flags[3 * i + 1]),
                "stability": bool(flags[3 * i + 2]),
            }
        )
    if as_json:
        _emit_json(rows)
        return
    if not rows:
        out.print(f"no agents under prefix {settings.key_prefix!r}", highlight=False)
        return
    table = _table(f"agents under {settings.key_prefix!r}")
    for column in ("agent", "runs", "learned", "trimmed", "lag", "plan", "trie", "stability"):
        right = column in {"runs", "learned", "trimmed", "lag"}
        table.add_column(column, justify="right" if right else "left", overflow="fold")
    for row in rows:
        table.add_row(
            str(row["agent_id"]),
            *(str(row[c]) for c in ("runs", "learned", "trimmed", "lag")),
            *("yes" if row[c] else "-" for c in ("plan", "trie", "stability")),
        )
    out.print(table)


@app.command()
@_guard
def plan(
    agent: AgentArg, redis_url: RedisUrl = None, prefix: Prefix = None, as_json: AsJson = False
) -> None:
    """The agent's tool-parallelism plan (`plan:{agent}`), as the runtime reads it."""
    store = _store(_settings(redis_url, prefix))
    raw = store.client.get(store.keys.plan(agent))
    if raw is None:
        raise _not_found(store, agent, "plan")
    value = parse_wire(ExecutionPlan, raw)
    if as_json:
        _emit_json(_wire(raw))
        return
    groups = [g.model_dump() for g in value.parallel_groups]
    out.print(_groups_table(f"tool-parallelism plan of {agent}", groups))
    out.print(
        f"template run {value.metadata_template.run_id}, "
        f"{len(value.metadata_template.parallel_hints)} parallel hints",
        highlight=False,
    )


@app.command()
@_guard
def hints(
    agent: AgentArg,
    path: Annotated[
        str | None,
        typer.Option(help="scope path from the trie root, names joined by / (e.g. openai)"),
    ] = None,
    call_index: Annotated[
        int | None,
        typer.Option("--call-index", min=1, max=U32_MAX, help="1-based LLM call index"),
    ] = None,
    redis_url: RedisUrl = None,
    prefix: Prefix = None,
    as_json: AsJson = False,
) -> None:
    """Latency hints for an LLM call, from the learned trie (`trie:{agent}`).

    Without --path and --call-index: the default hints (the root's
    any-index prediction, what the runtime injects without a better match).
    With either: what the runtime injects for that scope path and call index
    (`tasks.client.load_hints` gives the same). A path the trie does not
    have falls back, as in the runtime, to its longest prefix that it has
    (the root at worst): a note on stderr says so, and --json gives
    `matched_path` and `fallback`.
    """
    names: tuple[str, ...] = ()
    if path is not None:
        names = tuple(path.strip("/").split("/")) if path.strip("/") else ()
        if any(not n for n in names):
            raise _fail(f"--path {path!r}: empty name between slashes", EXIT_BAD_INPUT)
    store = _store(_settings(redis_url, prefix))
    trie = _trie(store, agent)
    if trie is None:
        raise _not_found(store, agent, "trie")
    matched = _matched_path(trie, names)
    fallback = matched != names
    if path is None and call_index is None:
        kind = "default hints"
        value = default_hints(trie)
    else:
        kind = f"hints for path {'/'.join(names) or '(root)'}, call {call_index or 1}"
        value = agent_hints(trie, names, call_index or 1, agent)
    if fallback:
        stop = repr("/".join(matched)) if matched else "the root"
        _note(
            f"path {'/'.join(names)!r} is not in the trie of agent {agent!r}, which stops at "
            f"{stop}: these hints come from there, as the runtime's lookup falls back"
        )
    if as_json:
        _emit_json(
            {
                "hints": value,
                "path": list(names) if path is not None else None,
                "matched_path": list(matched),
                "fallback": fallback,
                "call_index": call_index or (1 if path is not None else None),
            }
        )
        return
    if value is None:
        out.print(f"{agent}: no prediction in the trie, so no hints", highlight=False)
        return
    out.print(_kv_table(f"{kind} of {agent}", value))
    children = sorted((trie.get("root") or {}).get("children") or {})
    if children:
        out.print(f"paths in the trie: {', '.join(children)}", highlight=False)


def _matched_path(trie: dict[str, Any], names: Sequence[str]) -> tuple[str, ...]:
    """The longest prefix of `names` the trie has: where the runtime's lookup
    (`worker.engine.latency.lookup`) stops walking."""
    node = trie.get("root") if isinstance(trie.get("root"), dict) else trie
    matched: list[str] = []
    for name in names:
        children = node.get("children") if isinstance(node, dict) else None
        child = children.get(name) if isinstance(children, dict) else None
        if not isinstance(child, dict):
            break
        matched.append(name)
        node = child
    return tuple(matched)


@app.command()
@_guard
def stability(
    agent: AgentArg, redis_url: RedisUrl = None, prefix: Prefix = None, as_json: AsJson = False
) -> None:
    """The agent's ACG prompt stability (`acg_stability:{agent}`) and its stable prefix."""
    store = _store(_settings(redis_url, prefix))
    value = store.get_stability(agent)
    if value is None:
        raise _not_found(store, agent, "prompt stability")
    spans = _stable_prefix_spans(store, agent, value.stable_prefix_length)
    learning_keys = [key for key in store.learning_keys(agent) if key != agent]
    if as_json:
        raw = store.client.get(store.keys.acg_stability(agent))
        _emit_json(
            {
                "stability": _wire(raw) if raw is not None else None,
                "stable_prefix_span_ids": spans,
                "learning_keys": learning_keys,
            }
        )
        return
    out.print(
        f"stable prompt prefix of {agent}: {value.stable_prefix_length} blocks over "
        f"{value.total_observations} observations",
        highlight=False,
    )
    fingerprint = value.stable_prefix_fingerprint or "-"
    out.print(f"fingerprint: {fingerprint}", highlight=False, soft_wrap=True)
    if spans:
        out.print(f"prefix blocks: {', '.join(spans)}", highlight=False, soft_wrap=True)
    table = _table("block stability")
    for column in ("span", "class", "score", "confidence", "observations"):
        table.add_column(
            column, overflow="fold", justify="left" if column in {"span", "class"} else "right"
        )
    for s in value.scores:
        table.add_row(
            s.span_id,
            s.classification,
            f"{s.score:.3f}",
            f"{s.confidence:.3f}",
            str(s.observation_count),
        )
    out.print(table)
    if learning_keys:
        out.print(f"learning keys: {len(learning_keys)} (see --json)", highlight=False)


# --------------------------------------------------------------- maintenance


@app.command("rebuild")
@_guard
def rebuild_command(
    agent: Annotated[str | None, typer.Argument(help="agent id (or --all)")] = None,
    all_agents: Annotated[bool, typer.Option("--all", help="every agent under the prefix")] = False,
    redis_url: RedisUrl = None,
    prefix: Prefix = None,
    as_json: AsJson = False,
) -> None:
    """Recompute learned state from the retained runs, in-process, and swap it in.

    The same rebuild the beat runs daily (atomic: readers see the old state
    or the new one). Runs that arrive meanwhile are learned on top right after.
    """
    if all_agents == (agent is not None):
        raise _fail("give either AGENT or --all", EXIT_BAD_INPUT)
    settings = _settings(redis_url, prefix)
    store = _store(settings)
    if agent is not None:
        _require_agent(store, agent)
        targets = [agent]
    else:
        targets = store.agent_ids()
    config = engine_config(settings)
    results: list[dict[str, Any]] = []
    progress = Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=as_json,
    )
    with progress:
        for target in targets:
            task = progress.add_task(_safe(f"rebuild {target}"), total=None)

            def step(done: int, total: int, task: Any = task) -> None:
                progress.update(task, completed=done, total=total)

            result = rebuild(
                store, target, config=config, chunk=settings.learn_batch_size, progress=step
            )
            progress.update(task, completed=result.runs, total=result.runs)
            caught_up = learn_agent(
                store, target, max_runs=settings.learn_batch_size, config=config
            )
            results.append(
                {
                    "agent_id": target,
                    "runs": result.runs,
                    "learned": result.learned + caught_up.learned,
                    "version": result.version,
                    "deleted_keys": len(result.deleted),
                    "learned_after": caught_up.learned,
                }
            )
    if as_json:
        _emit_json(results)
        return
    if not results:
        out.print(f"no agents under prefix {settings.key_prefix!r}", highlight=False)
        return
    table = _table("rebuild")
    for column in ("agent", "runs", "state version", "stale keys deleted", "learned after"):
        table.add_column(column, justify="left" if column == "agent" else "right")
    for r in results:
        table.add_row(
            r["agent_id"],
            str(r["runs"]),
            str(r["version"]),
            str(r["deleted_keys"]),
            str(r["learned_after"]),
        )
    out.print(table)


@app.command()
@_guard
def stats(redis_url: RedisUrl = None, prefix: Prefix = None, as_json: AsJson = False) -> None:
    """Learning progress and counters (the numbers `/metrics` exports)."""
    from worker.metrics import snapshot

    store = _store(_settings(redis_url, prefix))
    snap = snapshot(store)
    if as_json:
        _emit_json(snap)
        return
    summary = {
        "agents": snap["agent_count"],
        "lag (runs not learned)": snap["lag_total"],
        "dead letters now": snap["dead_letter_list_length"],
        **{name.replace("_", " "): value for name, value in snap["counters"].items()},
    }
    out.print(_kv_table(f"stats of {store.keys.prefix!r}", summary))
    if snap["agents"]:
        table = _table("per agent")
        for column in ("agent", "runs", "learned", "trimmed", "lag"):
            table.add_column(column, justify="left" if column == "agent" else "right")
        for agent, a in snap["agents"].items():
            table.add_row(
                agent, str(a["index_length"]), str(a["learned"]), str(a["base"]), str(a["lag"])
            )
        out.print(table)


@app.command()
@_guard
def retention(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="only show what the policy would drop")
    ] = False,
    max_runs: Annotated[
        int | None,
        typer.Option(min=1, help="keep at most this many runs per agent (default: setting)"),
    ] = None,
    max_age_s: Annotated[
        int | None,
        typer.Option(min=1, help="drop runs older than this many seconds (default: setting)"),
    ] = None,
    redis_url: RedisUrl = None,
    prefix: Prefix = None,
    as_json: AsJson = False,
) -> None:
    """Apply the retention policy to every agent (only learned runs are ever dropped).

    The policy is ADAPTIVE_RETENTION_MAX_RUNS / ADAPTIVE_RETENTION_MAX_AGE_S
    unless --max-runs / --max-age-s say otherwise. Dropped run ids are
    remembered (tombstones), so a late duplicate is refused, not learned twice.
    """
    settings = _settings(redis_url, prefix)
    store = _store(settings)
    keep = max_runs if max_runs is not None else settings.retention_max_runs
    age = max_age_s if max_age_s is not None else settings.retention_max_age_s
    policy = {"max_runs": keep, "max_age_s": age}
    rows: list[dict[str, Any]] = []
    if keep is not None or age is not None:
        for agent in store.agent_ids():
            planned = plan_retention(store, agent, max_runs=keep, max_age_s=age)
            row = {
                "agent_id": agent,
                "runs": planned.index_length,
                "learned_in_index": planned.learned_unretained,
                "to_drop": planned.to_drop,
            }
            if not dry_run:
                row["dropped"] = apply_retention(
                    store,
                    agent,
                    max_runs=keep,
                    max_age_s=age,
                    tombstones=settings.retention_tombstones,
                )
            rows.append(row)
    if as_json:
        _emit_json({"dry_run": dry_run, "policy": policy, "agents": rows})
        return
    if keep is None and age is None:
        out.print(
            f"no retention policy ({ENV_PREFIX}RETENTION_MAX_RUNS, "
            f"{ENV_PREFIX}RETENTION_MAX_AGE_S, --max-runs, --max-age-s): every run is kept",
            highlight=False,
        )
        return
    shown = ", ".join(f"{k} {v}" for k, v in policy.items() if v is not None)
    title = f"retention ({shown}){' - dry run, nothing dropped' if dry_run else ''}"
    table = _table(title)
    columns = ["agent", "runs", "learned", "to drop"] + ([] if dry_run else ["dropped"])
    for column in columns:
        table.add_column(column, justify="left" if column == "agent" else "right")
    for r in rows:
        cells = [r["agent_id"], str(r["runs"]), str(r["learned_in_index"]), str(r["to_drop"])]
        table.add_row(*cells, *([] if dry_run else [str(r["dropped"])]))
    out.print(table)


# -------------------------------------------------------------- dead letters


def _parse_entry(index: int, entry: bytes) -> dict[str, Any]:
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


def _raw_dead_letters(store: Store, start: int, stop: int) -> list[bytes]:
    """Entries as stored, undecoded: one entry that is not UTF-8 must not make
    the whole list unreadable (the store's client decodes every reply)."""
    key = store.keys.dead_letters()
    entries: list[bytes] = store.client.execute_command(
        "LRANGE", key, start, stop, **{NEVER_DECODE: []}
    )
    return entries


def _entries(store: Store, indexes: Sequence[int]) -> list[tuple[int, bytes]]:
    """(position, entry) for the given positions, or every entry when none are given."""
    if not indexes:
        return list(enumerate(_raw_dead_letters(store, 0, -1)))
    found = []
    for index in indexes:
        entry = store.client.execute_command(
            "LINDEX", store.keys.dead_letters(), index, **{NEVER_DECODE: []}
        )
        if entry is None:
            raise _fail(
                f"no dead letter at position {index} (the list has {store.dead_letter_count()})",
                EXIT_NOT_FOUND,
            )
        found.append((index, entry))
    return found


@dead_letters_app.command("list")
@_guard
def dead_letters_list(
    limit: Annotated[int, typer.Option(min=1, help="show at most this many")] = 50,
    offset: Annotated[int, typer.Option(min=0, help="start at this position")] = 0,
    redis_url: RedisUrl = None,
    prefix: Prefix = None,
    as_json: AsJson = False,
) -> None:
    """Entries of the dead-letter list, oldest first (raw payloads with `show`)."""
    store = _store(_settings(redis_url, prefix))
    total = store.dead_letter_count()
    stored = _raw_dead_letters(store, offset, offset + limit - 1)
    entries = [_parse_entry(offset + i, e) for i, e in enumerate(stored)]
    for item in entries:
        raw = item.pop("raw", None)
        if not isinstance(item.get("raw_bytes"), int):  # entries record the original size
            item["raw_bytes"] = (
                len(raw.encode("utf-8", "surrogatepass")) if isinstance(raw, str) else 0
            )
    if as_json:
        _emit_json({"total": total, "entries": entries})
        return
    if not entries:
        empty = (
            f"no dead letters from position {offset} ({total} in all)"
            if total
            else f"no dead letters under {store.keys.prefix!r}"
        )
        out.print(empty, highlight=False)
        return
    table = _table(f"dead letters ({total} in all)")
    for column in ("#", "at", "stage", "agent / run", "reason", "bytes"):
        table.add_column(column, overflow="fold", justify="right" if column in "#bytes" else "left")
    for item in entries:
        reason = str(item.get("reason", ""))
        who = " / ".join(str(item[k]) for k in ("agent_id", "run_id") if item.get(k)) or "-"
        table.add_row(
            str(item["index"]),
            str(item.get("at", "-"))[:19].replace("T", " "),
            str(item.get("stage", "-")),
            who,
            reason if len(reason) <= 160 else reason[:157] + "...",
            str(item["raw_bytes"]),
        )
    out.print(table)


@dead_letters_app.command("show")
@_guard
def dead_letters_show(
    index: Annotated[int, typer.Argument(help="position in the list, as `list` shows it")],
    redis_url: RedisUrl = None,
    prefix: Prefix = None,
    as_json: AsJson = False,
) -> None:
    """One dead letter in full, with its raw payload."""
    store = _store(_settings(redis_url, prefix))
    ((pos, entry),) = _entries(store, [index])
    item = _parse_entry(pos, entry)
    if as_json:
        _emit_json(item)
        return
    raw = item.pop("raw", None)
    out.print(_kv_table(f"dead letter {pos}", item))
    if raw is None or raw == "":
        out.print("raw payload: (empty)")
        return
    out.print("raw payload:")
    out.print(_payload_text(raw if isinstance(raw, str) else _json_text(raw)), soft_wrap=True)


def _payload_text(raw: str) -> Text:
    """A raw payload for the terminal: indented and coloured when it is JSON
    (a lone surrogate shown as its escape), else as it is; never markup, and
    never a RecursionError for a payload nested deeper than Python recurses."""
    try:
        shown = _json_text(json.loads(raw))
    except (ValueError, RecursionError):
        return Text(_safe(raw, newlines=True))
    text = Text(_safe(shown, newlines=True))
    JSONHighlighter().highlight(text)
    return text


@dead_letters_app.command("replay")
@_guard
def dead_letters_replay(
    indexes: Annotated[
        list[int] | None, typer.Argument(help="positions to replay (default: every entry)")
    ] = None,
    redis_url: RedisUrl = None,
    prefix: Prefix = None,
    as_json: AsJson = False,
) -> None:
    """Ingest the raw payloads again and learn them, in-process.

    Payloads that validate now (e.g. after an upgrade, or a limit raised) are
    stored and leave the list; a run stored already counts as done too.
    The others stay where they are, with their original reason.
    """
    settings = _settings(redis_url, prefix)
    store = _store(settings)
    selected = _entries(store, indexes or [])
    valid: list[tuple[str, str]] = []  # (entry, payload)
    still: list[dict[str, Any]] = []
    for pos, entry in selected:
        item = _parse_entry(pos, entry)
        raw = item.get("raw")
        try:
            text = entry.decode("utf-8")
        except UnicodeDecodeError:
            still.append({"index": pos, "reason": str(item["reason"])})
            continue
        if not isinstance(raw, str) or not raw:
            still.append({"index": pos, "reason": "no payload to replay"})
            continue
        problem = _run_problem(raw, settings)
        if problem is not None:
            still.append({"index": pos, "reason": problem})
            continue
        valid.append((text, raw))
    result = _ingest(store, [payload for _, payload in valid], settings)
    removed = store.remove_dead_letters([entry for entry, _ in valid])
    config = engine_config(settings)
    learned = sum(
        learn_agent(store, a, max_runs=settings.learn_batch_size, config=config).learned
        for a in result.agents
    )
    summary = {
        "selected": len(selected),
        "stored": len(result.stored),
        "already_stored": len(result.duplicates),
        "removed": removed,
        "still_invalid": len(still),
        "learned": learned,
        "agents": sorted(result.agents),
        "remaining": store.dead_letter_count(),
    }
    if as_json:
        _emit_json({**summary, "invalid": still})
        return
    out.print(
        _kv_table(
            "dead-letter replay",
            {
                k.replace("_", " "): ", ".join(v) if isinstance(v, list) else v
                for k, v in summary.items()
            },
        )
    )
    for item in still[:10]:
        out.print(f"  still invalid #{item['index']}: {item['reason'][:200]}", highlight=False)


@dead_letters_app.command("purge")
@_guard
def dead_letters_purge(
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
    redis_url: RedisUrl = None,
    prefix: Prefix = None,
    as_json: AsJson = False,
) -> None:
    """Delete every dead letter (the `dead_letters` counter keeps its total)."""
    store = _store(_settings(redis_url, prefix))
    count = store.dead_letter_count()
    if count and not yes:
        if not sys.stdin.isatty():
            raise _fail(f"not purging {count} dead letters without --yes", EXIT_BAD_INPUT)
        if not typer.confirm(f"delete {count} dead letters?", err=True):
            raise _fail("not purged", EXIT_FAILED)
    purged = store.purge_dead_letters() if count else 0
    if as_json:
        _emit_json({"purged": purged})
    else:
        out.print(f"purged {purged} dead letters", highlight=False)


def main() -> None:  # pragma: no cover - console script shim
    app()


__all__ = ["BadInput", "app", "engine_config", "main", "read_records"]
