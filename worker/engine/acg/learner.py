"""The ACG fold: run records in, observation windows and stability results out.

Port of the runtime's `AcgLearner::process_run`, made pure (storage is the
caller's: windows come in as a dict and are updated in place; ids and clock
are injected) and batch-independent:

- per run, every LLM call with an `annotated_request` becomes one observation,
  grouped per learning key in call order and appended to that key's window,
  which drops from the front past `window_size` (exactly the runtime's
  pop-then-push, so a window stored larger than `window_size` stays that size);
- a run without such a call touches nothing;
- stability depends only on a window's final content, so each touched key is
  analysed once per fold instead of once per run: folding runs one by one or
  all at once stores the same windows and results;
- the seed (copied under the plain agent id) is the profile the LAST run with
  an observation chose: among the keys that run touched, the largest
  (stable_prefix_length, total_observations). The runtime iterates a HashMap
  there, so its choice on an exact tie is arbitrary; here the key the run
  touched first (call order) wins.

A request the runtime could not have parsed (unknown role, part or tool type,
malformed tool call, lone surrogate...) yields no observation, as the runtime
skips it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from worker.engine.acg.ir import build_prompt_ir, request_tools
from worker.engine.acg.key import learning_key
from worker.engine.acg.stability import analyze
from worker.engine.records import RunLike

DEFAULT_WINDOW_SIZE = 100

# Errors meaning "this request is not something the runtime could parse"
# (RecursionError: nesting deeper than serde_json's parser accepts anyway).
_MALFORMED = (ValueError, TypeError, KeyError, RecursionError)

_Prepared = tuple[str, dict[str, Any]] | None
_CACHE_LIMIT = 4096
# (id(request), agent_id) -> (request, prepared). The request is held so its id
# cannot be reused while the entry lives; it lets `fold_acg` reuse the work
# `run_learning_keys` did on the same record objects (records are not mutated).
# Large enough for a whole learn batch (500 runs of a few LLM calls each): at
# 256 a batch of 100 capture-shaped runs (300 requests) cleared it midway and
# the fold built half the prompts twice.
_prepared_cache: dict[tuple[int, str], tuple[Any, _Prepared]] = {}


@dataclass(frozen=True, slots=True)
class AcgFoldResult:
    """What a fold changed.

    touched_keys: learning keys whose window changed, first-touch order.
    stability: the StabilityAnalysisResult wire dict of each touched key.
    seed_key: the learning key whose window and stability the caller also
      writes under the plain agent id; None when no run had an observation.
    """

    touched_keys: list[str]
    stability: dict[str, dict[str, Any]]
    seed_key: str | None


def _prepare(agent_id: str, request: Any) -> _Prepared:
    """(learning key, observation template without id/time) or None if unparseable."""
    cache_key = (id(request), agent_id)
    cached = _prepared_cache.get(cache_key)
    if cached is not None and cached[0] is request:
        return cached[1]
    if not isinstance(request, dict):
        return None
    try:
        tools = request_tools(request)
        observation = build_prompt_ir(request, ir_id="", created_at="", tools=tools)
        prepared = (learning_key(agent_id, request, tools), observation)
    except _MALFORMED:
        prepared = None
    if len(_prepared_cache) >= _CACHE_LIMIT:
        _prepared_cache.clear()
    _prepared_cache[cache_key] = (request, prepared)
    return prepared


def _requests(run: RunLike) -> Iterable[Any]:
    for call in run.calls:
        if call.kind == "llm" and call.annotated_request is not None:
            yield call.annotated_request


def run_learning_keys(run: RunLike, agent_id: str) -> list[str]:
    """Keys the run's observations go to, in call order, deduplicated (for prefetching)."""
    keys: dict[str, None] = {}
    for request in _requests(run):
        prepared = _prepare(agent_id, request)
        if prepared is not None:
            keys[prepared[0]] = None
    return list(keys)


def _append(window: list[dict[str, Any]], new: list[dict[str, Any]], window_size: int) -> None:
    """Push each observation, popping the front first when the window is full (runtime order)."""
    length = len(window)
    drops = 0
    for _ in new:
        if length >= window_size and length > 0:
            drops += 1
        else:
            length += 1
    window.extend(new)
    if drops:
        del window[:drops]


def fold_acg(
    windows: dict[str, list[dict[str, Any]]],
    runs: Iterable[RunLike],
    *,
    agent_id: str,
    window_size: int = DEFAULT_WINDOW_SIZE,
    clock: Callable[[], str],
    new_id: Callable[[], str],
) -> AcgFoldResult:
    """Learn `runs` (in order) into `windows` (updated in place); see the module doc."""
    touched: dict[str, None] = {}
    last_run_keys: list[str] = []
    for run in runs:
        groups: dict[str, list[dict[str, Any]]] = {}
        for request in _requests(run):
            prepared = _prepare(agent_id, request)
            if prepared is None:
                continue
            key, template = prepared
            observation = dict(template)
            observation["ir_id"] = new_id()
            observation["blocks"] = [dict(block) for block in template["blocks"]]
            if "tool_schema_hashes" in template:
                observation["tool_schema_hashes"] = [
                    dict(item) for item in template["tool_schema_hashes"]
                ]
            observation["created_at"] = clock()
            groups.setdefault(key, []).append(observation)
        if not groups:
            continue
        for key, new in groups.items():
            window = windows.get(key)
            if window is None:
                window = windows[key] = []
            _append(window, new, window_size)
            touched[key] = None
        last_run_keys = list(groups)

    stability = {key: analyze(windows[key], key) for key in touched}
    seed_key: str | None = None
    best: tuple[int, int] | None = None
    for key in last_run_keys:
        result = stability[key]
        rank = (result["stable_prefix_length"], result["total_observations"])
        if best is None or rank > best:
            seed_key, best = key, rank
    return AcgFoldResult(touched_keys=list(touched), stability=stability, seed_key=seed_key)
