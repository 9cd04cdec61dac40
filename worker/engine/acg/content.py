"""Message content as the runtime's codec types see it.

An `annotated_request` is stored as JSON, but the runtime reads it back into
typed Rust values (`MessageContent`, `ContentPart`) before building a prompt
IR or a learning key. That round trip decides what text a part contributes:
non-text parts are re-serialized by serde in *declaration* order (`"type"`,
the variant's fields, then flattened extras sorted), optional fields that are
`null` vanish, and structs without a catch-all drop unknown keys. This module
reproduces that view from the stored dicts.
"""

from __future__ import annotations

from typing import Any

from worker.engine.acg.canonical import serde_struct_text, sha256_hex


class UnsupportedRequest(ValueError):
    """A recorded request the runtime could not have parsed; the call is skipped."""


# Declared fields per ContentPart variant, in serde order; True = `Option`
# skipped when absent (so a stored `null` disappears); "extra" = the variant
# has a flattened map that keeps every other key.
_PART_FIELDS: dict[str, tuple[tuple[tuple[str, bool], ...], bool]] = {
    "text": ((("text", False),), True),
    "image_url": ((("image_url", False),), True),
    "image": ((("image", False),), True),
    "audio": ((("audio", False),), True),
    "file": ((("file", False),), True),
    "refusal": ((("refusal", False),), True),
    "tool_use": ((("id", False), ("name", False), ("input", False)), True),
    "tool_result": ((("tool_use_id", False), ("content", False), ("is_error", True)), True),
    "provider_native": ((("provider", False), ("kind", False), ("value", False)), False),
}


def _image_url_value(image_url: Any) -> dict[str, Any]:
    # `OpenAiImageUrl { url, detail? }` has no catch-all: other keys are dropped.
    if not isinstance(image_url, dict) or not isinstance(image_url.get("url"), str):
        raise UnsupportedRequest("image_url part without a url")
    value: dict[str, Any] = {"url": image_url["url"]}
    if image_url.get("detail") is not None:
        value["detail"] = image_url["detail"]
    return value


def part_fields(part: Any) -> list[tuple[str, Any]]:
    """The part as serde writes it back: ordered (key, value) pairs, `type` first."""
    if not isinstance(part, dict):
        raise UnsupportedRequest("content part is not an object")
    kind = part.get("type")
    spec = _PART_FIELDS.get(kind) if isinstance(kind, str) else None
    if spec is None:
        raise UnsupportedRequest(f"unknown content part type {kind!r}")
    declared, has_extra = spec
    fields: list[tuple[str, Any]] = [("type", kind)]
    for name, optional in declared:
        if name not in part:
            if optional:
                continue
            raise UnsupportedRequest(f"{kind} part without {name}")
        value = part[name]
        if value is None and optional:
            continue
        if name == "image_url":
            value = _image_url_value(value)
        fields.append((name, value))
    if has_extra:
        known = {name for name, _ in declared}
        fields.extend(
            (key, part[key]) for key in sorted(part) if key != "type" and key not in known
        )
    return fields


def part_json(part: Any) -> str:
    """`serde_json::to_string(part)`: the text a non-text part contributes."""
    return serde_struct_text(part_fields(part))


def content_value(content: Any) -> Any:
    """`MessageContent` after a serde round trip (for fingerprints hashed as JSON)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return [dict(part_fields(part)) for part in content]
    raise UnsupportedRequest("message content is neither a string nor a list of parts")


_TEXT_FIELD = {"text": "text", "refusal": "refusal"}


def _part_text(part: dict[str, Any], kind: str) -> str:
    """The string of a text or refusal part (both surfaces' extractors agree on these)."""
    text = part.get(_TEXT_FIELD[kind])
    if not isinstance(text, str):
        raise UnsupportedRequest(f"{kind} part without {_TEXT_FIELD[kind]}")
    return text


def ir_text(content: Any) -> str:
    """Text of a content value for a prompt-IR block (`ir_builder::extract_text`).

    Text and refusal parts give their text, image parts nothing, every other part
    its serde JSON; empty pieces are dropped before joining with newlines.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise UnsupportedRequest("message content is neither a string nor a list of parts")
    pieces: list[str] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_FIELD:
            text = _part_text(part, kind)
        elif kind == "image_url":
            _image_url_value(part.get("image_url"))
            continue
        elif kind == "image":
            part_fields(part)
            continue
        else:
            text = part_json(part)
        if text:
            pieces.append(text)
    return "\n".join(pieces)


def seed_text(content: Any) -> str:
    """Text of a content value for the learning-key seed (`acg_profile::extract_text`).

    Unlike `ir_text` nothing is dropped: image URLs become
    `[image:{detail or none}:{sha256 of url}]`, the `image` variant its JSON.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise UnsupportedRequest("message content is neither a string nor a list of parts")
    pieces: list[str] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_FIELD:
            pieces.append(_part_text(part, kind))
        elif kind == "image_url":
            image = _image_url_value(part.get("image_url"))
            pieces.append(f"[image:{image.get('detail', 'none')}:{sha256_hex(image['url'])}]")
        else:
            pieces.append(part_json(part))
    return "\n".join(pieces)
