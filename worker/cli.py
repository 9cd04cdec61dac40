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
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import redis
import typer
from kombu.utils.url import maybe_sanitize_url
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from storage.connection import connect
from storage.errors import InvalidRecord
from storage.models import ExecutionPlan, TrieEnvelope, parse_wire
from storage.store import Cursor, Store
from tasks.learning import ingest, learn_agent, validate_payload
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
out = Console()
err = Console(stderr=True, soft_wrap=True)

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
EXIT_NOT_FOUND = 4

# The embedded default's in-memory broker is polled (kombu's virtual
# transport sleeps between empty polls, 1 s by default): a short interval
# lets the sample runs travel ingest -> learn in well under a second.
EMBEDDED_POLL_S = 0.02
U32_MAX = 0xFFFFFFFF

P = ParamSpec("P")
R = TypeVar("R")


# ------------------------------------------------------------------ helpers


def _fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    return typer.Exit(code)


def _guard(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn what a user can cause (Redis gone mid-command, a corrupt stored
    value, a bad setting) into one line and an exit code instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise _fail(f"lost the connection to Redis: {exc}", EXIT_UNAVAILABLE) from None
        except redis.RedisError as exc:
            raise _fail(f"Redis refused a command: {exc}", EXIT_FAILED) from None
        except InvalidRecord as exc:
            raise _fail(f"a stored value cannot be read: {exc}", EXIT_FAILED) from None
        except SettingsError as exc:
            raise _fail(str(exc), EXIT_BAD_INPUT) from None

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
        raise _fail(str(exc), EXIT_BAD_INPUT) from None


def _masked(url: str | None) -> str:
    """A URL fit for a message: no password."""
    return "the embedded Redis" if url is None else str(maybe_sanitize_url(url))


def _store(settings: Settings) -> Store:
    client = connect(settings.redis_url)
    try:
        client.ping()
    except redis.RedisError as exc:
        message = f"cannot reach Redis at {_masked(settings.redis_url)}: {exc}"
        raise _fail(message, EXIT_UNAVAILABLE) from None
    return Store(client, settings.key_prefix)


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(observation_window=settings.observation_window)


def _emit_json(data: Any) -> None:
    """One JSON document on stdout (plain text: no markup, no wrapping)."""
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _wire(raw: str) -> Any:
    return json.loads(raw)


class BadInput(ValueError):
    """A records file that cannot be read; `payloads` holds what came before the fault."""

    def __init__(self, message: str, payloads: list[str]) -> None:
        super().__init__(message)
        self.payloads = payloads


def read_records(text: str) -> list[str]:
    """Run payloads from a JSON array or JSON Lines, as JSON strings, in file order."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadInput(f"not a valid JSON array: {exc}", []) from None
        return [json.dumps(item) if not isinstance(item, str) else item for item in items]
    payloads: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInput(f"line {number}: not valid JSON: {exc}", payloads) from None
        payloads.append(line)
    return payloads


def _read_file(file: str) -> str:
    if file == "-":
        return sys.stdin.read()
    try:
        return Path(file).read_text(encoding="utf-8")
    except OSError as exc:
        raise _fail(f"cannot read {file}: {exc.strerror}", EXIT_BAD_INPUT) from None
    except UnicodeDecodeError as exc:
        raise _fail(f"cannot read {file}: not UTF-8 text ({exc.reason})", EXIT_BAD_INPUT) from None


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
    return Table(title=title, title_justify="left", min_width=len(title or ""), **options)


def _kv_table(title: str | None, rows: dict[str, Any]) -> Table:
    table = _table(title, show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for name, value in rows.items():
        table.add_row(name, "-" if value is None else str(value))
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
    out.rule(f"[bold]{agent}[/]: {item['learned']} of {item['runs']} runs learned")
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
        f"stable prompt prefix: [bold]{prefix['stable_prefix_length']}[/] blocks over "
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

        payloads = [run for runs in sample_runs().values() for run in runs]
        source = "the bundled samples"
    else:
        assert file is not None
        source = "stdin" if file == "-" else file
        try:
            payloads = read_records(_read_file(file))
        except BadInput as exc:
            raise _fail(f"{source}: {exc}; nothing submitted", EXIT_BAD_INPUT) from None
    if not payloads:
        raise _fail(f"{source}: no run records", EXIT_BAD_INPUT)
    for pos, payload in enumerate(payloads, start=1):
        try:
            validate_payload(payload, settings.max_run_bytes)
        except InvalidRecord as exc:
            raise _fail(
                f"{source}: record {pos}: {exc}; nothing submitted", EXIT_BAD_INPUT
            ) from None

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

    Uses the worker's own storage and commit code. On bad input the runs
    before the bad one stay stored and learned, the bad one is dead-lettered,
    and the exit status is non-zero.
    """
    settings = _settings(redis_url, prefix)
    store = _store(settings)
    problem: str | None = None
    try:
        payloads = read_records(_read_file(file))
    except BadInput as exc:
        payloads, problem = exc.payloads, str(exc)
    result = ingest(store, payloads, settings.max_run_bytes)
    if result.rejected:
        pos, reason = result.rejected[0]
        problem = problem or f"record {pos + 1}: {reason}"
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
        "rejected": len(result.rejected),
        "learned": learned,
        "agents": sorted(result.agents),
        "keys_written": sorted(keys),
    }
    if as_json:
        out.print_json(data=summary)
    else:
        table = Table(title="replay", show_header=False)
        for name, value in summary.items():
            shown = ", ".join(value) if isinstance(value, list) else str(value)
            if name == "keys_written":
                shown = str(len(value))
            table.add_row(name.replace("_", " "), shown)
        out.print(table)
    if problem:
        raise _fail(problem, EXIT_BAD_INPUT)


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
            row["agent_id"],
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
    (`tasks.client.load_hints` gives the same).
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
    if path is None and call_index is None:
        kind = "default hints"
        value = default_hints(trie)
    else:
        kind = f"hints for path {'/'.join(names) or '(root)'}, call {call_index or 1}"
        value = agent_hints(trie, names, call_index or 1, agent)
    if as_json:
        _emit_json(value)
        return
    if value is None:
        out.print(f"{agent}: no prediction in the trie, so no hints", highlight=False)
        return
    out.print(_kv_table(f"{kind} of {agent}", value))
    children = sorted((trie.get("root") or {}).get("children") or {})
    if children:
        out.print(f"paths in the trie: {', '.join(children)}", highlight=False)


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
        f"stable prompt prefix of {agent}: [bold]{value.stable_prefix_length}[/] blocks over "
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
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=as_json,
    )
    with progress:
        for target in targets:
            task = progress.add_task(f"rebuild {target}", total=None)

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


