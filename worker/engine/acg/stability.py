"""Stability analysis of an observation window (`analyze_stability` + the learner's fingerprint).

Input: the stored window (PromptIR wire dicts, oldest first) of one learning
key. Output: the StabilityAnalysisResult wire dict the runtime stores under
`acg_stability:{key}`, keys in Rust field order.

Two runtime details matter here and differ from what one might guess:
- `stable_prefix_length` is an exact-prefix descent over whole blocks (a
  dominant share must agree on every block up to the depth), not the count of
  leading spans classified stable;
- the stored fingerprint is bound to the learning key and, past the scaffold,
  to each observation's `source_request_hash`; the most frequent one wins, the
  smallest digest on a tie.

The window is re-analysed on every fold, so the work is arranged for speed:
content equality stands in for the runtime's equality of content hashes, and
tuple equality for equality of its JSON block keys (both exact equivalences),
and counting goes through `Counter` (C) over one tuple per block.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from itertools import chain
from operator import itemgetter
from typing import Any

from worker.engine.acg.canonical import sha256_hex

STABLE_THRESHOLD = 0.95
SEMI_STABLE_THRESHOLD = 0.50
FULL_CONFIDENCE_OBSERVATIONS = 20

_RANK = {"variable": 0, "semi_stable": 1, "stable": 2}
_SCAFFOLD_TYPES = frozenset({"tool_schema", "structured_output"})

# (span_id, role, content_type, content, sequence_index). The first four are the
# runtime's block identity; the index rides along for the span ordering. In
# every observation the runtime builds, the block at position d has index d,
# so the index never splits blocks the runtime would call equal; windows where
# that does not hold are compared on the first four fields only.
BlockKey = tuple[str, str, str, str, int]

_BLOCK_FIELDS = itemgetter("span_id", "role", "content_type", "content", "sequence_index")
_INDEX = itemgetter(4)
_SPAN = itemgetter(0)
_IDENTITY = itemgetter(0, 1, 2, 3)
_ORDER = itemgetter(0, 1, 2)


def block_keys(observation: dict[str, Any]) -> list[BlockKey]:
    """One key per block of a stored observation, in order."""
    return list(map(_BLOCK_FIELDS, observation.get("blocks", ())))


def _indexed_by_position(keys: list[list[BlockKey]]) -> bool:
    return all(list(map(_INDEX, ks)) == list(range(len(ks))) for ks in keys)


def classify(score: float) -> str:
    if score >= STABLE_THRESHOLD:
        return "stable"
    if score >= SEMI_STABLE_THRESHOLD:
        return "semi_stable"
    return "variable"


def span_scores(keys: list[list[BlockKey]]) -> list[dict[str, Any]]:
    """One score per span id (over N = len(keys) observations), in the runtime's order.

    score = (present / N) * (most common content count / present), evaluated in
    that order so the float is bit-identical; a span is present once per
    observation while its contents are counted per block, as in the runtime.
    Order = (smallest sequence index seen, class rank variable < semi_stable <
    stable, span id).
    """
    total = len(keys)
    present = Counter(chain.from_iterable(set(map(_SPAN, ks)) for ks in keys))
    by_content: dict[tuple[str, str], int] = {}
    first_index: dict[str, int] = {}
    for (span_id, _role, _type, content, index), count in Counter(
        chain.from_iterable(keys)
    ).items():
        pair = (span_id, content)
        by_content[pair] = by_content.get(pair, 0) + count
        if index < first_index.get(span_id, index + 1):
            first_index[span_id] = index
    dominant: dict[str, int] = {}
    for (span_id, _content), count in by_content.items():
        if count > dominant.get(span_id, 0):
            dominant[span_id] = count

    ranked: list[tuple[int, int, str, dict[str, Any]]] = []
    for span_id, count in present.items():
        score = (count / total) * (dominant[span_id] / count)
        classification = classify(score)
        ranked.append(
            (
                first_index[span_id],
                _RANK[classification],
                span_id,
                {
                    "span_id": span_id,
                    "classification": classification,
                    "score": score,
                    "confidence": min(count / FULL_CONFIDENCE_OBSERVATIONS, 1.0),
                    "observation_count": count,
                },
            )
        )
    ranked.sort(key=_ORDER)
    return [item[3] for item in ranked]


def required_agreement(total: int) -> int:
    """clamp(ceil(0.95 N), floor(N/2) + 1, max(N, 1)): a strict majority at least."""
    return min(max(math.ceil(STABLE_THRESHOLD * total), total // 2 + 1), max(total, 1))


def _descend(keys: list[list[Any]]) -> tuple[int, list[int]]:
    """The runtime's exact-prefix descent; returns (length, indices of the dominant group).

    Start with every observation; at depth d group the current members by
    their block d (members without one drop out); if a group holds at least
    `required` members (a strict majority, so at most one group can) it becomes
    the members for depth d + 1, otherwise the length is d. The final members
    are exactly the observations whose first `length` blocks are the dominant
    prefix.
    """
    required = required_agreement(len(keys))
    members = list(range(len(keys)))
    depth = 0
    while True:
        groups: dict[Any, list[int]] = {}
        for i in members:
            blocks = keys[i]
            if depth < len(blocks):
                key = blocks[depth]
                group = groups.get(key)
                if group is None:
                    groups[key] = [i]
                else:
                    group.append(i)
        for group in groups.values():
            if len(group) >= required:
                members = group
                break
        else:
            return depth, members
        depth += 1


def stable_prefix_length(keys: list[list[Any]]) -> int:
    """Exact-prefix descent length over block keys (one list per observation)."""
    return _descend(keys)[0]


def _prefix_digest(prefix: tuple[BlockKey, ...]) -> str:
    # serde_json of (span_id, role, content_type, content) per block, newline-joined.
    return sha256_hex(
        "\n".join(
            json.dumps(list(_IDENTITY(k)), ensure_ascii=False, separators=(",", ":"))
            for k in prefix
        )
    )


def _all_scaffold(prefix: tuple[BlockKey, ...]) -> bool:
    """Whether every prefix block is scaffold (system role, tool schema, structured output).

    Same as the runtime's `prefix_length <= scaffold_length`, which only
    depends on the prefix's own blocks.
    """
    return all(k[1] == "system" or k[2] in _SCAFFOLD_TYPES for k in prefix)


def prefix_fingerprint(
    observations: list[dict[str, Any]],
    keys: list[list[BlockKey]],
    prefix_length: int,
    learning_key: str,
    dominant: list[int] | None = None,
) -> str | None:
    """Most frequent per-observation bound fingerprint (smallest digest on a tie).

    Per observation: sha256(key \\n P \\n R) with P the digest of its first
    `prefix_length` blocks and R `stable-scaffold` when those blocks are all
    scaffold, else its `source_request_hash`. Observations shorter than the
    prefix (or without the hash when it is needed) give none. P (and for a
    scaffold prefix the whole digest) is computed once per distinct prefix;
    `dominant` (from the descent) lists observations known to share one prefix,
    which spares comparing their prefixes.
    """
    if prefix_length == 0:
        return None
    per_prefix: dict[tuple[BlockKey, ...], tuple[str, str | None]] = {}
    shared: tuple[str, str | None] | None = None
    in_dominant = set(dominant or ())
    counts: dict[str, int] = {}
    for i, (observation, blocks) in enumerate(zip(observations, keys, strict=True)):
        if len(blocks) < prefix_length:
            continue
        if i in in_dominant and shared is not None:
            known: tuple[str, str | None] | None = shared
        else:
            prefix = tuple(blocks[:prefix_length])
            known = per_prefix.get(prefix)
        if known is None:
            digest = _prefix_digest(prefix)
            scaffold_fp = (
                sha256_hex(f"{learning_key}\n{digest}\nstable-scaffold")
                if _all_scaffold(prefix)
                else None
            )
            known = per_prefix[prefix] = (digest, scaffold_fp)
            if i in in_dominant:
                shared = known
        fingerprint = known[1]
        if fingerprint is None:
            bound = observation.get("source_request_hash")
            if bound is None:
                continue
            fingerprint = sha256_hex(f"{learning_key}\n{known[0]}\n{bound}")
        counts[fingerprint] = counts.get(fingerprint, 0) + 1
    if not counts:
        return None
    best = max(counts.values())
    return min(fp for fp, count in counts.items() if count == best)


def analyze(observations: list[dict[str, Any]], learning_key: str) -> dict[str, Any]:
    """StabilityAnalysisResult wire dict for a window stored under `learning_key`."""
    total = len(observations)
    if total == 0:
        return {"scores": [], "stable_prefix_length": 0, "total_observations": 0}
    keys = [block_keys(o) for o in observations]
    if _indexed_by_position(keys):
        length, dominant = _descend(keys)
    else:
        length, dominant = _descend([list(map(_IDENTITY, ks)) for ks in keys])
    result: dict[str, Any] = {"scores": span_scores(keys), "stable_prefix_length": length}
    fingerprint = prefix_fingerprint(observations, keys, length, learning_key, dominant)
    if fingerprint is not None:
        result["stable_prefix_fingerprint"] = fingerprint
    result["total_observations"] = total
    return result
