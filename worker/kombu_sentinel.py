"""kombu's Sentinel transport, minus one crash of the worker on a failover.

When the primary dies while a worker holds unacked messages, celery closes
the broker connection; closing the channel restores those messages, which
needs a fresh pool, which kombu builds from the connection the close has
already detached (`self.connection.client` is None): `AttributeError: 'NoneType'
object has no attribute 'hostname'` escapes kombu's error filters and the
worker's main process exits with "Unrecoverable error" (seen in about one
failover in three in tests/test_sentinel.py). Raising a connection error
there instead is what every other failure of that restore does: kombu
ignores it, the messages stay in the unacked hash (replicated to the new
primary) and are delivered again after the visibility timeout, and the
worker reconnects through the sentinels.

Used for `sentinel://` brokers via Celery's `broker_transport`
(`worker/celery.py`); the URL and transport options are kombu's own.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis

__all__ = ["SentinelChannel", "Transport"]


class SentinelChannel(kombu_redis.SentinelChannel):  # type: ignore[misc]
    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection is None or self.connection.client is None:
            raise redis.ConnectionError("broker connection closed while restoring unacked")
        return super()._connparams(asynchronous)


class Transport(kombu_redis.SentinelTransport):  # type: ignore[misc]
    Channel = SentinelChannel
