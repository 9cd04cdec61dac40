"""All configuration, from one typed object (env prefix `ADAPTIVE_`, `.env` read).

Like arq and rq, every component gets its configuration from `Settings` and
nothing reads the environment on its own, so the README table below is the
whole truth. Invalid values fail at start with the variable's name.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, FilePath, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "ADAPTIVE_"

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class SettingsError(ValueError):
    """Raised at start when a setting is invalid; the message names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    redis_url: str | None = Field(
        default=None,
        description="Redis holding the runtime's state. Unset: embedded in-process fakeredis.",
    )
    broker_url: str | None = Field(
        default=None,
        description="Celery broker. Unset: the Redis URL (or in-memory when Redis is embedded).",
    )
    # ---- Redis Sentinel (storage/connection.py, adaptive_worker_client/broker.py)
    redis_sentinels: str | None = Field(
        default=None,
        description=(
            "Redis Sentinel addresses `host:port,host:port`: state (and a Redis broker) go to"
            " the primary they name and follow a failover; set, it wins over the Redis URLs."
        ),
    )
    redis_sentinel_service: str = Field(
        default="mymaster", description="Sentinel: the monitored service (master) name."
    )
    redis_sentinel_password: str | None = Field(
        default=None, description="Sentinel: password of the sentinels and of the primary."
    )
    redis_sentinel_tls: bool = Field(
        default=False,
        description="Sentinel: TLS to the sentinels and the primary (ADAPTIVE_TLS_* apply).",
    )
    durability_replicas: NonNegativeInt = Field(
        default=0,
        description=(
            "After storing runs and after each learn commit, WAIT for this many replicas;"
            " an ingest is acked only then, else retried (0: off)."
        ),
    )
    durability_timeout_ms: PositiveInt = Field(
        default=1000, description="Most milliseconds one WAIT for the replicas may take."
    )
    key_prefix: str = Field(
        default="nemo_relay:",
        description="Prefix of every key, the runtime's and ours (`nemo_flow:` for the seed).",
    )
    observation_window: PositiveInt = Field(
        default=100, description="ACG observations kept per learning key (the runtime's 100)."
    )
    learn_batch_size: PositiveInt = Field(
        default=500, description="Most runs folded into one learn commit."
    )
    max_run_bytes: PositiveInt = Field(
        default=8 * 1024 * 1024,
        description="Largest accepted run record, in bytes of its encoded JSON (every door).",
    )
    max_json_depth: Annotated[int, Field(ge=8, le=256)] = Field(
        default=128,
        description="Deepest JSON nesting accepted anywhere (serde_json's own limit is 128).",
    )
    dead_letter_raw_max_bytes: Annotated[int, Field(ge=256)] = Field(
        default=64 * 1024,
        description="Bytes of the rejected input a dead letter keeps (and its full size).",
    )
    dead_letter_max_entries: PositiveInt = Field(
        default=10_000,
        description="Dead-letter list cap: the oldest entries are trimmed (and counted) beyond it.",
    )
    max_message_bytes: PositiveInt = Field(
        default=64 * 1024 * 1024,
        description="Workers: largest task message body accepted (checked before decoding).",
    )
    retention_max_runs: PositiveInt | None = Field(
        default=None, description="Keep at most this many runs per agent (unset: keep all)."
    )
    retention_max_age_s: PositiveInt | None = Field(
        default=None, description="Drop runs older than this many seconds (unset: keep all)."
    )

    retention_tombstones: PositiveInt = Field(
        default=10_000,
        description="Ids of trimmed runs remembered per agent, so late duplicates are refused.",
    )
    discover_interval_s: PositiveFloat | None = Field(
        default=30.0,
        description="Beat: look for agents with unlearned runs this often (unset/0: off).",
    )
    rebuild_interval_s: PositiveFloat | None = Field(
        default=86_400.0,
        description="Beat: rebuild every agent's state from its runs this often (unset/0: off).",
    )
    retention_interval_s: PositiveFloat | None = Field(
        default=3_600.0,
        description="Beat: apply the retention policy this often (unset/0: off).",
    )

    ingest_fast_path: bool = Field(
        default=True,
        description="Ingest learns the runs it stored from memory when the agent's learned "
        "offset is right before them (else the learn task does).",
    )
    learn_pending_ttl_s: PositiveInt = Field(
        default=120,
        description="Expiry of the one-pending-learn-per-agent marker (bounds a lost learn).",
    )
    learn_min_batch: PositiveInt = Field(
        default=50,
        description="A learner keeps going while this many runs wait; fewer wait a linger.",
    )
    learn_linger_s: NonNegativeFloat = Field(
        default=0.25,
        description="Delay before learning a small backlog, so commits carry more runs.",
    )
    learn_time_budget_s: PositiveInt = Field(
        default=60,
        description="A learn task stops after this and re-queues the rest (< task time limit).",
    )

    # ---- broker and worker delivery (worker/celery.py)
    broker_visibility_timeout_s: PositiveInt = Field(
        default=600,
        description="Redis broker: a message unacked this long is delivered again (> task limit).",
    )
    broker_restore_interval_s: PositiveInt = Field(
        default=10,
        description="Redis broker: seconds between checks for messages past their timeout.",
    )
    broker_restore_throttle: PositiveInt = Field(
        default=6,
        description="Redis broker: scan unacked messages every Nth check (period: interval x N).",
    )
    broker_connect_timeout_s: PositiveFloat = Field(
        default=5.0, description="Workers: broker connect timeout."
    )
    broker_socket_timeout_s: PositiveFloat = Field(
        default=30.0,
        description="Workers: Redis socket timeout, so a half-open connection fails, not hangs.",
    )
    broker_delivery_limit: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=20,
        description=(
            "RabbitMQ: a message returned unacked more often than this (its worker died on it)"
            " goes to our dead letters; agents and workers must agree (a queue argument)."
        ),
    )
    broker_compression: Literal["zlib", "none"] = Field(
        default="zlib",
        description=(
            "Agents: compress ingest message bodies (zlib) before publishing. Workers accept"
            " zlib bodies whatever this says, inflated within ADAPTIVE_MAX_MESSAGE_BYTES."
        ),
    )
    task_time_limit_s: PositiveInt = Field(
        default=300,
        description="Hard task time limit; at most half the visibility timeout (soft limit: 90%).",
    )
    worker_prefetch_multiplier: PositiveInt = Field(
        default=2,
        description=(
            "Messages reserved per worker process; a running learn or maintenance task"
            " holds it at 1 for its process, so nothing waits behind a long task."
        ),
    )
    worker_soft_shutdown_s: NonNegativeFloat = Field(
        default=10.0,
        description="On shutdown, running tasks get this long before they are requeued.",
    )
    worker_gc_threshold: NonNegativeInt = Field(
        default=500_000,
        description=(
            "Workers: growth in live containers between young-generation garbage"
            " collections, with the start-up heap frozen out of them (0: Python's"
            " collector left as it is)."
        ),
    )

    # ---- monitoring (worker/metrics.py)
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = Field(
        default=9808,
        description=(
            "Workers: port of the Prometheus /metrics endpoint (0 or empty: no endpoint)."
        ),
    )
    metrics_bind: str = Field(
        default="127.0.0.1",
        description="Workers: address the metrics endpoint listens on (0.0.0.0 in a container).",
    )
    metrics_max_agents: NonNegativeInt = Field(
        default=50,
        description=(
            "Workers: agents given per-agent insight gauges (adaptive_agent_*), the most runs"
            " stored first (ties: agent id); the rest are counted, not exported. 0: none."
        ),
    )
    metrics_max_learning_keys: NonNegativeInt = Field(
        default=20,
        description=(
            "Workers: learning keys per exported agent in adaptive_agent_stable_prefix_blocks"
            " (the first in sorted order); the rest are counted, not exported."
        ),
    )

    # ---- security (storage/connection.py, worker/celery.py, worker/flower.py)
    tls_verify: bool = Field(
        default=True,
        description=(
            "Verify the server's certificate and host name on every TLS connection"
            " (rediss://, amqps://: state, broker, client). false: encrypted but unverified."
        ),
    )
    tls_ca_file: FilePath | None = Field(
        default=None,
        description="CA bundle (PEM) TLS certificates are verified against (unset: the system's).",
    )
    flower_insecure_no_auth: bool = Field(
        default=False,
        description="Let `celery -A worker flower` start without a login (it refuses by default).",
    )

    # ---- the agent-side client (tasks/client.py)
    client_buffer_max_runs: PositiveInt = Field(
        default=10_000, description="Client: runs held in memory waiting for the publisher."
    )
    client_buffer_max_bytes: PositiveInt = Field(
        default=64 * 1024 * 1024, description="Client: bytes held in memory waiting to publish."
    )
    client_batch_max_runs: PositiveInt = Field(
        default=500,
        description="Client: most runs in one ingest message (a worker learns a message's "
        "runs of one agent in one commit, which rewrites the agent's whole state).",
    )
    client_batch_max_bytes: PositiveInt = Field(
        default=4 * 1024 * 1024,
        description="Client: most bytes of runs in one ingest message (a larger run goes alone).",
    )
    client_linger_ms: NonNegativeFloat = Field(
        default=50.0,
        description="Client: the publisher waits this long after a wake-up to batch "
        "(each message costs a worker ~2 ms; 50 ms cut ingest CPU ~5x at 186 runs/s).",
    )
    client_overflow: Literal["drop_oldest", "drop_newest"] = Field(
        default="drop_oldest",
        description="Client: what a full buffer or spool drops (always counted and logged).",
    )
    client_spool_dir: Path | None = Field(
        default=None,
        description=(
            "Client: spool directory of runs the broker did not take"
            " (unset: ~/.cache/adaptive-worker/spool)."
        ),
    )
    client_spool_max_bytes: PositiveInt = Field(
        default=256 * 1024 * 1024, description="Client: most bytes of runs in one process's spool."
    )
    client_spool_fsync: bool = Field(
        default=True, description="Client: fsync each spool write (survives power loss too)."
    )
    client_retry_interval_s: PositiveFloat = Field(
        default=5.0, description="Client: after a failed publish, wait this long before retrying."
    )
    client_connect_timeout_s: PositiveFloat = Field(
        default=1.0, description="Client: broker connect/socket timeout of the publisher."
    )
    client_publish_retries: NonNegativeInt = Field(
        default=1, description="Client: publish retries before the batch goes to the spool."
    )
    client_exit_timeout_s: NonNegativeFloat = Field(
        default=2.0, description="Client: at exit, wait this long to publish, then spool the rest."
    )
    client_state_ttl_s: NonNegativeFloat = Field(
        default=5.0,
        description=(
            "Client: load_plan/load_hints/load_stability serve a value read from Redis for this"
            " long before reading it again (one GET per key per TTL per process; 0: every call)."
        ),
    )
    client_state_timeout_s: PositiveFloat = Field(
        default=0.5,
        description=(
            "Client: connect/socket timeout of state reads, which run on the agent's thread;"
            " after a failure the last good values are served for one TTL before retrying."
        ),
    )
    client_receipts: Literal["auto", "on", "off"] = Field(
        default="auto",
        description=(
            "Client: keep each published run until the state Redis shows it stored, republish"
            " it if not (auto: on for Redis brokers; needs ADAPTIVE_REDIS_URL)."
        ),
    )
    client_receipt_timeout_s: PositiveFloat = Field(
        default=30.0,
        description="Client: republish a run not seen stored this long after publishing (backoff).",
    )
    client_receipt_max_republish: NonNegativeInt = Field(
        default=3,
        description="Client: republishes of a run never seen stored before it is given up.",
    )
    client_receipt_max_bytes: PositiveInt = Field(
        default=64 * 1024 * 1024,
        description="Client: most bytes of published runs waiting for their receipt.",
    )

    @field_validator("task_time_limit_s")
    @classmethod
    def _limit_below_visibility(cls, value: int, info: ValidationInfo) -> int:
        # A task still running when the visibility timeout passes is delivered
        # again while it runs (celery#5935), so the limit must stay well below.
        visibility = info.data.get("broker_visibility_timeout_s")
        if visibility is not None and value * 2 > visibility:
            raise ValueError(
                f"must be at most half of {ENV_PREFIX}BROKER_VISIBILITY_TIMEOUT_S ({visibility})"
            )
        return value

    @field_validator(
        "discover_interval_s", "rebuild_interval_s", "retention_interval_s", mode="before"
    )
    @classmethod
    def _zero_is_off(cls, value: object) -> object:
        return None if value in (0, "0", "", "off", "none") else value

    @field_validator("redis_url", "broker_url")
    @classmethod
    def _url_scheme(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        scheme = value.split("://", 1)[0] if "://" in value else ""
        allowed = {"redis", "rediss", "unix", "amqp", "amqps", "pyamqp", "memory"}
        if scheme not in allowed:
            raise ValueError(
                f"unsupported URL scheme {scheme!r} (expected one of {sorted(allowed)})"
            )
        _check_url_parses(value)
        return value

    @field_validator("redis_sentinels", "redis_sentinel_password", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinel_list(cls, value: str | None) -> str | None:
        from adaptive_worker_client.config import parse_sentinels

        if value is not None:
            parse_sentinels(value)  # ValueError names the bad entry
        return value

    @field_validator("redis_sentinel_service")
    @classmethod
    def _service(cls, value: str) -> str:
        if not value.strip() or any(c.isspace() for c in value.strip()):
            raise ValueError("must be a service name without whitespace")
        return value.strip()

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _empty_port(cls, value: object) -> object:
        # `ADAPTIVE_METRICS_PORT=` (empty, as compose passes an unset default)
        # means "no endpoint", like 0, rather than an int parsing error.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("tls_ca_file", mode="before")
    @classmethod
    def _empty_ca_file(cls, value: object) -> object:
        # Empty (compose passes unset variables through as empty): the system's CAs.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("metrics_bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be an address such as 127.0.0.1 or 0.0.0.0")
        return value.strip()

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError("must be non-empty and contain no whitespace")
        return value

    @property
    def embedded(self) -> bool:
        """True when no Redis is configured and the in-process fakeredis is used."""
        return self.redis_url is None and self.redis_sentinels is None

    @property
    def effective_broker_url(self) -> str:
        # One rule for both ends (Sentinel wins over a Redis URL): the client's.
        from adaptive_worker_client.config import effective_broker

        return effective_broker(self)


def _check_url_parses(url: str) -> None:
    """A URL that would only fail when first used (`redis://h:notaport`, a bad
    `?db=`) fails at start instead, with the variable's name and without the
    URL itself (it may hold a password)."""
    from urllib.parse import urlsplit

    from redis.connection import parse_url

    try:
        for part in url.split(";"):  # kombu's failover list: url1;url2
            urlsplit(part.strip()).port  # noqa: B018 - parsing the port is the check
        if url.split("://", 1)[0] in {"redis", "rediss", "unix"}:
            parse_url(url)
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from None


def load_settings(**overrides: object) -> Settings:
    """Build settings, turning pydantic's error into one naming the variables."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            field = str(err["loc"][0]) if err["loc"] else "?"
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{ENV_PREFIX}{field.upper()}: {msg}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None


_INSTALLED: Settings | None = None


def use_settings(settings: Settings | None) -> None:
    """Make `settings` what `get_settings()` returns (None: the environment's again).

    The command line passes its options (`--redis-url`, `--prefix`) to the
    worker it starts this way, as a value, instead of rewriting os.environ
    and hoping every cache reads it again.
    """
    global _INSTALLED
    _INSTALLED = settings
    get_settings.cache_clear()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings (read once; tests build their own with load_settings)."""
    return _INSTALLED if _INSTALLED is not None else load_settings()
