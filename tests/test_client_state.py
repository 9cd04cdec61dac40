"""Reading the learned state back (`adaptive_worker_client`: StateReader, load_plan, load_hints,
load_stability), against the real Redis, one private key prefix per test.

State is put in place either by replaying the captured runs through this
project's own ingest + learn, or by writing the captured values as they are.
Every expected value comes from the fixtures: the captured plan, stability
and trie, the hints the real runtime injected (`observed_llm_requests.json`)
and NAT's lookup answers (`nat-trie/lookups_*.out.json`). `_runtime_hints`
below is the runtime's `build_agent_hints` (crates/adaptive,
adaptive_hints_intercept.rs) written out again here, so that no expectation
is produced by the code under test. The TTL is driven by an injected clock;
nothing sleeps to wait for it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import adaptive_worker_client.api as client_module
import adaptive_worker_client.config as client_config
from adaptive_worker_client import StateReader, StateUnavailable
from adaptive_worker_client.errors import InvalidRecord
from adaptive_worker_client.wire import ExecutionPlan, StabilityAnalysisResult, parse_wire
from storage.store import Store
from tasks.learning import catch_up, ingest
from tests.conftest import REDIS_URL
from tests.goldens import CAPTURES, FIXTURES, Capture, assert_json_close, load_capture
from worker.engine.fold import EngineConfig
from worker.settings import Settings, load_settings

pytestmark = pytest.mark.redis

DEAD = "redis://127.0.0.1:1/0"  # nothing listens on port 1
NAT = FIXTURES / "nat-trie"
TTL = 5.0


# ------------------------------------------------------------------ helpers


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Commands:
    """Every command a redis-py client sends, recorded by wrapping execute_command."""

    def __init__(self, client: redis.Redis, delay_s: float = 0.0) -> None:
        self.client = client
        self.sent: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()
        inner = client.execute_command

        def execute_command(*args: Any, **options: Any) -> Any:
            with self._lock:
                self.sent.append(args)
            if delay_s:
                time.sleep(delay_s)  # widens the race window; never asserted on
            return inner(*args, **options)

        client.execute_command = execute_command  # type: ignore[method-assign]

    def take(self) -> list[tuple[Any, ...]]:
        """The commands sent since the last take."""
        with self._lock:
            sent, self.sent = self.sent, []
        return sent


@pytest.fixture
def reader_redis() -> Iterator[redis.Redis]:
    """A client of the reader's own (the shared session client is never wrapped)."""
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    client.close()


def settings(prefix: str, url: str = REDIS_URL, **over: Any) -> Settings:
    return load_settings(_env_file=None, redis_url=url, key_prefix=prefix, **over)


def _round(x: float) -> int:
    """Rust `f64::round` then `as u32` for the non-negative values used here."""
    return max(0, math.floor(x + 0.5))


def _runtime_hints(pred: dict[str, Any], agent: str, depth: int, call_index: int) -> dict[str, Any]:
    """`build_agent_hints` with a prediction, sensitivity scale 5."""
    ls = pred["latency_sensitivity"]
    level = 1 if ls is None else ls
    return {
        "osl": _round(pred["output_tokens"]["p90"]),
        "iat": _round(pred["interarrival_ms"]["mean"]),
        "priority": max(5 - level, 0),
        "latency_sensitivity": float(level),
        "prefix_id": f"{agent}-d{depth}",
        "total_requests": _round(pred["remaining_calls"]["mean"]) + call_index,
    }


def _learn(store: Store, runs: list[str]) -> None:
    """This project's own pipeline: ingest, then learn until caught up."""
    ingest(store, runs, 8 << 20)
    summary = catch_up(
        store,
        json.loads(runs[0])["agent_id"],
        max_runs=100,
        config=EngineConfig(),
        clock=lambda: "2026-01-01T00:00:00.000000000+00:00",
    )
    assert summary.caught_up and summary.learned == len(runs)


def _raw(cap: Capture, kind: str) -> str:
    """The captured value of `kind` under the plain agent id, exactly as stored."""
    key = f"{cap.prefix}{kind}:{cap.agent_id}"
    (raw,) = [e.raw for e in cap.keys if e.key == key]
    assert isinstance(raw, str)
    return raw


