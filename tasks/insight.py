"""What learning buys one agent, as numbers: the data behind `adaptive-worker report`.

Every number the report prints (terminal, HTML or JSON) and the metrics'
per-agent headline gauges is computed here, from stored data only: the
agent's learned state (accumulators, trie, plan, ACG windows and stability)
and its retained runs. No Celery, no rendering. The pure functions at the
top take parsed values, so tests check them against hand-computed numbers;
the readers at the bottom fetch those values from a `Store`.

Two kinds of quantiles appear, and the report says which is which:

- LEARNED quantiles come from the t-digests the runtime stores in its
  accumulators (`estimate_quantile` of the engine's port of the Rust crate,
  the very function that gives the trie's p50/p90/p95): output tokens,
  inter-arrival time (iat) and remaining calls per trie path and call index.
- MEASURED quantiles come from the retained runs' start/end times: the
  latency (duration) of LLM calls and of tools. The runtime learns no
  duration digest (its trie predicts tokens, iat and sensitivity, not how
  long a call takes), so these are exact quantiles over the runs read
  (linear interpolation between closest ranks, numpy's default).

Vocabulary as in docs/glossary.md: trie path (the call name; the root is all
LLM calls together), call index (1-based per name within a run), parallel
group, learning key, stable prefix, fingerprint, lag.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from storage.errors import InvalidRecord
from storage.models import RunRecord, parse_wire
from storage.timestamps import format_ns
from worker.engine.stats import RunningStats

if TYPE_CHECKING:
    from storage.store import Store

QUANTILES = (0.5, 0.9, 0.99)
# Runs the report reads by default (the newest ones of the index).
DEFAULT_REPORT_RUNS = 1000
# Newest dead-letter entries scanned for the agent's own (the list holds up
# to 10,000 entries of up to 64 KiB each; a report must not read them all).
DEFAULT_DEAD_LETTER_SCAN = 1000
# Runs behind the headline's LLM latency (newest of the index), see `headline`.
HEADLINE_RUNS = 20
_NS = 1_000_000_000


# ====================================================================== quantiles


@dataclass(frozen=True, slots=True)
class Quantiles:
    """count, mean and p50/p90/p99 of one metric; all None but count when count is 0."""

    count: int
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None


EMPTY = Quantiles(0)


def exact_quantile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, R type 7)
    of an ascending, non-empty sequence: exact, and easy to check by hand."""
    h = (len(ordered) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (h - lo) * (ordered[hi] - ordered[lo])


def measured(values: Iterable[float]) -> Quantiles:
    """Exact quantiles of measured values (durations from the runs)."""
    ordered = sorted(values)
    if not ordered:
        return EMPTY
    p50, p90, p99 = (exact_quantile(ordered, q) for q in QUANTILES)
    return Quantiles(len(ordered), math.fsum(ordered) / len(ordered), p50, p90, p99)


def learned(stats: Mapping[str, Any] | None) -> Quantiles:
    """Quantiles of one stored RunningStats (`{count, mean, m2, digest}`), the
    way the runtime computes its trie's percentiles from it."""
    if not stats:
        return EMPTY
    value = RunningStats.from_wire(dict(stats))
    if value.count == 0:
        return EMPTY
    p50, p90, p99 = (value.digest.estimate_quantile(q) for q in QUANTILES)
    return Quantiles(value.count, value.mean, p50, p90, p99)


def downsample(values: Sequence[float | None], points: int) -> list[float | None]:
    """At most `points` values for a plot: consecutive runs split into that many
    buckets of (nearly) equal size, each the mean of its present values (None
    if it has none). Fewer values are returned as they are."""
    n = len(values)
    if n <= points or points <= 0:
        return list(values)
    out: list[float | None] = []
    for b in range(points):
        bucket = [v for v in values[b * n // points : (b + 1) * n // points] if v is not None]
        out.append(math.fsum(bucket) / len(bucket) if bucket else None)
    return out


def seconds(delta_ns: int) -> float:
    """A duration in seconds; negative spans (clock skew in a record) count 0."""
    return max(0, delta_ns) / _NS


# ===================================================================== LLM calls

ROOT = ""  # path key of the trie root: every LLM call of the run
_LEARNED_STATS = ("remaining_calls", "output_tokens", "interarrival_ms")


@dataclass(frozen=True, slots=True)
class LlmRow:
    """One trie path and call index (None: any index, the path's aggregate).

    Learned from the accumulators: `requests` (LLM calls learned there),
    `output_tokens`, `interarrival_ms`, `remaining_calls`; from the trie:
    `latency_sensitivity` (1-5). Measured on the runs read: `latency_s`
    (call durations) and `trend_s` (per run, index order: the mean duration
    of the matching calls in that run, None when it had none).
    """

    path: str
    call_index: int | None
    requests: int
    output_tokens: Quantiles
    interarrival_ms: Quantiles
    remaining_calls: Quantiles
    latency_sensitivity: int | None
    latency_s: Quantiles
    trend_s: list[float | None]


def llm_calls(run: RunRecord) -> list[tuple[str, int, float]]:
    """(path key, call index, duration s) of the run's completed LLM calls, in
    record order; the call index counts calls of the same name so far, as the
    trie learner does (SPEC 4)."""
    counts: Counter[str] = Counter()
    out = []
    for call in run.calls:
        if call.kind != "llm" or call.end_ns is None:
            continue
        counts[call.name] += 1
        out.append((call.name, counts[call.name], seconds(call.end_ns - call.start_ns)))
    return out


def _trie_node(trie: Mapping[str, Any] | None, path: str) -> Mapping[str, Any] | None:
    """The trie node of an accumulator path key (split on `/`, SPEC 6b)."""
    node = trie.get("root") if isinstance(trie, Mapping) else None
    if path != ROOT:
        for name in path.split("/"):
            children = node.get("children") if isinstance(node, Mapping) else None
            node = children.get(name) if isinstance(children, Mapping) else None
    return node if isinstance(node, Mapping) else None


def _sensitivity(node: Mapping[str, Any] | None, call_index: int | None) -> int | None:
    if node is None:
        return None
    if call_index is None:
        prediction = node.get("predictions_any_index")
    else:
        by_index = node.get("predictions_by_call_index")
        prediction = by_index.get(str(call_index)) if isinstance(by_index, Mapping) else None
    value = prediction.get("latency_sensitivity") if isinstance(prediction, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def llm_rows(
    accumulators: Mapping[str, Any] | None,
    trie: Mapping[str, Any] | None,
    runs: Sequence[RunRecord],
) -> list[LlmRow]:
    """Rows per trie path (root first) and call index (any first, then 1, 2, ...).

    A path or index only in the runs (not learned yet) still gets a row, with
    empty learned values; one only in the accumulators gets empty measured ones.
    """
    nodes: Mapping[str, Any] = (accumulators or {}).get("nodes") or {}
    per_run = [llm_calls(run) for run in runs]
    keys: set[tuple[str, int | None]] = set()
    for path, node in nodes.items():
        keys.add((path, None))
        for stat in _LEARNED_STATS:
            keys.update((path, int(i)) for i in (node.get(stat) or {}))
    for calls in per_run:
        for name, index, _ in calls:
            keys.update({(ROOT, None), (ROOT, index), (name, None), (name, index)})

    def matches(key: tuple[str, int | None], name: str, index: int) -> bool:
        path, wanted = key
        return path in (ROOT, name) and (wanted is None or wanted == index)

    rows = []
    for key in sorted(keys, key=lambda k: (k[0] != ROOT, k[0], -1 if k[1] is None else k[1])):
        path, wanted = key
        node = nodes.get(path) or {}
        if wanted is None:
            stats = {s: node.get(f"all_{s}") for s in _LEARNED_STATS}
        else:
            stats = {s: (node.get(s) or {}).get(str(wanted)) for s in _LEARNED_STATS}
        remaining = learned(stats["remaining_calls"])
        trend: list[float | None] = []
        durations: list[float] = []
        for calls in per_run:
            mine = [d for name, i, d in calls if matches(key, name, i)]
            durations += mine
            trend.append(math.fsum(mine) / len(mine) if mine else None)
        rows.append(
            LlmRow(
                path=path,
                call_index=wanted,
                requests=remaining.count,
                output_tokens=learned(stats["output_tokens"]),
                interarrival_ms=learned(stats["interarrival_ms"]),
                remaining_calls=remaining,
                latency_sensitivity=_sensitivity(_trie_node(trie, path), wanted),
                latency_s=measured(durations),
                trend_s=trend,
            )
        )
    return rows


# ========================================================================= tools


@dataclass(frozen=True, slots=True)
class ToolRow:
    """One tool: its completed calls' durations over the runs read, and how
    many of its calls never finished (no `ended_at`)."""

    name: str
    latency_s: Quantiles
    unfinished: int


@dataclass(frozen=True, slots=True)
class GroupRow:
    """One parallel group of the plan and how it fared in the runs read.

    `runs_with_tools`: runs that completed every tool of the group (as many
    calls of each as the group names); `runs_together`: runs where those
    calls were all running at one instant (possibly beside others).
    """

    group_id: str
    tool_names: list[str]
    runs_with_tools: int
    runs_together: int


@dataclass(frozen=True, slots=True)
class RunTiming:
    """One run: wall time vs its tools' time (seconds).

    `tool_sum_s` adds every completed tool call's duration (the time the
    tools would take one after another); `tool_busy_s` is the length of the
    union of their intervals (the time at least one tool ran);
    `saved_s = tool_sum_s - tool_busy_s` is what running them side by side
    saved in this run. `wall_s`: run end - start (no end: the latest call
    end - start; None if nothing ended). `llm_s`: the LLM calls' durations added.
    """

    run_id: str
    wall_s: float | None
    llm_s: float
    tool_sum_s: float
    tool_busy_s: float
    saved_s: float


def _completed_tools(run: RunRecord) -> list[tuple[int, int, str]]:
    return [
        (c.start_ns, max(c.start_ns, c.end_ns), c.name)
        for c in run.calls
        if c.kind == "tool" and c.end_ns is not None
    ]


def tool_rows(runs: Sequence[RunRecord]) -> list[ToolRow]:
    durations: dict[str, list[float]] = {}
    unfinished: Counter[str] = Counter()
    for run in runs:
        for call in run.calls:
            if call.kind != "tool":
                continue
            durations.setdefault(call.name, [])
            if call.end_ns is None:
                unfinished[call.name] += 1
            else:
                durations[call.name].append(seconds(call.end_ns - call.start_ns))
    return [
        ToolRow(name, measured(durations[name]), unfinished[name]) for name in sorted(durations)
    ]


def union_ns(intervals: Iterable[tuple[int, int]]) -> int:
    """Total length of the union of [start, end) intervals."""
    total = 0
    current: tuple[int, int] | None = None
    for start, end in sorted(intervals):
        if current is None or start > current[1]:
            if current is not None:
                total += current[1] - current[0]
            current = (start, end)
        else:
            current = (current[0], max(current[1], end))
    if current is not None:
        total += current[1] - current[0]
    return total


def ran_together(run: RunRecord, tool_names: Sequence[str]) -> bool:
    """Whether the run had calls of all `tool_names` (with multiplicity) running
    at one instant. Intervals that pairwise overlap share a point, and the
    latest start among them is one, so only call starts need checking; a call
    ending exactly when another starts does not overlap it (as the learner)."""
    wanted = Counter(tool_names)
    if not wanted:
        return False
    calls = [c for c in _completed_tools(run) if c[2] in wanted]
    for start, _, _ in calls:
        active = Counter(name for s, e, name in calls if s <= start < e)
        if all(active[name] >= n for name, n in wanted.items()):
            return True
    return False


def group_rows(plan: Mapping[str, Any] | None, runs: Sequence[RunRecord]) -> list[GroupRow]:
    rows = []
    for group in (plan or {}).get("parallel_groups") or []:
        names = list(group.get("tool_names") or [])
        wanted = Counter(names)
        with_tools = together = 0
        for run in runs:
            done = Counter(name for _, _, name in _completed_tools(run))
            if all(done[name] >= n for name, n in wanted.items()):
                with_tools += 1
                together += ran_together(run, names)
        rows.append(GroupRow(str(group.get("group_id")), names, with_tools, together))
    return rows


def run_timing(run: RunRecord) -> RunTiming:
    tools = _completed_tools(run)
    tool_sum = seconds(sum(end - start for start, end, _ in tools))
    busy = seconds(union_ns((start, end) for start, end, _ in tools))
    end = run.end_ns
    if end is None:
        ends = [c.end_ns for c in run.calls if c.end_ns is not None]
        end = max(ends) if ends else None
    wall = None if end is None else seconds(end - run.start_ns)
    llm = math.fsum(d for _, _, d in llm_calls(run))
    return RunTiming(run.id, wall, llm, tool_sum, busy, tool_sum - busy)


@dataclass(frozen=True, slots=True)
class Totals:
    """Sums over the runs read (seconds); `saved_share` = saved / tool_sum."""

    runs: int
    wall_s: float
    tool_sum_s: float
    tool_busy_s: float
    saved_s: float
    saved_share: float | None


def totals(timings: Sequence[RunTiming]) -> Totals:
    tool_sum = math.fsum(t.tool_sum_s for t in timings)
    saved = math.fsum(t.saved_s for t in timings)
    return Totals(
        runs=len(timings),
        wall_s=math.fsum(t.wall_s for t in timings if t.wall_s is not None),
        tool_sum_s=tool_sum,
        tool_busy_s=math.fsum(t.tool_busy_s for t in timings),
        saved_s=saved,
        saved_share=saved / tool_sum if tool_sum > 0 else None,
    )


# ============================================================ prompt stability


@dataclass(frozen=True, slots=True)
class StabilityRow:
    """One learning key's prompt stability (ACG).

    `observations`: the stability result's `total_observations`; `window`:
    prompts in the stored window; `stable_prefix_blocks` and `fingerprint`
    as stored; `stable_spans` of `spans` classified stable; `prefix_share`:
    per prompt of the window, the stable prefix's blocks over the prompt's
    blocks (at most 1), averaged: the part of each prompt a cache can reuse.
    `prefix_tokens`: ESTIMATED tokens of the stable prefix, per LLM call of
    the runs read that has this key and a `prompt_tokens` count:
    prompt_tokens x (characters of the prefix blocks / characters of all
    blocks); the runtime records no per-block token counts. `seed`: this
    key's profile is the one copied under the plain agent id (what a
    starting agent reads).
    """

    learning_key: str
    seed: bool
    observations: int
    window: int
    stable_prefix_blocks: int
    fingerprint: str | None
    stable_spans: int
    spans: int
    prefix_share: float | None
    prefix_tokens: Quantiles


def prefix_share(window: Sequence[Mapping[str, Any]], prefix_blocks: int) -> float | None:
    shares = []
    for observation in window:
        blocks = len(observation.get("blocks") or [])
        if blocks:
            shares.append(min(prefix_blocks, blocks) / blocks)
    return math.fsum(shares) / len(shares) if shares else None


def prefix_token_estimate(blocks: Sequence[Mapping[str, Any]], prefix: int, prompt: int) -> float:
    """prompt tokens x the prefix's share of the prompt's characters."""
    sizes = [len(str(block.get("content", ""))) for block in blocks]
    total = sum(sizes)
    return prompt * sum(sizes[:prefix]) / total if total else 0.0


def stability_row(
    key: str,
    stability: Mapping[str, Any],
    window: Sequence[Mapping[str, Any]],
    token_estimates: Sequence[float] = (),
    *,
    seed: bool = False,
) -> StabilityRow:
    length = int(stability.get("stable_prefix_length") or 0)
    scores = stability.get("scores") or []
    return StabilityRow(
        learning_key=key,
        seed=seed,
        observations=int(stability.get("total_observations") or 0),
        window=len(window),
        stable_prefix_blocks=length,
        fingerprint=stability.get("stable_prefix_fingerprint"),
        stable_spans=sum(1 for s in scores if s.get("classification") == "stable"),
        spans=len(scores),
        prefix_share=prefix_share(window, length),
        prefix_tokens=measured(token_estimates),
    )


def prompt_samples(
    agent_id: str, runs: Sequence[RunRecord]
) -> dict[str, list[tuple[list[Any], int]]]:
    """Per learning key, (blocks, prompt_tokens) of each LLM call of the runs
    with a recorded request and a prompt token count (the engine's own key
    and block builders, so calls land under the key learning used)."""
    from worker.engine.acg.ir import build_prompt_ir, request_tools
    from worker.engine.acg.key import learning_key

    out: dict[str, list[tuple[list[Any], int]]] = {}
    for run in runs:
        for call in run.calls:
            request = call.annotated_request
            if call.kind != "llm" or request is None or call.prompt_tokens is None:
                continue
            try:
                tools = request_tools(request)
                key = learning_key(agent_id, request, tools)
                blocks = build_prompt_ir(request, ir_id="", created_at="", tools=tools)["blocks"]
            except (ValueError, TypeError, KeyError, RecursionError):
                continue  # a request the runtime could not parse: no observation either
            out.setdefault(key, []).append((blocks, call.prompt_tokens))
    return out


# ====================================================================== health


@dataclass(frozen=True, slots=True)
class Health:
    """Learning health of the agent.

    `runs_stored`: ever stored (retained + trimmed); `lag_runs`: stored, not
    learned yet; `oldest_unlearned_age_s`: how long the first unlearned run
    has waited since it was stored (Redis server clock), None without lag
    or without a stored-at time. `dead_letters`: entries of the dead-letter
    list naming this agent (their `agent_id` field, or the agent id of the
    rejected run they hold) among the newest `dead_letters_scanned` of
    `dead_letters_total`. `last_commit_at`: the trie's `generated_at`, which
    every learn commit and rebuild rewrites (no other time is recorded);
    `last_stored_at`: when the newest run was stored. `runs_read` of the
    newest runs were read for this report; `runs_unreadable` of them could
    not be (missing, corrupt, another agent's): learning skips those too.
    """

    runs_stored: int
    runs_retained: int
    runs_trimmed: int
    runs_learned: int
    lag_runs: int
    state_version: int
    oldest_unlearned_age_s: float | None
    dead_letters: int
    dead_letters_scanned: int
    dead_letters_total: int
    last_commit_at: str | None
    last_stored_at: str | None
    runs_read: int
    runs_unreadable: int


def names_agent(entry: bytes | str, agent_id: str) -> bool:
    """Whether a dead-letter entry is about `agent_id`: its own `agent_id`
    field (learn stage), or the rejected input is a run of that agent."""
    try:
        value = orjson.loads(entry)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(value, dict):
        return False
    if value.get("agent_id") == agent_id:
        return True
    raw = value.get("raw")
    if not isinstance(raw, str) or value.get("raw_truncated") or '"agent_id"' not in raw:
        return False
    try:
        held = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return isinstance(held, dict) and held.get("agent_id") == agent_id


# ====================================================================== report


@dataclass(frozen=True, slots=True)
class Report:
    agent_id: str
    prefix: str
    generated_at: str
    run_ids: list[str]
    llm: list[LlmRow]
    tools: list[ToolRow]
    groups: list[GroupRow]
    runs: list[RunTiming]
    totals: Totals
    stability: list[StabilityRow]
    health: Health
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The JSON document of `report --json` (the same numbers)."""
        return asdict(self)


def read_runs(store: Store, agent_id: str, limit: int) -> tuple[list[str], list[RunRecord], int]:
    """The newest `limit` index entries, their readable runs (index order), and
    how many were unreadable. The rule for which runs count is learning's."""
    index = store.keys.runs_index(agent_id)
    ids: list[str] = list(store.client.lrange(index, -limit, -1)) if limit > 0 else []
    runs: list[RunRecord] = []
    bad = 0
    for start in range(0, len(ids), 200):
        chunk = ids[start : start + 200]
        raws: list[str | None] = store.client.mget([store.keys.run(agent_id, i) for i in chunk])
        for raw in raws:
            run = _run_or_none(agent_id, raw)
            if run is None:
                bad += 1
            else:
                runs.append(run)
    return ids, runs, bad


def _run_or_none(agent_id: str, raw: str | None) -> RunRecord | None:
    if raw is None:
        return None
    try:
        run = parse_wire(RunRecord, raw, trusted=True)
    except (InvalidRecord, ValueError):
        return None
    return run if run.agent_id == agent_id else None


def _json(raw: str | None) -> Any:
    if raw is None:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def count_dead_letters(store: Store, agent_id: str, scan: int) -> tuple[int, int, int]:
    """(entries naming the agent, entries scanned, list length): the newest `scan`."""
    total = store.dead_letter_count()
    scanned = min(total, max(0, scan))
    found = 0
    for start in range(total - scanned, total, 200):
        count = min(200, total - start)
        found += sum(names_agent(e, agent_id) for e in store.dead_letters_raw(start, count))
    return found, scanned, total


def read_health(
    store: Store, agent_id: str, trie: Mapping[str, Any] | None, dead_letter_scan: int
) -> tuple[Health, list[str]]:
    cursor = store.cursor(agent_id)
    notes = []
    client = store.client
    last = client.zrange(store.keys.stored_at(agent_id), -1, -1, withscores=True)
    last_stored = format_ns(int(last[0][1] * _NS)) if last else None
    age = None
    if cursor.lag:
        position = cursor.learned - cursor.base
        run_id = client.lindex(store.keys.runs_index(agent_id), position)
        score = client.zscore(store.keys.stored_at(agent_id), run_id) if run_id else None
        if score is not None:
            now_s, now_us = client.time()
            age = max(0.0, now_s + now_us / 1e6 - float(score))
    generated = trie.get("generated_at") if isinstance(trie, Mapping) else None
    if generated is None:
        notes.append("no trie stored: no learn commit or rebuild time is known")
    dead, scanned, total = count_dead_letters(store, agent_id, dead_letter_scan)
    if scanned < total:
        notes.append(f"dead letters: only the newest {scanned} of {total} entries were scanned")
    health = Health(
        runs_stored=cursor.end,
        runs_retained=cursor.index_length,
        runs_trimmed=cursor.base,
        runs_learned=cursor.learned,
        lag_runs=cursor.lag,
        state_version=cursor.version,
        oldest_unlearned_age_s=age,
        dead_letters=dead,
        dead_letters_scanned=scanned,
        dead_letters_total=total,
        last_commit_at=generated if isinstance(generated, str) else None,
        last_stored_at=last_stored,
        runs_read=0,
        runs_unreadable=0,
    )
    return health, notes


def read_stability(store: Store, agent_id: str, runs: Sequence[RunRecord]) -> list[StabilityRow]:
    """One row per learning key of the agent (its own set), the seed marked;
    the seed alone (under the agent id) when no learning key is recorded,
    e.g. for state a NeMo Relay agent learned itself."""
    keys = [k for k in store.learning_keys(agent_id) if k != agent_id]
    names = [agent_id, *keys]
    raws = store.get_many(
        [store.keys.acg_stability(k) for k in names]
        + [store.keys.acg_observations(k) for k in names]
    )
    stabilities = [raws[store.keys.acg_stability(k)] for k in names]
    windows = [raws[store.keys.acg_observations(k)] for k in names]
    seed_raw = stabilities[0]
    samples = prompt_samples(agent_id, runs) if runs else {}
    rows = []
    chosen = [(k, s, w) for k, s, w in zip(names[1:], stabilities[1:], windows[1:], strict=True)]
    if not chosen:
        chosen = [(agent_id, seed_raw, windows[0])]
    for key, raw, window_raw in chosen:
        stability = _json(raw)
        if not isinstance(stability, dict):
            continue
        window = _json(window_raw)
        window = [o for o in window if isinstance(o, dict)] if isinstance(window, list) else []
        length = int(stability.get("stable_prefix_length") or 0)
        estimates = [
            prefix_token_estimate(blocks, length, tokens) for blocks, tokens in samples.get(key, [])
        ]
        is_seed = key == agent_id or (seed_raw is not None and raw == seed_raw)
        rows.append(stability_row(key, stability, window, estimates, seed=is_seed))
    return rows


def build_report(
    store: Store,
    agent_id: str,
    *,
    max_runs: int = DEFAULT_REPORT_RUNS,
    dead_letter_scan: int = DEFAULT_DEAD_LETTER_SCAN,
) -> Report:
    """Every number of the report of one agent, from its stored state and runs."""
    values = store.get_many(
        [store.keys.accumulators(agent_id), store.keys.trie(agent_id), store.keys.plan(agent_id)]
    )
    accumulators = _json(values[store.keys.accumulators(agent_id)])
    trie = _json(values[store.keys.trie(agent_id)])
    plan = _json(values[store.keys.plan(agent_id)])
    ids, runs, unreadable = read_runs(store, agent_id, max_runs)
    health, notes = read_health(store, agent_id, trie, dead_letter_scan)
    health = _replace(health, runs_read=len(ids), runs_unreadable=unreadable)
    if len(ids) < health.runs_retained:
        notes.append(f"measured on the newest {len(ids)} of {health.runs_retained} retained runs")
    timings = [run_timing(run) for run in runs]
    now_s, now_us = store.client.time()
    return Report(
        agent_id=agent_id,
        prefix=store.keys.prefix,
        generated_at=format_ns(now_s * _NS + now_us * 1000),
        run_ids=[run.id for run in runs],
        llm=llm_rows(accumulators if isinstance(accumulators, dict) else None, trie, runs),
        tools=tool_rows(runs),
        groups=group_rows(plan if isinstance(plan, dict) else None, runs),
        runs=timings,
        totals=totals(timings),
        stability=read_stability(store, agent_id, runs),
        health=health,
        notes=notes,
    )


def _replace(health: Health, **changes: Any) -> Health:
    from dataclasses import replace

    return replace(health, **changes)


# ==================================================================== headline


@dataclass(frozen=True, slots=True)
class Headline:
    """The few per-agent numbers the metrics export as gauges (cheap to read).

    `root_llm_latency_p50_s` / `_p90_s`: the trie root is every LLM call of
    the agent together. The runtime learns no latency digest (its trie holds
    remaining calls, inter-arrival, output tokens and sensitivity), so these
    are MEASURED: exact quantiles of the durations of the completed LLM calls
    in the agent's newest `latency_runs` (default HEADLINE_RUNS) retained
    runs; None when they have none. `root_output_tokens_p50` and
    `root_interarrival_p50_ms` / `_p90_ms` are LEARNED: the trie root's
    any-index predictions (the t-digest quantiles the runtime computed);
    `root_requests`: LLM calls learned. `plan_groups`: parallel groups in
    the plan (None: no plan). `stable_prefix_blocks`: learning key ->
    stable prefix length in blocks (the agent's own learning-key set; the
    plain agent id's seed profile when the set is empty).
    """

    root_llm_latency_p50_s: float | None
    root_llm_latency_p90_s: float | None
    root_output_tokens_p50: float | None
    plan_groups: int | None
    stable_prefix_blocks: dict[str, int]
    root_interarrival_p50_ms: float | None = None
    root_interarrival_p90_ms: float | None = None
    root_requests: int | None = None


# (prefix, agent, newest run ids) -> the latency quantiles of those runs.
# Runs are immutable, so a scrape re-reads runs only when new ones arrived.
_LATENCY_CACHE: dict[tuple[str, str, tuple[str, ...]], tuple[float | None, float | None]] = {}
_LATENCY_CACHE_LIMIT = 4096


def _root_prediction(trie: Any) -> Mapping[str, Any]:
    root = trie.get("root") if isinstance(trie, dict) else None
    prediction = root.get("predictions_any_index") if isinstance(root, dict) else None
    return prediction if isinstance(prediction, dict) else {}


def _metric(prediction: Mapping[str, Any], stat: str, name: str) -> float | None:
    metrics = prediction.get(stat)
    if not isinstance(metrics, dict) or not metrics.get("sample_count"):
        return None
    value = metrics.get(name)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def headline(store: Store, agent_id: str, *, latency_runs: int = HEADLINE_RUNS) -> Headline:
    return headlines(store, [agent_id], latency_runs=latency_runs)[agent_id]


def headlines(
    store: Store,
    agent_ids: Sequence[str],
    *,
    latency_runs: int = HEADLINE_RUNS,
    max_learning_keys: int | None = None,
) -> dict[str, Headline]:
    """`Headline` of many agents in two pipelined round trips (a metrics scrape).

    Round one: each agent's trie, plan, learning-key set and newest index
    entries. Round two: the stability of each learning key (sorted, the
    first `max_learning_keys` when given) and only the runs not seen by an
    earlier call (their latency is cached by run ids). A value that does not
    parse gives None (a scrape must not fail on one agent's corrupt key).
    """
    agents = list(dict.fromkeys(agent_ids))
    if not agents:
        return {}
    k = store.keys
    pipe = store.client.pipeline(transaction=False)
    for agent in agents:
        pipe.get(k.trie(agent))
        pipe.get(k.plan(agent))
        pipe.smembers(k.learning_key_set(agent))
        # LRANGE 1 0 is always empty: no runs wanted.
        newest = (-latency_runs, -1) if latency_runs > 0 else (1, 0)
        pipe.lrange(k.runs_index(agent), *newest)
    first = pipe.execute()

    pipe = store.client.pipeline(transaction=False)
    Latency = tuple[float | None, float | None]
    plans: list[tuple[str, list[str], tuple[str, ...], Latency | None]] = []
    for i, agent in enumerate(agents):
        members = sorted(m for m in first[4 * i + 2] if m != agent) or [agent]
        if max_learning_keys is not None:
            members = members[: max(0, max_learning_keys)]
        for key in members:
            pipe.get(k.acg_stability(key))
        ids = tuple(first[4 * i + 3])
        known = _LATENCY_CACHE.get((k.prefix, agent, ids)) if ids else (None, None)
        if known is None:
            pipe.mget([k.run(agent, run_id) for run_id in ids])
        plans.append((agent, members, ids, known))
    second = pipe.execute()

    out: dict[str, Headline] = {}
    pos = 0
    for i, (agent, members, ids, known) in enumerate(plans):
        blocks: dict[str, int] = {}
        for key in members:
            stability = _json(second[pos])
            pos += 1
            length = stability.get("stable_prefix_length") if isinstance(stability, dict) else None
            if isinstance(length, int) and not isinstance(length, bool):
                blocks[key] = length
        if known is None:
            runs = [r for r in (_run_or_none(agent, raw) for raw in second[pos]) if r is not None]
            pos += 1
            latency = measured(d for run in runs for _, _, d in llm_calls(run))
            known = (latency.p50, latency.p90)
            if len(_LATENCY_CACHE) >= _LATENCY_CACHE_LIMIT:
                _LATENCY_CACHE.clear()
            _LATENCY_CACHE[(k.prefix, agent, ids)] = known
        p50, p90 = known
        prediction = _root_prediction(_json(first[4 * i]))
        plan = _json(first[4 * i + 1])
        groups = plan.get("parallel_groups") if isinstance(plan, dict) else None
        requests = prediction.get("remaining_calls")
        count = requests.get("sample_count") if isinstance(requests, dict) else None
        out[agent] = Headline(
            root_llm_latency_p50_s=p50,
            root_llm_latency_p90_s=p90,
            root_output_tokens_p50=_metric(prediction, "output_tokens", "p50"),
            plan_groups=len(groups) if isinstance(groups, list) else None,
            stable_prefix_blocks=blocks,
            root_interarrival_p50_ms=_metric(prediction, "interarrival_ms", "p50"),
            root_interarrival_p90_ms=_metric(prediction, "interarrival_ms", "p90"),
            root_requests=count if isinstance(count, int) and not isinstance(count, bool) else None,
        )
    return out
