"""Strict JSON: the one rule every door applies to what it accepts.

A run is kept only if the real runtime could read it back, and the runtime
parses with serde_json, which is stricter than Python's json module:

- no NaN or Infinity (and no number too large for a float, e.g. `1e999`):
  JSON has none, serde_json refuses them, and Python's json, orjson and
  pydantic would otherwise store them as a bare `NaN` or silently as `null`;
- no lone UTF-16 surrogates (`"\\ud800"`): serde_json refuses them and they
  cannot even be encoded as UTF-8, which is what crashed whole batches;
- nesting at most `max_depth` levels (serde_json's own limit is 128): deeper
  values are refused before anything recursive (pickle, repr, our learners)
  touches them.

All checks here are iterative or C-speed scans, so no input can raise
RecursionError, and each refusal is a ValueError whose text says why (and
where, for parsed values), ready to be a dead letter's reason.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from typing import Any

import orjson

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "check_depth",
    "check_text",
    "check_value",
    "loads",
    "text_too_deep",
    "too_deep",
    "utf8",
    "value_depth",
]

DEFAULT_MAX_DEPTH = 128

_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
# Objects and arrays nest alike: one kind of bracket, so that one replace
# per pass removes exactly the innermost level (two replaces in a row, one
# per kind, would peel `{[]}` whole in one pass and undercount by half).
_SQUARE = bytes.maketrans(b"{}", b"[]")


def utf8(text: str | bytes | bytearray) -> bytes:
    """The UTF-8 bytes of `text`, or ValueError naming the first lone surrogate."""
    if isinstance(text, bytes | bytearray):
        return bytes(text)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"text holds a lone surrogate (U+{ord(text[exc.start]):04X}) at character"
            f" {exc.start}; JSON text must be valid Unicode"
        ) from None


def loads(text: str | bytes | bytearray, *, max_depth: int, max_bytes: int) -> Any:
    """Parse JSON text under the strict rule; ValueError says why not.

    orjson is strict RFC 8259 (no NaN/Infinity, no lone surrogate escapes,
    no number that overflows a double) and safe at any nesting (it stops at
    1024 levels by itself, without Python recursion), so it parses first;
    the nesting limit is then checked on the parsed value (`too_deep`),
    which costs less than any scan of the text that must skip strings.
    """
    raw = utf8(text)
    if len(raw) > max_bytes:
        raise ValueError(f"{len(raw)} bytes of JSON, the limit is {max_bytes}")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth" in str(exc):
            raise ValueError(f"JSON nested more than {max_depth} levels deep") from None
        raise ValueError(
            f"not strict JSON (RFC 8259: no NaN/Infinity, no lone surrogates): {exc}"
        ) from None
    if too_deep(value, max_depth):
        raise ValueError(f"JSON nested more than {max_depth} levels deep")
    return value


def check_text(text: str | bytes | bytearray, *, max_depth: int, max_bytes: int) -> bytes:
    """`loads` for callers that parse again themselves; returns the UTF-8 bytes."""
    raw = utf8(text)
    loads(raw, max_depth=max_depth, max_bytes=max_bytes)
    return raw


def check_depth(raw: bytes, *, max_depth: int) -> None:
    """Refuse JSON text nested deeper than `max_depth`, without parsing it."""
    if text_too_deep(raw, max_depth):
        raise ValueError(f"JSON nested more than {max_depth} levels deep")


def text_too_deep(raw: bytes, limit: int) -> bool:
    """True if JSON text nests deeper than `limit`, known before any parser runs.

    Text with at most `limit` opening brackets cannot be too deep (most
    broker messages). Otherwise the string literals are cut out with C-speed
    replaces and a split on the quotes (backslashes occur only inside
    strings, so once escaped backslashes and escaped quotes are gone every
    quote left delimits a string), and the remaining brackets are peeled
    one level per pass. Brackets inside strings must not count at all:
    `"]]"` and `"[["` can make a bracket stream look shallower than the real
    nesting, as well as deeper. Unbalanced brackets count as more levels, so
    text a recursive parser would choke on is refused here either way.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    brackets = _outside_strings(raw).translate(_SQUARE, _NOT_BRACKETS)
    for _ in range(limit):
        if not brackets:
            return False
        peeled = brackets.replace(b"[]", b"")
        if len(peeled) == len(brackets):
            return True  # unbalanced: never valid JSON
        brackets = peeled
    return bool(brackets)