def _write_captured(store: Store, cap: Capture) -> None:
    agent = cap.agent_id
    store.client.set(store.keys.plan(agent), _raw(cap, "plan"))
    store.client.set(store.keys.trie(agent), _raw(cap, "trie"))
    store.client.set(store.keys.acg_stability(agent), _raw(cap, "acg_stability"))


def _observed_hints(capture: str) -> list[dict[str, Any] | None]:
    """The hints the runtime put into each request, in request order."""
    requests = json.loads((FIXTURES / capture / "observed_llm_requests.json").read_text())
    hints = []
    for request in requests:
        body = (request["body"].get("nvext") or {}).get("agent_hints")
        assert body == request["headers"].get("x-nemo-relay-adaptive-agent-hints")
        hints.append(body)
    return hints


# ------------------------------------------------------ the captured state


@pytest.mark.parametrize("capture", CAPTURES)
def test_replayed_state_reads_back_as_captured(
    capture: str, real_store: Store, prefix: str, reader_redis: redis.Redis
) -> None:
    """The 4 captured runs through ingest + learn; what an agent loads is the
    captured plan, stability and (via the captured trie) hints."""
    cap = load_capture(capture)
    agent = cap.agent_id
    _learn(real_store, cap.runs)
    reader = StateReader(settings(prefix), redis_client=reader_redis, clock=Clock())

    plan = reader.load_plan(agent)
    assert isinstance(plan, ExecutionPlan)
    assert plan == parse_wire(ExecutionPlan, _raw(cap, "plan"))
    assert_json_close(plan.to_wire(), cap.value("plan"), rel=0.0)

    stability = reader.load_stability(agent)
    assert isinstance(stability, StabilityAnalysisResult)
    assert_json_close(stability.to_wire(), cap.value("acg_stability"))

    # Root, call index 1: the captured trie's root prediction for index 1.
    root = cap.value("trie")["root"]
    first = root["predictions_by_call_index"]["1"]
    assert reader.load_hints(agent) == _runtime_hints(first, agent, 0, 1)
    assert reader.load_hints(agent, (), 1) == reader.load_hints(agent)
    if capture == "relay-openai":
        # p90 61.0, interarrival mean 187.25, remaining mean 1.5 (-> 2), level 5
        assert reader.load_hints(agent, (), 1) == {
            "osl": 61,
            "iat": 187,
            "priority": 0,
            "latency_sensitivity": 5.0,
            "prefix_id": "cap-agent-d0",
            "total_requests": 3,
        }
    assert reader.stats()["errors"] == 0 and reader.stats()["invalid"] == 0


@pytest.mark.parametrize("capture", CAPTURES)
def test_hints_are_what_the_runtime_injected(
    capture: str, real_store: Store, prefix: str, reader_redis: redis.Redis
) -> None:
    """Replays the capture as it happened: before each run, the hints for each
    of its LLM requests are loaded from what the workers learned so far and
    compared with what the runtime injected into that request.

    The runtime's intercept passes its scope stack as the path (one element:
    prefix_id `cap-agent-d1`; the scope's name is not in the capture and is
    not a trie child, so the walk stays at the root) and its per-process
    request counter (1, 2, ... across runs) as the call index. Its first run
    had no trie yet and carried no hints: load_hints gives None then.
    """
    cap = load_capture(capture)
    agent = cap.agent_id
    observed = _observed_hints(capture)
    clock = Clock()
    commands = Commands(reader_redis)
    reader = StateReader(settings(prefix), ttl_s=TTL, redis_client=reader_redis, clock=clock)
    trie_key = real_store.keys.trie(agent)

    counter = 0
    for raw_run in cap.runs:
        llm_calls = [c for c in json.loads(raw_run)["calls"] if c["kind"] == "llm"]
        for _ in llm_calls:
            counter += 1
            expected = observed[counter - 1]
            assert reader.load_hints(agent, ("agent-scope",), counter) == expected
            # The empty path lands on the same root node; only the depth differs.
            at_root = reader.load_hints(agent, (), counter)
            if expected is None:
                assert at_root is None
            else:
                assert at_root == {**expected, "prefix_id": f"{agent}-d0"}
        # One GET of the trie for the whole run: the rest came from memory.
        assert commands.take() == [("GET", trie_key)]
        _learn(real_store, [raw_run])
        clock.advance(TTL)  # the workers' new trie becomes visible
    assert counter == len(observed)
    assert observed[0] is None and observed[-1] is not None


