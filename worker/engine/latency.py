"""Latency-sensitivity learner: per-call contexts, accumulators, prediction trie.

A pure port of `nemo-relay-adaptive`'s `trie::builder` / `learner::latency`
(SPEC sections 3, 4 and 6b); the lookup an agent does (`trie::lookup`,
`build_agent_hints`) is `adaptive_worker_client.hints`, the one definition
agents and the CLI share.  No Redis, no clock, no I/O:
callers load the stored accumulators (`Accumulators.from_wire`), fold runs in
(`add_run`), store `to_wire()` and `build_trie(...)`.

Exactness notes (the stored values are compared bit for bit):

* Durations are chrono's `num_milliseconds()` (truncated toward zero) turned
  into f64, divided by 1000 for seconds; span start/end are whole seconds
  (`timestamp()`, floored).  Whole-second spans make calls inside the same
  second look sequential to the step grouping; that is the runtime's
  behaviour and it changes sensitivity scores, so it is kept.
* Samples are added in context order, root node first, then each path prefix.
* Rounding is Rust's `f64::round` (half away from zero) and float-to-int casts
  saturate like Rust's `as`.

Per-run cost is bounded by the run's size and by the number of distinct
(path, call index) pairs, never by the number of runs learned: every metric is
a fixed-size RunningStats.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from worker.engine.records import CallLike, RunLike
from worker.engine.stats import RunningStats

TRIE_VERSION = "1.0"
_NS_PER_MS = 1_000_000
_NS_PER_S = 1_000_000_000


# --------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class SensitivityConfig:
    """Auto-sensitivity scoring (`SensitivityConfig::default()` in the runtime).

    `enabled=False` is the builder's `None` config: no sensitivity samples are
    accumulated and predictions carry `latency_sensitivity: null`.
    """

    enabled: bool = True
    scale: int = 5
    w_critical: float = 0.5
    w_fanout: float = 0.3
    w_position: float = 0.2
    w_parallel: float = 0.0


DEFAULT_SENSITIVITY = SensitivityConfig()


def _trunc_ms(delta_ns: int) -> int:
    """chrono `TimeDelta::num_milliseconds`: whole milliseconds, toward zero."""
    if delta_ns >= 0:
        return delta_ns // _NS_PER_MS
    return -((-delta_ns) // _NS_PER_MS)


# -------------------------------------------------------------------- contexts


@dataclass(slots=True)
class CallContext:
    """One completed LLM call as the builder sees it (Rust `LlmCallContext`)."""

    path: list[str]
    call_index: int
    remaining_calls: int
    time_to_next_ms: float | None
    output_tokens: int
    call_duration_s: float
    workflow_duration_s: float
    span_start_time: float
    span_end_time: float
    parallel_slack_ratio: float = 0.0
    sensitivity_score: float = 0.0
    logical_position: int = field(default=0, repr=False)


def extract_contexts(
    run: RunLike, config: SensitivityConfig = DEFAULT_SENSITIVITY
) -> list[CallContext]:
    """Contexts of the run's completed LLM calls, in record order, scored.

    Differences from NAT's Python builder that are the runtime's on purpose:
    call_index counts in record order (not end order); `time_to_next_ms` is
    taken from the next LLM call *in the record* (finished or not, even if it
    started earlier, so it can be negative); the workflow duration of a run
    with no end uses the latest call *end*.
    """
    calls = run.calls
    run_start = run.start_ns
    run_end = run.end_ns
    if run_end is not None:
        workflow_s = _trunc_ms(run_end - run_start) / 1000.0
    else:
        ends = [e for e in (c.end_ns for c in calls) if e is not None]
        workflow_s = _trunc_ms(max(ends) - run_start) / 1000.0 if ends else 0.0

    # next_llm_start[i]: start of the first LLM call after position i (any state).
    n = len(calls)
    next_llm_start: list[int | None] = [None] * n
    nxt: int | None = None
    for i in range(n - 1, -1, -1):
        next_llm_start[i] = nxt
        if calls[i].kind == "llm":
            nxt = calls[i].start_ns

    completed: list[tuple[int, CallLike, int]] = []
    for i, c in enumerate(calls):
        if c.kind == "llm":
            end = c.end_ns
            if end is not None:
                completed.append((i, c, end))

    total = len(completed)
    counts: dict[str, int] = {}
    contexts: list[CallContext] = []
    for pos, (i, c, end) in enumerate(completed):
        name = c.name
        idx = counts.get(name, 0) + 1
        counts[name] = idx
        start = c.start_ns
        nxt_start = next_llm_start[i]
        tokens = c.output_tokens
        contexts.append(
            CallContext(
                path=[name],
                call_index=idx,
                remaining_calls=total - pos - 1,
                time_to_next_ms=None if nxt_start is None else float(_trunc_ms(nxt_start - end)),
                output_tokens=0 if tokens is None else int(tokens),
                call_duration_s=_trunc_ms(end - start) / 1000.0,
                workflow_duration_s=workflow_s,
                span_start_time=float(start // _NS_PER_S),
                span_end_time=float(end // _NS_PER_S),
            )
        )
    if config.enabled:
        score_sensitivity(contexts, config)
    return contexts


def _logical_positions(contexts: Sequence[CallContext]) -> list[int]:
    """Interval merging over [start, end) sorted (stably) by start: a call that
    starts strictly before the current group's max end joins the group."""
    n = len(contexts)
    order = sorted(range(n), key=lambda k: contexts[k].span_start_time)
    groups = [0] * n
    current = 0
    group_max_end = contexts[order[0]].span_end_time
    for k in order[1:]:
        ctx = contexts[k]
        if ctx.span_start_time < group_max_end:
            groups[k] = current
            group_max_end = max(group_max_end, ctx.span_end_time)
        else:
            current += 1
            groups[k] = current
            group_max_end = ctx.span_end_time
    return groups


