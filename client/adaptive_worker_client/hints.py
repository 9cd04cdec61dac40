"""The hint lookup: what NeMo Relay's hints intercept injects for one LLM call.

Agents read the learned trie (`trie:{agent_id}`) and turn it into
`AgentHints` (`osl`, `iat`, `priority`, `latency_sensitivity`, `prefix_id`,
`total_requests`) exactly as the runtime's `build_agent_hints` does. This is
the one definition: the client's `load_hints` and the server's CLI both use
it; the learning engine only builds tries and never looks hints up.
Works on the trie's plain JSON dict (a `TrieEnvelope` or a bare root node).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["DEFAULT_SCALE", "agent_hints", "default_hints", "lookup", "round_half_away"]

# The runtime's default latency-sensitivity scale (`SensitivityConfig::default()`).
DEFAULT_SCALE = 5
_U32_MAX = 0xFFFFFFFF


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


def _as_u32(x: float) -> int:
    """Rust `f64 as u32`: truncate, saturate, NaN -> 0."""
    if x != x or x <= 0.0:
        return 0
    if x >= _U32_MAX:
        return _U32_MAX
    return int(x)


def _root_of(trie: dict[str, Any]) -> dict[str, Any]:
    """Accept a TrieEnvelope or a bare root node."""
    root = trie.get("root")
    return root if isinstance(root, dict) else trie


def _prediction_at(node: dict[str, Any], call_index: int) -> dict[str, Any] | None:
    by_index = node.get("predictions_by_call_index") or {}
    pred = by_index.get(str(call_index))
    return pred if pred is not None else node.get("predictions_any_index")


def lookup(trie: dict[str, Any], path: Sequence[str], call_index: int) -> dict[str, Any] | None:
    """`PredictionTrieLookup::find`: walk from the root while children match;
    at each visited node prefer the exact call index, else any-index; return
    the deepest prediction found (None when there is none)."""
    node = _root_of(trie)
    best = _prediction_at(node, call_index)
    for name in path:
        child = (node.get("children") or {}).get(name)
        if child is None:
            break
        node = child
        pred = _prediction_at(node, call_index)
        if pred is not None:
            best = pred
    return best


def default_hints(trie: dict[str, Any], scale: int = DEFAULT_SCALE) -> dict[str, Any] | None:
    """`compute_default_hints`: AgentHints from the root's any-index prediction
    (None without one).  Field order as the runtime serializes AgentHints."""
    pred = _root_of(trie).get("predictions_any_index")
    if pred is None:
        return None
    ls = pred.get("latency_sensitivity")
    level = 1 if ls is None else int(ls)
    return {
        "osl": _as_u32(round_half_away(pred["output_tokens"]["p90"])),
        "iat": _as_u32(round_half_away(pred["interarrival_ms"]["mean"])),
        "priority": max(scale - level, 0),
        "latency_sensitivity": 0.0 if ls is None else float(level),
        "prefix_id": "default",
        # `mean.round() as u32 + 1`, wrapping like a release build.
        "total_requests": (_as_u32(round_half_away(pred["remaining_calls"]["mean"])) + 1)
        & _U32_MAX,
    }


def agent_hints(
    trie: dict[str, Any],
    scope_path: Sequence[str],
    call_index: int,
    agent_id: str,
    scale: int = DEFAULT_SCALE,
) -> dict[str, Any] | None:
    """What the runtime's hints intercept injects for one request
    (`build_agent_hints`): the lookup's prediction, or `default_hints`.

    Unlike the defaults, a prediction without sensitivity reports 1.0, the
    prefix id is `{agent_id}-d{len(scope_path)}` and `total_requests` adds the
    caller's 1-based request counter instead of 1.
    """
    pred = lookup(trie, scope_path, call_index)
    if pred is None:
        return default_hints(trie, scale)
    ls = pred.get("latency_sensitivity")
    level = 1 if ls is None else int(ls)
    return {
        "osl": _as_u32(round_half_away(pred["output_tokens"]["p90"])),
        "iat": _as_u32(round_half_away(pred["interarrival_ms"]["mean"])),
        "priority": max(scale - level, 0),
        "latency_sensitivity": float(level),
        "prefix_id": f"{agent_id}-d{len(scope_path)}",
        "total_requests": (_as_u32(round_half_away(pred["remaining_calls"]["mean"])) + call_index)
        & _U32_MAX,
    }
