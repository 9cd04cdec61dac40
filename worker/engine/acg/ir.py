"""PromptIR: one recorded LLM request flattened into addressable blocks.

Port of the runtime's `build_prompt_ir` applied to a stored
`annotated_request` (OpenAI chat and Anthropic messages surfaces both arrive
in this normalized form; Anthropic's `system` is `instructions`). The output
is the wire dict of a stored observation, keys in the Rust field order, so a
compact `json.dumps` of it is byte-identical to what the runtime stores.
"""

from __future__ import annotations

from typing import Any

from worker.engine.acg.canonical import jcs, jcs_object, normalize_whitespace, sha256_hex
from worker.engine.acg.content import UnsupportedRequest, ir_text
from worker.engine.acg.tools import ToolsInfo, tools_info

SENSITIVITY = "public"


def _block(
    index: int, role: str, content: str, content_type: str, provenance: str, suffix: str | None
) -> dict[str, Any]:
    span_id = f"{role}-{index}" if suffix is None else f"{role}-{index}-{suffix}"
    return {
        "span_id": span_id,
        "sequence_index": index,
        "role": role,
        "content": content,
        "content_type": content_type,
        "provenance": provenance,
        "sensitivity": SENSITIVITY,
    }


def structured_output_canonical(request: dict[str, Any]) -> str | None:
    """RFC 8785 text of a top-level, non-null `response_format` (an unknown-key extra).

    OpenAI chat's own `response_format` lives under `api_specific` and never
    gets here.
    """
    value = request.get("response_format")
    return None if value is None else jcs(value)


def _tool_call_content(call: Any) -> tuple[str, str]:
    # `ToolCall { id, type, function: { name, arguments } }`: no catch-all, so
    # any other stored key is dropped before canonicalizing.
    if not isinstance(call, dict):
        raise UnsupportedRequest("tool call is not an object")
    function = call.get("function")
    if not isinstance(function, dict):
        raise UnsupportedRequest("tool call without function")
    name, arguments = function.get("name"), function.get("arguments")
    call_id, call_type = call.get("id"), call.get("type")
    if not all(isinstance(v, str) for v in (name, arguments, call_id, call_type)):
        raise UnsupportedRequest("tool call with missing or non-string fields")
    value = {"id": call_id, "type": call_type, "function": {"name": name, "arguments": arguments}}
    return name, normalize_whitespace(jcs(value))


def _serialized_message(message: dict[str, Any], role: str, fields: tuple[str, ...]) -> str:
    """JCS of a message variant re-serialized by serde (required fields + `id?` + extras)."""
    value: dict[str, Any] = {"role": role}
    for field in fields:
        if field not in message:
            raise UnsupportedRequest(f"{role} message without {field}")
        value[field] = message[field]
    if role != "provider_native":
        if message.get("id") is not None:
            value["id"] = message["id"]
        for key, item in message.items():
            if key not in value and key != "id":
                value[key] = item
    return normalize_whitespace(jcs(value))


