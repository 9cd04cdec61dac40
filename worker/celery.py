"""The Celery app: `celery -A worker worker|beat|flower` finds `worker.celery:app`.

Everything is derived from `Settings` in `configure()`, so tests and the
agent-side client build identically configured apps of their own. The
choices follow from how delivery really behaves (see NOTES-celery.md):

- acks late + reject on worker lost: a task whose worker dies runs again
  instead of being lost; our tasks are idempotent, so running twice is safe.
  On RabbitMQ the queues are quorum queues with a delivery limit, so a
  message that kills its worker every time ends in our dead letters
  (`worker/delivery_limit.py`) instead of looping.
- prefetch 2, for ingest only: the next message is fetched and decoded while
  a task runs; a learn or maintenance task holds its share of the window
  down while it is in the pool, so nothing waits behind a long task
  (`worker/prefetch.py`).
- Redis redelivers anything unacked for longer than the visibility timeout,
  even while it still runs, so the hard time limit is at most half of it.
- JSON only: a pickle body from anyone who can write to the broker would be
  code execution in the worker.
- no result backend: ingest is fire-and-forget and learn results live in
  Redis state, so storing task results would only cost writes.
- on Redis, every broker key (queues, unacked bookkeeping, bindings) lives
  under `{key_prefix}adaptive_worker:celery:` (kombu's `global_keyprefix`):
  SPEC section 2 wants our own keys under the runtime's prefix, in a segment
  that cannot collide with the runtime's kinds; it also lets several
  deployments (and tests) share one Redis database.
"""

from __future__ import annotations

import sys
from typing import Any

from celery import Celery
from celery.signals import celeryd_after_setup

# Names, queues and the broker pieces the agent-side client shares: one
# definition, in the client package. Re-exported here for old imports only;
# new code imports them from `adaptive_worker_client.contract`.
from adaptive_worker_client.broker import (
    AMQP_SCHEMES,
    REDIS_SCHEMES,
    TASK_ROUTES,
    broker_scheme,
    common_conf,
    sentinel_transport_options,
    task_queues,
)
from adaptive_worker_client.contract import (
    DISCOVER_TASK,
    INGEST_QUEUE,
    INGEST_TASK,
    LEARN_QUEUE,
    LEARN_TASK,
    MAINTENANCE_QUEUE,
    QUEUES,
    REBUILD_ALL_TASK,
    REBUILD_TASK,
    RETENTION_TASK,
)
from adaptive_worker_client.contract import broker_key_prefix as _broker_key_prefix
from tasks.schedule import beat_schedule
from worker.settings import Settings, SettingsError, get_settings

__all__ = [
    "AMQP_SCHEMES",
    "DISCOVER_TASK",
    "INGEST_QUEUE",
    "INGEST_TASK",
    "LEARN_QUEUE",
    "LEARN_TASK",
    "MAINTENANCE_QUEUE",
    "QUEUES",
    "REBUILD_ALL_TASK",
    "REBUILD_TASK",
    "REDIS_SCHEMES",
    "RETENTION_TASK",
    "TASK_MODULES",
    "TASK_ROUTES",
    "app",
    "beat_schedule",
    "broker_key_prefix",
    "broker_scheme",
    "configure",
    "create_app",
    "task_queues",
    "transport_options",
]

TASK_MODULES = ("tasks.jobs",)


def broker_key_prefix(settings: Settings) -> str:
    """Prefix of every broker key on a Redis broker (kombu `global_keyprefix`)."""
    return _broker_key_prefix(settings.key_prefix)


def transport_options(settings: Settings, url: str | None = None) -> dict[str, Any]:
    """Transport options for the broker's kind; other kinds would ignore or reject them."""
    scheme = broker_scheme(url or settings.effective_broker_url)
    if scheme in REDIS_SCHEMES:
        return {
            "visibility_timeout": settings.broker_visibility_timeout_s,
            "unacked_restore_interval": settings.broker_restore_interval_s,
            "unacked_restore_throttle": settings.broker_restore_throttle,
            "global_keyprefix": broker_key_prefix(settings),
            # Without a socket timeout a publish on a half-open connection
            # waits forever; keepalive finds dead peers behind NAT/firewalls.
            "socket_timeout": settings.broker_socket_timeout_s,
            "socket_connect_timeout": settings.broker_connect_timeout_s,
            "socket_keepalive": True,
            "health_check_interval": 25,
            # sentinel://: which service to ask the sentinels for, and their auth/TLS.
            **(sentinel_transport_options(settings) if scheme == "sentinel" else {}),
        }
    if scheme in AMQP_SCHEMES:
        # Publisher confirms: a publish returns only once RabbitMQ has the
        # message, so the client knows whether to spool it.
        return {"confirm_publish": True}
    return {}


