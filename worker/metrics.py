"""Prometheus metrics of learning progress, read from Redis at every scrape.

Why a collector that reads Redis instead of counters kept in memory: the
numbers that matter are global. Any worker process (or `adaptive-worker
replay`) may ingest or learn, a prefork worker's pool children share no
memory with the process that serves /metrics, and a restart would reset
in-memory counters. Redis holds the truth: each agent's cursor (`learned`,
`base`) and run index, and the counters hash that ingest and the Lua commit
increment atomically. So every scrape reads them (one SCAN for the agents,
then one pipelined round trip for all cursors), and every worker exposes the
same numbers: scrape one of them, or aggregate with `max`, never `sum`.

Flower's /metrics has task and worker metrics but no backlog or learning lag
(NOTES-celery.md); `adaptive_learning_lag_runs` is that missing number: runs
stored but not yet folded into the learned state.

A scrape never fails because Redis is down: it answers `adaptive_up 0` (and
counts `adaptive_scrape_errors_total`), so an alert can tell "Redis is
unreachable" from "the endpoint is gone".

Per-agent insight gauges (`adaptive_agent_*`: root LLM latency and output
tokens, plan groups, stable prefix blocks per learning key) show what
learning buys, as `adaptive-worker report` does for one agent. Their series
count grows with agents and learning keys, so both are capped
(ADAPTIVE_METRICS_MAX_AGENTS, ADAPTIVE_METRICS_MAX_LEARNING_KEYS) and what
the caps leave out is counted instead of silently missing. Reading learned
state costs more than reading cursors, so that part is cached for
AGENT_INSIGHT_TTL_S: a scrape every second reads it at most every few.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

import redis
from celery import Celery
from celery.signals import celeryd_after_setup, worker_process_init
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.backoff import NoBackoff
from redis.retry import Retry

from storage.connection import connect, redis_tls_options, sentinel_client
from storage.store import Store
from worker.settings import Settings, get_settings

if TYPE_CHECKING:
    from tasks.insight import Headline

log = logging.getLogger(__name__)

# Fields of the counters hash (storage/keys.py `counters`), and the name each
# is exported under (prometheus_client appends `_total` to counters).
COUNTERS: dict[str, tuple[str, str]] = {
    "runs_ingested": (
        "adaptive_runs_ingested",
        "Runs stored for the first time (duplicates not counted).",
    ),
    "runs_learned": (
        "adaptive_runs_learned",
        "Runs folded into learned state by committed learns.",
    ),
    "commits": ("adaptive_commits", "Learn commits that applied (compare-and-set won)."),
    "conflicts": (
        "adaptive_learn_conflicts",
        "Learn commits refused because another learner moved the offset first.",
    ),
    "dead_letters": (
        "adaptive_dead_letters",
        "Payloads or runs ever sent to the dead-letter list.",
    ),
    "dead_letters_trimmed": (
        "adaptive_dead_letters_trimmed",
        "Oldest dead letters dropped to keep the list under its cap.",
    ),
    "conflicting_duplicates": (
        "adaptive_conflicting_duplicates",
        "Runs resubmitted under a stored run id with different content (first kept).",
    ),
    "learn_tasks": (
        "adaptive_learn_tasks",
        "Learn task executions (debounced: at most one queued per agent).",
    ),
    "fast_path_runs": (
        "adaptive_fast_path_runs",
        "Runs learned by ingest from memory (fast path), also counted in runs_learned.",
    ),
}
# A counter added to the hash later is still exported, as adaptive_<field>_total.
_FIELD = re.compile(r"[a-z_][a-z0-9_]*")

# A scrape should answer inside Prometheus' default 10 s scrape timeout even
# when Redis is unreachable or stalled, so the metrics client has its own
# short timeouts and one immediate retry (the workers' client waits 30 s).
# The first failing command ends the scrape: at worst about 2 x 3 s.
SCRAPE_CONNECT_TIMEOUT_S = 2.0
SCRAPE_SOCKET_TIMEOUT_S = 3.0

# Defaults of the caps, from the settings (one source of truth).
DEFAULT_MAX_AGENTS: int = Settings.model_fields["metrics_max_agents"].default
DEFAULT_MAX_LEARNING_KEYS: int = Settings.model_fields["metrics_max_learning_keys"].default
# How long the per-agent insight read is reused. Learned state changes once
# per learn commit, and a few seconds' staleness is invisible on a dashboard,
# while re-reading tries and stability for 50 agents at each 1 s scrape is not.
AGENT_INSIGHT_TTL_S = 5.0


def snapshot(store: Store) -> dict[str, Any]:
    """The scraped numbers as a plain, JSON-serialisable dict (for `adaptive-worker stats`).

    Raises redis.RedisError when Redis cannot be read; the collector turns
    that into `adaptive_up 0`, a command line reports it.
    """
    agents = store.agent_ids()
    cursors = store.cursors(agents)
    stored = store.counters()
    dead_now = store.dead_letter_count()
    per_agent = {
        agent: {
            "lag": c.lag,
            "index_length": c.index_length,
            "learned": c.learned,
            "base": c.base,
        }
        for agent, c in cursors.items()
    }
    counters = {name: stored.get(name, 0) for name in COUNTERS}
    # Counters this module does not know yet still show in `stats`.
    counters.update({k: v for k, v in stored.items() if k not in counters})
    return {
        "agent_count": len(per_agent),
        "lag_total": sum(a["lag"] for a in per_agent.values()),
        "agents": per_agent,
        "counters": counters,
        "dead_letter_list_length": dead_now,
    }


def select_agents(runs_stored: Mapping[str, int], cap: int) -> tuple[list[str], int]:
    """The agents given per-agent insight gauges, and how many the cap leaves out.

    Rule: the most runs stored (index length + retention-trimmed, i.e. every
    run ever indexed) first, ties broken by agent id. It is deterministic, so
    the exported set does not flap between scrapes, and it needs nothing
    beyond the cursors every scrape reads anyway. Busy agents are the ones
    whose learned numbers mean the most.
    """
    ranked = sorted(runs_stored, key=lambda agent: (-runs_stored[agent], agent))
    chosen = ranked[: max(0, cap)]
    return chosen, len(ranked) - len(chosen)


@dataclass(frozen=True, slots=True)
class AgentInsight:
    """The per-agent part of one scrape: the chosen agents' headlines and
    learning-key counts (their sets' sizes), and how many agents were left out."""

    headlines: dict[str, Headline]
    learning_keys: dict[str, int]
    omitted_agents: int


def read_headlines(
    store: Store, agents: Sequence[str], max_learning_keys: int
) -> tuple[dict[str, Headline], dict[str, int]]:
    """Headlines of `agents` (at most `max_learning_keys` learning keys each,
    the first in sorted order) and the number of learning keys in its set.

    Batched: tasks.insight.headlines reads all agents in two pipelined round
    trips, and one more counts the sets (SCARD), so the cost grows with the
    caps, never with the number of learning keys an agent has. One corrupt
    value must not hide every other agent's gauges: when the batch fails on
    data, each agent is read alone and the failing ones are logged and left
    out. A Redis error propagates (retrying agent by agent would only repeat
    the timeout once per agent).
    """
    if not agents:
        return {}, {}
    # Imported when first needed: the engine code stays out of processes that never serve.
    from tasks.insight import headlines

    # The set also names the seed profile (the plain agent id), which is not a
    # learning key: counted out, as tasks.insight leaves it out.
    pipe = store.client.pipeline(transaction=False)
    for agent in agents:
        pipe.scard(store.keys.learning_key_set(agent))
        pipe.sismember(store.keys.learning_key_set(agent), agent)
    replies = pipe.execute()
    counts = {
        agent: int(replies[2 * i]) - int(bool(replies[2 * i + 1])) for i, agent in enumerate(agents)
    }
    try:
        found = dict(headlines(store, list(agents), max_learning_keys=max_learning_keys))
    except redis.RedisError:
        raise
    except Exception as exc:
        log.warning("metrics: batch headline read failed (%s); reading agents one by one", exc)
        found = {}
        for agent in agents:
            try:
                found.update(headlines(store, [agent], max_learning_keys=max_learning_keys))
            except redis.RedisError:
                raise
            except Exception as exc:
                log.warning("metrics: no insight gauges for agent %r: %s", agent, exc)
    return found, counts


class AdaptiveCollector(Collector):
    """A prometheus_client collector that reads the Store on every scrape."""

    def __init__(
        self,
        store: Store,
        *,
        max_agents: int = DEFAULT_MAX_AGENTS,
        max_learning_keys: int = DEFAULT_MAX_LEARNING_KEYS,
        insight_ttl_s: float = AGENT_INSIGHT_TTL_S,
    ) -> None:
        self.store = store
        self.max_agents = max_agents
        self.max_learning_keys = max_learning_keys
        self.insight_ttl_s = insight_ttl_s
        self._lock = threading.Lock()
        self._errors = 0
        self._insight_errors = 0
        self._was_up = True
        # (monotonic time read, agents read, their headlines, their learning-key counts)
        self._cached: tuple[float, tuple[str, ...], dict[str, Headline], dict[str, int]] | None = (
            None
        )

    def describe(self) -> Iterable[Metric]:
        # Names only, so registering checks duplicates without touching Redis.
        return [
            *self._families(None, 0.0, 0, describe=True),
            *self._agent_families(None, 0, describe=True),
        ]

    def collect(self) -> Iterable[Metric]:
        started = time.perf_counter()
        snap: dict[str, Any] | None
        try:
            snap = snapshot(self.store)
        except Exception as exc:
            # Any failure (Redis down, a corrupt cursor) must still give an
            # answer: the scrape itself succeeding is what `adaptive_up` needs.
            snap = None
            with self._lock:
                self._errors += 1
                first = self._was_up
                self._was_up = False
            level = logging.WARNING if first else logging.DEBUG
            log.log(level, "metrics scrape could not read Redis: %s", exc)
        else:
            with self._lock:
                if not self._was_up:
                    log.warning("metrics scrape reads Redis again")
                self._was_up = True
        insight: AgentInsight | None = None
        if snap is not None:
            try:
                insight = self._agent_insight(snap)
            except Exception as exc:
                # The global numbers above are still right: export them, and
                # count the failure so a dashboard can show missing gauges.
                with self._lock:
                    self._insight_errors += 1
                log.warning("metrics: per-agent insight gauges not read: %s", exc)
        with self._lock:
            errors, insight_errors = self._errors, self._insight_errors
        return [
            *self._families(snap, time.perf_counter() - started, errors),
            *(() if snap is None else self._agent_families(insight, insight_errors)),
        ]

    def _agent_insight(self, snap: dict[str, Any]) -> AgentInsight:
        """Headlines of the agents the cap selects, reused for `insight_ttl_s`."""
        runs_stored = {
            agent: numbers["index_length"] + numbers["base"]
            for agent, numbers in snap["agents"].items()
        }
        chosen, omitted = select_agents(runs_stored, self.max_agents)
        wanted = tuple(chosen)
        now = time.monotonic()
        with self._lock:
            cached = self._cached
        if cached is not None and cached[1] == wanted and now - cached[0] < self.insight_ttl_s:
            found, counts = cached[2], cached[3]
        else:
            found, counts = read_headlines(self.store, chosen, self.max_learning_keys)
            with self._lock:
                self._cached = (now, wanted, found, counts)
        return AgentInsight(
            {a: found[a] for a in chosen if a in found},
            {a: counts.get(a, 0) for a in chosen if a in found},
            omitted,
        )

    def _agent_families(
        self, insight: AgentInsight | None, insight_errors: int, *, describe: bool = False
    ) -> Iterator[Metric]:
        """The per-agent insight gauges; with `describe`, names only."""
        latency = GaugeMetricFamily(
            "adaptive_agent_llm_latency_seconds",
            "Duration of the agent's LLM calls (trie root: all of them), measured on its"
            " newest retained runs.",
            labels=["agent_id", "quantile"],
        )
        tokens = GaugeMetricFamily(
            "adaptive_agent_output_tokens",
            "Output tokens per LLM call at the trie root, the learned t-digest's quantile.",
            labels=["agent_id", "quantile"],
        )
        calls = GaugeMetricFamily(
            "adaptive_agent_llm_calls_learned",
            "LLM calls learned at the trie root (the samples behind its predictions).",
            labels=["agent_id"],
        )
        groups = GaugeMetricFamily(
            "adaptive_agent_plan_groups",
            "Parallel groups in the agent's learned execution plan.",
            labels=["agent_id"],
        )
        prefix = GaugeMetricFamily(
            "adaptive_agent_stable_prefix_blocks",
            "Stable prompt prefix (blocks prompt caching can reuse) per learning key.",
            labels=["agent_id", "learning_key"],
        )
        keys = GaugeMetricFamily(
            "adaptive_agent_learning_keys",
            "Learning keys in the agent's set, exported or not (0: only the seed profile,"
            " exported under the agent id).",
            labels=["agent_id"],
        )
        omitted_agents = GaugeMetricFamily(
            "adaptive_metrics_agents_omitted",
            "Agents left without adaptive_agent_* gauges by ADAPTIVE_METRICS_MAX_AGENTS.",
        )
        omitted_keys = GaugeMetricFamily(
            "adaptive_metrics_learning_keys_omitted",
            "Learning keys of exported agents left out by ADAPTIVE_METRICS_MAX_LEARNING_KEYS.",
        )
        errors = CounterMetricFamily(
            "adaptive_agent_insight_errors",
            "Scrapes whose per-agent insight gauges could not be read (since process start).",
        )
        if not describe:
            errors.add_metric([], insight_errors)
        if insight is not None:
            left_out = 0
            for agent, head in insight.headlines.items():
                for quantile, seconds in (
                    ("0.5", head.root_llm_latency_p50_s),
                    ("0.9", head.root_llm_latency_p90_s),
                ):
                    if seconds is not None:
                        latency.add_metric([agent, quantile], seconds)
                if head.root_output_tokens_p50 is not None:
                    tokens.add_metric([agent, "0.5"], head.root_output_tokens_p50)
                if head.root_requests is not None:
                    calls.add_metric([agent], head.root_requests)
                if head.plan_groups is not None:
                    groups.add_metric([agent], head.plan_groups)
                for key in sorted(head.stable_prefix_blocks)[: self.max_learning_keys]:
                    prefix.add_metric([agent, key], head.stable_prefix_blocks[key])
                in_set = insight.learning_keys[agent]
                keys.add_metric([agent], in_set)
                left_out += max(0, in_set - self.max_learning_keys)
            omitted_agents.add_metric([], insight.omitted_agents)
            omitted_keys.add_metric([], left_out)
        yield from (latency, tokens, calls, groups, prefix, keys)
        if describe or insight is not None:
            yield from (omitted_agents, omitted_keys)
        yield errors

    def _families(
        self, snap: dict[str, Any] | None, duration: float, errors: int, *, describe: bool = False
    ) -> Iterator[Metric]:
        """Every family; with `describe`, names only (no samples, no Redis read)."""
        up = GaugeMetricFamily(
            "adaptive_up", "1 if this scrape read the adaptive state from Redis, else 0."
        )
        if not describe:
            up.add_metric([], 0 if snap is None else 1)
        yield up
        duration_family = GaugeMetricFamily(
            "adaptive_scrape_duration_seconds", "Time this scrape spent reading Redis."
        )
        if not describe:
            duration_family.add_metric([], duration)
        yield duration_family
        errors_family = CounterMetricFamily(
            "adaptive_scrape_errors", "Scrapes that could not read Redis (since process start)."
        )
        if not describe:
            errors_family.add_metric([], errors)
        yield errors_family
        if snap is None and not describe:
            return

        agents = GaugeMetricFamily("adaptive_agents", "Agents with a run index.")
        lag = GaugeMetricFamily(
            "adaptive_learning_lag_runs",
            "Runs in the index not yet learned (index length + trimmed - learned offset).",
            labels=["agent_id"],
        )
        length = GaugeMetricFamily(
            "adaptive_runs_index_length", "Entries in the agent's runs_index.", labels=["agent_id"]
        )
        learned = GaugeMetricFamily(
            "adaptive_learned_offset",
            "Absolute index offset learned so far (the commit fencing token).",
            labels=["agent_id"],
        )
        trimmed = GaugeMetricFamily(
            "adaptive_retention_trimmed_runs",
            "Index entries removed from the front by retention (the cursor's base).",
            labels=["agent_id"],
        )
        dead_now = GaugeMetricFamily(
            "adaptive_dead_letter_list_length", "Entries now in the dead-letter list."
        )
        counters = {
            field: CounterMetricFamily(name, doc) for field, (name, doc) in COUNTERS.items()
        }
        if snap is not None:
            for field in snap["counters"]:
                if field not in counters and _FIELD.fullmatch(field):
                    counters[field] = CounterMetricFamily(
                        f"adaptive_{field}", f"Counter `{field}` of the counters hash."
                    )
        if snap is not None:
            agents.add_metric([], snap["agent_count"])
            for agent, numbers in snap["agents"].items():
                lag.add_metric([agent], numbers["lag"])
                length.add_metric([agent], numbers["index_length"])
                learned.add_metric([agent], numbers["learned"])
                trimmed.add_metric([agent], numbers["base"])
            dead_now.add_metric([], snap["dead_letter_list_length"])
            for field, family in counters.items():
                family.add_metric([], snap["counters"][field])
        yield from (agents, lag, length, learned, trimmed, dead_now, *counters.values())


def metrics_store(settings: Settings) -> Store:
    """A Store for scraping, with short timeouts of its own (see SCRAPE_*_TIMEOUT_S)."""
    if settings.redis_sentinels is not None:
        # The current primary, asked of the sentinels again after a failover.
        socket = {
            "socket_connect_timeout": SCRAPE_CONNECT_TIMEOUT_S,
            "socket_timeout": SCRAPE_SOCKET_TIMEOUT_S,
            "retry": Retry(NoBackoff(), 1),
        }
        return Store(sentinel_client(settings, socket), settings.key_prefix)
    if settings.redis_url is None:
        # Embedded: the process's fakeredis, the same data the worker sees.
        return Store(connect(None), settings.key_prefix)
    client = redis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        socket_connect_timeout=SCRAPE_CONNECT_TIMEOUT_S,
        socket_timeout=SCRAPE_SOCKET_TIMEOUT_S,
        retry=Retry(NoBackoff(), 1),
        **redis_tls_options(settings.redis_url, settings),
    )
    return Store(client, settings.key_prefix)


