"""Commands that read learned state: `agents`, `plan`, `hints`, `stability`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

import typer

from worker.cli.options import (
    EXIT_BAD_INPUT,
    EXIT_NOT_FOUND,
    AgentArg,
    AsJson,
    Prefix,
    RedisUrl,
    fail,
    guard,
    open_store,
    settings_from,
)

if TYPE_CHECKING:
    from storage.store import Cursor, Store

U32_MAX = 0xFFFFFFFF


# ----------------------------------------------------------------- lookups


def not_found(store: Store, agent: str, what: str) -> typer.Exit:
    """Exit 4, saying whether the agent is unknown or has only not learned `what` yet."""
    cursor = store.cursor(agent)
    if cursor.index_length or cursor.base or cursor.learned:
        return fail(
            f"agent {agent!r} has no {what} yet ({cursor.end} runs, {cursor.learned} learned)",
            EXIT_NOT_FOUND,
        )
    known = store.agent_ids()
    shown = ", ".join(known[:10]) + (f" and {len(known) - 10} more" if len(known) > 10 else "")
    hint = f"known agents: {shown}" if known else "no agents at all"
    return fail(
        f"unknown agent {agent!r} under prefix {store.keys.prefix!r} ({hint})", EXIT_NOT_FOUND
    )


def require_agent(store: Store, agent: str) -> Cursor:
    cursor = store.cursor(agent)
    if not (cursor.index_length or cursor.base or cursor.learned):
        raise not_found(store, agent, "runs")
    return cursor


def stored_trie(store: Store, agent: str) -> dict[str, Any] | None:
    """The stored trie as the JSON the lookup functions take, validated first."""
    import json

    from storage.models import TrieEnvelope, parse_wire

    raw = store.get_raw(store.keys.trie(agent))
    if raw is None:
        return None
    parse_wire(TrieEnvelope, raw)
    trie: dict[str, Any] = json.loads(raw)
    return trie


def stable_prefix_spans(store: Store, agent: str, length: int) -> list[str]:
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


def agent_report(store: Store, agent: str) -> dict[str, Any]:
    """What `run` shows of one agent: plan groups, default hints, stable prefix."""
    from adaptive_worker_client.hints import default_hints

    cursor = store.cursor(agent)
    plan = store.get_plan(agent)
    trie = stored_trie(store, agent)
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
            "span_ids": stable_prefix_spans(store, agent, stability.stable_prefix_length),
        }
    return report


# ---------------------------------------------------------------- commands


@guard
def agents(redis_url: RedisUrl = None, prefix: Prefix = None, as_json: AsJson = False) -> None:
    """Agents with runs under the prefix, how far learning is, and what is learned."""
    from worker.cli.render import emit_json, out, table

    settings = settings_from(redis_url, prefix)
    store = open_store(settings)
    ids = store.agent_ids()
    cursors = store.cursors(ids)
    presence = store.state_presence(ids)
    rows = []
    for agent in ids:
        c = cursors[agent]
        rows.append(
            {
                "agent_id": agent,
                "runs": c.index_length,
                "learned": c.learned,
                "trimmed": c.base,
                "lag": c.lag,
                "plan": presence[agent]["plan"],
                "trie": presence[agent]["trie"],
                "stability": presence[agent]["stability"],
            }
        )
    if as_json:
        emit_json(rows)
        return
    if not rows:
        out.print(f"no agents under prefix {settings.key_prefix!r}", highlight=False)
        return
    shown = table(f"agents under {settings.key_prefix!r}")
    for column in ("agent", "runs", "learned", "trimmed", "lag", "plan", "trie", "stability"):
        right = column in {"runs", "learned", "trimmed", "lag"}
        shown.add_column(column, justify="right" if right else "left", overflow="fold")
    for row in rows:
        shown.add_row(
            str(row["agent_id"]),
            *(str(row[c]) for c in ("runs", "learned", "trimmed", "lag")),
            *("yes" if row[c] else "-" for c in ("plan", "trie", "stability")),
        )
    out.print(shown)


@guard
def plan(
    agent: AgentArg, redis_url: RedisUrl = None, prefix: Prefix = None, as_json: AsJson = False
) -> None:
    """The agent's tool-parallelism plan (`plan:{agent}`), as the runtime reads it."""
    import json

    from storage.models import ExecutionPlan, parse_wire
    from worker.cli.render import emit_json, groups_table, out

    store = open_store(settings_from(redis_url, prefix))
    raw = store.get_raw(store.keys.plan(agent))
    if raw is None:
        raise not_found(store, agent, "plan")
    value = parse_wire(ExecutionPlan, raw)
    if as_json:
        emit_json(json.loads(raw))
        return
    groups = [g.model_dump() for g in value.parallel_groups]
    out.print(groups_table(f"tool-parallelism plan of {agent}", groups))
    out.print(
        f"template run {value.metadata_template.run_id}, "
        f"{len(value.metadata_template.parallel_hints)} parallel hints",
        highlight=False,
    )