def _outside_strings(raw: bytes) -> bytes:
    """The text with every string literal cut out (C-speed split, a Python step per quote).

    A quote is escaped when the run of backslashes before it, inside a
    string, is odd; backslashes occur only inside strings in JSON.
    """
    parts = raw.split(b'"')
    kept = [parts[0]]
    inside = False
    for before, part in itertools.pairwise(parts):  # a quote between `before` and `part`
        if inside and (len(before) - len(before.rstrip(b"\\"))) % 2:
            continue  # an escaped quote: still inside the same string
        inside = not inside
        if not inside:
            kept.append(part)
    return b"".join(kept)


_CONTAINERS = (dict, list, tuple)


def value_depth(value: Any, limit: int) -> int:
    """Nesting depth of decoded containers, level by level (no recursion); stops past `limit`.

    One comprehension per level and C-level `extend`s keep it near C speed
    (isinstance with a tuple, not a `|` union: half the time per item): it
    runs on every run a worker ingests, ~100 us for a 7 KB capture-shaped run.
    """
    depth = 0
    level = [value]
    while True:
        containers = [item for item in level if isinstance(item, _CONTAINERS)]
        if not containers:
            return depth
        depth += 1
        if depth > limit:
            return depth
        level = []
        for item in containers:
            level.extend(item.values() if isinstance(item, dict) else item)


# orjson encodes at most 255 levels; limits up to this can use its output.
_INDENT_MAX_LIMIT = 254


@functools.lru_cache(maxsize=8)
def _opening_at(limit: int) -> re.Pattern[bytes]:
    """A line of indented JSON that opens a container at level `limit + 1`:
    indented exactly 2 * limit spaces, then `[` or `{` (after its key, in an object)."""
    return re.compile(rb'\n {%d}(?:"(?:[^"\\]|\\.)*": )?[\[{]' % (2 * limit))


def too_deep(value: Any, limit: int) -> bool:
    """True if a value decoded from JSON nests more than `limit` containers deep.

    Exact, and ~5x cheaper than walking every item (`value_depth`, ~50 us
    for a 7 KB capture-shaped run, the largest part of checking one): in
    orjson's indented output each element of a container at level d (the
    outermost is 1) starts a line indented 2 * d spaces, so a container at
    level limit + 1, which is what too deep means, starts a line indented
    exactly 2 * limit spaces with `[` or `{`. Most runs have no line indented
    that far, which one memchr-speed search shows; otherwise a regex over
    those lines decides. Strings cannot fake it: JSON escapes their newlines
    and quotes. What orjson cannot encode (a limit past its 255 levels, a
    value nested deeper than that, an integer past 64 bits) is walked.
    """
    if 0 < limit <= _INDENT_MAX_LIMIT:
        try:
            text = orjson.dumps(value, option=orjson.OPT_INDENT_2)
        except TypeError:  # orjson.JSONEncodeError: past 255 levels, or not plain JSON
            pass
        else:
            if b"\n" + b" " * (2 * limit) not in text:
                return False
            return _opening_at(limit).search(text) is not None
    return value_depth(value, limit) > limit


def check_value(value: Any, *, max_depth: int) -> None:
    """Check a parsed JSON value (dicts, lists, str, int, float, bool, None).

    Iterative, so a value nested deeper than the interpreter's recursion
    limit is refused like any other. Raises ValueError naming the path.
    """
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, dict):
            if depth > max_depth:
                raise ValueError(f"{_where(path)}nested deeper than {max_depth} levels")
            for key, child in item.items():
                if not isinstance(key, str):
                    raise ValueError(f"{_where(path)}object key {key!r} is not a string")
                _check_str(key, path)
                stack.append((child, depth + 1, f"{path}.{key}" if path else key))
        elif isinstance(item, list | tuple):
            if depth > max_depth:
                raise ValueError(f"{_where(path)}nested deeper than {max_depth} levels")
            stack.extend(
                (child, depth + 1, f"{path}.{i}" if path else str(i))
                for i, child in enumerate(item)
            )
        elif isinstance(item, str):
            _check_str(item, path)
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError(f"{_where(path)}{item!r}: JSON has no NaN or Infinity")
        elif item is None or isinstance(item, bool | int):
            continue
        else:
            raise ValueError(f"{_where(path)}{type(item).__name__} is not a JSON value")


def _check_str(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{_where(path)}lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}"
        ) from None


def _where(path: str) -> str:
    return f"{path[:200]}: " if path else ""