def score_sensitivity(contexts: list[CallContext], config: SensitivityConfig) -> None:
    """Four weighted signals, min-max normalised over the run (in place)."""
    if not contexts:
        return
    positions = _logical_positions(contexts)
    steps = max(positions) + 1
    max_remaining = steps - 1
    group_sizes: dict[int, int] = {}
    for p in positions:
        group_sizes[p] = group_sizes.get(p, 0) + 1

    raw: list[float] = []
    for ctx, pos in zip(contexts, positions, strict=True):
        ctx.logical_position = pos
        if ctx.workflow_duration_s > 0.0:
            critical = min(ctx.call_duration_s / ctx.workflow_duration_s, 1.0)
        else:
            critical = 1.0
        fanout = (max(max_remaining - pos, 0) / max_remaining) if max_remaining > 0 else 0.0
        if steps > 1:
            normalized = pos / (steps - 1)
            position = max(1.0 - normalized, normalized)
        else:
            position = 1.0
        g = group_sizes.get(pos, 1)
        slack = ctx.parallel_slack_ratio
        penalty = (slack + (g - 1) / g) / 2.0 if g > 1 else slack
        raw.append(
            config.w_critical * critical
            + config.w_fanout * fanout
            + config.w_position * position
            - config.w_parallel * penalty
        )

    lo = min(raw)
    hi = max(raw)
    span = hi - lo
    for ctx, r in zip(contexts, raw, strict=True):
        ctx.sensitivity_score = (r - lo) / span if span > 0.0 else 0.5


# ---------------------------------------------------------------- accumulators

_PER_INDEX = ("remaining_calls", "interarrival_ms", "output_tokens", "sensitivity")
_ALL = ("all_remaining_calls", "all_interarrival_ms", "all_output_tokens", "all_sensitivity")


def _stats_map_to_wire(m: dict[int, RunningStats]) -> dict[str, Any]:
    return {str(k): m[k].to_wire() for k in sorted(m)}


def _stats_map_from_wire(d: dict[str, Any]) -> dict[int, RunningStats]:
    return {int(k): RunningStats.from_wire(v) for k, v in d.items()}


