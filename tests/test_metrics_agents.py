"""Per-agent insight gauges (`adaptive_agent_*`): values, caps, label safety, cost bounds.

Runs against the real Redis (private prefix per test). The captured
relay-openai runs are ingested and learned by the functions the tasks call;
expected values come from the capture itself (what the real runtime learned
from the same runs: trie, plan, stability) or are computed here by hand from
the run records' timestamps, never from the code under test.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest
import redis
from prometheus_client import generate_latest

import tasks.insight
from storage.store import Store
from tasks.learning import catch_up, ingest
from tests.conftest import REDIS_URL
from tests.goldens import load_capture
from tests.test_metrics import MAX_BYTES, Samples, free_port, http_get, parse, runs_for
from worker.engine.fold import EngineConfig
from worker.metrics import (
    AdaptiveCollector,
    build_registry,
    select_agents,
    start_metrics_server,
)
from worker.settings import SettingsError, load_settings

CAPTURE = load_capture("relay-openai")
AGENT_FAMILIES = (
    "adaptive_agent_llm_latency_seconds",
    "adaptive_agent_output_tokens",
    "adaptive_agent_llm_calls_learned",
    "adaptive_agent_plan_groups",
    "adaptive_agent_stable_prefix_blocks",
    "adaptive_agent_learning_keys",
)


def learn(store: Store, agent: str, runs: list[str] | None = None) -> None:
    result = ingest(store, runs if runs is not None else runs_for(agent), MAX_BYTES)
    assert not result.rejected
    assert catch_up(store, agent, max_runs=500, config=EngineConfig()).caught_up


def scrape(store: Store, **caps: int) -> Samples:
    registry = build_registry(store, process_metrics=False, **caps)
    return parse(generate_latest(registry).decode())


def series(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: value for (metric, labels), value in samples.items() if metric == name}


def agents_in(samples: Samples) -> set[str]:
    return {
        dict(labels)["agent_id"]
        for (metric, labels), _ in samples.items()
        if metric.startswith("adaptive_agent_") and "agent_id" in dict(labels)
    }


# ------------------------------------------------------------- hand values


def ns(stamp: str) -> int:
    """RFC 3339 with nanoseconds -> ns since the epoch (Python's datetime stops at µs)."""
    whole, _, frac = stamp.rstrip("Z").partition(".")
    seconds = int(datetime.fromisoformat(whole + "+00:00").timestamp())
    return seconds * 1_000_000_000 + int(frac.ljust(9, "0"))


def hand_quantile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks, written out."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    below = int(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (position - below) * (ordered[above] - ordered[below])


def captured_llm_durations() -> list[float]:
    out = []
    for raw in CAPTURE.runs:
        for call in json.loads(raw)["calls"]:
            if call["kind"] == "llm" and call.get("ended_at"):
                out.append((ns(call["ended_at"]) - ns(call["started_at"])) / 1e9)
    return out


def captured_root_prediction() -> dict[str, Any]:
    trie = CAPTURE.value("trie")
    prediction: dict[str, Any] = trie["root"]["predictions_any_index"]
    return prediction


def captured_learning_key() -> tuple[str, dict[str, Any]]:
    """The capture's one derived learning key (without its agent id) and its stability."""
    prefix = f"{CAPTURE.prefix}acg_stability:{CAPTURE.agent_id}::"
    (found,) = [(k, v) for k, v in CAPTURE.entries("acg_stability") if k.startswith(prefix)]
    return found[0][len(prefix) :], found[1]


# ------------------------------------------------------------------ values


def test_gauges_equal_the_capture_and_hand_computed_values(real_store: Store) -> None:
    learn(real_store, "a")
    samples = scrape(real_store)
    durations = captured_llm_durations()
    assert len(durations) == 10  # 4 runs: 3 + 3 + 2 + 2 completed LLM calls
    latency = series(samples, "adaptive_agent_llm_latency_seconds")
    assert latency.keys() == {
        (("agent_id", "a"), ("quantile", "0.5")),
        (("agent_id", "a"), ("quantile", "0.9")),
    }
    assert latency[(("agent_id", "a"), ("quantile", "0.5"))] == pytest.approx(
        hand_quantile(durations, 0.5), rel=1e-9
    )
    assert latency[(("agent_id", "a"), ("quantile", "0.9"))] == pytest.approx(
        hand_quantile(durations, 0.9), rel=1e-9
    )
    root = captured_root_prediction()
    assert samples[
        ("adaptive_agent_output_tokens", (("agent_id", "a"), ("quantile", "0.5")))
    ] == pytest.approx(root["output_tokens"]["p50"])  # 196.75 in the capture
    assert (
        samples[("adaptive_agent_llm_calls_learned", (("agent_id", "a"),))]
        == root["remaining_calls"]["sample_count"]
        == 10
    )
    plan = CAPTURE.value("plan")
    assert (
        samples[("adaptive_agent_plan_groups", (("agent_id", "a"),))]
        == len(plan["parallel_groups"])
        == 3
    )
    suffix, stability = captured_learning_key()
    prefix_blocks = series(samples, "adaptive_agent_stable_prefix_blocks")
    assert prefix_blocks == {
        (("agent_id", "a"), ("learning_key", f"a::{suffix}")): stability["stable_prefix_length"]
    }
    assert stability["stable_prefix_length"] == 6
    assert samples[("adaptive_agent_learning_keys", (("agent_id", "a"),))] == 1
    assert samples[("adaptive_metrics_agents_omitted", ())] == 0
    assert samples[("adaptive_metrics_learning_keys_omitted", ())] == 0
    assert samples[("adaptive_agent_insight_errors_total", ())] == 0


def test_an_agent_with_runs_but_nothing_learned_exports_no_numbers(real_store: Store) -> None:
    ingest(real_store, runs_for("fresh"), MAX_BYTES)  # stored, not learned
    samples = scrape(real_store)
    # The newest runs are there, so latency is measured; nothing else is learned yet.
    assert len(series(samples, "adaptive_agent_llm_latency_seconds")) == 2
    for name in (
        "adaptive_agent_output_tokens",
        "adaptive_agent_plan_groups",
        "adaptive_agent_llm_calls_learned",
    ):
        assert series(samples, name) == {}, name
    assert samples[("adaptive_agent_learning_keys", (("agent_id", "fresh"),))] == 0


# -------------------------------------------------------------------- caps


def test_select_agents_rule() -> None:
    stored = {"d": 1, "b": 4, "a": 4, "c": 9, "e": 2}
    assert select_agents(stored, 2) == (["c", "a"], 3)  # most runs; ties by agent id
    assert select_agents(stored, 0) == ([], 5)
    assert select_agents(stored, 50) == (["c", "a", "b", "e", "d"], 0)
    assert select_agents({}, 3) == ([], 0)


def test_agent_cap_exports_the_busiest_and_counts_the_rest(real_store: Store) -> None:
    runs_per_agent = {"e-a": 4, "e-b": 2, "e-c": 4, "e-d": 1, "e-e": 3}
    for agent, n in runs_per_agent.items():
        ingest(real_store, runs_for(agent)[:n], MAX_BYTES)
    samples = scrape(real_store, max_agents=2)
    assert agents_in(samples) == {"e-a", "e-c"}  # 4 runs each
    assert samples[("adaptive_metrics_agents_omitted", ())] == 3
    # Retention-trimmed runs count as stored: 1 in the index + 10 trimmed ranks first.
    real_store.client.hset(real_store.keys.cursor("e-d"), mapping={"base": 10, "learned": 10})
    samples = scrape(real_store, max_agents=2)
    assert agents_in(samples) == {"e-d", "e-a"}
    assert samples[("adaptive_metrics_agents_omitted", ())] == 3
    # The global per-agent cursors stay complete whatever the cap.
    assert len(series(samples, "adaptive_learning_lag_runs")) == 5


def test_cap_zero_disables_per_agent_gauges(
    real_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    learn(real_store, "a")
    ingest(real_store, runs_for("b"), MAX_BYTES)

    def must_not_run(*_: Any, **__: Any) -> Any:
        raise AssertionError("no headline read with ADAPTIVE_METRICS_MAX_AGENTS=0")

    monkeypatch.setattr(tasks.insight, "headlines", must_not_run)
    samples = scrape(real_store, max_agents=0)
    assert agents_in(samples) == set()
    assert samples[("adaptive_metrics_agents_omitted", ())] == 2
    assert samples[("adaptive_agent_insight_errors_total", ())] == 0
    assert samples[("adaptive_up", ())] == 1


def add_learning_keys(store: Store, agent: str, blocks: dict[str, int]) -> None:
    """Extra learning keys with a stability of a known stable prefix length each."""
    _, stability = captured_learning_key()
    for suffix, length in blocks.items():
        key = f"{agent}::{suffix}"
        store.client.sadd(store.keys.learning_key_set(agent), key)
        store.client.set(
            store.keys.acg_stability(key), json.dumps({**stability, "stable_prefix_length": length})
        )


def test_learning_key_cap_exports_the_first_keys_and_counts_the_rest(real_store: Store) -> None:
    learn(real_store, "a")
    learn(real_store, "b")
    # The learned key is `a::model=...`; these sort before it ("0" < "m").
    add_learning_keys(real_store, "a", {"0-first": 1, "0-second": 2, "0-third": 3})
    samples = scrape(real_store, max_learning_keys=2)
    blocks = series(samples, "adaptive_agent_stable_prefix_blocks")
    suffix, _ = captured_learning_key()
    assert blocks == {
        (("agent_id", "a"), ("learning_key", "a::0-first")): 1,
        (("agent_id", "a"), ("learning_key", "a::0-second")): 2,
        (("agent_id", "b"), ("learning_key", f"b::{suffix}")): 6,
    }
    assert samples[("adaptive_agent_learning_keys", (("agent_id", "a"),))] == 4
    assert samples[("adaptive_agent_learning_keys", (("agent_id", "b"),))] == 1
    assert samples[("adaptive_metrics_learning_keys_omitted", ())] == 2  # a's third and learned
    samples = scrape(real_store, max_learning_keys=0)
    assert series(samples, "adaptive_agent_stable_prefix_blocks") == {}
    assert samples[("adaptive_metrics_learning_keys_omitted", ())] == 5


def test_series_count_is_bounded_by_the_caps(real_store: Store) -> None:
    for i in range(6):
        learn(real_store, f"agent-{i}")
        add_learning_keys(real_store, f"agent-{i}", {f"0-{j}": j for j in range(5)})
    samples = scrape(real_store, max_agents=3, max_learning_keys=2)
    per_agent = [key for key in samples if key[0] in AGENT_FAMILIES]
    # Per exported agent: 2 latency + 1 tokens + 1 calls + 1 plan + 1 key count + 2 keys.
    assert len(per_agent) == 3 * (2 + 1 + 1 + 1 + 1 + 2)
    assert samples[("adaptive_metrics_agents_omitted", ())] == 3
    assert samples[("adaptive_metrics_learning_keys_omitted", ())] == 3 * (6 - 2)


# ------------------------------------------------------------ hostile labels


HOSTILE = [
    'agent "quoted" \\ back\nslash',
    "agent {brace} =,}",
    "émoji 🚀 \t tab",
    "a" * 300,
]


def test_hostile_agent_ids_are_exported_exactly(real_store: Store) -> None:
    for agent in HOSTILE:
        learn(real_store, agent)
    text = generate_latest(build_registry(real_store, process_metrics=False)).decode()
    samples = parse(text)  # the official parser reads every label back
    assert agents_in(samples) == set(HOSTILE)
    suffix, _ = captured_learning_key()
    for agent in HOSTILE:
        assert samples[("adaptive_agent_plan_groups", (("agent_id", agent),))] == 3
        key = (("agent_id", agent), ("learning_key", f"{agent}::{suffix}"))
        assert samples[("adaptive_agent_stable_prefix_blocks", key)] == 6
    # Nothing of an id escapes its quoted label value: one line per sample.
    lines = [ln for ln in text.splitlines() if ln.startswith("adaptive_agent_plan_groups{")]
    assert len(lines) == len(HOSTILE)


# ------------------------------------------------------------- cost, failure


def test_insight_is_cached_and_renewed(real_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    learn(real_store, "a")
    reads: list[list[str]] = []
    real = tasks.insight.headlines

    def counting(store: Store, agents: list[str], **kw: Any) -> Any:
        reads.append(list(agents))
        return real(store, agents, **kw)

    monkeypatch.setattr(tasks.insight, "headlines", counting)
    collector = AdaptiveCollector(real_store, insight_ttl_s=3600)

    def plan_groups() -> float | None:
        for family in collector.collect():
            if family.name == "adaptive_agent_plan_groups":
                return family.samples[0].value if family.samples else None
        raise AssertionError("no plan family")

    assert plan_groups() == 3
    real_store.client.delete(real_store.keys.plan("a"))
    assert plan_groups() == 3  # cached: one read for two scrapes
    assert reads == [["a"]]
    # A new agent changes the selection: read again (both agents, one batch),
    # and the deleted plan shows (b has learned nothing).
    ingest(real_store, runs_for("b"), MAX_BYTES)
    assert plan_groups() is None
    assert reads == [["a"], ["a", "b"]]
    collector.insight_ttl_s = 0  # expired at once: every scrape reads
    plan_groups()
    assert len(reads) == 3


def test_one_failing_agent_does_not_hide_the_others(
    real_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    learn(real_store, "good")
    learn(real_store, "bad")
    real = tasks.insight.headlines

    def failing(store: Store, agents: list[str], **kw: Any) -> Any:
        if "bad" in agents:
            raise ValueError("a value that does not parse")
        return real(store, agents, **kw)

    monkeypatch.setattr(tasks.insight, "headlines", failing)
    samples = scrape(real_store)
    assert agents_in(samples) == {"good"}
    assert samples[("adaptive_agent_plan_groups", (("agent_id", "good"),))] == 3
    assert samples[("adaptive_agent_insight_errors_total", ())] == 0


def test_a_redis_error_in_the_insight_keeps_the_global_numbers(
    real_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    learn(real_store, "a")
    calls: list[int] = []

    def down(*_: Any, **__: Any) -> Any:
        calls.append(1)
        raise redis.ConnectionError("gone")

    monkeypatch.setattr(tasks.insight, "headlines", down)
    collector = AdaptiveCollector(real_store)
    for expected in (1, 2):
        families = {f.name: f for f in collector.collect()}
        assert families["adaptive_up"].samples[0].value == 1
        assert families["adaptive_learning_lag_runs"].samples[0].value == 0
        assert families["adaptive_agent_insight_errors"].samples[0].value == expected
        assert not families["adaptive_agent_plan_groups"].samples
    assert len(calls) == 2  # not retried agent by agent


def test_redis_down_exports_no_agent_families(prefix: str) -> None:
    client = redis.Redis.from_url("redis://127.0.0.1:1/0", decode_responses=True)
    families = {f.name for f in AdaptiveCollector(Store(client, prefix)).collect()}
    assert "adaptive_up" in families
    assert not any(name.startswith("adaptive_agent_") for name in families)


def test_describe_names_the_new_families_without_redis(prefix: str) -> None:
    client = redis.Redis.from_url("redis://127.0.0.1:1/0", decode_responses=True)
    names = {f.name for f in AdaptiveCollector(Store(client, prefix)).describe()}
    assert set(AGENT_FAMILIES) <= names
    assert {"adaptive_metrics_agents_omitted", "adaptive_agent_insight_errors"} <= names


def test_settings_of_the_caps() -> None:
    settings = load_settings()
    assert (settings.metrics_max_agents, settings.metrics_max_learning_keys) == (50, 20)
    with pytest.raises(SettingsError, match="ADAPTIVE_METRICS_MAX_AGENTS"):
        load_settings(metrics_max_agents=-1)
    with pytest.raises(SettingsError, match="ADAPTIVE_METRICS_MAX_LEARNING_KEYS"):
        load_settings(metrics_max_learning_keys=-1)


def test_the_endpoint_applies_the_settings_caps(real_store: Store, prefix: str) -> None:
    learn(real_store, "a")
    add_learning_keys(real_store, "a", {"0-first": 1})
    ingest(real_store, runs_for("b")[:1], MAX_BYTES)
    port = free_port()
    settings = load_settings(
        redis_url=REDIS_URL,
        key_prefix=prefix,
        metrics_port=port,
        metrics_max_agents=1,
        metrics_max_learning_keys=1,
    )
    server = start_metrics_server(settings)
    assert server is not None
    try:
        status, text = http_get("127.0.0.1", port)
    finally:
        server.close()
    samples = parse(text)
    assert status == 200 and agents_in(samples) == {"a"}
    assert samples[("adaptive_metrics_agents_omitted", ())] == 1
    assert series(samples, "adaptive_agent_stable_prefix_blocks") == {
        (("agent_id", "a"), ("learning_key", "a::0-first")): 1
    }
    assert samples[("adaptive_metrics_learning_keys_omitted", ())] == 1