@guard
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
    (`adaptive_worker_client.load_hints` gives the same). A path the trie
    does not have falls back, as in the runtime, to its longest prefix that
    it has (the root at worst): a note on stderr says so, and --json gives
    `matched_path` and `fallback`.
    """
    names: tuple[str, ...] = ()
    if path is not None:
        names = tuple(path.strip("/").split("/")) if path.strip("/") else ()
        if any(not n for n in names):
            raise fail(f"--path {path!r}: empty name between slashes", EXIT_BAD_INPUT)
    from adaptive_worker_client.hints import agent_hints, default_hints
    from worker.cli.render import emit_json, kv_table, note, out

    store = open_store(settings_from(redis_url, prefix))
    trie = stored_trie(store, agent)
    if trie is None:
        raise not_found(store, agent, "trie")
    matched = matched_path(trie, names)
    fallback = matched != names
    if path is None and call_index is None:
        kind = "default hints"
        value = default_hints(trie)
    else:
        kind = f"hints for path {'/'.join(names) or '(root)'}, call {call_index or 1}"
        value = agent_hints(trie, names, call_index or 1, agent)
    if fallback:
        stop = repr("/".join(matched)) if matched else "the root"
        note(
            f"path {'/'.join(names)!r} is not in the trie of agent {agent!r}, which stops at "
            f"{stop}: these hints come from there, as the runtime's lookup falls back"
        )
    if as_json:
        emit_json(
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
    out.print(kv_table(f"{kind} of {agent}", value))
    children = sorted((trie.get("root") or {}).get("children") or {})
    if children:
        out.print(f"paths in the trie: {', '.join(children)}", highlight=False)


def matched_path(trie: dict[str, Any], names: Sequence[str]) -> tuple[str, ...]:
    """The longest prefix of `names` the trie has: where the runtime's lookup
    (`adaptive_worker_client.hints.lookup`) stops walking."""
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


@guard
def stability(
    agent: AgentArg, redis_url: RedisUrl = None, prefix: Prefix = None, as_json: AsJson = False
) -> None:
    """The agent's ACG prompt stability (`acg_stability:{agent}`) and its stable prefix."""
    import json

    from worker.cli.render import emit_json, out, table

    store = open_store(settings_from(redis_url, prefix))
    value = store.get_stability(agent)
    if value is None:
        raise not_found(store, agent, "prompt stability")
    spans = stable_prefix_spans(store, agent, value.stable_prefix_length)
    learning_keys = [key for key in store.learning_keys(agent) if key != agent]
    if as_json:
        raw = store.get_raw(store.keys.acg_stability(agent))
        emit_json(
            {
                "stability": json.loads(raw) if raw is not None else None,
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
    scores = table("block stability")
    for column in ("span", "class", "score", "confidence", "observations"):
        scores.add_column(
            column, overflow="fold", justify="left" if column in {"span", "class"} else "right"
        )
    for s in value.scores:
        scores.add_row(
            s.span_id,
            s.classification,
            f"{s.score:.3f}",
            f"{s.confidence:.3f}",
            str(s.observation_count),
        )
    out.print(scores)
    if learning_keys:
        out.print(f"learning keys: {len(learning_keys)} (see --json)", highlight=False)


def register(app: typer.Typer) -> None:
    for command in (agents, plan, hints, stability):
        app.command()(command)