class NodeAccumulators:
    """Per-call-index and all-index stats of one trie path (Rust `NodeAccumulators`)."""

    __slots__ = (*_PER_INDEX, *_ALL)

    def __init__(self) -> None:
        self.remaining_calls: dict[int, RunningStats] = {}
        self.interarrival_ms: dict[int, RunningStats] = {}
        self.output_tokens: dict[int, RunningStats] = {}
        self.sensitivity: dict[int, RunningStats] = {}
        self.all_remaining_calls = RunningStats()
        self.all_interarrival_ms = RunningStats()
        self.all_output_tokens = RunningStats()
        self.all_sensitivity = RunningStats()

    def add_context(self, ctx: CallContext, has_sensitivity: bool) -> None:
        idx = ctx.call_index
        remaining = float(ctx.remaining_calls)
        tokens = float(ctx.output_tokens)
        ttn = ctx.time_to_next_ms
        _stat(self.remaining_calls, idx).add(remaining)
        _stat(self.output_tokens, idx).add(tokens)
        if ttn is not None:
            _stat(self.interarrival_ms, idx).add(ttn)
        self.all_remaining_calls.add(remaining)
        self.all_output_tokens.add(tokens)
        if ttn is not None:
            self.all_interarrival_ms.add(ttn)
        if has_sensitivity:
            _stat(self.sensitivity, idx).add(ctx.sensitivity_score)
            self.all_sensitivity.add(ctx.sensitivity_score)

    def to_wire(self) -> dict[str, Any]:
        """Fields in the runtime's order; per-index keys as decimal strings
        (sorted numerically here; the runtime's HashMap order is arbitrary)."""
        return {
            "remaining_calls": _stats_map_to_wire(self.remaining_calls),
            "interarrival_ms": _stats_map_to_wire(self.interarrival_ms),
            "output_tokens": _stats_map_to_wire(self.output_tokens),
            "sensitivity": _stats_map_to_wire(self.sensitivity),
            "all_remaining_calls": self.all_remaining_calls.to_wire(),
            "all_interarrival_ms": self.all_interarrival_ms.to_wire(),
            "all_output_tokens": self.all_output_tokens.to_wire(),
            "all_sensitivity": self.all_sensitivity.to_wire(),
        }

    def copy(self) -> NodeAccumulators:
        return NodeAccumulators.from_wire(self.to_wire())

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> NodeAccumulators:
        out = cls.__new__(cls)
        # serde `Default` on the struct: a missing field is an empty one.
        for name in _PER_INDEX:
            setattr(out, name, _stats_map_from_wire(d.get(name) or {}))
        for name in _ALL:
            raw = d.get(name)
            setattr(out, name, RunningStats() if raw is None else RunningStats.from_wire(raw))
        return out


def _stat(m: dict[int, RunningStats], idx: int) -> RunningStats:
    s = m.get(idx)
    if s is None:
        s = m[idx] = RunningStats()
    return s


class Accumulators:
    """AccumulatorState: path key (`/`-joined, root is `""`) -> NodeAccumulators.

    Twin nodes share one object. An agent whose LLM calls all have one name
    feeds the root and that name's node the very same samples, so the two
    stay equal forever, and the t-digest updates (the learner's main cost)
    are done once for both. Two nodes share an object only while their state
    is equal and they receive identical sample sequences; a run that feeds
    them differently splits them first. Same inputs, same state, same bits:
    results are identical to updating each node (`share=False`, tested).
    """

    __slots__ = ("nodes", "share")

    def __init__(self, share: bool = True) -> None:
        self.nodes: dict[str, NodeAccumulators] = {}
        self.share = share

    def add_contexts(self, contexts: Iterable[CallContext], has_sensitivity: bool) -> None:
        """Root first, then every prefix of the path.  An empty call name gives
        the key `""` again, so such a call is counted at the root twice; a name
        containing `/` is one key here and only split when the trie is built."""
        feeds: dict[str, list[CallContext]] = {}
        for ctx in contexts:
            feeds.setdefault("", []).append(ctx)
            path = ctx.path
            for i in range(len(path)):
                key = path[0] if i == 0 else "/".join(path[: i + 1])
                feeds.setdefault(key, []).append(ctx)
        if not self.share:
            for key, seq in feeds.items():
                node = self.nodes.get(key) or self.nodes.setdefault(key, NodeAccumulators())
                for ctx in seq:
                    node.add_context(ctx, has_sensitivity)
            return
        # Keys fed the same contexts in the same order form a group.
        groups: dict[tuple[int, ...], list[str]] = {}
        for key, seq in feeds.items():
            groups.setdefault(tuple(map(id, seq)), []).append(key)
        owners: dict[int, list[str]] = {}
        for key, node in self.nodes.items():
            owners.setdefault(id(node), []).append(key)
        for keys in groups.values():
            seq = feeds[keys[0]]
            targets: dict[int, NodeAccumulators] = {}
            fresh: NodeAccumulators | None = None
            for key in keys:
                node = self.nodes.get(key)
                if node is None:
                    if fresh is None:
                        fresh = NodeAccumulators()
                        targets[id(fresh)] = fresh
                    self.nodes[key] = fresh
                    continue
                sharers = owners[id(node)]
                if not set(sharers) <= set(keys):
                    # Twins about to diverge: give this group its own copy.
                    inside = [k for k in sharers if k in keys]
                    node = node.copy()
                    for k in inside:
                        self.nodes[k] = node
                    owners[id(node)] = inside
                    for k in inside:
                        sharers.remove(k)
                targets[id(node)] = node
            for node in targets.values():
                for ctx in seq:
                    node.add_context(ctx, has_sensitivity)

    def add_run(self, run: RunLike, config: SensitivityConfig = DEFAULT_SENSITIVITY) -> None:
        """`PredictionTrieBuilder::add_run`: extract, score, accumulate."""
        self.add_contexts(extract_contexts(run, config), config.enabled)

    def to_wire(self) -> dict[str, Any]:
        done: dict[int, dict[str, Any]] = {}
        out = {}
        for k in sorted(self.nodes):
            node = self.nodes[k]
            wire = done.get(id(node))
            if wire is None:
                wire = done[id(node)] = node.to_wire()
            out[k] = wire
        return {"nodes": out}

    @classmethod
    def from_wire(cls, d: dict[str, Any] | None, share: bool = True) -> Accumulators:
        """Nodes whose stored values are equal become one shared object."""
        out = cls(share)
        if d:
            seen: list[tuple[dict[str, Any], NodeAccumulators]] = []
            for k, v in (d.get("nodes") or {}).items():
                twin = next((n for w, n in seen if w == v), None) if share else None
                if twin is None:
                    twin = NodeAccumulators.from_wire(v)
                    seen.append((v, twin))
                out.nodes[k] = twin
        return out


