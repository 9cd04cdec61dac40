"""Metrics: the numbers come from Redis, are served over HTTP, and survive Redis being down.

Runs against the real Redis (private prefix per test), with runs from the
captured relay-openai fixture, ingested and learned by the same functions the
tasks call, so lag and counters are the ones a deployment would see.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from celery.signals import celeryd_after_setup
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from storage.store import Cursor, Store
from tasks.learning import catch_up, ingest, learn_step
from tests.conftest import REDIS_URL
from tests.goldens import load_capture
from worker import metrics
from worker.engine.fold import EngineConfig
from worker.metrics import (
    AdaptiveCollector,
    build_registry,
    install,
    snapshot,
    start_metrics_server,
)
from worker.settings import SettingsError, load_settings

MAX_BYTES = 8 << 20
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    """A port nothing listens on right now (also used as a "Redis is down" address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def runs_for(agent: str) -> list[str]:
    """The captured runs, re-labelled for `agent` (run ids: other UUIDs, one set per agent)."""
    out = []
    for raw in load_capture("relay-openai").runs:
        run = json.loads(raw)
        run["agent_id"] = agent
        run["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{agent}/{run['id']}"))
        out.append(json.dumps(run))
    return out


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(store: Store) -> Samples:
    registry = build_registry(store, process_metrics=False)
    return parse(generate_latest(registry).decode())


def lag_of(samples: Samples, agent: str) -> float:
    return samples[("adaptive_learning_lag_runs", (("agent_id", agent),))]


@pytest.fixture
def down_store(prefix: str) -> Iterator[Store]:
    """A store whose Redis refuses connections."""
    client = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", decode_responses=True)
    yield Store(client, prefix)
    client.close()


