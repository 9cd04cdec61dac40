"""The AdaptiveConfig an agent needs so its runtime reads what our workers write."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adaptive_worker_client.relay import _common
from adaptive_worker_client.relay._common import ExportMode, Provider, ToolMode, settings_or_default

if TYPE_CHECKING:  # pragma: no cover - typing only
    from adaptive_worker_client.config import AgentSettings

__all__ = ["recommended_config"]


def recommended_config(
    agent_id: str,
    *,
    settings: AgentSettings | None = None,
    redis_url: str | None = None,
    key_prefix: str | None = None,
    provider: Provider = "openai",
    tool_parallelism: ToolMode = "schedule",
    export: ExportMode = "runtime",
    runtime_hints: bool = False,
) -> Any:
    """The AdaptiveConfig for an agent whose learning is done by our workers.

    - `state`: the Redis and key prefix the workers use (`settings`, i.e. the
      `ADAPTIVE_REDIS_URL` / `ADAPTIVE_KEY_PREFIX` the workers read, unless
      given), so the agent loads what they write.
    - `telemetry`: `TelemetryConfig(learners=[])` for `export="runtime"` (the
      runtime stores finished runs, learns nothing; `discover` picks them up);
      None for `export="subscriber"` (nothing written by the runtime; use
      `install_exporter`). Never both: every run would be learned twice.
      No learner may be listed: the runtime's learners would overwrite the
      workers' plan and double-count every run (see `tasks.mixed`).
    - `adaptive_hints`: off by default, since the runtime has no trie to hint
      from; `install_hints` injects ours. `runtime_hints=True` keeps the
      runtime's intercept (for `set_latency_sensitivity`); ours still wins.
    - `tool_parallelism`: `schedule` gates the tools of the plan's parallel
      groups (needs the plan AND a stability with >= 3 observations).
    - `acg`: the provider whose cache breakpoints the runtime places from the
      loaded stability (Anthropic: only for prompts of >= 1024 tokens).
    """
    relay = _common._relay()
    ad = relay.adaptive
    if redis_url is None or key_prefix is None:
        s = settings_or_default(settings)
        redis_url = redis_url or s.redis_url
        key_prefix = s.key_prefix if key_prefix is None else key_prefix
    if not redis_url:
        raise ValueError(
            "the NeMo Relay runtime needs a real Redis URL (ADAPTIVE_REDIS_URL), "
            "not the embedded in-process default"
        )
    if export not in ("runtime", "subscriber"):
        raise ValueError(f"export must be 'runtime' or 'subscriber', got {export!r}")
    return ad.AdaptiveConfig(
        agent_id=agent_id,
        state=ad.StateConfig(backend=ad.BackendSpec.redis(redis_url, key_prefix=key_prefix)),
        telemetry=ad.TelemetryConfig(learners=[]) if export == "runtime" else None,
        adaptive_hints=ad.AdaptiveHintsConfig() if runtime_hints else None,
        tool_parallelism=ad.ToolParallelismConfig(mode=tool_parallelism),
        acg=ad.AcgConfig(provider=provider),
    )


def _config_dict(config: Any) -> dict[str, Any]:
    return dict(config.to_dict()) if hasattr(config, "to_dict") else dict(config)
