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
from functools import cache

import redis
from celery.exceptions import SoftTimeLimitExceeded

from storage.connection import connect
from storage.store import Store
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
from worker.engine.fold import EngineConfig
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)

# Connection trouble is retried with backoff; anything else is a bug or bad
# data, which the functions below dead-letter instead of raising.
RETRY_ON = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


@cache
def _store() -> Store:
    """One store per worker process (redis-py pools reconnect after fork)."""
    settings = get_settings()
    return Store(connect(settings.redis_url), settings.key_prefix)


def _config(settings: Settings) -> EngineConfig:
    return EngineConfig(observation_window=settings.observation_window)


def schedule_learn(store: Store, agents: list[str], settings: Settings) -> list[str]:
    """Enqueue a learn for each agent that has none pending; returns those enqueued."""
    enqueued = []
    for agent in store.mark_pending(agents, settings.learn_pending_ttl_s):
        try:
            learn_agent.apply_async(args=[agent], argsrepr=f"<agent {agent}>")
            enqueued.append(agent)
        except Exception:
            # Without the message the marker would only delay the next try.
            store.clear_pending(agent)
            raise
    return enqueued


@app.task(
    name=INGEST_TASK,
    autoretry_for=RETRY_ON,
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=None,
    ignore_result=True,
)
def ingest_runs(payloads: list[str]) -> dict[str, int]:
    """Validate, store (idempotently) and make sure each agent's learn is pending."""
    settings = get_settings()
    store = _store()
    result = learning.ingest(store, payloads, settings.max_run_bytes)
    schedule_learn(store, result.agents, settings)
    for pos, reason in result.rejected:
        log.warning("rejected run %d of %d: %s", pos + 1, len(payloads), reason)
    return {
        "stored": len(result.stored),
        "duplicates": len(result.duplicates),
        "rejected": len(result.rejected),
    }


@app.task(
    name=LEARN_TASK,
    autoretry_for=RETRY_ON,
    retry_backoff=True,
    retry_backoff_max=30,
    max_retries=None,
    ignore_result=True,
)
def learn_agent(agent_id: str) -> dict[str, int]:
    """Learn everything past the agent's offset, within the time budget.

    The pending marker is cleared BEFORE reading, so a run stored while we
    learn schedules one more learn instead of being missed.
    """
    settings = get_settings()
    store = _store()
    store.clear_pending(agent_id)
    store.incr_counter("learn_tasks")
    deadline = time.monotonic() + settings.learn_time_budget_s
    try:
        summary = learning.learn_agent(
            store,
            agent_id,
            max_runs=settings.learn_batch_size,
            config=_config(settings),
            deadline=deadline,
        )
    except SoftTimeLimitExceeded:
        schedule_learn(store, [agent_id], settings)
        raise
    if not summary.caught_up:
        schedule_learn(store, [agent_id], settings)
    return {"learned": summary.learned, "commits": summary.commits, "conflicts": summary.conflicts}


# ----------------------------------------------------------------- maintenance


@app.task(name=DISCOVER_TASK, autoretry_for=RETRY_ON, retry_backoff=True, ignore_result=True)
def discover() -> dict[str, int]:
    """Schedule a learn for every agent with unlearned runs (including runs written
    by NeMo Relay agents themselves), so nothing waits on a lost learn message."""
    settings = get_settings()
    store = _store()
    lagging = maintenance.lagging_agents(store)
    enqueued = schedule_learn(store, list(lagging), settings)
    return {"lagging": len(lagging), "enqueued": len(enqueued)}


@app.task(name=REBUILD_TASK, autoretry_for=RETRY_ON, retry_backoff=True, ignore_result=True)
def rebuild_agent(agent_id: str) -> dict[str, int]:
    """Recompute one agent's state from its retained runs and swap it in."""
    settings = get_settings()
    store = _store()
    result = maintenance.rebuild(
        store, agent_id, config=_config(settings), chunk=settings.learn_batch_size
    )
    schedule_learn(store, [agent_id], settings)  # runs that arrived meanwhile
    return {"runs": result.runs, "version": result.version}


@app.task(name=REBUILD_ALL_TASK, autoretry_for=RETRY_ON, retry_backoff=True, ignore_result=True)
def rebuild_all() -> dict[str, int]:
    """Fan out one rebuild per agent (each its own task, so one big agent blocks nothing)."""
    agents = _store().agent_ids()
    for agent in agents:
        rebuild_agent.apply_async(args=[agent], argsrepr=f"<agent {agent}>")
    return {"agents": len(agents)}


@app.task(name=RETENTION_TASK, autoretry_for=RETRY_ON, retry_backoff=True, ignore_result=True)
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
