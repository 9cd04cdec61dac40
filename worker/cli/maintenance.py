"""Commands that maintain the state: `rebuild`, `stats`, `retention`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from worker.cli.options import (
    ENV_PREFIX,
    EXIT_BAD_INPUT,
    AsJson,
    Prefix,
    RedisUrl,
    fail,
    guard,
    open_store,
    settings_from,
)


@guard
def rebuild(
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
        raise fail("give either AGENT or --all", EXIT_BAD_INPUT)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tasks.operations import rebuild_and_catch_up
    from worker.cli.render import emit_json, err, out, safe, table
    from worker.cli.state import require_agent

    settings = settings_from(redis_url, prefix)
    store = open_store(settings)
    if agent is not None:
        require_agent(store, agent)
        targets = [agent]
    else:
        targets = store.agent_ids()
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
            task = progress.add_task(safe(f"rebuild {target}"), total=None)

            def step(done: int, total: int, task: Any = task) -> None:
                progress.update(task, completed=done, total=total)

            results.append(rebuild_and_catch_up(store, target, settings, progress=step).as_dict())
    if as_json:
        emit_json(results)
        return
    if not results:
        out.print(f"no agents under prefix {settings.key_prefix!r}", highlight=False)
        return
    shown = table("rebuild")
    for column in ("agent", "runs", "state version", "stale keys deleted", "learned after"):
        shown.add_column(column, justify="left" if column == "agent" else "right")
    for r in results:
        shown.add_row(
            r["agent_id"],
            str(r["runs"]),
            str(r["version"]),
            str(r["deleted_keys"]),
            str(r["learned_after"]),
        )
    out.print(shown)


@guard
def stats(redis_url: RedisUrl = None, prefix: Prefix = None, as_json: AsJson = False) -> None:
    """Learning progress and counters (the numbers `/metrics` exports)."""
    from worker.cli.render import emit_json, kv_table, out, table
    from worker.metrics import snapshot

    store = open_store(settings_from(redis_url, prefix))
    snap = snapshot(store)
    if as_json:
        emit_json(snap)
        return
    summary = {
        "agents": snap["agent_count"],
        "lag (runs not learned)": snap["lag_total"],
        "dead letters now": snap["dead_letter_list_length"],
        **{name.replace("_", " "): value for name, value in snap["counters"].items()},
    }
    out.print(kv_table(f"stats of {store.keys.prefix!r}", summary))
    if snap["agents"]:
        per_agent = table("per agent")
        for column in ("agent", "runs", "learned", "trimmed", "lag"):
            per_agent.add_column(column, justify="left" if column == "agent" else "right")
        for agent, a in snap["agents"].items():
            per_agent.add_row(
                agent, str(a["index_length"]), str(a["learned"]), str(a["base"]), str(a["lag"])
            )
        out.print(per_agent)


@guard
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
    from tasks.maintenance import apply_retention, plan_retention
    from worker.cli.render import emit_json, out, table

    settings = settings_from(redis_url, prefix)
    store = open_store(settings)
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
        emit_json({"dry_run": dry_run, "policy": policy, "agents": rows})
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
    result = table(title)
    columns = ["agent", "runs", "learned", "to drop"] + ([] if dry_run else ["dropped"])
    for column in columns:
        result.add_column(column, justify="left" if column == "agent" else "right")
    for r in rows:
        cells = [r["agent_id"], str(r["runs"]), str(r["learned_in_index"]), str(r["to_drop"])]
        result.add_row(*cells, *([] if dry_run else [str(r["dropped"])]))
    out.print(result)


def register(app: typer.Typer) -> None:
    app.command("rebuild")(rebuild)
    app.command()(stats)
    app.command()(retention)
