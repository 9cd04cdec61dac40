"""Byte-level primitives shared by the ACG modules: RFC 8785, serde_json text, hashing.

Every digest the runtime stores (tool schema hashes, the source request hash,
learning-key fingerprints, prefix fingerprints) is a SHA-256 over text the
Rust side produced with `serde_json_canonicalizer` (RFC 8785) or with plain
`serde_json`. Python's `json.dumps` differs from both on numbers (`1.0`,
`1e-07`) and, for RFC 8785, on key order for astral characters, so the
text is rebuilt here. The `rfc8785` package is the reference for RFC 8785;
`jcs` is a faster equivalent (checked against it in the tests) because the
learner canonicalizes every recorded request.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from typing import Any

import rfc8785

# Rust `char::is_whitespace` (Unicode White_Space). Python's `str.isspace` also
# accepts U+001C..U+001F, which Rust keeps as ordinary characters.
RUST_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_WS_CLASS = "".join(f"\\u{ord(c):04x}" for c in RUST_WHITESPACE)
_WS_NO_SPACE_CLASS = "".join(f"\\u{ord(c):04x}" for c in RUST_WHITESPACE if c != " ")

# A whitespace run needs rewriting unless it is a single ASCII space.
_WS_RUN = re.compile(f"[{_WS_CLASS}]{{2,}}|[{_WS_NO_SPACE_CLASS}]")
# Text is already normal unless it has whitespace other than space and newline,
# or a space followed by whitespace.
_OTHER_WS_CLASS = "".join(f"\\u{ord(c):04x}" for c in RUST_WHITESPACE if c not in " \n")
_NEEDS_WORK = re.compile(f"[{_OTHER_WS_CLASS}]| [ \\n]")

_encode_str: Callable[[str], str] = json.encoder.encode_basestring  # type: ignore[attr-defined]

_INT_SAFE = 2**53 - 1
_I64_MIN = -(2**63)
_U64_MAX = 2**64 - 1


def sha256_hex(text: str) -> str:
    """`sha256:` + lowercase hex of the UTF-8 bytes, the runtime's digest format."""
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def _ws_replace(match: re.Match[str]) -> str:
    run = match.group()
    newlines = run.count("\n")
    if not newlines:
        return " "
    if run[-1] == "\n":
        return "\n" * newlines
    return "\n" * newlines + " "


def normalize_whitespace(text: str) -> str:
    """Port of the runtime's `normalize_whitespace` (Rust whitespace semantics).

    Trim; inside, every run of whitespace keeps its newlines and collapses the
    rest to one space, which is dropped when a newline follows it (the Rust loop
    forgets a pending space at each newline). The text is trimmed, so every run
    ends before a non-whitespace character. Most prompt text is already normal
    (only single spaces and newlines, no space before a newline): that is
    checked with substring scans before any regex runs.
    """
    trimmed = text.strip(RUST_WHITESPACE)
    if not trimmed:
        return ""
    if trimmed.isascii():
        if (
            "  " not in trimmed
            and " \n" not in trimmed
            and "\t" not in trimmed
            and "\r" not in trimmed
            and "\x0b" not in trimmed
            and "\x0c" not in trimmed
        ):
            return trimmed
    elif _NEEDS_WORK.search(trimmed) is None:
        return trimmed
    return _WS_RUN.sub(_ws_replace, trimmed)


# ----------------------------------------------------------------- RFC 8785


def _jcs_float(value: float) -> str:
    return rfc8785.dumps(value).decode()


def _utf16_key(key: str) -> bytes:
    return key.encode("utf-16be")


def _jcs_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    kind = type(value)
    if kind is int:
        if -_INT_SAFE <= value <= _INT_SAFE:
            return str(value)
        # Beyond 2^53 a JSON number is a double to RFC 8785 (the rfc8785
        # package refuses it instead).
        return _jcs_float(float(value))
    if kind is float:
        if value.is_integer() and -_INT_SAFE <= value <= _INT_SAFE:
            return str(int(value))
        return _jcs_float(value)
    # Subclasses (IntEnum, str subclasses...) and anything exotic: the reference.
    return rfc8785.dumps(value).decode()


