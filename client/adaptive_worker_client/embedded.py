"""The embedded Redis: one in-process fakeredis server, when no Redis URL is configured.

Without `redis_url`, the workers, the CLI and the client in one process (a
demo, `make run`, tests) must all see the same data. The one server lives
here, in the package both sides import, so it is the same object whichever
side makes it first (the server's `storage.connection` uses it too).
fakeredis is a server dependency, not the client's: an agent without it and
without a Redis URL simply reads no state (counted, never raised).
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["embedded_client", "embedded_server"]

_LOCK = threading.Lock()
_SERVER: Any = None


def embedded_server() -> Any:
    """The process's fakeredis server (`fakeredis.FakeServer`), made on first use."""
    global _SERVER
    with _LOCK:
        if _SERVER is None:
            import fakeredis

            _SERVER = fakeredis.FakeServer()
        return _SERVER


def embedded_client() -> Any:
    """A client of the embedded server with string responses, like every state client."""
    import fakeredis

    return fakeredis.FakeRedis(server=embedded_server(), decode_responses=True)