def test_deeper_paths_on_the_captured_trie(
    real_store: Store, prefix: str, reader_redis: redis.Redis
) -> None:
    """Captured values written as they are; the walk stops where the path
    leaves the trie and keeps the deepest prediction found."""
    cap = load_capture("relay-openai")
    agent = cap.agent_id
    _write_captured(real_store, cap)
    reader = StateReader(settings(prefix), redis_client=reader_redis, clock=Clock())
    root = cap.value("trie")["root"]
    (child_name,) = root["children"]
    child = root["children"][child_name]

    def expect(pred: dict[str, Any], path: tuple[str, ...], index: int) -> dict[str, Any]:
        return _runtime_hints(pred, agent, len(path), index)

    for path, index, pred in [
        ((child_name,), 2, child["predictions_by_call_index"]["2"]),
        # unknown index at the deepest node: its any-index prediction
        ((child_name,), 9, child["predictions_any_index"]),
        # the path goes on below the trie: the deepest node that exists
        ((child_name, "deeper", "still"), 1, child["predictions_by_call_index"]["1"]),
        # the first name is not a child: the root, exact index
        (("elsewhere", child_name), 3, root["predictions_by_call_index"]["3"]),
        # the root, unknown index
        ((), 7, root["predictions_any_index"]),
    ]:
        assert reader.load_hints(agent, path, index) == expect(pred, path, index), path
    assert reader.load_plan(agent) == parse_wire(ExecutionPlan, _raw(cap, "plan"))
    assert reader.load_stability(agent) == parse_wire(
        StabilityAnalysisResult, _raw(cap, "acg_stability")
    )


@pytest.mark.parametrize("mode", ["flat", "agent", "agent-call"])
def test_lookups_match_the_nat_lookup(
    mode: str, real_store: Store, prefix: str, reader_redis: redis.Redis
) -> None:
    """NAT's tries (paths `[call]`, `["root", agent]`, `[agent, call]`) written
    as the agent's trie; each of NAT's lookup queries gives the hints of the
    prediction NAT's own lookup returned (exact index, else any-index, deepest
    node on the path)."""
    agent = "research_agent"
    real_store.client.set(real_store.keys.trie(agent), (NAT / f"trie_{mode}.json").read_text())
    queries = json.loads((NAT / f"lookups_{mode}.out.json").read_text())
    commands = Commands(reader_redis)
    reader = StateReader(settings(prefix), redis_client=reader_redis, clock=Clock())
    assert len(queries) == 7
    for q in queries:
        path, index = q["query"]["path"], q["query"]["call_index"]
        assert q["prediction"] is not None
        expected = _runtime_hints(q["prediction"], agent, len(path), index)
        assert reader.load_hints(agent, path, index) == expected, q["query"]
    assert len(commands.take()) == 1


# ------------------------------------------------------------- the cache


def test_one_read_per_key_per_ttl(
    real_store: Store, prefix: str, reader_redis: redis.Redis
) -> None:
    cap = load_capture("relay-openai")
    agent = cap.agent_id
    _write_captured(real_store, cap)
    clock = Clock()
    commands = Commands(reader_redis)
    reader = StateReader(settings(prefix), ttl_s=TTL, redis_client=reader_redis, clock=clock)
    plan_key, trie_key = real_store.keys.plan(agent), real_store.keys.trie(agent)

    plan = reader.load_plan(agent)
    assert plan is not None
    hints = [reader.load_hints(agent, ("openai",), i) for i in (1, 2, 3, 4)]
    assert commands.take() == [("GET", plan_key), ("GET", trie_key)]

    # Within the TTL: no command at all, the parsed model itself is served.
    clock.advance(TTL - 0.25)
    assert reader.load_plan(agent) is plan
    assert [reader.load_hints(agent, ("openai",), i) for i in (1, 2, 3, 4)] == hints
    assert commands.take() == []

    # A newer value in Redis is not seen before the TTL runs out...
    newer = cap.value("plan")
    newer["parallel_groups"] = newer["parallel_groups"][:1]
    real_store.client.set(plan_key, json.dumps(newer))
    assert reader.load_plan(agent) is plan
    assert commands.take() == []

    # ...and is read (once) when it has.
    clock.advance(0.25)  # exactly one TTL after the read
    fresh = reader.load_plan(agent)
    assert fresh is not None and fresh is not plan
    assert fresh.to_wire() == newer
    assert reader.load_plan(agent) is fresh
    assert commands.take() == [("GET", plan_key)]

    stats = reader.stats()
    assert stats["reads"] == 3 and stats["errors"] == 0 and stats["redis_up"] is True
    assert stats["hits"] == 3 + 4 + 3  # hints after the read, hints, plan


