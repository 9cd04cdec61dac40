"""`adaptive-worker run`: the embedded default, or a real Celery worker."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from worker.cli.options import (
    ENV_PREFIX,
    EXIT_BAD_INPUT,
    Prefix,
    RedisUrl,
    fail,
    guard,
    masked,
    open_store,
    settings_from,
    state_location,
)

if TYPE_CHECKING:
    from pathlib import Path

    from celery import Celery

    from storage.store import Store
    from worker.settings import Settings

# The embedded default's in-memory broker is polled (kombu's virtual
# transport sleeps between empty polls, 1 s by default): a short interval
# lets the sample runs travel ingest -> learn in well under a second.
EMBEDDED_POLL_S = 0.02


@guard
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
    `adaptive_worker_client.submit_run`.
    """
    from worker.settings import use_settings

    settings = settings_from(redis_url, prefix)
    if settings.embedded:
        if settings.broker_url and not settings.broker_url.startswith("memory://"):
            raise fail(
                f"{ENV_PREFIX}BROKER_URL is set but {ENV_PREFIX}REDIS_URL is not: a worker "
                "on a shared broker needs a shared Redis (set both, or neither)",
                EXIT_BAD_INPUT,
            )
    elif as_json:
        raise fail("--json applies to the embedded run only", EXIT_BAD_INPUT)
    # The tasks, the worker's door and its metrics read the process settings:
    # these settings, options included, while the worker runs (then the
    # environment's again: tests run commands in one process).
    use_settings(settings)
    try:
        if settings.embedded:
            _run_embedded(settings, as_json=as_json, timeout=timeout)
            return
        code = _run_worker(settings, beat=beat, concurrency=concurrency, loglevel=loglevel)
    finally:
        use_settings(None)
    raise typer.Exit(code)


def _module_app(settings: Settings) -> Celery:
    """`worker.celery.app` (the one `tasks.jobs` registers on), configured for `settings`."""
    import tasks.jobs  # noqa: F401  (registers the tasks on the module's app)
    from worker.celery import app as celery_app
    from worker.celery import configure

    return configure(celery_app, settings)


def _run_worker(settings: Settings, *, beat: bool, concurrency: int | None, loglevel: str) -> int:
    """`celery worker` in this process, on the configured Redis and broker."""
    import os

    from worker.cli.render import err

    open_store(settings)  # unreachable Redis: one line and exit 3, not a retry loop
    from adaptive_worker_client.contract import QUEUES

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
        f"adaptive-worker: Celery worker on {masked(settings.effective_broker_url)}, "
        f"state in {state_location(settings)} under {settings.key_prefix!r}"
        f"{', with beat' if beat else ''}",
        highlight=False,
    )
    return int(celery_app.start(argv) or 0)


def _beat_schedule_file(settings: Settings) -> Path:
    """Beat's state file, out of the working directory (one per prefix)."""
    import tempfile
    from pathlib import Path

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in settings.key_prefix)
    for root in (Path.home() / ".cache" / "adaptive-worker", Path(tempfile.gettempdir())):
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        return root / f"celerybeat-schedule-{safe}"
    return Path(f"celerybeat-schedule-{safe}")


def _run_embedded(settings: Settings, *, as_json: bool, timeout: float) -> None:
    import tempfile
    import time
    from pathlib import Path

    from celery.contrib.testing.worker import start_worker

    from adaptive_worker_client import RunClient
    from worker.cli.render import emit_json, err, print_agent_report
    from worker.cli.state import agent_report
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
    store = open_store(settings)
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
                raise fail(f"the in-memory broker did not take the sample runs ({last_error})")
            _wait_learned(store, {agent: len(runs) for agent, runs in samples.items()}, timeout)
        finally:
            _wake_to_stop(celery_app)
    elapsed = time.monotonic() - started
    report = {agent: agent_report(store, agent) for agent in samples}
    if as_json:
        emit_json({"elapsed_s": round(elapsed, 3), "agents": report})
        return
    for agent, item in report.items():
        print_agent_report(agent, item)
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

    from adaptive_worker_client.contract import DISCOVER_TASK

    state.should_terminate = 0
    for _ in range(2):
        celery_app.send_task(DISCOVER_TASK)


def _wait_learned(store: Store, expected: dict[str, int], timeout: float) -> None:
    """Until every agent has its runs indexed and learned (lag 0)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        cursors = store.cursors(expected)
        if all(cursors[a].index_length >= n and cursors[a].lag == 0 for a, n in expected.items()):
            return
        if time.monotonic() > deadline:
            learned = sum(min(c.learned, expected[a]) for a, c in cursors.items())
            raise fail(
                f"timed out after {timeout:.0f} s: the worker learned {learned} of "
                f"{sum(expected.values())} sample runs ({store.dead_letter_count()} dead letters)"
            )
        time.sleep(0.02)


def register(app: typer.Typer) -> None:
    app.command()(run)
