"""The agent's settings: only what publishing and reading need, and never an exception.

The client runs inside someone else's process, so reading its configuration
must not fail that process: an invalid value (or a worker-only setting the
client does not know, which it never reads) is logged once and the default
is used. Names and defaults are the server's (`ADAPTIVE_` prefix, `.env`
read, the environment wins), and the server's `Settings` takes its client
defaults from `ClientSettings`, so both sides mean the same by each name.
Any object with these attributes (the server's `Settings` included) can be
passed where the client takes settings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol

__all__ = [
    "ENV_PREFIX",
    "AgentSettings",
    "ClientSettings",
    "effective_broker",
    "get_settings",
    "load_client_settings",
    "parse_sentinels",
    "sentinel_broker_url",
]

log = logging.getLogger(__name__)

ENV_PREFIX = "ADAPTIVE_"
URL_SCHEMES = frozenset({"redis", "rediss", "unix", "amqp", "amqps", "pyamqp", "memory"})


class AgentSettings(Protocol):
    """What the client reads of a settings object (`ClientSettings` or the server's)."""

    redis_url: str | None
    broker_url: str | None
    redis_sentinels: str | None
    redis_sentinel_service: str
    redis_sentinel_password: str | None
    redis_sentinel_tls: bool
    key_prefix: str
    max_run_bytes: int
    max_json_depth: int
    tls_verify: bool
    tls_ca_file: Path | None
    broker_delivery_limit: int
    broker_compression: Literal["zlib", "none"]
    client_buffer_max_runs: int
    client_buffer_max_bytes: int
    client_batch_max_runs: int
    client_batch_max_bytes: int
    client_linger_ms: float
    client_overflow: Literal["drop_oldest", "drop_newest"]
    client_spool_dir: Path | None
    client_spool_max_bytes: int
    client_spool_fsync: bool
    client_retry_interval_s: float
    client_connect_timeout_s: float
    client_publish_retries: int
    client_exit_timeout_s: float
    client_state_ttl_s: float
    client_state_timeout_s: float
    client_receipts: Literal["auto", "on", "off"]
    client_receipt_timeout_s: float
    client_receipt_max_republish: int
    client_receipt_max_bytes: int

    @property
    def effective_broker_url(self) -> str: ...


def _url(text: str) -> str | None:
    text = text.strip()
    if not text:
        return None
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme not in URL_SCHEMES:
        raise ValueError(f"unsupported URL scheme {scheme!r}")
    return text


def parse_sentinels(text: str) -> list[tuple[str, int]]:
    """`host:port,host:port` as (host, port) pairs; ValueError names the bad entry."""
    pairs: list[tuple[str, int]] = []
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        host, sep, port = entry.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected host:port, got {entry!r}")
        pairs.append((host, int(port)))
    if not pairs:
        raise ValueError("expected host:port[,host:port...]")
    return pairs


def sentinel_broker_url(sentinels: str, password: str | None) -> str:
    """kombu's Sentinel broker URL, `sentinel://h:p;sentinel://h:p` (the password
    in each part: kombu takes the master's from the URL; the sentinels' own
    goes in the transport options, see `broker.sentinel_transport_options`)."""
    from urllib.parse import quote

    auth = f":{quote(password, safe='')}@" if password else ""
    return ";".join(f"sentinel://{auth}{h}:{p}" for h, p in parse_sentinels(sentinels))


def effective_broker(settings: AgentSettings) -> str:
    """The broker both sides use: Sentinel, when configured, wins over a Redis URL.

    A RabbitMQ `broker_url` stays: Sentinel only replaces Redis addresses.
    """
    url = settings.broker_url
    scheme = url.split("://", 1)[0].lower() if url and "://" in url else ""
    if settings.redis_sentinels and (not url or scheme in ("redis", "rediss", "unix")):
        return sentinel_broker_url(settings.redis_sentinels, settings.redis_sentinel_password)
    if url:
        return url
    return settings.redis_url or "memory://"


def _sentinels(text: str) -> str | None:
    if not text.strip():
        return None
    parse_sentinels(text)
    return text.strip()


def _name(text: str) -> str:
    if not text.strip() or any(c.isspace() for c in text.strip()):
        raise ValueError("must be non-empty and contain no whitespace")
    return text.strip()


def _prefix(text: str) -> str:
    if not text or any(c.isspace() for c in text):
        raise ValueError("must be non-empty and contain no whitespace")
    return text


def _number(cast: Callable[[str], Any], low: float, high: float = float("inf"), *, strict=False):
    def parse(text: str) -> Any:
        value = cast(text.strip())
        if not (low < value if strict else low <= value) or value > high or value != value:
            raise ValueError(f"out of range: {value!r}")
        return value

    return parse


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on", "t", "y"):
        return True
    if value in ("0", "false", "no", "off", "f", "n"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _path(text: str) -> Path | None:
    return Path(text).expanduser() if text.strip() else None


def _ca_file(text: str) -> Path | None:
    path = _path(text)
    if path is not None and not path.is_file():
        raise ValueError(f"{path} is not a file")
    return path


def _choice(*options: str) -> Callable[[str], str]:
    """A parser of one of `options`, case and surrounding spaces ignored."""

    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError(f"must be {', '.join(options[:-1])} or {options[-1]}")
        return value

    return parse


def _overflow(text: str) -> str:
    if text not in ("drop_oldest", "drop_newest"):
        raise ValueError("must be drop_oldest or drop_newest")
    return text


_POS_INT = _number(int, 0, strict=True)
_POS_FLOAT = _number(float, 0.0, strict=True)
_NONNEG_FLOAT = _number(float, 0.0)


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """The agent-side settings; see the README's settings table for each one."""

    redis_url: str | None = None
    broker_url: str | None = None
    redis_sentinels: str | None = None
    redis_sentinel_service: str = "mymaster"
    redis_sentinel_password: str | None = None
    redis_sentinel_tls: bool = False
    key_prefix: str = "nemo_relay:"
    max_run_bytes: int = 8 * 1024 * 1024
    max_json_depth: int = 128
    tls_verify: bool = True
    tls_ca_file: Path | None = None
    broker_delivery_limit: int = 20
    broker_compression: Literal["zlib", "none"] = "zlib"
    client_buffer_max_runs: int = 10_000
    client_buffer_max_bytes: int = 64 * 1024 * 1024
    client_batch_max_runs: int = 500
    client_batch_max_bytes: int = 4 * 1024 * 1024
    client_linger_ms: float = 50.0
    client_overflow: Literal["drop_oldest", "drop_newest"] = "drop_oldest"
    client_spool_dir: Path | None = None
    client_spool_max_bytes: int = 256 * 1024 * 1024
    client_spool_fsync: bool = True
    client_retry_interval_s: float = 5.0
    client_connect_timeout_s: float = 1.0
    client_publish_retries: int = 1
    client_exit_timeout_s: float = 2.0
    client_state_ttl_s: float = 5.0
    client_state_timeout_s: float = 0.5
    client_receipts: Literal["auto", "on", "off"] = "auto"
    client_receipt_timeout_s: float = 30.0
    client_receipt_max_republish: int = 3
    client_receipt_max_bytes: int = 64 * 1024 * 1024

    @property
    def embedded(self) -> bool:
        """True when no Redis is configured (the workers' in-process default)."""
        return self.redis_url is None and self.redis_sentinels is None

    @property
    def effective_broker_url(self) -> str:
        """The broker: Sentinel, else `broker_url`, else the Redis URL, else in-memory."""
        return effective_broker(self)


_PARSERS: dict[str, Callable[[str], Any]] = {
    "redis_url": _url,
    "broker_url": _url,
    "redis_sentinels": _sentinels,
    "redis_sentinel_service": _name,
    "redis_sentinel_password": lambda text: text or None,
    "redis_sentinel_tls": _bool,
    "key_prefix": _prefix,
    "max_run_bytes": _POS_INT,
    "max_json_depth": _number(int, 8, 256),
    "tls_verify": _bool,
    "tls_ca_file": _ca_file,
    "broker_delivery_limit": _number(int, 1, 1_000_000),
    "broker_compression": _choice("zlib", "none"),
    "client_buffer_max_runs": _POS_INT,
    "client_buffer_max_bytes": _POS_INT,
    "client_batch_max_runs": _POS_INT,
    "client_batch_max_bytes": _POS_INT,
    "client_linger_ms": _NONNEG_FLOAT,
    "client_overflow": _overflow,
    "client_spool_dir": _path,
    "client_spool_max_bytes": _POS_INT,
    "client_spool_fsync": _bool,
    "client_retry_interval_s": _POS_FLOAT,
    "client_connect_timeout_s": _POS_FLOAT,
    "client_publish_retries": _number(int, 0),
    "client_exit_timeout_s": _NONNEG_FLOAT,
    "client_state_ttl_s": _NONNEG_FLOAT,
    "client_state_timeout_s": _POS_FLOAT,
    "client_receipts": _choice("auto", "on", "off"),
    "client_receipt_timeout_s": _POS_FLOAT,
    "client_receipt_max_republish": _number(int, 0),
    "client_receipt_max_bytes": _POS_INT,
}


def _dotenv(path: Path) -> dict[str, str]:
    """`KEY=value` lines of a `.env` file (what pydantic-settings reads for the server)."""
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return values
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key.strip().upper()] = value
    return values


def load_client_settings(
    environ: Mapping[str, str] | None = None, env_file: Path | None = Path(".env")
) -> ClientSettings:
    """The agent's settings from the environment (then `.env`); never raises.

    An invalid value is logged (naming the variable, not the value, which may
    be a URL with a password) and replaced by its default: a typo in the
    agent's environment costs the feature that value tunes, never the agent.
    """
    env = {k.upper(): v for k, v in (os.environ if environ is None else environ).items()}
    dotenv = _dotenv(env_file) if env_file is not None else {}
    values: dict[str, Any] = {}
    for f in fields(ClientSettings):
        name = ENV_PREFIX + f.name.upper()
        raw = env.get(name, dotenv.get(name))
        if raw is None:
            continue
        try:
            values[f.name] = _PARSERS[f.name](raw)
        except Exception as exc:
            # URLs may hold a password: their reason never quotes the value.
            secret = f.name.endswith(("_url", "_password"))
            reason = type(exc).__name__ if secret else str(exc)
            log.warning("ignoring %s (%s); using the default", name, reason)
    return ClientSettings(**values)


@lru_cache(maxsize=1)
def get_settings() -> ClientSettings:
    """The process's agent settings, read once (the default of every client object)."""
    return load_client_settings()
