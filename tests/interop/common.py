"""Shared by the interop scripts, which run under `.venv-relay` (nemo-relay installed).

An agent whose provider and tools are in-process coroutines: no network.
Each run goes through NeMo Relay's managed LLM and tool pipeline:
LLM (answers with 3 tool calls) -> the 3 tools at once -> LLM -> 1 tool.
The system prompt is long enough (> 1024 tokens) for Anthropic prompt
caching, so a runtime that loaded a stability places cache breakpoints.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import nemo_relay
from nemo_relay import LLMRequest, ScopeType, ToolExecutionResult
from nemo_relay.codecs import AnthropicMessagesCodec, OpenAIChatCodec

MODEL = {"anthropic": "claude-sonnet-4-20250514", "openai": "gpt-4.1-mini"}
SYSTEM = (
    "You are TripPlanner, a meticulous travel-planning assistant for a corporate travel desk. "
    "Always gather flight, hotel and weather information before proposing an itinerary. "
    "When several lookups are independent, request them in parallel.\n\nTravel policy:\n"
    + "\n".join(
        f"{i}. Clause {i}: economy class for flights under {i + 3} hours; hotel nightly cap "
        f"${150 + i}; meals per diem ${40 + i}; receipts for any expense above ${20 + i}."
        for i in range(1, 80)
    )
)
TOOLS = [
    ("search_flights", "Search flights between two airports on a date.", ["origin", "date"]),
    ("search_hotels", "Find hotels near a location for a date range.", ["near", "nights"]),
    ("get_weather", "Daily weather forecast for a city.", ["city", "date"]),
    ("rank_options", "Rank candidate itineraries by cost and convenience.", ["candidates"]),
    ("draft_itinerary", "Draft the itinerary from the ranked options.", ["options"]),
]
# The captured agent's prompt (fixtures/relay-*): ~440 tokens, no caching.
SYSTEM_SHORT = SYSTEM.split("\n\nTravel policy:")[0]
PARALLEL = ("search_flights", "search_hotels", "get_weather")
TOOL_DELAY_S = {"search_flights": 0.06, "search_hotels": 0.05, "get_weather": 0.04}
USERS = [
    "Plan a 2-night trip from SFO to JFK on 2026-12-03 for a meeting at Javits Center.",
    "Plan a 3-night trip from SEA to BOS on 2026-12-10 for a meeting at Hynes.",
    "Plan a 1-night trip from LAX to ORD on 2026-12-15 for a meeting at McCormick Place.",
]


def _schema(fields: list[str]) -> dict[str, Any]:
    props = {f: {"type": "string"} for f in fields}
    return {"type": "object", "properties": props, "required": fields}


def body(
    surface: str, user: str, tail: list[dict[str, Any]] | None = None, system: str = SYSTEM
) -> dict[str, Any]:
    if surface == "anthropic":
        return {
            "model": MODEL[surface],
            "system": system,
            "messages": [{"role": "user", "content": user}, *(tail or [])],
            "tools": [
                {"name": n, "description": d, "input_schema": _schema(f)} for n, d, f in TOOLS
            ],
            "max_tokens": 512,
            "temperature": 0.2,
        }
    tools = [
        {"type": "function", "function": {"name": n, "description": d, "parameters": _schema(f)}}
        for n, d, f in TOOLS
    ]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return {"model": MODEL[surface], "messages": messages + (tail or []), "tools": tools}


class FakeProvider:
    """Answers like the provider would; records what the runtime handed to it."""

    def __init__(self, surface: str, delay_s: float = 0.002) -> None:
        self.surface = surface
        self.delay_s = delay_s
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, request: LLMRequest) -> dict[str, Any]:
        content = request.content
        self.seen.append({"headers": dict(request.headers), "body": content})
        first = len(content["messages"]) <= (1 if self.surface == "anthropic" else 2)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.surface == "anthropic":
            if first:
                blocks = [
                    {
                        "type": "tool_use",
                        "id": f"toolu_{n}_{uuid.uuid4().hex[:6]}",
                        "name": n,
                        "input": {"q": n},
                    }
                    for n in PARALLEL
                ]
                stop = "tool_use"
            else:
                blocks, stop = (
                    [{"type": "text", "text": "- UA 123\n- Hotel near venue"}],
                    "end_turn",
                )
            return {
                "id": "msg_" + uuid.uuid4().hex[:8],
                "type": "message",
                "role": "assistant",
                "model": content["model"],
                "content": blocks,
                "stop_reason": stop,
                "usage": {"input_tokens": 2000, "output_tokens": 60 if first else 180},
            }
        if first:
            calls = [
                {
                    "id": f"call_{n}_{uuid.uuid4().hex[:6]}",
                    "type": "function",
                    "function": {"name": n, "arguments": json.dumps({"q": n})},
                }
                for n in PARALLEL
            ]
            message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": calls}
            finish = "tool_calls"
        else:
            message, finish = {"role": "assistant", "content": "- UA 123"}, "stop"
        return {
            "id": "chatcmpl-" + uuid.uuid4().hex[:8],
            "object": "chat.completion",
            "model": content["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": 2000,
                "completion_tokens": 60 if first else 180,
                "total_tokens": 2100,
            },
        }


class Timeline:
    """Start and end of every tool execution, to see the runtime's tool gating."""

    def __init__(self, delays: dict[str, float] | None = None) -> None:
        self.delays = TOOL_DELAY_S if delays is None else delays
        self.rows: list[dict[str, Any]] = []

    def tool(self, name: str, run: int) -> Callable[[Any], Any]:
        async def impl(args: Any) -> ToolExecutionResult:
            start = time.perf_counter()
            await asyncio.sleep(self.delays.get(name, 0.005))
            self.rows.append({"run": run, "tool": name, "start": start, "end": time.perf_counter()})
            return ToolExecutionResult({"tool": name, "ok": True})

        return impl


