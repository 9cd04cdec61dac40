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
Content equality stands in for the runtime's equality of content hashes (and
tuple equality for its JSON block keys); both are exact equivalences, and
avoiding the hashes keeps the analysis cheap.
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

BlockKey = tuple[str, str, str, str]


_KEY_FIELDS = itemgetter("span_id", "role", "content_type", "content")
_SPAN_INDEX = itemgetter("span_id", "sequence_index")
_SPAN = itemgetter(0)
_SPAN_CONTENT = itemgetter(0, 3)


def _block_keys(observation: dict[str, Any]) -> list[BlockKey]:
    return list(map(_KEY_FIELDS, observation.get("blocks", ())))


def classify(score: float) -> str:
    if score >= STABLE_THRESHOLD:
        return "stable"
    if score >= SEMI_STABLE_THRESHOLD:
        return "semi_stable"
    return "variable"


def span_scores(
    observations: list[dict[str, Any]], keys: list[list[BlockKey]] | None = None
) -> list[dict[str, Any]]:
    """One score per span id, in the runtime's canonical order.

    score = (present / N) * (most common content count / present), evaluated in
    that order so the float is bit-identical; order = (smallest sequence index
    seen, class rank variable < semi_stable < stable, span id). A span counts
    as present once per observation, while its contents are counted per block,
    as in the runtime. Counting runs through `Counter` (C) because the window
    is re-analysed on every fold.
    """
    total = len(observations)
    if keys is None:
        keys = [_block_keys(o) for o in observations]
    flat = list(chain.from_iterable(keys))
    present = Counter(chain.from_iterable(set(map(_SPAN, ks)) for ks in keys))
    dominant: dict[str, int] = {}
    for (span_id, _content), count in Counter(map(_SPAN_CONTENT, flat)).items():
        if count > dominant.get(span_id, 0):
            dominant[span_id] = count
    first_index: dict[str, int] = {}
    for span_id, index in set(
        chain.from_iterable(map(_SPAN_INDEX, o.get("blocks", ())) for o in observations)
    ):
        if index < first_index.get(span_id, index + 1):
            first_index[span_id] = index

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


_ORDER = itemgetter(0, 1, 2)


def required_agreement(total: int) -> int:
    """clamp(ceil(0.95 N), floor(N/2) + 1, max(N, 1)): a strict majority at least."""
    return min(max(math.ceil(STABLE_THRESHOLD * total), total // 2 + 1), max(total, 1))


def _common_prefix(left: list[BlockKey], right: list[BlockKey]) -> int:
    for depth, (a, b) in enumerate(zip(left, right)):
        if a != b:
            return depth
    return min(len(left), len(right))


def stable_prefix_length(keys: list[list[BlockKey]]) -> int:
    """Length of the exact block prefix shared by `required` observations (the runtime's descent).

    The runtime descends depth by depth, keeping the group of current members
    that share the block at that depth if it holds at least `required` (a strict
    majority, so at most one group qualifies; members without such a block drop
    out). That ends at the largest d for which some length-d prefix is shared by
    `required` observations. In sorted order, observations sharing a prefix are
    contiguous and the common prefix of a run of them is that of its two ends,
    so the answer is the best common prefix over the windows of `required`
    consecutive sorted observations: a sort in C instead of a loop per depth.
    """
    total = len(keys)
    required = required_agreement(total)
    if required > total:
        return 0
    ordered = sorted(keys)
    return max(
        _common_prefix(ordered[i], ordered[i + required - 1])
        for i in range(total - required + 1)
    )


def descent_prefix_length(keys: list[list[BlockKey]]) -> int:
    """The runtime's depth-by-depth descent, literally (reference for `stable_prefix_length`)."""
    required = required_agreement(len(keys))
    members = keys
    depth = 0
    while True:
        groups: dict[BlockKey, list[list[BlockKey]]] = {}
        for blocks in members:
            if depth < len(blocks):
                groups.setdefault(blocks[depth], []).append(blocks)
        dominant = next((g for g in groups.values() if len(g) >= required), None)
        if dominant is None:
            return depth
        members = dominant
        depth += 1


def _prefix_digest(prefix: tuple[BlockKey, ...]) -> str:
    return sha256_hex(
        "\n".join(json.dumps(list(k), ensure_ascii=False, separators=(",", ":")) for k in prefix)
    )


def _all_scaffold(prefix: tuple[BlockKey, ...]) -> bool:
    """Whether every block of the prefix is scaffold (system role, tool schema, structured output).

    Equivalent to the runtime's `prefix_length <= scaffold_length` test, which
    only looks at the prefix's own blocks.
    """
    return all(k[1] == "system" or k[2] in _SCAFFOLD_TYPES for k in prefix)


def prefix_fingerprint(
    observations: list[dict[str, Any]],
    keys: list[list[BlockKey]],
    prefix_length: int,
    learning_key: str,
) -> str | None:
    """Most frequent per-observation bound fingerprint (smallest digest on a tie).

    Per observation: sha256(key \\n P \\n R) with P the digest of its first
    `prefix_length` blocks and R `stable-scaffold` when those blocks are all
    scaffold, else its `source_request_hash`. Observations shorter than the
    prefix (or without the hash when it is needed) give none. Observations
    sharing a prefix share P (and, for a scaffold prefix, the whole digest),
    so those are computed once per distinct prefix.
    """
    if prefix_length == 0:
        return None
    # prefix -> (P, fingerprint when the prefix is all scaffold, else None)
    per_prefix: dict[tuple[BlockKey, ...], tuple[str, str | None]] = {}
    counts: dict[str, int] = {}
    for observation, blocks in zip(observations, keys, strict=True):
        if len(blocks) < prefix_length:
            continue
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
    keys = [_block_keys(o) for o in observations]
    length = stable_prefix_length(keys)
    result: dict[str, Any] = {
        "scores": span_scores(observations, keys),
        "stable_prefix_length": length,
    }
    fingerprint = prefix_fingerprint(observations, keys, length, learning_key)
    if fingerprint is not None:
        result["stable_prefix_fingerprint"] = fingerprint
    result["total_observations"] = total
    return result
