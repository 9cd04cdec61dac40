"""Turning what an agent hands in into the JSON text of one run, cheaply and strictly.

This is the whole cost `submit_run` puts on the agent's thread: encode (or
take the caller's text), size and nesting checks with the worker's own
strict-JSON rule (`strictjson`), so a run the worker would refuse is refused
(and counted) here, without importing pydantic.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol, TypeAlias

from adaptive_worker_client import strictjson
from adaptive_worker_client.contract import agent_id_problem
from adaptive_worker_client.errors import InvalidRecord

__all__ = [
    "Overflow",
    "Record",
    "RunInput",
    "SupportsToJson",
    "agent_of",
    "argsrepr",
    "check",
    "encode",
    "invalid",
]


class SupportsToJson(Protocol):
    def to_json(self) -> str: ...


RunInput: TypeAlias = Mapping[str, Any] | str | bytes | bytearray | SupportsToJson
Overflow: TypeAlias = Literal["drop_oldest", "drop_newest"]
# (JSON text of the run, its agent id when known cheaply, len of the text)
Record: TypeAlias = tuple[str, str | None, int]

# Compact, refusing NaN/Infinity (not JSON; the worker and the runtime refuse
# them too), and leaving non-ASCII text as is so that a lone surrogate fails
# the UTF-8 check below instead of becoming an escape the worker must refuse.
_ENCODER = json.JSONEncoder(
    separators=(",", ":"), allow_nan=False, ensure_ascii=False, check_circular=False
)
_AGENT_RE = re.compile(r'"agent_id"\s*:\s*"((?:[^"\\]|\\.){1,200})"')
_ORPHAN_SCAN_S = 60.0
_DROP_LOG_S = 60.0
_REPLAY_BATCHES_PER_CYCLE = 16


def invalid(message: str) -> InvalidRecord:
    return InvalidRecord("RunRecord", [("", message)])


def encode(run: RunInput) -> tuple[str, str | None]:
    """JSON text and agent id of one run: the whole agent-side cost, kept minimal."""
    cls = type(run)
    if cls is str:
        return run, None  # type: ignore[return-value]
    if cls is dict:
        try:
            # The C encoder of the standard library: orjson is faster but
            # turns NaN into null silently, and the one rule on every door
            # is that NaN/Infinity are refused (storage/strictjson.py).
            text = _ENCODER.encode(run)
        except (TypeError, ValueError, RecursionError) as exc:
            raise invalid(f"not JSON serializable: {exc}") from None
        agent = run.get("agent_id")  # type: ignore[union-attr]
        return text, agent if type(agent) is str else None
    if isinstance(run, str):
        return str(run), None
    if isinstance(run, bytes | bytearray):
        try:
            return bytes(run).decode("utf-8"), None
        except UnicodeDecodeError as exc:
            raise invalid(f"not UTF-8: {exc}") from None
    to_json = getattr(run, "to_json", None) or getattr(run, "model_dump_json", None)
    if to_json is not None:
        text = to_json()
        if not isinstance(text, str):
            raise invalid(f"to_json() returned {type(text).__name__}, not str")
        agent = getattr(run, "agent_id", None)
        return text, agent if isinstance(agent, str) else None
    if isinstance(run, Mapping):
        return encode(dict(run))
    raise invalid(f"expected a dict, JSON text or a model with to_json(), got {cls.__name__}")


def agent_of(record: Record) -> str | None:
    text, agent, _ = record
    if agent is not None:
        return agent
    match = _AGENT_RE.search(text, 0, 4096)
    return match.group(1) if match else None


def argsrepr(records: Sequence[Record]) -> str:
    """What Flower shows instead of megabytes of prompts: count, size, agents."""
    agents = list(dict.fromkeys(a for a in map(agent_of, records) if a is not None))
    size = sum(r[2] for r in records)
    shown = ", ".join(agents[:5]) + (f" +{len(agents) - 5} more" if len(agents) > 5 else "")
    text = f"<{len(records)} runs, {size} bytes, agents: {shown or '?'}>"
    return text if len(text) <= 300 else text[:296] + "...>"


def check(
    text: str,
    *,
    agent: str | None,
    max_bytes: int,
    max_depth: int,
    encoded_from: Any = None,
) -> None:
    """The worker's own strict-JSON rule, so a run it would refuse is refused here.

    Text we encoded ourselves (`encoded_from` is the dict it came from) has
    no NaN (the encoder refused it), so it only needs the cheap checks, and
    its nesting is the dict's own: walking the dict (~35 us for a 7 KB run)
    costs a third of scanning the text, which must first cut out every
    string. Text from the caller is parsed strictly.
    """
    try:
        if encoded_from is not None:
            raw = strictjson.utf8(text)
            if len(raw) > max_bytes:
                raise ValueError(f"larger than max_run_bytes ({max_bytes})")
            if strictjson.value_depth(encoded_from, max_depth) > max_depth:
                raise ValueError(f"JSON nested more than {max_depth} levels deep")
        else:
            strictjson.check_text(text, max_depth=max_depth, max_bytes=max_bytes)
    except ValueError as exc:
        raise invalid(str(exc)) from None
    problem = agent_id_problem(agent) if agent is not None else None
    if problem:
        raise InvalidRecord("RunRecord", [("agent_id", problem)])
