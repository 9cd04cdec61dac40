"""Using the workers from a NeMo Relay agent (`nemo-relay` 0.10.x), agent side.

Install with the extra: `pip install 'adaptive-worker-client[relay]'`.
`nemo_relay` is imported only when a function here needs it.

Modules: `config` (`recommended_config`), `exporter` (runs from the event
stream to our `RunClient`), `hints` (our hints injected into LLM requests),
`watcher` (`StateWatcher`: re-register on newly published state).

Why each piece exists (everything below was checked against the real
`nemo-relay` 0.10.4; see docs/interop.md):

- Runs to the workers. The runtime has no callback that hands a finished
  RunRecord to Python. What it does offer: with a telemetry section whose
  learner list is EMPTY it still stores every finished run (`runs:{agent}:{id}`
  plus RPUSH `runs_index:{agent}`) in the Redis it is configured with, and
  learns nothing. The workers' `discover` beat task finds those runs and learns
  them exactly once. That is the recommended configuration
  (`recommended_config()`): no code in the agent, and the records are the
  runtime's own. Alternative (`install_exporter()`): the telemetry section off
  and a subscriber that rebuilds each RunRecord from the public event stream
  and hands it to our buffered, spooling `RunClient` (for agents that must not
  write to the state Redis, or use another broker).
- Hints. The runtime reads the latency trie nowhere (SPEC 6c), so its own
  hints intercept has nothing learned to send. `install_hints()` registers a
  request intercept that injects our `StateReader.load_hints` the way the
  runtime injects its own: JSON object in the `x-nemo-relay-adaptive-agent-hints`
  header and in the body at `nvext.agent_hints`.
- New plans. The runtime reads `plan` and `acg_stability` when it registers
  (and `plan` again after each finished run, when telemetry is on), never the
  stability again. `StateWatcher` polls our published state version and
  replaces the AdaptiveRuntime when what it would load has changed. Replace,
  not re-register: a runtime with a telemetry section refuses a second
  `register()` ("telemetry already registered").
"""

from __future__ import annotations

from adaptive_worker_client.relay._common import (
    EXPORT_SUBSCRIBER,
    HINTS_HEADER,
    HINTS_INTERCEPT,
    HINTS_PRIORITY,
    RELAY_VERSION,
    SEED_FAILURE_EVENTS,
    ExportMode,
    Installed,
    Provider,
    ToolMode,
)
from adaptive_worker_client.relay.config import recommended_config
from adaptive_worker_client.relay.exporter import (
    RunRecordExporter,
    install_exporter,
    runtime_timestamp,
    uuid7,
)
from adaptive_worker_client.relay.hints import HintsIntercept, hints_run, install_hints
from adaptive_worker_client.relay.watcher import (
    Snapshot,
    StateWatcher,
    loadable_digest,
    published_version,
)

__all__ = [
    "EXPORT_SUBSCRIBER",
    "HINTS_HEADER",
    "HINTS_INTERCEPT",
    "HINTS_PRIORITY",
    "RELAY_VERSION",
    "SEED_FAILURE_EVENTS",
    "ExportMode",
    "HintsIntercept",
    "Installed",
    "Provider",
    "RunRecordExporter",
    "Snapshot",
    "StateWatcher",
    "ToolMode",
    "hints_run",
    "install_exporter",
    "install_hints",
    "loadable_digest",
    "published_version",
    "recommended_config",
    "runtime_timestamp",
    "uuid7",
]