def build_registry(
    store: Store,
    *,
    process_metrics: bool = True,
    max_agents: int = DEFAULT_MAX_AGENTS,
    max_learning_keys: int = DEFAULT_MAX_LEARNING_KEYS,
) -> CollectorRegistry:
    """A private registry (not prometheus_client's global one), so tests and
    several stores in one process never clash over metric names."""
    registry = CollectorRegistry()
    registry.register(
        AdaptiveCollector(store, max_agents=max_agents, max_learning_keys=max_learning_keys)
    )
    if process_metrics:
        # The serving process's CPU, memory and fds: cheap, and they tell a
        # stuck or leaking worker main process apart from a slow Redis.
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            registry.register(collector)
    return registry


@dataclass(slots=True)
class MetricsServer:
    """A running /metrics endpoint (prometheus_client's WSGI server in a daemon thread)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(settings: Settings, store: Store | None = None) -> MetricsServer | None:
    """Serve /metrics on `metrics_bind:metrics_port`; None when the port is 0 or unset.

    Raises OSError when the address cannot be bound (the worker hook logs it
    instead: a metrics port clash must not stop learning).
    """
    if not settings.metrics_port:
        log.info("metrics endpoint disabled (ADAPTIVE_METRICS_PORT is 0 or empty)")
        return None
    registry = build_registry(
        store or metrics_store(settings),
        max_agents=settings.metrics_max_agents,
        max_learning_keys=settings.metrics_max_learning_keys,
    )
    server, thread = start_http_server(
        settings.metrics_port, addr=settings.metrics_bind, registry=registry
    )
    running = MetricsServer(server, thread)
    host, port = running.address
    log.info("metrics endpoint on http://%s:%d/metrics", host, port)
    return running


# ------------------------------------------------------------- worker hook

_SERVER_LOCK = threading.Lock()
_SERVER: MetricsServer | None = None


def _start_once(settings: Settings) -> MetricsServer | None:
    global _SERVER
    with _SERVER_LOCK:
        if _SERVER is None:
            try:
                _SERVER = start_metrics_server(settings)
            except OSError as exc:
                log.error(
                    "metrics endpoint not started on %s:%s: %s",
                    settings.metrics_bind,
                    settings.metrics_port,
                    exc,
                )
        return _SERVER


def _close_in_pool_child(**_: Any) -> None:
    # A prefork child inherits the listening socket but never serves it;
    # closing its copy lets the port go when the main process exits, even if
    # an orphaned child lingers. The parent's socket is unaffected.
    if _SERVER is not None:
        _SERVER.server.socket.close()


def install(app: Celery, settings: Settings | None = None) -> None:
    """Serve /metrics from each `celery worker` main process of `app`.

    Connected to `celeryd_after_setup`, which only the `celery worker`
    command sends (not beat, flower, or test workers started in a thread),
    so the endpoint runs once per worker node. Idempotent.
    """

    def _on_worker_setup(sender: object = None, instance: Any = None, **_: Any) -> None:
        if instance is not None and getattr(instance, "app", app) is not app:
            return
        _start_once(settings or get_settings())

    celeryd_after_setup.connect(
        _on_worker_setup, weak=False, dispatch_uid=f"adaptive-metrics-{id(app)}"
    )
    worker_process_init.connect(
        _close_in_pool_child, weak=False, dispatch_uid="adaptive-metrics-pool-child"
    )
