"""`adaptive-worker dead-letters ...`: list, show, replay and purge the dead-letter list."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

import typer

from worker.cli.options import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    AsJson,
    Prefix,
    RedisUrl,
    fail,
    guard,
    open_store,
    settings_from,
)

if TYPE_CHECKING:
    from storage.store import Store

app = typer.Typer(
    no_args_is_help=True,
    help="The dead-letter list: payloads and runs that could not be stored or learned.",
)


def _entries(store: Store, indexes: Sequence[int]) -> list[tuple[int, bytes]]:
    """(position, entry) for the given positions, or every entry when none are given."""
    if not indexes:
        return list(enumerate(store.dead_letters_raw()))
    found = []
    for index in indexes:
        entry = store.dead_letter_raw_at(index)
        if entry is None:
            raise fail(
                f"no dead letter at position {index} (the list has {store.dead_letter_count()})",
                EXIT_NOT_FOUND,
            )
        found.append((index, entry))
    return found


@app.command("list")
@guard
def dead_letters_list(
    limit: Annotated[int, typer.Option(min=1, help="show at most this many")] = 50,
    offset: Annotated[int, typer.Option(min=0, help="start at this position")] = 0,
    redis_url: RedisUrl = None,
    prefix: Prefix = None,
    as_json: AsJson = False,
) -> None:
    """Entries of the dead-letter list, oldest first (raw payloads with `show`)."""
    from tasks.operations import parse_dead_letter
    from worker.cli.render import emit_json, out, table

    store = open_store(settings_from(redis_url, prefix))
    total = store.dead_letter_count()
    stored = store.dead_letters_raw(offset, limit)
    entries = [parse_dead_letter(offset + i, e) for i, e in enumerate(stored)]
    for item in entries:
        raw = item.pop("raw", None)
        if not isinstance(item.get("raw_bytes"), int):  # entries record the original size
            item["raw_bytes"] = (
                len(raw.encode("utf-8", "surrogatepass")) if isinstance(raw, str) else 0
            )
    if as_json:
        emit_json({"total": total, "entries": entries})
        return
    if not entries:
        empty = (
            f"no dead letters from position {offset} ({total} in all)"
            if total
            else f"no dead letters under {store.keys.prefix!r}"
        )
        out.print(empty, highlight=False)
        return
    shown = table(f"dead letters ({total} in all)")
    for column in ("#", "at", "stage", "agent / run", "reason", "bytes"):
        shown.add_column(column, overflow="fold", justify="right" if column in "#bytes" else "left")
    for item in entries:
        reason = str(item.get("reason", ""))
        who = " / ".join(str(item[k]) for k in ("agent_id", "run_id") if item.get(k)) or "-"
        shown.add_row(
            str(item["index"]),
            str(item.get("at", "-"))[:19].replace("T", " "),
            str(item.get("stage", "-")),
            who,
            reason if len(reason) <= 160 else reason[:157] + "...",
            str(item["raw_bytes"]),
        )
    out.print(shown)


@app.command("show")
@guard
def dead_letters_show(
    index: Annotated[int, typer.Argument(help="position in the list, as `list` shows it")],
    redis_url: RedisUrl = None,
    prefix: Prefix = None,
    as_json: AsJson = False,
) -> None:
    """One dead letter in full, with its raw payload."""
    from tasks.operations import json_text, parse_dead_letter
    from worker.cli.render import emit_json, kv_table, out, payload_text

    store = open_store(settings_from(redis_url, prefix))
    ((pos, entry),) = _entries(store, [index])
    item = parse_dead_letter(pos, entry)
    if as_json:
        emit_json(item)
        return
    raw = item.pop("raw", None)
    out.print(kv_table(f"dead letter {pos}", item))
    if raw is None or raw == "":
        out.print("raw payload: (empty)")
        return
    out.print("raw payload:")
    out.print(payload_text(raw if isinstance(raw, str) else json_text(raw)), soft_wrap=True)


@app.command("replay")
@guard
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
    from tasks.operations import replay_dead_letters
    from worker.cli.render import emit_json, kv_table, out

    settings = settings_from(redis_url, prefix)
    store = open_store(settings)
    report = replay_dead_letters(store, _entries(store, indexes or []), settings)
    summary = report.summary()
    if as_json:
        emit_json({**summary, "invalid": report.invalid})
        return
    out.print(
        kv_table(
            "dead-letter replay",
            {
                k.replace("_", " "): ", ".join(v) if isinstance(v, list) else v
                for k, v in summary.items()
            },
        )
    )
    for item in report.invalid[:10]:
        out.print(f"  still invalid #{item['index']}: {item['reason'][:200]}", highlight=False)


@app.command("purge")
@guard
def dead_letters_purge(
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
    redis_url: RedisUrl = None,
    prefix: Prefix = None,
    as_json: AsJson = False,
) -> None:
    """Delete every dead letter (the `dead_letters` counter keeps its total)."""
    import sys

    from worker.cli.render import emit_json, out

    store = open_store(settings_from(redis_url, prefix))
    count = store.dead_letter_count()
    if count and not yes:
        if not sys.stdin.isatty():
            raise fail(f"not purging {count} dead letters without --yes", EXIT_BAD_INPUT)
        if not typer.confirm(f"delete {count} dead letters?", err=True):
            raise fail("not purged", EXIT_FAILED)
    purged = store.purge_dead_letters() if count else 0
    if as_json:
        emit_json({"purged": purged})
    else:
        out.print(f"purged {purged} dead letters", highlight=False)
