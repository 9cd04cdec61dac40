"""Register a real runtime on each prepared prefix; the caller reads its WARNs.

argv[1]: a JSON file, a list of {"prefix", "agent", "surface"}. For each case
a marker line `@@case N` goes to stderr, then a runtime with no telemetry
(it writes nothing) registers, which reads `plan`, `acg_stability` and,
when that is absent, `acg_observations` of the agent, and is shut down.
Run with NEMO_RELAY_LOG=warn: the runtime writes a WARN line to stderr
(synchronously, before `register()` returns) for every value it could not
parse, so the lines after a marker belong to that case. Prints one JSON
line: the cache facts of each case.
"""

from __future__ import annotations

import json
import sys

from common import cache_facts, emit, run_script
from nemo_relay.adaptive import AdaptiveRuntime

from adaptive_worker_client.relay import recommended_config


async def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        cases = json.load(f)
    facts = []
    for n, case in enumerate(cases):
        sys.stderr.write(f"@@case {n}\n")
        sys.stderr.flush()
        config = recommended_config(
            case["agent"],
            redis_url=case["redis_url"],
            key_prefix=case["prefix"],
            provider=case.get("surface", "anthropic"),
            tool_parallelism="schedule",
            export="subscriber",
        )
        runtime = AdaptiveRuntime(config.to_dict())
        await runtime.register()
        facts.append(cache_facts(runtime, case["agent"], case.get("surface", "anthropic")))
        await runtime.shutdown()
    sys.stderr.write("@@end\n")
    sys.stderr.flush()
    emit({"facts": facts})


if __name__ == "__main__":
    run_script(main)
