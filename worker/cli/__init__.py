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

What the terms in the output mean (osl, iat, priority, latency_sensitivity,
prefix_id, fanout: group ids, stable prefix, fingerprint): docs/glossary.md.
The run-record format: docs/run-record.schema.json.
"""

# This package builds the app from small command modules that import only
# typer at module level; what a command needs (redis, pydantic, Celery,
# rich's tables) is imported when it runs, so `--help` stays fast.

from __future__ import annotations

import typer

from worker.cli import dead_letters, maintenance, records, report, run, state
from worker.cli.options import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_NOT_FOUND, EXIT_UNAVAILABLE

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__, rich_markup_mode=None)
run.register(app)
records.register(app)
state.register(app)
maintenance.register(app)
report.register(app)
app.add_typer(dead_letters.app, name="dead-letters")


def main() -> None:  # pragma: no cover - console script shim
    app()


__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "EXIT_NOT_FOUND",
    "EXIT_UNAVAILABLE",
    "app",
    "main",
]