@pytest.fixture
def fresh_hook(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The worker hook's process-wide server slot, empty for the test and closed after."""
    monkeypatch.setattr(metrics, "_SERVER", None)
    yield
    if metrics._SERVER is not None:
        metrics._SERVER.close()


# ------------------------------------------------------------------ storage


def test_cursors_batch_equals_one_by_one(real_store: Store) -> None:
    ingest(real_store, runs_for("a") + runs_for("b"), MAX_BYTES)
    step = learn_step(real_store, "a", max_runs=1, config=EngineConfig())
    assert step.committed
    agents = ["a", "b", "never-seen"]
    batch = real_store.cursors(agents)
    assert batch == {agent: real_store.cursor(agent) for agent in agents}
    assert batch["a"].learned == 1 and batch["a"].index_length == 4
    assert batch["never-seen"] == Cursor()
    assert real_store.cursors([]) == {}


def test_lag_is_index_length_plus_base_minus_learned(real_store: Store) -> None:
    # As after retention trimmed 2 entries: 4 left in the index, 3 learned.
    real_store.client.rpush(real_store.keys.runs_index("t"), "r2", "r3", "r4", "r5")
    real_store.client.hset(real_store.keys.cursor("t"), mapping={"learned": 3, "base": 2})
    snap = snapshot(real_store)
    assert snap["agents"]["t"] == {"lag": 3, "index_length": 4, "learned": 3, "base": 2}
    samples = scrape(real_store)
    assert lag_of(samples, "t") == 3
    assert samples[("adaptive_retention_trimmed_runs", (("agent_id", "t"),))] == 2


# --------------------------------------------------------- lag and counters


def test_lag_and_counters_before_and_after_learning(real_store: Store) -> None:
    result = ingest(real_store, [*runs_for("a"), *runs_for("b"), "not json"], MAX_BYTES)
    assert len(result.stored) == 8 and len(result.rejected) == 1

    before = snapshot(real_store)
    assert before["agent_count"] == 2 and before["lag_total"] == 8
    assert before["agents"]["a"] == {"lag": 4, "index_length": 4, "learned": 0, "base": 0}
    assert before["counters"]["runs_ingested"] == 8
    assert before["counters"]["runs_learned"] == 0
    assert before["counters"]["dead_letters"] == 1
    assert before["dead_letter_list_length"] == 1
    samples = scrape(real_store)
    assert samples[("adaptive_up", ())] == 1
    assert lag_of(samples, "a") == lag_of(samples, "b") == 4
    assert samples[("adaptive_runs_ingested_total", ())] == 8

    summary = catch_up(real_store, "a", max_runs=2, config=EngineConfig())
    assert summary.caught_up and summary.learned == 4

    after = snapshot(real_store)
    assert after["agents"]["a"] == {"lag": 0, "index_length": 4, "learned": 4, "base": 0}
    assert after["agents"]["b"] == before["agents"]["b"]
    assert after["lag_total"] == 4
    assert after["counters"]["runs_learned"] == 4
    assert after["counters"]["commits"] == summary.commits == 2
    samples = scrape(real_store)
    assert lag_of(samples, "a") == 0 and lag_of(samples, "b") == 4
    assert samples[("adaptive_learned_offset", (("agent_id", "a"),))] == 4
    assert samples[("adaptive_runs_index_length", (("agent_id", "a"),))] == 4
    assert samples[("adaptive_runs_learned_total", ())] == 4
    assert samples[("adaptive_commits_total", ())] == 2
    assert samples[("adaptive_agents", ())] == 2


def test_conflicts_and_dead_letters(real_store: Store) -> None:
    ingest(real_store, runs_for("a"), MAX_BYTES)
    # A learner that lost the race: its expected offset is stale.
    assert not real_store.commit("a", expected_learned=3, new_learned=4, writes={}).committed
    real_store.push_dead_letters(['{"reason": "x"}', '{"reason": "y"}'])
    samples = scrape(real_store)
    assert samples[("adaptive_learn_conflicts_total", ())] == 1
    assert samples[("adaptive_commits_total", ())] == 0
    assert samples[("adaptive_dead_letters_total", ())] == 2
    assert samples[("adaptive_dead_letter_list_length", ())] == 2


def test_empty_store_exposes_zeros(real_store: Store) -> None:
    samples = scrape(real_store)
    assert samples[("adaptive_up", ())] == 1
    assert samples[("adaptive_agents", ())] == 0
    for name in metrics.COUNTERS.values():
        assert samples[(f"{name[0]}_total", ())] == 0
    assert not any(key[0] == "adaptive_learning_lag_runs" for key in samples)


def test_every_counter_of_the_hash_is_exported(real_store: Store) -> None:
    real_store.incr_counter("learn_tasks", 2)
    real_store.incr_counter("future_thing", 3)
    real_store.incr_counter("Not-A-Metric-Name", 1)
    snap = snapshot(real_store)
    assert snap["counters"]["future_thing"] == 3 and snap["counters"]["Not-A-Metric-Name"] == 1
    samples = scrape(real_store)
    assert samples[("adaptive_learn_tasks_total", ())] == 2
    assert samples[("adaptive_future_thing_total", ())] == 3
    assert samples[("adaptive_up", ())] == 1  # the odd name is skipped, not fatal


def test_agent_ids_are_escaped_as_label_values(real_store: Store) -> None:
    odd = 'agent "quoted" \\ back\nslash'
    real_store.client.rpush(real_store.keys.runs_index(odd), "r1")
    assert lag_of(scrape(real_store), odd) == 1


# -------------------------------------------------------------- Redis down


def test_redis_down_gives_up_zero_without_raising(down_store: Store) -> None:
    collector = AdaptiveCollector(down_store)
    for expected_errors in (1, 2):
        families = {f.name: f for f in collector.collect()}
        assert families["adaptive_up"].samples[0].value == 0
        assert families["adaptive_scrape_errors"].samples[0].value == expected_errors
        assert "adaptive_learning_lag_runs" not in families
    with pytest.raises(redis.ConnectionError):
        snapshot(down_store)  # the CLI reports this itself


def test_stalled_redis_answers_inside_the_scrape_timeout(prefix: str) -> None:
    # Accepts connections (the listen backlog) but never replies.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        settings = load_settings(redis_url=f"redis://127.0.0.1:{port}/0", key_prefix=prefix)
        store = metrics.metrics_store(settings)
        started = time.monotonic()
        families = {f.name: f for f in AdaptiveCollector(store).collect()}
        elapsed = time.monotonic() - started
        store.client.close()
    assert families["adaptive_up"].samples[0].value == 0
    assert elapsed < 9, f"a scrape of a stalled Redis took {elapsed:.1f} s (Prometheus: 10 s)"


def test_registering_does_not_read_redis(down_store: Store) -> None:
    collector = AdaptiveCollector(down_store)
    names = {f.name for f in collector.describe()}
    assert {"adaptive_up", "adaptive_learning_lag_runs", "adaptive_runs_ingested"} <= names
    assert collector._errors == 0


def test_up_again_after_redis_returns(real_store: Store, down_store: Store) -> None:
    collector = AdaptiveCollector(down_store)
    list(collector.collect())
    collector.store = real_store
    families = {f.name: f for f in collector.collect()}
    assert families["adaptive_up"].samples[0].value == 1
    assert families["adaptive_scrape_errors"].samples[0].value == 1  # a counter: kept


# -------------------------------------------------------------- HTTP server


def http_get(host: str, port: int, path: str = "/metrics") -> tuple[int, str]:
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as response:
        return response.status, response.read().decode()


def test_http_exposition_served_and_parsed(real_store: Store, prefix: str) -> None:
    ingest(real_store, runs_for("a"), MAX_BYTES)
    learn_step(real_store, "a", max_runs=1, config=EngineConfig())
    port = free_port()
    settings = load_settings(
        redis_url=REDIS_URL, key_prefix=prefix, metrics_port=port, metrics_bind="127.0.0.1"
    )
    server = start_metrics_server(settings)
    assert server is not None
    try:
        assert server.address == ("127.0.0.1", port)
        status, text = http_get("127.0.0.1", port)
        assert status == 200
        samples = parse(text)
        assert samples[("adaptive_up", ())] == 1
        assert lag_of(samples, "a") == 3
        assert samples[("adaptive_learned_offset", (("agent_id", "a"),))] == 1
        assert samples[("adaptive_runs_ingested_total", ())] == 4
        assert samples[("adaptive_scrape_duration_seconds", ())] >= 0
        # The serving process's own metrics come along (Linux /proc).
        assert any(name == "process_resident_memory_bytes" for name, _ in samples)
    finally:
        server.close()


def test_http_with_redis_down_answers_up_zero(prefix: str) -> None:
    port = free_port()
    settings = load_settings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0", key_prefix=prefix, metrics_port=port
    )
    server = start_metrics_server(settings)
    assert server is not None
    try:
        started = time.monotonic()
        status, text = http_get("127.0.0.1", port)
        assert status == 200
        assert time.monotonic() - started < 5
        samples = parse(text)
        assert samples[("adaptive_up", ())] == 0
        assert samples[("adaptive_scrape_errors_total", ())] == 1
    finally:
        server.close()


