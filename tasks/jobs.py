"""Celery tasks: thin wrappers with explicit names around `tasks.learning`.

Tasks take small JSON arguments (run payloads as JSON strings, agent ids)
and call plain functions. Exactly-once does not depend on Celery's delivery
guarantees: ingest is idempotent, a learn commits with a compare-and-set on
the learned offset, and a lost learn message is re-triggered by the next
ingest or the beat sweep once its pending marker expires.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from celery.exceptions import SoftTimeLimitExceeded

from adaptive_worker_client.broker import delay_seconds
from storage.connection import connect_state
from storage.store import NotDurable, Store
from tasks import learning, maintenance
from worker.celery import (
    DISCOVER_TASK,
    INGEST_TASK,
    LEARN_TASK,
    REBUILD_ALL_TASK,
    REBUILD_TASK,
    RETENTION_TASK,
    app,
)
from worker.guard import NoArgs, TaskArgs, declare
from worker.request import DecodedRequest
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)

# Connection trouble is retried with backoff; anything else is a bug or bad
# data, which the functions below dead-letter instead of raising.
# (Countdowns such as this one are whole seconds on RabbitMQ: `schedule_learn`.)
LEASE_RECHECK_S = 0.5
# NotDurable: stored on the primary but not yet on enough replicas, so the
# ingest is not acked (the message comes again; storing is idempotent).
RETRY_ON = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, NotDurable)


def task(name: str, shape: type[TaskArgs] = NoArgs, **options: Any) -> Callable[..., Any]:
    """`app.task` with our common policy: explicit name, no result,
    connection trouble retried with backoff (anything else is dead-lettered
    by the functions the tasks call, not raised), and the body decoded once.

    `shape` is what the worker's door (worker/guard.py) checks a message's
    arguments against before Celery sees it: a message whose arguments do
    not fit is one dead letter, never a crash or a retry loop.
    """
    declare(name, shape)
    # Not shared: Celery would otherwise add these tasks to every app created
    # in the process (the client's publishing app, a test's app), where they
    # would replace that app's own task of the same name.
    return app.task(
        name=name,
        shared=False,
        autoretry_for=RETRY_ON,
        retry_backoff=True,
        ignore_result=True,
        # The pool process gets the body the guard decoded (worker/request.py).
        Request=DecodedRequest,
        **options,
    )


def _store() -> Store:
    """One store per worker process (redis-py pools reconnect after fork), for
    the current settings: the command line may install others in-process."""
    settings = get_settings()
    key = settings.model_dump_json()  # Settings is not hashable; its values are
    store = _STORES.get(key)
    if store is None:
        # Sentinel (when configured) or the URL; WAIT after stores and commits.
        store = _STORES[key] = Store(
            connect_state(settings),
            settings.key_prefix,
            dead_letter_cap=settings.dead_letter_max_entries,
            durability_replicas=settings.durability_replicas,
            durability_timeout_ms=settings.durability_timeout_ms,
        )
    return store


_STORES: dict[str, Store] = {}


def schedule_learn(
    store: Store, agents: list[str], settings: Settings, countdown: float | None = None
) -> list[str]:
    """Enqueue a learn for each agent that has none pending; returns those enqueued.

    The countdown goes through `delay_seconds`: on RabbitMQ Celery delays
    natively in whole seconds and raises ValueError under one, so the
    lingering or re-checking learn would never be sent (the agent waits for
    its next ingest or the discover sweep).
    """
    enqueued = []
    delay = delay_seconds(countdown, settings.effective_broker_url)
    for agent in store.mark_pending(agents, settings.learn_pending_ttl_s):
        try:
            learn_agent.apply_async(args=[agent], argsrepr=f"<agent {agent}>", countdown=delay)
            enqueued.append(agent)
        except Exception:
            # Without the message the marker would only delay the next try.
            store.clear_pending(agent)
            raise
    return enqueued


class IngestArgs(TaskArgs):
    # A list, but of anything: each payload is validated on its own by
    # `learning.ingest`, so a bad one is its own dead letter, not the batch's.
    payloads: list[Any]


class AgentArgs(TaskArgs):
    agent_id: str


@task(INGEST_TASK, IngestArgs, retry_backoff_max=60, max_retries=None)
def ingest_runs(payloads: list[str]) -> dict[str, int]:
    """Validate and store (idempotently); learn from memory where the fast path
    applies (`learning.learn_ingested`), else make sure the agent's learn is pending."""
    settings = get_settings()
    store = _store()
    result = learning.ingest(
        store,
        payloads,
        settings.max_run_bytes,
        max_depth=settings.max_json_depth,
        max_raw=settings.dead_letter_raw_max_bytes,
    )
    caught_up: dict[str, bool] = {}
    if settings.ingest_fast_path and result.stored:
        try:
            caught_up = learning.learn_ingested(
                store,
                result,
                config=learning.engine_config(settings),
                max_runs=settings.learn_batch_size,
            )
        except RETRY_ON:
            raise
        except Exception:  # an optimisation only: the learn task does it the usual way
            log.exception("fast path failed; the learn task takes over")
    schedule_learn(store, [a for a in result.agents if not caught_up.get(a)], settings)
    for pos, reason in result.rejected:
        log.warning("rejected run %d of %d: %s", pos + 1, len(payloads), reason)
    return {
        "stored": len(result.stored),
        "duplicates": len(result.duplicates),
        "rejected": len(result.rejected),
        "learned_here": len(caught_up),
    }


