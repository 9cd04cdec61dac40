"""All configuration, from one typed object (env prefix `ADAPTIVE_`, `.env` read).

Like arq and rq, every component gets its configuration from `Settings` and
nothing reads the environment on its own, so the README table below is the
whole truth. Invalid values fail at start with the variable's name.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "ADAPTIVE_"

PositiveInt = Annotated[int, Field(gt=0)]


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
        default=8 * 1024 * 1024, description="Largest accepted run record, in bytes of JSON."
    )
    retention_max_runs: PositiveInt | None = Field(
        default=None, description="Keep at most this many runs per agent (unset: keep all)."
    )
    retention_max_age_s: PositiveInt | None = Field(
        default=None, description="Drop runs older than this many seconds (unset: keep all)."
    )

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
        return value

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError("must be non-empty and contain no whitespace")
        return value

    @property
    def embedded(self) -> bool:
        """True when no Redis is configured and the in-process fakeredis is used."""
        return self.redis_url is None

    @property
    def effective_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return self.redis_url or "memory://"


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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings (read once; tests build their own with load_settings)."""
    return load_settings()
