"""RabbitMQ: messages past their delivery limit become our dead letters.

Our queues on RabbitMQ are quorum queues with a delivery limit
(`ADAPTIVE_BROKER_DELIVERY_LIMIT`, see `adaptive_worker_client.broker`): a
message returned unacked more often than that (its worker was killed on it
again and again, or the door requeued it while Redis was down) is
dead-lettered by RabbitMQ, at least once, into `adaptive.dead`. Without
this consumer it would sit there unseen; dropped or looping forever are
the two alternatives the limit exists to avoid.

Every worker consumes `adaptive.dead` on its own channel (a Celery consumer
bootstep, so it follows the worker's connection through reconnects) and
writes each message as ONE dead letter: stage `delivery_limit`, the reason
from RabbitMQ's `x-death` header, the raw body truncated as every dead
letter is (`tasks.learning.dead_letter`), then acks it. The body is never
decoded or run: it is the message that killed workers. While Redis cannot
take the dead letter the message is requeued after a pause, as the door does
(`worker/guard.py`), so it is recorded once Redis answers, never dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from celery import bootsteps
from kombu import Consumer
from kombu.message import Message

from adaptive_worker_client.broker import dead_letter_queue

log = logging.getLogger(__name__)

STAGE = "delivery_limit"
# Dead letters are rare; a few in flight keep the event loop's share small.
PREFETCH = 10


def _text(value: Any, limit: int = 200) -> str | None:
    if value is None:
        return None
    out = value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)
    return out[:limit]


def death_of(headers: Any) -> dict[str, Any]:
    """RabbitMQ's newest `x-death` entry (why and from where), or {} if it is not there.

    Read defensively: these headers are as the publisher sent them plus
    RabbitMQ's own, and a message here already killed workers.
    """
    if not isinstance(headers, Mapping):
        return {}
    deaths = headers.get("x-death")
    if isinstance(deaths, list | tuple) and deaths and isinstance(deaths[0], Mapping):
        return dict(deaths[0])
    return {}


def describe(message: Any) -> tuple[str, dict[str, str | None]]:
    """The dead letter's reason and context for a message from `adaptive.dead`."""
    headers = getattr(message, "headers", None)
    headers = headers if isinstance(headers, Mapping) else {}
    death = death_of(headers)
    why = _text(death.get("reason") or headers.get("x-first-death-reason")) or "unknown"
    queue = _text(death.get("queue") or headers.get("x-first-death-queue"))
    if why == "delivery_limit":
        reason = (
            f"delivery limit reached on {queue}: returned unacked more often than"
            " ADAPTIVE_BROKER_DELIVERY_LIMIT allows (a worker died on it each time)"
        )
    else:
        reason = f"dead-lettered by RabbitMQ from {queue} ({why})"
    context = {
        "task": _text(headers.get("task")),
        "task_id": _text(headers.get("id")),
        "queue": queue,
        "broker_reason": why,
    }
    return reason, context


def record(message: Any) -> bool:
    """Write the dead letter; False only if Redis is unreachable (then nothing was written)."""
    from tasks import learning
    from worker import guard

    raw = getattr(message, "body", b"")
    if isinstance(raw, bytearray | memoryview):
        raw = bytes(raw)
    if not isinstance(raw, str | bytes):
        raw = repr(raw)
    reason, context = describe(message)
    try:
        entry = learning.dead_letter(raw, reason, STAGE, **context)
        store = guard.store_factory()
        store.push_dead_letters([entry])
        store.incr_counter("delivery_limit_messages")
    except guard.REDIS_DOWN as exc:
        log.error("dead-lettered message NOT recorded yet (%s): %s %s", exc, reason, context)
        return False
    except Exception:
        # A bug, not something a retry would fix: the log is the trace left.
        log.exception("dead-lettered message NOT recorded, dropped: %s %s", reason, context)
        return True
    log.warning("message past its delivery limit dead-lettered: %s %s", reason, context)
    return True


def on_message(message: Message) -> None:
    """Record and ack; requeue after a pause while Redis cannot take it."""
    from worker import guard

    try:
        if record(message):
            message.ack()
        else:
            time.sleep(guard.REQUEUE_PAUSE_S)
            message.reject(requeue=True)
    except Exception:  # the channel's trouble; the consumer recovers the connection
        log.exception("could not settle a message from %s", dead_letter_queue().name)


class DeliveryLimitConsumer(bootsteps.ConsumerStep):
    """Consume `adaptive.dead` beside the task queues (RabbitMQ brokers only)."""

    def get_consumers(self, channel: Any) -> list[Consumer]:
        # Per-consumer QoS: quorum queues refuse a global prefetch.
        channel.basic_qos(0, PREFETCH, False)
        # `on_message`, not callbacks: kombu would decode the body first.
        return [Consumer(channel, queues=[dead_letter_queue()], on_message=on_message)]