def build_blocks(
    request: dict[str, Any], tools: ToolsInfo | None, structured_output: str | None
) -> list[dict[str, Any]]:
    """The ordered blocks of a request (see SPEC section 6)."""
    blocks: list[dict[str, Any]] = []
    append = blocks.append
    seq = 0

    def scaffold() -> None:
        nonlocal seq
        if tools is not None:
            for schema in tools.schemas:
                append(
                    _block(
                        seq, "system", schema.block_content, "tool_schema", "system", schema.name
                    )
                )
                seq += 1
        if structured_output is not None:
            append(
                _block(
                    seq,
                    "system",
                    structured_output,
                    "structured_output",
                    "system",
                    "structured-output",
                )
            )
            seq += 1

    instructions = request.get("instructions")
    if instructions is not None:
        append(
            _block(
                seq,
                "system",
                normalize_whitespace(ir_text(instructions)),
                "text",
                "system",
                "instructions",
            )
        )
        seq += 1

    messages = request.get("messages", [])
    if not isinstance(messages, list):
        raise UnsupportedRequest("messages is not a list")
    inserted = False
    for message in messages:
        if not isinstance(message, dict):
            raise UnsupportedRequest("message is not an object")
        role = message.get("role")
        if not inserted and role != "system" and role != "developer":
            scaffold()
            inserted = True
        if role == "system" or role == "user" or role == "developer":
            if "content" not in message:
                raise UnsupportedRequest(f"{role} message without content")
            text = normalize_whitespace(ir_text(message["content"]))
            if role == "developer":
                append(_block(seq, "system", text, "text", "developer", "developer"))
            else:
                append(_block(seq, role, text, "text", role, None))
            seq += 1
        elif role == "assistant":
            content = message.get("content")
            if content is not None:
                # Emitted whenever content is present, even when it is empty.
                append(
                    _block(
                        seq,
                        "assistant",
                        normalize_whitespace(ir_text(content)),
                        "text",
                        "developer",
                        None,
                    )
                )
                seq += 1
            calls = message.get("tool_calls")
            if calls is not None:
                if not isinstance(calls, list):
                    raise UnsupportedRequest("tool_calls is not a list")
                for call in calls:
                    name, text = _tool_call_content(call)
                    append(_block(seq, "assistant", text, "text", "developer", name))
                    seq += 1
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or "content" not in message:
                raise UnsupportedRequest("tool message without tool_call_id or content")
            text = normalize_whitespace(ir_text(message["content"]))
            append(_block(seq, "tool", text, "tool_result", "tool", call_id))
            seq += 1
        elif role == "function":
            name, content = message.get("name"), message.get("content")
            if not isinstance(name, str) or not (content is None or isinstance(content, str)):
                raise UnsupportedRequest("function message without name")
            append(_block(seq, "tool", normalize_whitespace(content or ""), "text", "tool", name))
            seq += 1
        elif role == "tool_call":
            name = message.get("name")
            if not isinstance(name, str):
                raise UnsupportedRequest("tool_call item without name")
            text = _serialized_message(message, "tool_call", ("call_id", "name", "arguments"))
            append(_block(seq, "assistant", text, "text", "developer", name))
            seq += 1
        elif role == "tool_result":
            call_id = message.get("call_id")
            if not isinstance(call_id, str):
                raise UnsupportedRequest("tool_result item without call_id")
            text = _serialized_message(message, "tool_result", ("call_id", "output"))
            append(_block(seq, "tool", text, "text", "tool", call_id))
            seq += 1
        elif role == "provider_native":
            kind = message.get("kind")
            if not isinstance(kind, str):
                raise UnsupportedRequest("provider_native item without kind")
            text = _serialized_message(message, "provider_native", ("provider", "kind", "value"))
            append(_block(seq, "user", text, "text", "developer", kind))
            seq += 1
        else:
            raise UnsupportedRequest(f"unknown message role {role!r}")
    if not inserted:
        scaffold()
    return blocks


def source_request_hash(request: dict[str, Any], tools: ToolsInfo | None = None) -> str:
    """sha256 of the RFC 8785 text of the request exactly as stored (hints included).

    The tool list, the bulk of most requests, is taken from the tools cache.
    """
    if tools is None:
        return sha256_hex(jcs(request))
    return sha256_hex(jcs_object(request, {"tools": tools.stored_canonical}))


def request_tools(request: dict[str, Any]) -> ToolsInfo | None:
    """Cached tool data of a request; None when it has no `tools` (or `tools: null`)."""
    raw_tools = request.get("tools")
    return None if raw_tools is None else tools_info(raw_tools)


def build_prompt_ir(
    request: dict[str, Any],
    *,
    ir_id: str,
    created_at: str,
    tools: ToolsInfo | None = None,
) -> dict[str, Any]:
    """Wire dict of the PromptIR observation for one recorded request.

    `tools` may pass `request_tools(request)` when the caller already has it.
    Raises UnsupportedRequest when the runtime could not have parsed the request.
    """
    if not isinstance(request, dict):
        raise UnsupportedRequest("annotated_request is not an object")
    if tools is None:
        tools = request_tools(request)
    structured_output = structured_output_canonical(request)
    blocks = build_blocks(request, tools, structured_output)
    observation: dict[str, Any] = {"ir_id": ir_id, "blocks": blocks}
    if tools is not None:
        observation["tool_schema_hashes"] = [
            {"tool_name": s.name, "schema_hash": s.schema_hash} for s in tools.schemas
        ]
    if structured_output is not None:
        observation["structured_output_schema_id"] = sha256_hex(structured_output)
    observation["source_request_hash"] = source_request_hash(request, tools)
    observation["created_at"] = created_at
    return observation
