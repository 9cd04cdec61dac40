"""A FRESH NeMo Relay agent on our state: what it loaded, shown by what it does.

Registers `recommended_config(export="subscriber")` (no telemetry section:
it writes nothing, so the state under test stays as the workers left it),
with tool parallelism in schedule mode, Anthropic prompt caching and our
`install_hints`. Does N runs and prints one JSON line:
  requests   per provider request: run, position of the call in the run,
             the hints header, body `nvext.agent_hints`, cache_control paths
  serialized per run, pairs of the parallel tools that did not overlap (gating)
  facts      the runtime's cache-request facts for the agent's first request
"""

from __future__ import annotations

import argparse

from common import (
    FakeProvider,
    Timeline,
    cache_control_paths,
    cache_facts,
    emit,
    run_once,
    run_script,
)
from common import serialized_pairs as serialized
from nemo_relay.adaptive import AdaptiveRuntime

from adaptive_worker_client.relay import HINTS_HEADER, install_hints, recommended_config


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--agent", required=True)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--surface", default="anthropic", choices=["anthropic", "openai"])
    ap.add_argument("--no-hints", action="store_true")
    a = ap.parse_args()

    config = recommended_config(
        a.agent,
        redis_url=a.redis_url,
        key_prefix=a.prefix,
        provider=a.surface,
        tool_parallelism="schedule",
        export="subscriber",
    )
    runtime = AdaptiveRuntime(config.to_dict())
    await runtime.register()
    hook = None
    if not a.no_hints:
        from adaptive_worker_client import StateReader  # slow to import: only when used
        from worker.settings import load_settings

        settings = load_settings(_env_file=None, redis_url=a.redis_url, key_prefix=a.prefix)
        hook = install_hints(a.agent, StateReader(settings, ttl_s=0.0))

    provider = FakeProvider(a.surface)
    timeline = Timeline()
    requests = []
    for run in range(a.runs):
        before = len(provider.seen)
        await run_once(a.agent, a.surface, provider, timeline, run)
        for position, seen in enumerate(provider.seen[before:], start=1):
            requests.append(
                {
                    "run": run,
                    "position": position,
                    "header": seen["headers"].get(HINTS_HEADER),
                    "body": (seen["body"].get("nvext") or {}).get("agent_hints"),
                    "cache_control": cache_control_paths(seen["body"]),
                }
            )
    facts = cache_facts(runtime, a.agent, a.surface)
    await runtime.shutdown()
    out = {
        "requests": requests,
        "serialized": [serialized(timeline.rows, run) for run in range(a.runs)],
        "facts": facts,
    }
    if hook is not None:
        h = hook.target
        out["hints"] = {"injected": h.injected, "without": h.without_hints, "errors": h.errors}
        hook.remove()
    emit(out)


if __name__ == "__main__":
    run_script(main)
