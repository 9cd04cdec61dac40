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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import fakeredis
import redis

# One embedded server per process and one definition of the TLS options,
# shared with the agent-side client (which cannot import this package).
from adaptive_worker_client import broker as _client_broker
from adaptive_worker_client.embedded import embedded_server

if TYPE_CHECKING:
    from worker.settings import Settings

__all__ = ["broker_tls_options", "connect", "embedded_server", "is_tls_url", "redis_tls_options"]


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
        socket_connect_timeout=5,
        socket_timeout=30,
        health_check_interval=30,
        retry_on_timeout=True,
        **redis_tls_options(redis_url, settings),
    )
