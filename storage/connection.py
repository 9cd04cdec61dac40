"""Redis clients: the real server, or the embedded in-process default.

The embedded default (no Redis URL configured) is one fakeredis server per
process, shared by every client made here, so the store, the in-memory broker
side and the CLI all see the same data, through the same code path as a real
server (fakeredis runs our Lua scripts with lupa).

TLS (`rediss://`): every connection verifies the server's certificate and
host name, against `tls_ca_file` when set (else the system's CAs), unless the
operator opted out with `tls_verify=false`. redis-py already verifies by
default, but kombu does not (a `rediss://` broker URL without
`ssl_cert_reqs` silently means CERT_NONE), so the same options are built
here once and given to every client: the state connection, the broker
(`worker.celery`), the client's publisher and its state reader. Options in
the URL's query (`?ssl_cert_reqs=...`) are the operator's explicit choice
and win, as redis-py and kombu both let them.

Sentinel (`redis_sentinels`): the workers' state connection (and every
other reader of the state: the CLI, the metrics scrape, `tasks.mixed`) asks
the sentinels for the service's primary and asks again after a failover
(redis-py `Sentinel.master_for`), so a promotion costs retried tasks, not a
restart.
Set, it wins over `redis_url`, which is then only what NeMo Relay agents are
given: their runtime takes one URL and cannot follow a failover.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import fakeredis
import redis
from redis.sentinel import Sentinel

# One embedded server per process and one definition of the TLS options,
# shared with the agent-side client (which cannot import this package).
from adaptive_worker_client import broker as _client_broker
from adaptive_worker_client.config import parse_sentinels
from adaptive_worker_client.embedded import embedded_server

if TYPE_CHECKING:
    from worker.settings import Settings

__all__ = [
    "broker_tls_options",
    "connect",
    "connect_state",
    "embedded_server",
    "is_tls_url",
    "redis_tls_options",
    "relay_address_problem",
    "sentinel_client",
    "warn_relay_once",
]

log = logging.getLogger(__name__)

# The workers' socket policy, for plain and Sentinel-managed connections alike.
_WORKER_SOCKET: dict[str, Any] = {
    "socket_connect_timeout": 5,
    "socket_timeout": 30,
    "health_check_interval": 30,
    "retry_on_timeout": True,
}
_warned: set[tuple[str | None, str]] = set()


def is_tls_url(url: str | None) -> bool:
    """True for the URL schemes that mean TLS: `rediss://` and `amqps://`."""
    if not url or "://" not in url:
        return False
    return url.split("://", 1)[0].lower() in ("rediss", "amqps")


def redis_tls_options(url: str | None, settings: Settings | None = None) -> dict[str, Any]:
    """redis-py keyword arguments for a `rediss://` URL (none for any other URL).

    `settings` defaults to the process settings, so callers that only pass a
    URL still get the operator's CA file and opt-out.
    """
    if not url or url.split("://", 1)[0].lower() != "rediss":
        return {}
    if settings is None:
        from worker.settings import get_settings

        settings = get_settings()
    return _client_broker.redis_tls_options(url, settings)


def broker_tls_options(url: str, settings: Settings) -> dict[str, Any] | None:
    """Celery's `broker_use_ssl` for a TLS broker URL, None for a plain one.

    None matters: on `amqp://` any `broker_use_ssl` would switch TLS on.
    kombu takes redis-py's keys for `rediss://` and py-amqp's for `amqps://`
    (py-amqp checks the host name only when given `server_hostname`; None
    makes kombu fill in the URL's host).
    """
    return _client_broker.broker_tls_options(url, settings)


def connect(redis_url: str | None, settings: Settings | None = None) -> redis.Redis:
    """A client with string responses; `None` means the embedded fakeredis.

    `settings` (default: the process settings) only matters for `rediss://`:
    see `redis_tls_options`.
    """
    if redis_url is None:
        return fakeredis.FakeRedis(server=embedded_server(), decode_responses=True)
    return redis.Redis.from_url(
        redis_url,
        decode_responses=True,
        **_WORKER_SOCKET,
        **redis_tls_options(redis_url, settings),
    )


def sentinel_client(settings: Settings, socket: Mapping[str, Any] | None = None) -> redis.Redis:
    """The primary of `redis_sentinel_service`, found (and found again after a
    failover) through the sentinels; password and TLS apply to both hops.

    `socket`: the primary's connection options instead of the workers'
    (the metrics scrape has short timeouts of its own); a sentinel hop then
    waits at most that connect timeout too.
    """
    assert settings.redis_sentinels is not None
    auth = _client_broker.sentinel_connection_options(settings)
    options = dict(_WORKER_SOCKET if socket is None else socket)
    hop = min(2.0, float(options.get("socket_connect_timeout") or 2.0))
    sentinel = Sentinel(
        parse_sentinels(settings.redis_sentinels),
        sentinel_kwargs={"socket_connect_timeout": hop, "socket_timeout": hop, **auth},
        **auth,
    )
    return sentinel.master_for(settings.redis_sentinel_service, decode_responses=True, **options)


def connect_state(settings: Settings) -> redis.Redis:
    """The workers' state connection: Sentinel when configured, else `redis_url`."""
    if settings.redis_sentinels is None:
        return connect(settings.redis_url, settings)
    warn_relay_once(settings)
    return sentinel_client(settings)


def warn_relay_once(settings: Settings) -> None:
    """Log `relay_address_problem` once per process (and per configuration);
    the worker's main process calls it at start, so its pool children,
    forked afterwards, do not repeat it."""
    if settings.redis_sentinels is None:
        return
    key = (settings.redis_url, settings.redis_sentinels)
    if key in _warned:
        return
    _warned.add(key)
    problem = relay_address_problem(settings)
    if problem:
        log.warning("%s", problem)


def relay_address_problem(settings: Settings) -> str | None:
    """Why NeMo Relay agents cannot follow this deployment's failovers, if so.

    Their runtime takes one Redis URL (no Sentinel or cluster client). Given
    no URL they cannot be pointed at the state at all; given the address of
    a node Sentinel watches, they keep writing to it after a promotion (a
    replica refuses writes; a returning old primary is made a replica) and
    their runs are lost. Only a stable address in front of whichever node is
    primary works: a Sentinel-aware proxy or a virtual IP.
    """
    if settings.redis_sentinels is None:
        return None
    if settings.redis_url is None:
        return (
            "Sentinel is configured but ADAPTIVE_REDIS_URL is not: NeMo Relay agents take one"
            " Redis URL and cannot follow a failover; give them (and ADAPTIVE_REDIS_URL) the"
            " primary behind a stable address (a Sentinel-aware proxy or a virtual IP)"
        )
    parts = urlsplit(settings.redis_url)
    node = (parts.hostname, parts.port or 6379)
    try:
        watched = _watched_nodes(settings)
    except redis.RedisError:
        return None  # the sentinels are unreachable: the connection will say so
    if node in watched:
        return (
            f"ADAPTIVE_REDIS_URL points at {node[0]}:{node[1]}, a node Sentinel may demote:"
            " NeMo Relay agents given it lose their runs after a failover; give them the"
            " primary behind a stable address (a Sentinel-aware proxy or a virtual IP)"
        )
    return None


def _watched_nodes(settings: Settings) -> set[tuple[str | None, int]]:
    """Addresses of the service's primary and replicas, as the sentinels see them."""
    assert settings.redis_sentinels is not None
    auth = _client_broker.sentinel_connection_options(settings)
    sentinel = Sentinel(
        parse_sentinels(settings.redis_sentinels),
        sentinel_kwargs={"socket_connect_timeout": 2, "socket_timeout": 2, **auth},
    )
    service = settings.redis_sentinel_service
    nodes = {tuple(sentinel.discover_master(service))}
    nodes.update(tuple(replica) for replica in sentinel.discover_slaves(service))
    return {(str(host), int(port)) for host, port in nodes}
