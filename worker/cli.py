"""The `adaptive-worker` command line (typer + rich).

User mistakes (bad files, bad settings, unreachable Redis) end with one clear
line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import redis
import typer
from rich.console import Console
from rich.table import Table

from storage.connection import connect
from storage.store import Store
from tasks.learning import ingest, learn_agent
from worker.engine.fold import EngineConfig
from worker.settings import Settings, SettingsError, load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
out = Console()
err = Console(stderr=True, soft_wrap=True)

EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _settings(redis_url: str | None, prefix: str | None) -> Settings:
    overrides: dict[str, Any] = {}
    if redis_url is not None:
        overrides["redis_url"] = redis_url
    if prefix is not None:
        overrides["key_prefix"] = prefix
    try:
        return load_settings(**overrides)
    except SettingsError as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from None


def _store(settings: Settings) -> Store:
    client = connect(settings.redis_url)
    try:
        client.ping()
    except redis.RedisError as exc:
        message = f"cannot reach Redis at {settings.redis_url}: {exc}"
        raise _fail(message, EXIT_UNAVAILABLE) from None
    return Store(client, settings.key_prefix)


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(observation_window=settings.observation_window)


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


RedisUrl = Annotated[
    str | None, typer.Option("--redis-url", help="Redis URL (default: ADAPTIVE_REDIS_URL)")
]
Prefix = Annotated[str | None, typer.Option("--prefix", help="key prefix (default: settings)")]


@app.command()
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
    learned = dead = 0
    keys: set[str] = set()
    for agent in result.agents:
        s = learn_agent(store, agent, max_runs=settings.learn_batch_size, config=config)
        learned += s.learned
        dead += s.dead
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


@app.command()
def run() -> None:
    """The main job (the pipeline arrives with the Celery tasks)."""
    out.print("adaptive-worker: the Celery pipeline is not built yet; try `replay`")


def main() -> None:  # pragma: no cover - console script shim
    app()
