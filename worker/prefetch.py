"""Prefetch: reserve messages ahead for ingest only, never behind a long task.

Why reserve ahead at all: with one message per pool process, the next
message is fetched only once the previous one is acked, so every hand-off
waits for the consumer to fetch, inflate and decode ~5 MB of runs (~10 ms
per 500-run message) while the pool process idles. With
`worker_prefetch_multiplier` 2 that work happens while the previous task
runs (BENCHMARKS.md, issue 12, fourth stop).

Why not simply: a message reserved by a worker waits there until one of its
processes is free, even when another worker is idle. Behind an ingest
(~0.25 s for 500 runs) that costs nothing; behind a learn (up to
`ADAPTIVE_LEARN_TIME_BUDGET_S`) or a rebuild it would. So each task that is
not an ingest, from its arrival until it is acked or rejected
(worker/request.py), lowers the window by multiplier - 1: when every
process runs such a task, the worker reserves nothing beyond them. Celery
adjusts the same window for ETA tasks, with the same `QoS` calls.
"""

from __future__ import annotations

from typing import Any

from adaptive_worker_client.contract import INGEST_TASK

__all__ = ["Hold", "bind", "hold"]

# The consumer whose window requests adjust: set when it starts consuming
# (worker/guard.py). Each hold keeps the QoS object it lowered: after a
# reconnect Celery builds a new one, and the old holds must not raise it.
_consumer: Any = None


def bind(consumer: Any) -> None:
    global _consumer
    _consumer = consumer


class Hold:
    """The part of the window one long task holds down, given back once."""

    __slots__ = ("_amount", "_qos")

    def __init__(self, qos: Any, amount: int) -> None:
        self._qos, self._amount = qos, amount

    def release(self) -> None:
        if self._amount:
            self._qos.increment_eventually(self._amount)
            self._amount = 0


def hold(task_name: str) -> Hold | None:
    """Lower the bound consumer's window for a task that is not an ingest.

    Never below 1 (kombu's floor, where 0 would mean no limit at all), and
    only by what it really took, so releases add back exactly that.
    """
    if task_name == INGEST_TASK or _consumer is None:
        return None
    qos = getattr(_consumer, "qos", None)
    multiplier = int(getattr(_consumer, "prefetch_multiplier", 1) or 1)
    if qos is None or not qos.value or multiplier <= 1:
        return None
    amount = min(multiplier - 1, qos.value - 1)
    if amount <= 0:
        return None
    qos.decrement_eventually(amount)
    return Hold(qos, amount)
