"""The broker side both ends must agree on, and the publisher's own Celery app.

The worker's app (`worker.celery`) and the client's publishing app are built
from the same pieces here: queue declarations (an exchange declared with
another type on one side is a channel error on the other), serializers (JSON
only), the Redis broker's key prefix, TLS options. The client's app adds
short timeouts of its own, since it publishes from inside an agent.
Celery is imported when an app is built, not when this module is.
"""

from __future__ import annotations

import math
import ssl
from typing import TYPE_CHECKING, Any

from adaptive_worker_client.contract import (
    INGEST_QUEUE,
    LEARN_QUEUE,
    MAINTENANCE_QUEUE,
    QUEUES,
    broker_key_prefix,
)

if TYPE_CHECKING:
    from celery import Celery
    from kombu import Queue

    from adaptive_worker_client.config import AgentSettings

__all__ = [
    "AMQP_SCHEMES",
    "COMPRESSION",
    "DEAD_LETTER_QUEUE",
    "DEFAULT_DELIVERY_LIMIT",
    "REDIS_SCHEMES",
    "TASK_ROUTES",
    "broker_scheme",
    "broker_tls_options",
    "common_conf",
    "dead_letter_queue",
    "delay_seconds",
    "publisher_app",
    "quorum_arguments",
    "redis_tls_options",
    "sentinel_connection_options",
    "sentinel_transport_options",
    "task_queues",
]

# `sentinel`: kombu's Redis transport that asks Redis Sentinel for the primary.
REDIS_SCHEMES = frozenset({"redis", "rediss", "unix", "socket", "sentinel"})
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})

# Glob patterns, matched in order: the first match wins.
TASK_ROUTES: dict[str, dict[str, str]] = {
    "adaptive.ingest_*": {"queue": INGEST_QUEUE},
    "adaptive.learn_*": {"queue": LEARN_QUEUE},
    "adaptive.*": {"queue": MAINTENANCE_QUEUE},
}


def broker_scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


# RabbitMQ: where a message goes once it was delivered more often than the
# delivery limit without being acked (a worker killed on it again and again):
# the worker consumes this queue and turns each message into one of our dead
# letters (stage `delivery_limit`, `worker/delivery_limit.py`). Not a Celery
# task queue: its messages are never run.
DEAD_LETTER_QUEUE = "adaptive.dead"
# RabbitMQ 4's own default for quorum queues (3.x has none: a message could
# loop forever). A healthy message is redelivered only when its worker dies.
DEFAULT_DELIVERY_LIMIT = 20
# The dead-letter queue itself is requeued (with a pause) only while Redis
# cannot take the dead letter; RabbitMQ 4 would drop it after 20 returns, and
# -1 means "drop at the first return" on 3.x, so the limit is just very high.
DEAD_QUEUE_DELIVERY_LIMIT = 1_000_000_000


def quorum_arguments(delivery_limit: int) -> dict[str, Any]:
    """`queue_arguments` of our task queues on RabbitMQ.

    Explicit: with explicit `task_queues`, Celery's `task_default_queue_type`
    does not apply. Replicated (quorum), a delivery limit so a message that
    keeps killing its worker cannot loop forever, and at-least-once dead
    lettering (which needs `reject-publish` overflow) so RabbitMQ keeps such a
    message until our dead-letter queue has it instead of dropping it.
    RabbitMQ refuses to redeclare a queue with other arguments, so agents and
    workers must use the same `delivery_limit` (one setting).
    """
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": DEAD_LETTER_QUEUE,
        "x-dead-letter-routing-key": DEAD_LETTER_QUEUE,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def task_queues(url: str = "", delivery_limit: int = DEFAULT_DELIVERY_LIMIT) -> tuple[Queue, ...]:
    """Our three queues: classic lists on Redis, durable quorum queues on RabbitMQ.

    On RabbitMQ each exchange is a topic exchange: Celery's native delayed
    delivery (switched on by quorum queues) can only route a countdown
    message back through topic exchanges; with a direct one the worker holds
    the message itself until its ETA, blocking the consumer's only prefetch
    slot meanwhile. A topic binding on the queue's own name routes exactly as
    a direct one would.
    """
    from kombu import Exchange, Queue

    if broker_scheme(url) in AMQP_SCHEMES:
        arguments = quorum_arguments(delivery_limit)
        return tuple(
            Queue(
                name,
                Exchange(name, type="topic", durable=True),
                routing_key=name,
                durable=True,
                queue_arguments=arguments,
            )
            for name in QUEUES
        )
    return tuple(Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES)


def dead_letter_queue() -> Queue:
    """The RabbitMQ queue our queues dead-letter into (see `DEAD_LETTER_QUEUE`)."""
    from kombu import Exchange, Queue

    return Queue(
        DEAD_LETTER_QUEUE,
        Exchange(DEAD_LETTER_QUEUE, type="direct", durable=True),
        routing_key=DEAD_LETTER_QUEUE,
        durable=True,
        queue_arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": DEAD_QUEUE_DELIVERY_LIMIT,
        },
    )


def delay_seconds(countdown: float | None, url: str) -> float | None:
    """A task countdown the broker can honour.

    On RabbitMQ with quorum queues Celery delays natively, in whole seconds
    (`int(countdown)` picks the delay queues), and a countdown under 1 s
    raises `ValueError: countdown must be a positive number` at publish. So
    there a positive countdown is rounded up to whole seconds; elsewhere, and
    for no delay at all, it is left alone.
    """
    if not countdown or countdown <= 0:
        return None
    if broker_scheme(url) in AMQP_SCHEMES:
        return float(math.ceil(countdown))
    return countdown