def test_ttl_zero_reads_every_time(
    real_store: Store, prefix: str, reader_redis: redis.Redis
) -> None:
    cap = load_capture("relay-openai")
    _write_captured(real_store, cap)
    commands = Commands(reader_redis)
    reader = StateReader(settings(prefix), ttl_s=0, redis_client=reader_redis, clock=Clock())
    for _ in range(3):
        assert reader.load_plan(cap.agent_id) is not None
    assert len(commands.take()) == 3


def test_ttl_comes_from_the_settings(prefix: str) -> None:
    assert StateReader(settings(prefix)).ttl_s == 5.0
    assert StateReader(settings(prefix, client_state_ttl_s=0.25)).ttl_s == 0.25
    with pytest.raises(ValueError, match="ttl_s"):
        StateReader(settings(prefix), ttl_s=-1)


def test_missing_keys_give_none_and_are_cached_too(
    real_store: Store, prefix: str, reader_redis: redis.Redis
) -> None:
    cap = load_capture("relay-openai")
    agent = cap.agent_id
    clock = Clock()
    commands = Commands(reader_redis)
    reader = StateReader(settings(prefix), ttl_s=TTL, redis_client=reader_redis, clock=clock)
    for _ in range(2):
        assert reader.load_plan(agent) is None
        assert reader.load_hints(agent, ("openai",), 2) is None
        assert reader.load_stability(agent) is None
    assert len(commands.take()) == 3  # one GET per key, the second round from memory

    _write_captured(real_store, cap)
    clock.advance(TTL)
    assert reader.load_plan(agent) is not None
    assert reader.load_hints(agent, ("openai",), 2) is not None
    assert reader.load_stability(agent) is not None
    assert reader.stats()["errors"] == 0


def test_threads_share_one_read(real_store: Store, prefix: str, reader_redis: redis.Redis) -> None:
    """Many threads asking at once for a key never read: one GET, one answer."""
    cap = load_capture("relay-openai")
    _write_captured(real_store, cap)
    commands = Commands(reader_redis, delay_s=0.05)
    reader = StateReader(settings(prefix), redis_client=reader_redis, clock=Clock())
    barrier = threading.Barrier(16)
    results: list[Any] = []

    def ask() -> None:
        barrier.wait()
        results.append(reader.load_hints(cap.agent_id, ("openai",), 2))

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16 and results[0] is not None
    assert all(r == results[0] for r in results)
    assert commands.take() == [("GET", real_store.keys.trie(cap.agent_id))]


# --------------------------------------------------------------- failures


def test_dead_redis_gives_none_and_counts_errors(prefix: str) -> None:
    """No Redis at all: None for everything, no exception, one error per TTL."""
    clock = Clock()
    reader = StateReader(settings(prefix, url=DEAD), ttl_s=TTL, clock=clock)
    assert reader.load_plan("cap-agent") is None
    assert reader.load_hints("cap-agent", ("openai",), 1) is None
    assert reader.load_stability("cap-agent") is None
    stats = reader.stats()
    assert stats["errors"] == 1 and stats["redis_up"] is False
    assert stats["skipped"] == 2  # within the TTL after a failure, Redis is not tried
    assert "ConnectionError" in str(stats["last_error"])

    clock.advance(TTL)
    assert reader.load_plan("cap-agent") is None
    assert reader.stats()["errors"] == 2