def serialized_pairs(rows: list[dict[str, Any]], run: int) -> int:
    """Pairs of the run's parallel tools where one started only after the other ended."""
    mine = [r for r in rows if r["run"] == run and r["tool"] in PARALLEL]
    return sum(
        1
        for i, a in enumerate(mine)
        for b in mine[i + 1 :]
        if b["start"] >= a["end"] or a["start"] >= b["end"]
    )


def codec(surface: str) -> Any:
    return AnthropicMessagesCodec() if surface == "anthropic" else OpenAIChatCodec()


async def run_once(
    agent: str,
    surface: str,
    provider: FakeProvider,
    timeline: Timeline,
    run: int,
    shape: str = "interop",
) -> None:
    """One agent run through the managed pipeline (see the module doc).

    `shape="capture"`: the captured runs' shape instead (fixtures/relay-*):
    short prompt, LLM -> 3 tools at once -> rank_options -> draft_itinerary ->
    LLM, and on odd runs one more LLM call.
    """
    c = codec(surface)
    user = USERS[run % len(USERS)]
    system = SYSTEM_SHORT if shape == "capture" else SYSTEM
    headers = {"content-type": "application/json"}

    async def llm(tail: list[dict[str, Any]] | None = None) -> Any:
        return await nemo_relay.llm.execute(
            surface,
            LLMRequest(headers, body(surface, user, tail, system)),
            provider,
            codec=c,
            response_codec=c,
            model_name=MODEL[surface],
        )

    async def tool(name: str, cid: str | None = None) -> Any:
        return await nemo_relay.tools.execute(
            name, {"q": name}, timeline.tool(name, run), tool_call_id=cid
        )

    with nemo_relay.scope.scope(agent, ScopeType.Agent):
        first = await llm()
        if surface == "anthropic":
            calls = [(b["name"], b["id"]) for b in first["content"] if b["type"] == "tool_use"]
        else:
            calls = [
                (tc["function"]["name"], tc["id"])
                for tc in first["choices"][0]["message"]["tool_calls"]
            ]
        results = await asyncio.gather(*(tool(name, cid) for name, cid in calls))
        if surface == "anthropic":
            tail = [
                {"role": "assistant", "content": first["content"]},
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": cid, "content": json.dumps(r.result)}
                        for (_, cid), r in zip(calls, results, strict=True)
                    ],
                },
            ]
        else:
            tail = [first["choices"][0]["message"]] + [
                {"role": "tool", "tool_call_id": cid, "content": json.dumps(r.result)}
                for (_, cid), r in zip(calls, results, strict=True)
            ]
        if shape == "capture":
            await tool("rank_options")
            await tool("draft_itinerary")
            await llm(tail)
            if run % 2:
                await llm([*tail, {"role": "user", "content": "Make it refundable."}])
        else:
            await llm(tail)
            await tool("rank_options")


def cache_control_paths(value: Any, path: str = "$") -> list[str]:
    """Where the request carries Anthropic `cache_control` breakpoints."""
    if isinstance(value, dict):
        here = [path] if "cache_control" in value else []
        return here + [p for k, v in value.items() for p in cache_control_paths(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in cache_control_paths(v, f"{path}[{i}]")]
    return []


def cache_facts(runtime: Any, agent: str, surface: str) -> Any:
    """The runtime's cache-request facts for this agent's first request."""
    c = codec(surface)
    annotated = c.decode(LLMRequest({"content-type": "application/json"}, body(surface, USERS[0])))
    return runtime.build_cache_request_facts(
        provider=surface, request_id=str(uuid.uuid4()), annotated_request=annotated, agent_id=agent
    )


async def drain(runtime: Any) -> None:
    """Wait until the runtime's background drain has stored every finished run."""
    await nemo_relay.subscribers.flush_async()
    if runtime is not None:
        await asyncio.to_thread(runtime.wait_for_idle)


def emit(payload: dict[str, Any]) -> None:
    print(json.dumps(payload), flush=True)


def run_script(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """`asyncio.run(main())`, then exit without interpreter teardown.

    nemo-relay 0.10.4's native core sometimes dies with SIGSEGV while Python
    finalizes (seen in about 1 of 10 agent processes here), after every run
    was done and reported. Skipping finalization keeps that runtime bug from
    failing a test whose work succeeded; an exception in `main` still exits
    non-zero with its traceback.
    """
    asyncio.run(main())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
