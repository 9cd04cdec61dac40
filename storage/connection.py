"""Redis clients: the real server, or the embedded in-process default.

The embedded default (no Redis URL configured) is one fakeredis server per
process, shared by every client made here, so the store, the in-memory broker
side and the CLI all see the same data, through the same code path as a real
server (fakeredis runs our Lua scripts with lupa).
"""

from __future__ import annotations

import threading

import fakeredis
import redis

_EMBEDDED_LOCK = threading.Lock()
_EMBEDDED_SERVER: fakeredis.FakeServer | None = None


def embedded_server() -> fakeredis.FakeServer:
    global _EMBEDDED_SERVER
    with _EMBEDDED_LOCK:
        if _EMBEDDED_SERVER is None:
            _EMBEDDED_SERVER = fakeredis.FakeServer()
        return _EMBEDDED_SERVER


def connect(redis_url: str | None) -> redis.Redis:
    """A client with string responses; `None` means the embedded fakeredis."""
    if redis_url is None:
        return fakeredis.FakeRedis(server=embedded_server(), decode_responses=True)
    return redis.Redis.from_url(
        redis_url,
        decode_responses=True,
        socket_connect_timeout=5,
        socket_timeout=30,
        health_check_interval=30,
        retry_on_timeout=True,
    )