def _jcs_into(value: Any, out: list[str]) -> None:
    # Hot path of the learner (every recorded request is hashed): strings are
    # handled inline, containers recurse, everything else is a scalar.
    kind = type(value)
    if kind is dict:
        if not value:
            out.append("{}")
            return
        keys = sorted(value)
        # Code point order equals UTF-16 order unless a key has an astral character.
        joined = "".join(keys)
        if not joined.isascii() and max(joined) > "\uffff":
            keys.sort(key=_utf16_key)
        sep = "{"
        for key in keys:
            item = value[key]
            kind = type(item)
            if kind is str:
                out.append(f"{sep}{_encode_str(key)}:{_encode_str(item)}")
            elif kind is dict or kind is list:
                out.append(f"{sep}{_encode_str(key)}:")
                _jcs_into(item, out)
            else:
                out.append(f"{sep}{_encode_str(key)}:{_jcs_scalar(item)}")
            sep = ","
        out.append("}")
    elif kind is list or kind is tuple:
        if not value:
            out.append("[]")
            return
        sep = "["
        for item in value:
            kind = type(item)
            if kind is str:
                out.append(sep + _encode_str(item))
            elif kind is dict or kind is list:
                out.append(sep)
                _jcs_into(item, out)
            else:
                out.append(sep + _jcs_scalar(item))
            sep = ","
        out.append("]")
    elif kind is str:
        out.append(_encode_str(value))
    else:
        out.append(_jcs_scalar(value))


def jcs_object(value: dict[str, Any], known: dict[str, str]) -> str:
    """RFC 8785 text of an object whose members in `known` are already canonical text."""
    keys = sorted(value)
    joined = "".join(keys)
    if not joined.isascii() and max(joined) > "\uffff":
        keys.sort(key=_utf16_key)
    out: list[str] = []
    sep = "{"
    for key in keys:
        text = known.get(key)
        if text is None:
            out.append(f"{sep}{_encode_str(key)}:")
            _jcs_into(value[key], out)
        else:
            out.append(f"{sep}{_encode_str(key)}:{text}")
        sep = ","
    out.append("}" if out else "{}")
    return "".join(out)


def jcs(value: Any) -> str:
    """RFC 8785 canonical JSON text of a parsed JSON value.

    Equal to `rfc8785.dumps(value).decode()` wherever that succeeds; strings
    with lone surrogates fail later, when the text is encoded for hashing, as
    they fail in the runtime's JSON parser.
    """
    kind = type(value)
    if kind is str:
        return _encode_str(value)
    out: list[str] = []
    _jcs_into(value, out)
    return "".join(out)


# ------------------------------------------------------- serde_json text


def serde_float(value: float) -> str:
    """`serde_json`'s text for an f64 (ryu layout: `1.0`, `1e-7`, `1e16`)."""
    if not math.isfinite(value):
        return "null"
    if value == 0:
        return "-0.0" if math.copysign(1.0, value) < 0 else "0.0"
    text = repr(value)
    sign = ""
    if text[0] == "-":
        sign, text = "-", text[1:]
    mantissa, _, exp_text = text.partition("e")
    whole, _, frac = mantissa.partition(".")
    digits = whole + frac
    point = len(whole) + (int(exp_text) if exp_text else 0)
    stripped = digits.lstrip("0")
    point -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    length = len(digits)
    k = point - length
    if k >= 0 and point <= 16:
        body = digits + "0" * k + ".0"
    elif 0 < point <= 16:
        body = digits[:point] + "." + digits[point:]
    elif -5 < point <= 0:
        body = "0." + "0" * (-point) + digits
    elif length == 1:
        body = f"{digits}e{point - 1}"
    else:
        body = f"{digits[0]}.{digits[1:]}e{point - 1}"
    return sign + body


def _serde_into(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(_encode_str(value))
    elif isinstance(value, dict):
        # serde_json::Map without `preserve_order` is a BTreeMap: keys in byte order.
        sep = "{"
        for key in sorted(value):
            out.append(sep)
            out.append(_encode_str(key))
            out.append(":")
            _serde_into(value[key], out)
            sep = ","
        out.append("{}" if sep == "{" else "}")
    elif isinstance(value, list | tuple):
        sep = "["
        for item in value:
            out.append(sep)
            _serde_into(item, out)
            sep = ","
        out.append("[]" if sep == "[" else "]")
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        # serde_json keeps i64/u64 exactly; wider integers were parsed as f64.
        out.append(str(value) if _I64_MIN <= value <= _U64_MAX else serde_float(float(value)))
    elif isinstance(value, float):
        out.append(serde_float(value))
    else:
        raise TypeError(f"not a JSON value: {type(value).__name__}")


def serde_json_text(value: Any) -> str:
    """Compact `serde_json::to_string` text of a `serde_json::Value` (sorted maps)."""
    out: list[str] = []
    _serde_into(value, out)
    return "".join(out)


def serde_struct_text(fields: list[tuple[str, Any]]) -> str:
    """Compact serde text of a derived struct: fields in the given (declaration) order."""
    out: list[str] = []
    sep = "{"
    for key, item in fields:
        out.append(sep)
        out.append(_encode_str(key))
        out.append(":")
        _serde_into(item, out)
        sep = ","
    out.append("{}" if sep == "{" else "}")
    return "".join(out)
