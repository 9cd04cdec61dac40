"""Run records rebuilt from the runtime's event stream, handed to our RunClient."""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adaptive_worker_client.relay import _common
from adaptive_worker_client.relay._common import EXPORT_SUBSCRIBER, Installed, log

if TYPE_CHECKING:  # pragma: no cover - typing only
    from adaptive_worker_client.publisher import RunClient

__all__ = ["RunRecordExporter", "install_exporter", "runtime_timestamp", "uuid7"]


_FRACTION = re.compile(r"^(.*T\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(?:Z|z|[+-]00:00)$")
_CALL_FIELDS = (
    "kind",
    "name",
    "started_at",
    "ended_at",
    "metadata_snapshot",
    "output_tokens",
    "prompt_tokens",
    "total_tokens",
    "model_name",
    "tool_call_count",
    "annotated_request",
    "annotated_response",
)


def runtime_timestamp(stamp: str) -> str:
    """An event timestamp in the form the runtime stores (chrono's `AutoSi`, `Z`).

    Events carry `...:19.411124000+00:00`; stored records carry
    `...:19.411124Z`: 0, 3, 6 or 9 fraction digits, the fewest that are exact.
    """
    m = _FRACTION.match(stamp)
    if m is None:
        return stamp
    head, frac = m.group(1), m.group(2) or ""
    ns = int(frac.ljust(9, "0")) if frac else 0
    if ns == 0:
        return f"{head}Z"
    if ns % 1_000_000 == 0:
        return f"{head}.{ns // 1_000_000:03d}Z"
    if ns % 1_000 == 0:
        return f"{head}.{ns // 1_000:06d}Z"
    return f"{head}.{ns:09d}Z"


def uuid7() -> str:
    """A UUIDv7 (the runtime mints v7 run ids; Python 3.11 has no uuid7)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


def _field(event: Any, name: str) -> Any:
    if isinstance(event, Mapping):
        return event.get(name)
    return getattr(event, name, None)


@dataclass(slots=True)
class _OpenRun:
    record: dict[str, Any]
    calls: list[dict[str, Any]]


class RunRecordExporter:
    """A subscriber callback that rebuilds the runtime's RunRecords from events.

    Same rules as the runtime's own run accumulator (crate `adaptive`,
    `drain.rs`), so the records equal the ones the runtime would store except
    for the run id (a fresh UUIDv7): every Agent scope starts a run of
    `agent_id` (nested Agent scopes too, as in the runtime), LLM and tool
    scopes inside it become calls, an end event closes the last open call of
    the same name; an LLM end adds token counts, model name and tool-call
    count from the annotated response. Calls outside any run are ignored.

    `on_run(record)` is called with the finished record (a dict) on the
    thread that delivers events; it must be cheap (`RunClient.submit_run`
    is). Thread-safe. Takes event objects or their `to_dict()` form.
    """

    def __init__(self, agent_id: str, on_run: Callable[[dict[str, Any]], None]) -> None:
        self.agent_id = agent_id
        self.on_run = on_run
        self.exported = 0
        self.errors = 0
        self._open: dict[str, _OpenRun] = {}
        self._roots: dict[str, str] = {}  # event/scope uuid -> run root uuid
        self._lock = threading.Lock()

    def __call__(self, event: Any) -> None:
        if _field(event, "kind") != "scope":
            return
        try:
            with self._lock:
                done = self._process(event)
        except Exception:  # an exporter bug must never reach the agent
            self.errors += 1
            log.exception("run exporter: cannot process an event")
            return
        if done is not None:
            self.exported += 1
            try:
                self.on_run(done)
            except Exception:
                self.errors += 1
                log.exception("run exporter: on_run failed")

    def _root_of(self, uid: str, parent: str | None) -> str | None:
        return self._roots.get(uid) or (self._roots.get(parent) if parent else None)

    def _process(self, event: Any) -> dict[str, Any] | None:
        category = _field(event, "category")
        start = _field(event, "scope_category") == "start"
        uid = str(_field(event, "uuid"))
        stamp = runtime_timestamp(str(_field(event, "timestamp")))
        if category == "agent":
            if start:
                self._roots[uid] = uid
                record = {"id": uuid7(), "agent_id": self.agent_id, "calls": []}
                record["started_at"] = stamp
                self._open[uid] = _OpenRun(record, [])
                return None
            run = self._open.pop(self._roots.pop(uid, uid), None)
            if run is None:
                return None
            run.record["calls"] = [_ordered(call) for call in run.calls]
            run.record["ended_at"] = stamp
            return run.record
        parent = _field(event, "parent_uuid")
        root = self._root_of(uid, parent)
        if category not in ("llm", "tool"):  # function and other nested scopes
            if start and root is not None:
                self._roots[uid] = root
            elif not start:
                self._roots.pop(uid, None)
            return None
        if root is None:
            return None
        run = self._open.get(root)
        name = str(_field(event, "name"))
        if start:
            self._roots[uid] = root
            if run is not None:
                call: dict[str, Any] = {"kind": category, "name": name, "started_at": stamp}
                if category == "llm":
                    profile = _field(event, "category_profile") or {}
                    if profile.get("annotated_request") is not None:
                        call["annotated_request"] = profile["annotated_request"]
                run.calls.append(call)
            return None
        if run is not None:
            for call in reversed(run.calls):
                if call["name"] == name and "ended_at" not in call:
                    call["ended_at"] = stamp
                    if category == "llm":
                        profile = _field(event, "category_profile") or {}
                        _finish_llm(call, profile.get("annotated_response"))
                    break
        self._roots.pop(uid, None)
        return None


def _finish_llm(call: dict[str, Any], response: Mapping[str, Any] | None) -> None:
    if response is None:
        return
    usage = response.get("usage") or {}
    for source, target in (
        ("completion_tokens", "output_tokens"),
        ("prompt_tokens", "prompt_tokens"),
        ("total_tokens", "total_tokens"),
    ):
        if usage.get(source) is not None:
            call[target] = usage[source]
    if response.get("model") is not None:
        call["model_name"] = response["model"]
    if response.get("tool_calls") is not None:
        call["tool_call_count"] = len(response["tool_calls"])
    call["annotated_response"] = dict(response)


def _ordered(call: dict[str, Any]) -> dict[str, Any]:
    """The runtime's field order (not needed for learning; keeps records diffable)."""
    out = {k: call[k] for k in _CALL_FIELDS if k in call}
    out.update((k, v) for k, v in call.items() if k not in out)
    return out


def install_exporter(
    agent_id: str, client: RunClient | None = None, *, name: str = EXPORT_SUBSCRIBER
) -> Installed:
    """Send every finished run of this process to the workers through `client`.

    For agents configured with `recommended_config(export="subscriber")` (no
    telemetry section): with the runtime's own run storage on as well, each
    run would be stored twice under two ids and learned twice. `client`
    defaults to the process's `RunClient` (settings from `ADAPTIVE_*`).
    `Installed.target` is the `RunRecordExporter` (counters `exported`,
    `errors`).
    """
    relay = _common._relay()
    if client is None:
        from adaptive_worker_client.api import default_client

        client = default_client()
    exporter = RunRecordExporter(agent_id, client.submit_run)
    relay.subscribers.register(name, exporter)
    return Installed("subscriber", name, exporter)