def _parse_entry(index: int, entry: str) -> dict[str, Any]:
    """One dead-letter entry as a dict; an entry that is not ours is shown as raw."""
    try:
        value = json.loads(entry)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        return {"index": index, "reason": "not a dead-letter entry", "raw": entry}
    return {"index": index, **value}


def _entries(store: Store, indexes: Sequence[int]) -> list[tuple[int, str]]:
    """(position, entry) for the given positions, or every entry when none are given."""
    if not indexes:
        return list(enumerate(store.dead_letters()))
    found = []
    for index in indexes:
        entry = store.dead_letter_at(index)
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
    entries = [_parse_entry(offset + i, e) for i, e in enumerate(store.dead_letters(offset, limit))]
    for item in entries:
        raw = item.pop("raw", None)
        item["raw_bytes"] = len(raw.encode()) if isinstance(raw, str) else 0
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
    if not raw:
        out.print("raw payload: (empty)")
        return
    out.print("raw payload:")
    try:
        out.print_json(raw)
    except (ValueError, TypeError):
        out.print(raw, markup=False, highlight=False)


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
            if not isinstance(raw, str) or not raw:
                raise InvalidRecord("RunRecord", [("", "no payload to replay")])
            validate_payload(raw, settings.max_run_bytes)
        except InvalidRecord as exc:
            still.append({"index": pos, "reason": str(exc)})
            continue
        valid.append((entry, raw))
    result = ingest(store, [payload for _, payload in valid], settings.max_run_bytes)
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