@task(LEARN_TASK, AgentArgs, retry_backoff_max=30, max_retries=None)
def learn_agent(agent_id: str) -> dict[str, int]:
    """Learn everything past the agent's offset, within the time budget.

    The pending marker is cleared BEFORE reading, so a run stored while we
    learn schedules one more learn instead of being missed. A lease keeps a
    second learner of the same agent from folding the same batch only to
    lose the commit; the holder keeps going while runs keep arriving (low
    latency), and re-checks the lag after releasing, so no wake-up is lost.
    """
    settings = get_settings()
    store = _store()
    store.clear_pending(agent_id)
    store.incr_counter("learn_tasks")
    token = uuid.uuid4().hex
    lease_ms = (settings.learn_time_budget_s + 10) * 1000
    deadline = time.monotonic() + settings.learn_time_budget_s
    totals = {"learned": 0, "commits": 0, "conflicts": 0}
    first = True
    while store.acquire_lease(agent_id, token, lease_ms):
        first = False
        try:
            summary = learning.catch_up(
                store,
                agent_id,
                max_runs=settings.learn_batch_size,
                config=learning.engine_config(settings),
                deadline=deadline,
            )
            totals["learned"] += summary.learned
            totals["commits"] += summary.commits
            totals["conflicts"] += summary.conflicts
        except SoftTimeLimitExceeded:
            log.warning("learn for %s hit the soft time limit; re-queued", agent_id)
            break
        finally:
            store.release_lease(agent_id, token)
        lag = store.cursor(agent_id).lag
        if time.monotonic() >= deadline or lag < settings.learn_min_batch:
            break
    if first:
        # Another learner holds the lease and re-checks the lag when it lets
        # go. In case it died holding it, look again shortly (short
        # countdowns only: long ones misbehave on Redis, kombu#337).
        store.incr_counter("learn_skipped")
        schedule_learn(store, [agent_id], settings, countdown=LEASE_RECHECK_S)
    elif store.cursor(agent_id).lag > 0:
        # A few runs arrived during the last step: let more gather first, as
        # every commit rewrites the agent's whole state (windows of up to 100
        # prompts), so tiny batches would cost throughput for nothing.
        schedule_learn(store, [agent_id], settings, countdown=settings.learn_linger_s)
    return totals


# ----------------------------------------------------------------- maintenance


@task(DISCOVER_TASK)
def discover() -> dict[str, int]:
    """Schedule a learn for every agent with unlearned runs (including runs written
    by NeMo Relay agents themselves), so nothing waits on a lost learn message."""
    settings = get_settings()
    store = _store()
    lagging = maintenance.lagging_agents(store)
    enqueued = schedule_learn(store, list(lagging), settings)
    return {"lagging": len(lagging), "enqueued": len(enqueued)}


@task(REBUILD_TASK, AgentArgs)
def rebuild_agent(agent_id: str) -> dict[str, int]:
    """Recompute one agent's state from its retained runs and swap it in."""
    settings = get_settings()
    store = _store()
    result = maintenance.rebuild(
        store, agent_id, config=learning.engine_config(settings), chunk=settings.learn_batch_size
    )
    schedule_learn(store, [agent_id], settings)  # runs that arrived meanwhile
    return {"runs": result.runs, "version": result.version}


@task(REBUILD_ALL_TASK)
def rebuild_all() -> dict[str, int]:
    """Fan out one rebuild per agent (each its own task, so one big agent blocks nothing)."""
    agents = _store().agent_ids()
    for agent in agents:
        rebuild_agent.apply_async(args=[agent], argsrepr=f"<agent {agent}>")
    return {"agents": len(agents)}


@task(RETENTION_TASK)
def retention() -> dict[str, int]:
    """Apply the retention policy to every agent (only learned runs are ever dropped)."""
    settings = get_settings()
    if settings.retention_max_runs is None and settings.retention_max_age_s is None:
        return {"agents": 0, "dropped": 0}
    store = _store()
    dropped = 0
    agents = store.agent_ids()
    for agent in agents:
        dropped += maintenance.apply_retention(
            store,
            agent,
            max_runs=settings.retention_max_runs,
            max_age_s=settings.retention_max_age_s,
            tombstones=settings.retention_tombstones,
        )
    return {"agents": len(agents), "dropped": dropped}