# ------------------------------------------------------------------- the trie


def round_half_away(x: float) -> float:
    """Rust `f64::round`: ties away from zero (Python's `round` is half-even).

    `x - floor(x)` is exact for doubles, so the tie test is exact too.
    """
    if not math.isfinite(x):
        return x
    f = math.floor(x)
    diff = x - f
    if diff > 0.5 or (diff == 0.5 and x > 0.0):
        return float(f + 1)
    return float(f)


def _score_to_sensitivity(acc: RunningStats, scale: int) -> int | None:
    if acc.count == 0:
        return None
    raw = int(round_half_away(acc.mean * (float(scale) - 1.0))) + 1
    return min(max(raw, 1), scale)


def _new_node(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "children": {},
        "predictions_by_call_index": {},
        "predictions_any_index": None,
    }


def _populate(node: dict[str, Any], accs: NodeAccumulators, scale: int | None) -> None:
    indices = set(accs.remaining_calls) | set(accs.interarrival_ms) | set(accs.output_tokens)
    by_index = node["predictions_by_call_index"]
    zeros = RunningStats()
    for idx in sorted(indices):
        sens = accs.sensitivity.get(idx)
        by_index[str(idx)] = {
            "remaining_calls": accs.remaining_calls.get(idx, zeros).metrics(),
            "interarrival_ms": accs.interarrival_ms.get(idx, zeros).metrics(),
            "output_tokens": accs.output_tokens.get(idx, zeros).metrics(),
            "latency_sensitivity": (
                _score_to_sensitivity(sens, scale)
                if scale is not None and sens is not None
                else None
            ),
        }
    if accs.all_remaining_calls.count > 0:
        node["predictions_any_index"] = {
            "remaining_calls": accs.all_remaining_calls.metrics(),
            "interarrival_ms": accs.all_interarrival_ms.metrics(),
            "output_tokens": accs.all_output_tokens.metrics(),
            "latency_sensitivity": (
                _score_to_sensitivity(accs.all_sensitivity, scale) if scale is not None else None
            ),
        }


def build_trie_root(
    acc: Accumulators, config: SensitivityConfig = DEFAULT_SENSITIVITY
) -> dict[str, Any]:
    """`PredictionTrieBuilder::build`: the root PredictionTrieNode as a wire dict.

    Each path key is split on `/` (so `a/b/c` makes nested nodes a, b, c with
    empty intermediates).  Keys are visited in sorted order so children come
    out sorted; the runtime's HashMap order is arbitrary.
    """
    root = _new_node("root")
    scale = config.scale if config.enabled else None
    for key in sorted(acc.nodes):
        node = root
        if key:
            for name in key.split("/"):
                children = node["children"]
                child = children.get(name)
                if child is None:
                    child = children[name] = _new_node(name)
                node = child
        _populate(node, acc.nodes[key], scale)
    return root


def build_trie(
    acc: Accumulators,
    agent_id: str,
    generated_at: str,
    config: SensitivityConfig = DEFAULT_SENSITIVITY,
) -> dict[str, Any]:
    """TrieEnvelope wire dict; `generated_at` is passed in (no clock here)."""
    return {
        "version": TRIE_VERSION,
        "generated_at": generated_at,
        "workflow_name": agent_id,
        "root": build_trie_root(acc, config),
    }