def configure(app: Celery, settings: Settings) -> Celery:
    """Apply the settings to `app` (the module's app, a test's or the client's)."""
    url = settings.effective_broker_url
    hard_limit = settings.task_time_limit_s
    app.conf.update(
        # Broker URL and TLS, JSON only, no results, queues and routes: as
        # the client's publisher (`adaptive_worker_client.broker`).
        common_conf(settings, url),
        broker_transport_options=transport_options(settings, url),
        broker_connection_timeout=settings.broker_connect_timeout_s,
        # Delivery.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # The door for whole messages: a poison message (bad envelope, body,
        # nesting or arguments) is dead-lettered and acked, never fatal.
        worker_consumer="worker.guard:GuardedConsumer",
        worker_prefetch_multiplier=settings.worker_prefetch_multiplier,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_soft_shutdown_timeout=settings.worker_soft_shutdown_s,
        task_time_limit=hard_limit,
        # The soft limit lets a learn re-queue its remainder before the kill.
        task_soft_time_limit=max(1, hard_limit * 9 // 10),
        # Flower needs both (the common part sends the sent events).
        worker_send_task_events=True,
        include=list(TASK_MODULES),
        beat_schedule=beat_schedule(settings),
        # Several beats must not double the schedule's effects: tasks are
        # idempotent; a short loop keeps the schedule responsive.
        beat_max_loop_interval=10,
    )
    if broker_scheme(url) == "sentinel":
        # kombu's Sentinel transport minus a worker crash on failover.
        app.conf.broker_transport = "worker.kombu_sentinel:Transport"
    if broker_scheme(url) in AMQP_SCHEMES:
        # RabbitMQ dead-letters a message past its delivery limit into a
        # queue of its own; this step turns each into one of our dead letters.
        from worker.delivery_limit import DeliveryLimitConsumer

        app.steps["consumer"].add(DeliveryLimitConsumer)
    return app


def create_app(settings: Settings | None = None, *, name: str = "adaptive") -> Celery:
    """A separately configured app that does not become Celery's current app."""
    app = Celery(name, set_as_current=False)
    return configure(app, settings or get_settings())


def _loaded_by_celery_command() -> bool:
    """True while the `celery` command line (worker, beat, flower, inspect...)
    loads this module: its app loader runs inside celery's click group."""
    import click

    ctx = click.get_current_context(silent=True)
    callback = ctx.find_root().command.callback if ctx is not None else None
    return getattr(callback, "__module__", None) == "celery.bin.celery"


def _module_settings() -> Settings:
    """The process settings for the module's app.

    Under `celery -A worker ...` a bad setting is one line on stderr naming
    the variable, and exit status 2: celery's app loader would wrap it in a
    38-line traceback (a crash loop of them under a restart policy).
    Imported anywhere else (the client, inside an agent), SettingsError is
    raised as before: an import must never exit someone else's program.
    """
    try:
        return get_settings()
    except SettingsError as exc:
        if not _loaded_by_celery_command():
            raise
        message = " ".join(str(exc).split())
        sys.stderr.write(f"adaptive-worker: {message}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None


app = Celery("adaptive")
configure(app, _module_settings())

# Serve Prometheus metrics from every `celery worker` main process.
from worker.metrics import install  # noqa: E402 - needs the configured app

install(app)

# Task bodies decode as plain JSON with orjson, here and in the pool processes
# forked from here (worker/body_json.py).
from worker.body_json import install as install_body_json  # noqa: E402

install_body_json()

# Each worker process tunes its garbage collector once it has started (worker/gc_tuning.py).
from worker.gc_tuning import install as install_gc_tuning  # noqa: E402

install_gc_tuning(get_settings())


@celeryd_after_setup.connect(weak=False)
def _warn_relay_agents(**_: Any) -> None:
    """Sentinel for us but no stable address for NeMo Relay agents: say so at start."""
    from storage.connection import warn_relay_once

    warn_relay_once(get_settings())


# `celery -A worker flower`: a login required and loopback by default (worker/flower.py).
from worker.flower import install as install_flower_defaults  # noqa: E402

install_flower_defaults(get_settings())