def test_outage_serves_the_last_good_values(
    real_store: Store, prefix: str, reader_redis: redis.Redis
) -> None:
    cap = load_capture("relay-openai")
    agent = cap.agent_id
    _write_captured(real_store, cap)
    clock = Clock()
    reader = StateReader(settings(prefix), ttl_s=TTL, redis_client=reader_redis, clock=clock)
    plan = reader.load_plan(agent)
    hints = reader.load_hints(agent, ("openai",), 2)
    assert plan is not None and hints is not None

    # The client now points at a dead port.
    pool = reader_redis.connection_pool
    live_port = pool.connection_kwargs["port"]
    pool.connection_kwargs["port"] = 1
    pool.reset()  # drop the pooled connections: new ones go to the dead port
    clock.advance(TTL)
    assert reader.load_plan(agent) is plan
    assert reader.load_hints(agent, ("openai",), 2) == hints
    assert reader.load_stability(agent) is None  # never read: nothing to fall back on
    stats = reader.stats()
    assert stats["errors"] == 1 and stats["skipped"] == 2 and stats["redis_up"] is False

    # Redis back: read again after the TTL.
    pool.connection_kwargs["port"] = live_port
    pool.reset()
    clock.advance(TTL)
    assert reader.load_stability(agent) is not None
    assert reader.stats()["redis_up"] is True


def test_strict_raises(real_store: Store, prefix: str) -> None:
    clock = Clock()
    reader = StateReader(settings(prefix, url=DEAD), ttl_s=TTL, strict=True, clock=clock)
    with pytest.raises(StateUnavailable) as info:
        reader.load_plan("cap-agent")
    assert isinstance(info.value.__cause__, redis.ConnectionError)
    # Nothing cached, nothing skipped: every call tries and raises.
    with pytest.raises(StateUnavailable):
        reader.load_plan("cap-agent")
    with pytest.raises(StateUnavailable):
        reader.load_hints("cap-agent", ("openai",), 1)
    with pytest.raises(StateUnavailable):
        reader.load_stability("cap-agent")
    assert reader.stats()["errors"] == 4

    # A value that does not parse raises too.
    real_store.client.set(real_store.keys.plan("cap-agent"), '{"agent_id": "cap-agent"}')
    strict = StateReader(settings(prefix), strict=True, clock=clock)
    with pytest.raises(InvalidRecord):
        strict.load_plan("cap-agent")


@pytest.mark.parametrize(
    "bad",
    [
        "not json",
        '{"agent_id": "cap-agent"}',  # required fields missing
        '{"version": "1.0"}',
        "list",  # a key of the wrong Redis type
    ],
)
def test_unusable_values_are_treated_as_absent(
    bad: str, real_store: Store, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """As the runtime drops a key it cannot parse (SPEC 6c): None, counted, logged."""
    caplog.set_level(logging.WARNING, logger="adaptive_worker_client.reader")
    agent = "cap-agent"
    for key in (real_store.keys.plan(agent), real_store.keys.trie(agent)):
        if bad == "list":
            real_store.client.rpush(key, "x")
        else:
            real_store.client.set(key, bad)
    reader = StateReader(settings(prefix), clock=Clock())
    assert reader.load_plan(agent) is None
    assert reader.load_hints(agent) is None
    assert reader.load_hints(agent) is None  # cached: not parsed again
    stats = reader.stats()
    assert stats["invalid"] == 2 and stats["errors"] == 0 and stats["reads"] == 2
    assert "cannot be used" in caplog.text


def test_bad_arguments_are_refused(prefix: str) -> None:
    reader = StateReader(settings(prefix, url=DEAD))
    with pytest.raises(TypeError):
        reader.load_hints("a", "openai")  # a string is not a path
    with pytest.raises(ValueError):
        reader.load_hints("a", (), 0)
    assert reader.stats()["reads"] == 0


# ------------------------------------------------------- module functions


def test_module_functions_use_one_lazy_reader(
    real_store: Store, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cap = load_capture("relay-openai")
    agent = cap.agent_id
    _write_captured(real_store, cap)
    monkeypatch.setattr(client_config, "get_settings", lambda: settings(prefix))
    monkeypatch.setattr(client_module, "_default_reader", None)

    plan = client_module.load_plan(agent)
    assert plan == parse_wire(ExecutionPlan, _raw(cap, "plan"))
    root = cap.value("trie")["root"]
    assert client_module.load_hints(agent) == _runtime_hints(
        root["predictions_by_call_index"]["1"], agent, 0, 1
    )
    assert client_module.load_stability(agent) == parse_wire(
        StabilityAnalysisResult, _raw(cap, "acg_stability")
    )
    reader = client_module.default_reader()
    assert reader is client_module.default_reader()
    assert client_module.load_plan(agent) is plan  # same reader, same cached model
    assert reader.stats()["reads"] == 3
