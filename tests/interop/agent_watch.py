"""A long-lived NeMo Relay agent kept on our newest state by `StateWatcher`.

Driven line by line on stdin, one JSON line on stdout per command:
  run      one run, then wait until the runtime stored it (it writes runs:
           recommended config, telemetry with no learners); reports tool
           gating, cache breakpoints and the runtime's cache facts
  refresh  `await watcher.refresh()`: replaces the runtime if our published
           state changed; reports whether it did and the version it loaded
  quit     close the watcher
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from common import (
    FakeProvider,
    Timeline,
    cache_control_paths,
    cache_facts,
    drain,
    emit,
    run_once,
    run_script,
)
from common import serialized_pairs as serialized

from adaptive_worker_client.relay import StateWatcher, recommended_config
from worker.settings import load_settings


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--agent", required=True)
    ap.add_argument("--surface", default="anthropic", choices=["anthropic", "openai"])
    a = ap.parse_args()

    settings = load_settings(_env_file=None, redis_url=a.redis_url, key_prefix=a.prefix)
    config = recommended_config(a.agent, settings=settings, provider=a.surface)
    watcher = StateWatcher(a.agent, config, settings=settings, poll_interval_s=0.0)
    await watcher.start()
    emit({"ready": True, "loaded": watcher.loaded.version if watcher.loaded else None})
    provider, timeline, run = FakeProvider(a.surface), Timeline(), 0
    while True:
        line = (await asyncio.to_thread(sys.stdin.readline)).strip()
        if line in ("", "quit"):
            break
        if line == "run":
            before = len(provider.seen)
            await run_once(a.agent, a.surface, provider, timeline, run)
            await drain(watcher.runtime)
            emit(
                {
                    "run": run,
                    "serialized": serialized(timeline.rows, run),
                    "cache_control": [
                        cache_control_paths(s["body"]) for s in provider.seen[before:]
                    ],
                    "facts": cache_facts(watcher.runtime, a.agent, a.surface),
                }
            )
            run += 1
        elif line == "refresh":
            swapped = await watcher.refresh()
            loaded = watcher.loaded
            emit(
                {
                    "swapped": swapped,
                    "loaded": loaded.version if loaded else None,
                    "swaps": watcher.swaps,
                    "error": watcher.last_error,
                }
            )
        else:
            emit({"error": f"unknown command {line!r}"})
    await watcher.close()
    emit({"bye": True, "swaps": watcher.swaps})


if __name__ == "__main__":
    run_script(main)
