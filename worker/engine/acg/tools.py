"""Tool definitions: canonical text, schema hashes and the tools fingerprint.

An agent sends the same tool list on every call, so the canonical form of a
tool list is computed once per distinct list and cached by content. The cache
key is the `marshal` serialization (C, ~10x faster than `json.dumps`): it is
faithful and typed (`True`, `1` and `1.0` differ), so equal keys mean equal
lists; object sharing can make equal lists serialize differently, which only
costs a cache miss. Both the prompt IR (tool-schema blocks,
`tool_schema_hashes`, the request hash) and the learning key read it.
"""

from __future__ import annotations

import json
import marshal
from dataclasses import dataclass
from typing import Any

from worker.engine.acg.canonical import jcs, normalize_whitespace, sha256_hex
from worker.engine.acg.content import UnsupportedRequest

_CACHE_LIMIT = 4096

# `FunctionDefinition` fields that are `Option` + skip_serializing_if: a stored
# `null` parses as absent and is not written back.
_OPTIONAL_FUNCTION_FIELDS = ("description", "parameters", "strict")


@dataclass(frozen=True, slots=True)
class ToolSchema:
    """One tool definition as the runtime re-serializes and canonicalizes it."""

    name: str
    canonical: str
    block_content: str
    schema_hash: str


@dataclass(frozen=True, slots=True)
class ToolsInfo:
    """Everything derived from a request's `tools` list."""

    schemas: tuple[ToolSchema, ...]
    fingerprint: str
    stored_canonical: str  # RFC 8785 of the list exactly as stored (for the request hash)


def _normalized_tool(tool: Any) -> tuple[str, dict[str, Any]]:
    """(name, serde value) of one `ToolDefinition`; the value is `tool` itself when unchanged."""
    if not isinstance(tool, dict):
        raise UnsupportedRequest("tool definition is not an object")
    kind = tool.get("type")
    if kind == "provider_native":
        value: dict[str, Any] = {"type": kind}
        for field in ("provider", "kind", "value"):
            if field not in tool:
                raise UnsupportedRequest(f"provider_native tool without {field}")
            value[field] = tool[field]
        if not isinstance(value["kind"], str):
            raise UnsupportedRequest("provider_native tool kind is not a string")
        return value["kind"], value
    if kind != "function":
        raise UnsupportedRequest(f"unknown tool definition type {kind!r}")
    function = tool.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise UnsupportedRequest("function tool without a named function")
    if any(function.get(f, 0) is None for f in _OPTIONAL_FUNCTION_FIELDS):
        function = {
            k: v for k, v in function.items() if not (v is None and k in _OPTIONAL_FUNCTION_FIELDS)
        }
        return function["name"], {**tool, "function": function}
    return function["name"], tool


def _build(tools: list[Any]) -> ToolsInfo:
    schemas = []
    as_stored = True
    for tool in tools:
        name, value = _normalized_tool(tool)
        as_stored = as_stored and value is tool
        canonical = jcs(value)
        schemas.append(
            ToolSchema(
                name=name,
                canonical=canonical,
                block_content=normalize_whitespace(canonical),
                schema_hash=sha256_hex(canonical),
            )
        )
    joined = "|".join(s.canonical for s in schemas)
    fingerprint = sha256_hex(joined) if joined else "tools-unavailable"
    stored = "[" + ",".join(s.canonical for s in schemas) + "]" if as_stored else jcs(tools)
    return ToolsInfo(schemas=tuple(schemas), fingerprint=fingerprint, stored_canonical=stored)


_cache: dict[bytes | str, ToolsInfo] = {}


def _cache_key(tools: list[Any]) -> bytes | str:
    try:
        return marshal.dumps(tools)
    except ValueError:  # not plain JSON types (a dict subclass...): JSON text instead
        return json.dumps(tools, ensure_ascii=False, separators=(",", ":"))


def tools_info(tools: Any) -> ToolsInfo:
    """Canonical data for a `tools` list (cached by content)."""
    if not isinstance(tools, list):
        raise UnsupportedRequest("tools is not a list")
    key = _cache_key(tools)
    info = _cache.get(key)
    if info is None:
        info = _build(tools)
        if len(_cache) >= _CACHE_LIMIT:
            _cache.clear()
        _cache[key] = info
    return info
