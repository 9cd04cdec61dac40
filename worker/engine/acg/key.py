"""ACG learning key of nemo-relay 0.10.x (`derive_acg_learning_key`).

Observations are bucketed per learning key, so two requests share a
stability window only when model, system content, tools and structured-output
contract all match. With a scaffold (system/developer content, a non-empty
tool list, or a response_format) the full digests are used; without one the
key is led by a fingerprint of the first conversational message and every
part is cut to 16 bytes (`short_hash`), e.g. `seed=user:sha256:1a2b`.
"""

from __future__ import annotations

from typing import Any

from worker.engine.acg.canonical import jcs, serde_json_text, sha256_hex
from worker.engine.acg.content import UnsupportedRequest, content_value, seed_text
from worker.engine.acg.ir import request_tools, structured_output_canonical
from worker.engine.acg.tools import ToolsInfo

HASH_PREFIX_LEN = 16
STABLE_SCAFFOLD = "stable-scaffold"


def short_hash(value: str) -> str:
    """First 16 bytes (Rust `str::get(..16)`: the whole string if that is not a char boundary)."""
    raw = value.encode("utf-8")
    if len(raw) <= HASH_PREFIX_LEN:
        return value
    try:
        return raw[:HASH_PREFIX_LEN].decode("utf-8")
    except UnicodeDecodeError:
        return value


def system_fingerprint(request: dict[str, Any]) -> str:
    """Digest of instructions plus every system/developer message, content as stored."""
    entries: list[dict[str, Any]] = []
    instructions = request.get("instructions")
    if instructions is not None:
        entries.append({"source": "instructions", "content": content_value(instructions)})
    for message in request.get("messages") or ():
        role = message.get("role") if isinstance(message, dict) else None
        if role == "system" or role == "developer":
            entries.append(
                {"source": "message", "role": role, "content": content_value(message["content"])}
            )
    return sha256_hex(jcs(entries)) if entries else "no-system"


def tools_fingerprint(tools: ToolsInfo | None) -> str:
    """`no-tools` without tools, `tools-unavailable` for `[]`, else sha256 of `|`-joined JCS."""
    return "no-tools" if tools is None else tools.fingerprint


def response_format_fingerprint(request: dict[str, Any]) -> str | None:
    canonical = structured_output_canonical(request)
    return None if canonical is None else sha256_hex(canonical)


def seed_fingerprint(request: dict[str, Any]) -> str:
    """Fingerprint of the first message that is neither system nor developer."""
    for message in request.get("messages") or ():
        if not isinstance(message, dict):
            raise UnsupportedRequest("message is not an object")
        role = message.get("role")
        if role == "system" or role == "developer":
            continue
        if role == "user":
            return "user:" + sha256_hex(seed_text(message["content"]))
        if role == "assistant":
            content = message.get("content")
            if content is None:
                return "assistant:no-content"
            return "assistant:" + sha256_hex(seed_text(content))
        if role == "tool":
            return "tool:" + sha256_hex(seed_text(message["content"]))
        if role == "function":
            value = {"name": message.get("name"), "content": message.get("content")}
            return "function:" + sha256_hex(jcs(value))
        if role == "tool_call":
            value = {"name": message.get("name"), "arguments": message.get("arguments")}
            return "tool-call:" + sha256_hex(jcs(value))
        if role == "tool_result":
            return "tool-result:" + sha256_hex(serde_json_text(message.get("output")))
        if role == "provider_native":
            value = {
                "provider": message.get("provider"),
                "kind": message.get("kind"),
                "value": message.get("value"),
            }
            return "native:" + sha256_hex(jcs(value))
        raise UnsupportedRequest(f"unknown message role {role!r}")
    return "no-seed"


def learning_key(agent_id: str, request: dict[str, Any], tools: ToolsInfo | None = None) -> str:
    """The key a request's observation is stored under (`acg_observations:{key}`).

    `tools` may pass `request_tools(request)` when the caller already has it.
    """
    if tools is None:
        tools = request_tools(request)
    system = system_fingerprint(request)
    tools_fp = tools_fingerprint(tools)
    response_format = response_format_fingerprint(request)
    scaffold = system != "no-system" or bool(tools and tools.schemas) or response_format is not None
    model = request.get("model")
    if not isinstance(model, str):
        model = "unknown"
    if scaffold:
        seed = STABLE_SCAFFOLD
    else:
        seed = short_hash(seed_fingerprint(request))
        system = short_hash(system)
        tools_fp = short_hash(tools_fp)
    key = f"{agent_id}::model={model}::seed={seed}::system={system}::tools={tools_fp}"
    if response_format is not None:
        key += f"::response_format={response_format}"
    return key
