"""The Celery app: `celery -A worker worker|beat|flower` finds `worker.celery:app`.

Everything is derived from `Settings` in `configure()`, so tests and the
agent-side client build identically configured apps of their own. The
choices follow from how delivery really behaves (see NOTES-celery.md):

- acks late + reject on worker lost: a task whose worker dies runs again
  instead of being lost; our tasks are idempotent, so running twice is safe.
- prefetch 1: a long learn does not hold other messages hostage.
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
from kombu import Exchange, Queue

from storage.connection import broker_tls_options
from storage.keys import OWN
from worker.settings import Settings, SettingsError, get_settings

INGEST_QUEUE = "adaptive.ingest"
LEARN_QUEUE = "adaptive.learn"
MAINTENANCE_QUEUE = "adaptive.maintenance"
QUEUES = (INGEST_QUEUE, LEARN_QUEUE, MAINTENANCE_QUEUE)

INGEST_TASK = "adaptive.ingest_runs"
LEARN_TASK = "adaptive.learn_agent"
DISCOVER_TASK = "adaptive.discover"
REBUILD_TASK = "adaptive.rebuild_agent"
REBUILD_ALL_TASK = "adaptive.rebuild_all"
RETENTION_TASK = "adaptive.retention"

TASK_MODULES = ("tasks.jobs",)

# Glob patterns, matched in order: the first match wins.
TASK_ROUTES: dict[str, dict[str, str]] = {
    "adaptive.ingest_*": {"queue": INGEST_QUEUE},
    "adaptive.learn_*": {"queue": LEARN_QUEUE},
    "adaptive.*": {"queue": MAINTENANCE_QUEUE},
}

REDIS_SCHEMES = frozenset({"redis", "rediss", "unix", "socket"})
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})


def broker_scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def broker_key_prefix(settings: Settings) -> str:
    """Prefix of every broker key on a Redis broker (kombu `global_keyprefix`)."""
    return f"{settings.key_prefix}{OWN}:celery:"


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
        }
    if scheme in AMQP_SCHEMES:
        # Publisher confirms: a publish returns only once RabbitMQ has the
        # message, so the client knows whether to spool it.
        return {"confirm_publish": True}
    return {}


def task_queues() -> tuple[Queue, ...]:
    return tuple(Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES)


def configure(app: Celery, settings: Settings) -> Celery:
    """Apply the settings to `app` (the module's app, a test's or the client's)."""
    url = settings.effective_broker_url
    hard_limit = settings.task_time_limit_s
    app.conf.update(
        broker_url=url,
        broker_transport_options=transport_options(settings, url),
        # rediss:// / amqps://: verify the certificate (kombu's default for a
        # rediss:// URL is CERT_NONE); None keeps TLS off on plain URLs.
        broker_use_ssl=broker_tls_options(url, settings),
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.broker_connect_timeout_s,
        # JSON only, everywhere a serializer is chosen.
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
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
        # Fire-and-forget: no result backend writes.
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        # Queues and routes.
        task_queues=task_queues(),
        task_default_queue=MAINTENANCE_QUEUE,
        task_default_exchange=MAINTENANCE_QUEUE,
        task_default_routing_key=MAINTENANCE_QUEUE,
        task_routes=(TASK_ROUTES,),
        # Flower needs both.
        worker_send_task_events=True,
        task_send_sent_event=True,
        include=list(TASK_MODULES),
        beat_schedule=beat_schedule(settings),
        # Several beats must not double the schedule's effects: tasks are
        # idempotent; a short loop keeps the schedule responsive.
        beat_max_loop_interval=10,
        enable_utc=True,
        timezone="UTC",
    )
    return app


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Periodic tasks; each period comes from settings and None switches it off.

    Every entry is idempotent, and `expires` drops a run that waited longer
    than its own period (a backlog must not replay a pile of sweeps).
    """
    entries = {
        "discover": (DISCOVER_TASK, settings.discover_interval_s),
        "rebuild-all": (REBUILD_ALL_TASK, settings.rebuild_interval_s),
        "retention": (RETENTION_TASK, settings.retention_interval_s),
    }
    return {
        name: {"task": task, "schedule": period, "options": {"expires": period}}
        for name, (task, period) in entries.items()
        if period
    }


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

# `celery -A worker flower`: a login required and loopback by default (worker/flower.py).
from worker.flower import install as install_flower_defaults  # noqa: E402

install_flower_defaults(get_settings())