def redis_tls_options(url: str | None, settings: AgentSettings) -> dict[str, Any]:
    """redis-py keyword arguments for a `rediss://` URL (none for any other URL).

    Verified by default (certificate and host name, against `tls_ca_file`
    when set), unless the operator opted out with `tls_verify=false`.
    """
    if not url or url.split("://", 1)[0].lower() != "rediss":
        return {}
    if not settings.tls_verify:
        return {"ssl_cert_reqs": "none", "ssl_check_hostname": False}
    options: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    if settings.tls_ca_file is not None:
        options["ssl_ca_certs"] = str(settings.tls_ca_file)
    return options


def sentinel_connection_options(settings: AgentSettings) -> dict[str, Any]:
    """redis-py keyword arguments for connections to the sentinels and to the
    primary they name: the password and, with `redis_sentinel_tls`, the same
    verified TLS options as a `rediss://` URL (ssl=True switches TLS on)."""
    options: dict[str, Any] = {}
    if settings.redis_sentinel_password:
        options["password"] = settings.redis_sentinel_password
    if settings.redis_sentinel_tls:
        options["ssl"] = True
        options.update(redis_tls_options("rediss://", settings))
    return options


def sentinel_transport_options(settings: AgentSettings) -> dict[str, Any]:
    """kombu transport options of a `sentinel://` broker: the service to ask
    for, and how to talk to the sentinels themselves (kombu passes the URL's
    password only to the primary)."""
    return {
        "master_name": settings.redis_sentinel_service,
        "sentinel_kwargs": sentinel_connection_options(settings),
    }


def broker_tls_options(url: str, settings: AgentSettings) -> dict[str, Any] | None:
    """Celery's `broker_use_ssl` for a TLS broker URL, None for a plain one.

    None matters: on `amqp://` any `broker_use_ssl` would switch TLS on.
    kombu takes redis-py's keys for `rediss://` and py-amqp's for `amqps://`
    (py-amqp checks the host name only when given `server_hostname`; None
    makes kombu fill in the URL's host). kombu's own default for a
    `rediss://` URL is CERT_NONE, hence these explicit options.
    """
    scheme = broker_scheme(url)
    ca_file = str(settings.tls_ca_file) if settings.tls_ca_file is not None else None
    if scheme == "sentinel":
        # The primary a sentinel names: TLS only when the operator said so.
        scheme = "rediss" if settings.redis_sentinel_tls else ""
    if scheme == "rediss":
        if not settings.tls_verify:
            return {"ssl_cert_reqs": ssl.CERT_NONE, "ssl_check_hostname": False}
        options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}
        if ca_file is not None:
            options["ssl_ca_certs"] = ca_file
        return options
    if scheme == "amqps":
        if not settings.tls_verify:
            return {"cert_reqs": ssl.CERT_NONE}
        return {"cert_reqs": ssl.CERT_REQUIRED, "ca_certs": ca_file, "server_hostname": None}
    return None


# ADAPTIVE_BROKER_COMPRESSION -> kombu's compression name (zlib is registered
# by kombu as `application/x-gzip`; the worker's door inflates it bounded).
COMPRESSION: dict[str, str | None] = {"zlib": "zlib", "none": None}


def common_conf(settings: AgentSettings, url: str) -> dict[str, Any]:
    """Celery configuration both the worker's and the publisher's app need."""
    return {
        "broker_url": url,
        "broker_use_ssl": broker_tls_options(url, settings),
        "broker_connection_retry_on_startup": True,
        # JSON only, everywhere a serializer is chosen: a pickle body from
        # anyone who can write to the broker would be code execution.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Fire-and-forget: no result backend writes.
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        # Queues and routes.
        "task_queues": task_queues(url, settings.broker_delivery_limit),
        "task_default_queue": MAINTENANCE_QUEUE,
        "task_default_exchange": MAINTENANCE_QUEUE,
        "task_default_routing_key": MAINTENANCE_QUEUE,
        "task_routes": (TASK_ROUTES,),
        # Flower shows what was sent.
        "task_send_sent_event": True,
        "enable_utc": True,
        "timezone": "UTC",
    }


def publisher_app(settings: AgentSettings) -> Celery:
    """A private app for the client's publisher thread.

    Short timeouts (`client_connect_timeout_s`): a publish runs inside an
    agent and must fail fast to the spool, never stall it. Never Celery's
    current app, so the agent's own Celery (if any) is left alone.
    """
    from celery import Celery

    url = settings.effective_broker_url
    timeout = settings.client_connect_timeout_s
    scheme = broker_scheme(url)
    options: dict[str, Any] = {}
    if scheme in REDIS_SCHEMES:
        options = {
            "global_keyprefix": broker_key_prefix(settings.key_prefix),
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "socket_keepalive": True,
            "health_check_interval": 25,
        }
        if scheme == "sentinel":
            options.update(sentinel_transport_options(settings))
    elif scheme in AMQP_SCHEMES:
        # Publisher confirms: a publish returns only once RabbitMQ has the
        # message, so the client knows whether to spool it.
        options = {"confirm_publish": True, "read_timeout": timeout, "write_timeout": timeout}
    app = Celery("adaptive-client", set_as_current=False)
    app.conf.update(
        common_conf(settings, url),
        broker_transport_options=options,
        broker_connection_timeout=timeout,
        broker_pool_limit=2,
        # Nobody services heartbeats on a publish-only connection; an idle
        # one dropped by the server is revived by the publish retry.
        broker_heartbeat=0,
        # A batch of one agent's runs repeats its prompts run after run: zlib
        # makes the body ~24x smaller, and the worker's consumer process
        # (which decodes, re-encodes and stores every byte of a message on
        # the Redis transport) and Redis handle that much less.
        task_compression=COMPRESSION.get(settings.broker_compression),
    )
    return app
