"""Commands that take run records from a file: `submit` (through the broker) and
`replay` (stored and learned in-process)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from worker.cli.options import (
    ENV_PREFIX,
    EXIT_BAD_INPUT,
    EXIT_UNAVAILABLE,
    AsJson,
    Prefix,
    RedisUrl,
    fail,
    guard,
    masked,
    open_store,
    read_input,
    settings_from,
)

if TYPE_CHECKING:
    from tasks.operations import Record
    from worker.settings import Settings

RECORDS_HELP = "run records: JSON array or JSON Lines; - for stdin"


def _records_or_exit(source: str, file: str, settings: Settings, consequence: str) -> list[Record]:
    """The file's records, or one line and exit 2 when the file cannot be read at all."""
    from tasks.operations import BadInput, read_records

    try:
        return read_records(
            read_input(file), max_depth=settings.max_json_depth, max_bytes=settings.max_run_bytes
        )
    except BadInput as exc:
        raise fail(f"{source}: {exc}; {consequence}", EXIT_BAD_INPUT) from None


@guard
def submit(
    file: Annotated[
        str | None,
        typer.Argument(help=RECORDS_HELP),
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

    Uses the agent-side client (`adaptive_worker_client.RunClient`): the
    records are validated here first (an invalid one: nothing is sent, exit
    2), then published in batches to the ingest queue; the workers store and
    learn them. If the broker cannot be reached the runs are not lost: they
    go to the client's spool directory (ADAPTIVE_CLIENT_SPOOL_DIR) and the
    exit status is 3; the next `submit` (or any client using that directory)
    sends them once the broker answers. Needs a broker: the embedded
    default's in-memory one lives inside `adaptive-worker run` only.
    """
    import logging
    import time

    from tasks.operations import Record, run_problem

    settings = settings_from(redis_url, prefix)
    if settings.effective_broker_url.startswith("memory://"):
        raise fail(
            f"submit needs a broker that workers share: set {ENV_PREFIX}REDIS_URL (or "
            "--redis-url); the embedded default's in-memory broker lives inside "
            "`adaptive-worker run` only",
            EXIT_BAD_INPUT,
        )
    if samples == (file is not None):
        raise fail("give either FILE (or - for stdin) or --samples", EXIT_BAD_INPUT)
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
        raise fail(f"{source}: no run records", EXIT_BAD_INPUT)
    for record in records:
        problem = record.problem or run_problem(record.text, settings)
        if problem is not None:
            raise fail(f"{source}: {record.where}: {problem}; nothing submitted", EXIT_BAD_INPUT)
    payloads = [str(record.text) for record in records]

    from adaptive_worker_client import RunClient
    from adaptive_worker_client.spool import default_spool_dir
    from worker.cli.render import emit_json, kv_table, out

    # The client logs broker trouble as warnings, which Python prints to
    # stderr when logging is not set up; here the one-line summary says it.
    # A handler (that drops them) stops that fallback; configured logging
    # still gets them.
    client_log = logging.getLogger("adaptive_worker_client")
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
        "broker": masked(settings.effective_broker_url),
        "spool_dir": str(settings.client_spool_dir or default_spool_dir()),
    }
    if as_json:
        emit_json(summary)
    else:
        out.print(kv_table("submit", {k.replace("_", " "): v for k, v in summary.items()}))
    if pending or dropped:
        raise fail(
            f"broker {summary['broker']} did not take every run ({stats['last_error']}): "
            f"{pending} runs wait in {summary['spool_dir']}; the next submit (or client) using "
            "that spool directory sends them once the broker answers"
            + (f"; {dropped} dropped" if dropped else ""),
            EXIT_UNAVAILABLE,
        )


@guard
def replay(
    file: Annotated[str, typer.Argument(help=RECORDS_HELP)],
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
    from tasks.operations import replay_records
    from worker.cli.render import MAX_ERROR_LINES, emit_json, error, kv_table, out

    settings = settings_from(redis_url, prefix)
    store = open_store(settings)
    source = "stdin" if file == "-" else file
    records = _records_or_exit(source, file, settings, "nothing stored")
    report = replay_records(store, records, settings, source=source)
    summary = report.summary()
    if as_json:
        skipped = [{**r.position, "reason": r.problem} for r in report.skipped]
        emit_json({**summary, "skipped": skipped})
    else:
        shown = {name.replace("_", " "): value for name, value in summary.items()}
        shown["keys written"] = len(report.keys_written)
        out.print(kv_table("replay", shown))
    problems = [
        f"{source}: {r.where}: {r.problem}; skipped and dead-lettered" for r in report.skipped
    ]
    conflicts = report.result.conflicts
    if conflicts:
        ids = ", ".join(run.id for run in conflicts[:3])
        ids += ", ..." if len(conflicts) > 3 else ""
        problems.append(
            f"{source}: {len(conflicts)} runs ({ids}) "
            "reuse the id of a stored run with other content; the stored one is kept, these "
            "are dead-lettered"
        )
    for line in problems[:MAX_ERROR_LINES]:
        error(line)
    if len(problems) > MAX_ERROR_LINES:
        more = len(problems) - MAX_ERROR_LINES
        error(
            f"{source}: {more} more records skipped and dead-lettered (see --json, or "
            "`adaptive-worker dead-letters list`)"
        )
    if problems:
        raise typer.Exit(EXIT_BAD_INPUT)


def register(app: typer.Typer) -> None:
    app.command()(submit)
    app.command()(replay)
