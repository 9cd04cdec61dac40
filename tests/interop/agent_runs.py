"""A NeMo Relay agent doing N runs against our Redis; prints one JSON line.

Configurations:
  default            `recommended_config`: telemetry with no learners, so the
                     runtime stores each run (runs + runs_index) and learns nothing
  --learners a,b,c   the runtime's own learners on as well ("mixed mode")
  --export-prefix Q  also `install_exporter`: every run rebuilt from the event
                     stream and submitted through our RunClient to the workers of Q
  --no-telemetry     no telemetry section (nothing stored by the runtime)
  --fast             no provider or tool delays (benchmarks)
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

from common import TOOLS, FakeProvider, Timeline, drain, emit, run_once, run_script
from nemo_relay.adaptive import AdaptiveRuntime, TelemetryConfig

from adaptive_worker_client.relay import install_exporter, recommended_config


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--agent", required=True)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--surface", default="anthropic", choices=["anthropic", "openai"])
    ap.add_argument("--learners", default="")
    ap.add_argument("--export-prefix", default=None)
    ap.add_argument("--no-telemetry", action="store_true")
    ap.add_argument("--tool-mode", default="schedule")
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--shape", default="interop", choices=["interop", "capture"])
    a = ap.parse_args()

    config = recommended_config(
        a.agent,
        redis_url=a.redis_url,
        key_prefix=a.prefix,
        provider=a.surface,
        tool_parallelism=a.tool_mode,
        export="subscriber" if a.no_telemetry else "runtime",
    )
    if a.learners:
        learners = [x for x in a.learners.split(",") if x]
        config = dataclasses.replace(config, telemetry=TelemetryConfig(learners=learners))
    runtime = AdaptiveRuntime(config.to_dict())
    await runtime.register()

    client = exporter = None
    if a.export_prefix:
        from adaptive_worker_client import RunClient  # slow to import: only when used
        from worker.settings import load_settings

        settings = load_settings(
            _env_file=None,
            redis_url=a.redis_url,
            key_prefix=a.export_prefix,
            client_spool_dir=tempfile.mkdtemp(prefix="relay-spool-"),
        )
        client = RunClient(settings)
        exporter = install_exporter(a.agent, client)

    provider = FakeProvider(a.surface, delay_s=0.0 if a.fast else 0.002)
    timeline = Timeline(dict.fromkeys([n for n, _, _ in TOOLS], 0.0) if a.fast else None)
    for i in range(a.warmup):
        await run_once(a.agent, a.surface, provider, timeline, -1 - i, a.shape)
    await drain(runtime)

    agent_s: list[float] = []
    cpu0 = time.process_time()  # every thread of the process: the runtime's drain too
    started = time.perf_counter()
    for i in range(a.runs):
        t0 = time.perf_counter()
        await run_once(a.agent, a.surface, provider, timeline, i, a.shape)
        agent_s.append(time.perf_counter() - t0)
    runs_done = time.perf_counter()
    await drain(runtime)
    drained = time.perf_counter()
    cpu_s = time.process_time() - cpu0
    report = runtime.report()
    await runtime.shutdown()

    out = {
        "runs": a.runs,
        "agent_s": agent_s,
        "runs_wall_s": runs_done - started,
        "drain_wait_s": drained - runs_done,
        "learn_wall_s": drained - started,
        "cpu_s": cpu_s,
        "report": report,
    }
    if exporter is not None and client is not None:
        out["exported"] = exporter.target.exported
        out["exporter_errors"] = exporter.target.errors
        exporter.remove()
        out["flushed"] = client.flush(30)
        out["client"] = {k: v for k, v in client.stats().items() if isinstance(v, int | bool)}
        client.close(5)
    emit(out)


if __name__ == "__main__":
    run_script(main)
