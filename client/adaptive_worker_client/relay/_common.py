"""Shared pieces of the NeMo Relay integration: the lazy `nemo_relay` import, names, settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # pragma: no cover - typing only
    from adaptive_worker_client.config import AgentSettings

log = logging.getLogger("adaptive_worker_client.relay")

RELAY_VERSION = "0.10.4"
HINTS_HEADER = "x-nemo-relay-adaptive-agent-hints"
HINTS_INTERCEPT = "adaptive-worker-hints"
EXPORT_SUBSCRIBER = "adaptive-worker-export"
# The runtime's own hints intercept runs at 100 (lower first): ours runs after
# it, so when both are on, ours is what the provider sees.
HINTS_PRIORITY = 200
# WARN events (visible with NEMO_RELAY_LOG=warn) the runtime logs when it
# drops a value it cannot parse, naming neither key nor error.
SEED_FAILURE_EVENTS = ("adaptive_hot_cache_seed_failed", "adaptive_acg_cache_seed_failed")

ExportMode = Literal["runtime", "subscriber"]
ToolMode = Literal["observe_only", "inject_hints", "schedule"]
Provider = Literal["anthropic", "openai", "passthrough"]


def _relay() -> Any:
    """The `nemo_relay` package, with a clear message when it is missing."""
    try:
        import nemo_relay
        import nemo_relay.adaptive
        import nemo_relay.intercepts
        import nemo_relay.subscribers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "adaptive_worker_client.relay needs nemo-relay"
            f" (pip install 'adaptive-worker-client[relay]'): {exc}"
        ) from exc
    return nemo_relay


def settings_or_default(settings: AgentSettings | None) -> AgentSettings:
    if settings is not None:
        return settings
    from adaptive_worker_client.config import get_settings

    return get_settings()


@dataclass
class Installed:
    """A registration made here; `remove()` undoes it (idempotent)."""

    kind: Literal["subscriber", "llm_request_intercept"]
    name: str
    target: Any

    def remove(self) -> bool:
        if self.target is None:
            return False
        relay = _relay()
        if self.kind == "subscriber":
            removed = bool(relay.subscribers.deregister(self.name))
        else:
            removed = bool(relay.intercepts.deregister_llm_request(self.name))
        self.target = None
        return removed