@pytest.mark.parametrize("port", [0, None, ""])
def test_port_zero_or_empty_disables(port: int | str | None) -> None:
    settings = load_settings(metrics_port=port)
    assert settings.metrics_port in (0, None)
    assert start_metrics_server(settings) is None


def test_settings_defaults_and_validation() -> None:
    settings = load_settings()
    assert settings.metrics_port == 9808 and settings.metrics_bind == "127.0.0.1"
    with pytest.raises(SettingsError, match="ADAPTIVE_METRICS_PORT"):
        load_settings(metrics_port=70000)
    with pytest.raises(SettingsError, match="ADAPTIVE_METRICS_BIND"):
        load_settings(metrics_bind=" ")


# --------------------------------------------------------------- worker hook


class _FakeWorker:
    """What `celeryd_after_setup` passes as `instance`: only `.app` is read."""

    def __init__(self, app: Celery) -> None:
        self.app = app


def test_install_starts_server_once_for_its_app(prefix: str, fresh_hook: None) -> None:
    app, other = Celery("metrics-test", set_as_current=False), Celery("x", set_as_current=False)
    port = free_port()
    settings = load_settings(redis_url=REDIS_URL, key_prefix=prefix, metrics_port=port)
    install(app, settings)
    install(app, settings)  # idempotent: one receiver
    uid = f"adaptive-metrics-{id(app)}"
    try:
        celeryd_after_setup.send(sender="celery@other", instance=_FakeWorker(other), conf=None)
        assert metrics._SERVER is None
        celeryd_after_setup.send(sender="celery@test", instance=_FakeWorker(app), conf=None)
        server = metrics._SERVER
        assert server is not None and server.address[1] == port
        celeryd_after_setup.send(sender="celery@test", instance=_FakeWorker(app), conf=None)
        assert metrics._SERVER is server
        status, text = http_get("127.0.0.1", port)
        assert status == 200 and parse(text)[("adaptive_up", ())] == 1
    finally:
        celeryd_after_setup.disconnect(dispatch_uid=uid)


def test_hook_survives_port_in_use(prefix: str, fresh_hook: None) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = load_settings(redis_url=REDIS_URL, key_prefix=prefix, metrics_port=port)
        assert metrics._start_once(settings) is None  # logged, not raised
