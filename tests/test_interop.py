"""Interop with the real NeMo Relay runtime (nemo-relay 0.10.4), both directions.

The agents run in subprocesses under `.venv-relay` (built on demand by `make
relay-venv`: nemo-relay plus this project) with in-process fake providers and
tools, through NeMo Relay's managed LLM and tool pipeline; our workers are
real `celery worker` processes (tests/pipeline.py) on the real Redis.

- agent -> us: the runs a runtime with no learners stores are found by the
  beat's `discover`, learned once, and give the state `adaptive-worker
  replay` gives for the same records; the subscriber exporter sends the same
  records (bar the id) through our client.
- us -> agent: a fresh runtime loads our plan and stability (cache
  breakpoints, cache facts, tool gating) and sends our hints.
- a long-lived agent picks up newer state through `StateWatcher`.
- mixed mode (the runtime's learners on too) is detected and rebuilt.
- whatever our writers produce, a real runtime parses (property test).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import fakeredis
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from adaptive_worker_client.relay import (
    SEED_FAILURE_EVENTS,
    RunRecordExporter,
    runtime_timestamp,
    uuid7,
)
from storage.store import Store
from tasks.learning import catch_up, ingest
from tasks.maintenance import owned_learning_keys
from tasks.mixed import check_foreign_writes, recover
from tests.conftest import REDIS_URL
from tests.engine.test_fold_properties import AGENT as PROP_AGENT
from tests.engine.test_fold_properties import runs as run_streams
from tests.pipeline import celery_workers, wait_until, worker_env
from worker.cli import app as cli
from worker.engine.fold import EngineConfig, without_volatile
from worker.settings import load_settings

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "interop"
RELAY_PYTHON = ROOT / ".venv-relay" / "bin" / "python"
CONFIG = EngineConfig()
SURFACE = "anthropic"


# ------------------------------------------------------------------ harness


@pytest.fixture(scope="session")
def relay_python() -> Path:
    """`.venv-relay/bin/python`, built by `make relay-venv` when missing or stale."""
    proc = subprocess.run(
        ["make", "-s", "relay-venv"], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        message = f"`make relay-venv` failed:\n{(proc.stdout + proc.stderr)[-2000:]}"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI reaches PyPI: a failure here is real
        pytest.skip(f"no nemo-relay venv (is PyPI reachable?): {message}")
    return RELAY_PYTHON


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTIVE_")}
    env["NEMO_RELAY_LOG"] = "warn"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def relay(python: Path, script: str, *args: str, timeout: float = 120) -> dict[str, Any]:
    """Run an interop script; its last stdout line is JSON."""
    proc = subprocess.run(
        [str(python), str(SCRIPTS / script), *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for event in SEED_FAILURE_EVENTS:
        assert event not in proc.stderr, f"{script}: the runtime dropped a value:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def agent_state(client: redis.Redis, prefix: str, agent: str) -> dict[str, Any]:
    """Learned state of one agent under `prefix` (volatile fields blanked), as
    `tests.pipeline.dump_state` shows it, read key by key (no full SCAN)."""
    store = Store(client, prefix)
    k = store.keys
    keys = [k.plan(agent), k.trie(agent), k.accumulators(agent)]
    for key in [agent, *owned_learning_keys(store, agent)]:
        keys += [k.acg_observations(key), k.acg_stability(key)]
    out: dict[str, Any] = {}
    for key, raw in store.get_many(keys).items():
        if raw is None:
            continue
        out[key[len(prefix) :]] = without_volatile(k.runtime_kind(key) or "", json.loads(raw))
    return out


def records(store: Store, agent: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for _, raw in store.read_runs(agent, 0, 100_000) if raw]


def replay_state(
    client: redis.Redis, runs: list[dict[str, Any]], agent: str, tmp_path: Path
) -> dict[str, Any]:
    """The state `adaptive-worker replay` learns from `runs`, in a scratch prefix."""
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    path = tmp_path / f"replay-{agent}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in runs))
    try:
        result = CliRunner().invoke(
            cli, ["replay", str(path), "--redis-url", REDIS_URL, "--prefix", prefix, "--json"]
        )
        assert result.exit_code == 0, result.output
        return agent_state(client, prefix, agent)
    finally:
        Store(client, prefix).delete_prefix()


def root_count(store: Store, agent: str) -> int:
    """Runs counted at the trie root for call index 1 (each run has one such call)."""
    acc = json.loads(store.client.get(store.keys.accumulators(agent)))
    return int(acc["nodes"][""]["remaining_calls"]["1"]["count"])


@dataclass
class Deployment:
    store: Store  # prefix the agents and the workers (with beat) share
    export: Store  # prefix whose workers receive the exporter's runs
    python: Path
    tmp: Path

    def args(self, agent: str, *extra: str, prefix: str | None = None) -> list[str]:
        prefix = prefix or self.store.keys.prefix
        return ["--redis-url", REDIS_URL, "--prefix", prefix, "--agent", agent, *extra]

    def learned(self, agent: str, runs: int, store: Store | None = None) -> None:
        store = store or self.store

        def done() -> bool:
            c = store.cursor(agent)
            return c.index_length == runs and c.learned == runs

        wait_until(done, 60, f"the workers to learn {runs} runs of {agent}")


@pytest.fixture(scope="module")
def deployment(
    relay_python: Path, real_redis: redis.Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """Workers on one prefix with beat (`discover` every second), and plain workers
    on a second prefix for the exporter's runs."""
    tmp = tmp_path_factory.mktemp("interop")
    base = f"test:{uuid.uuid4().hex[:12]}:"
    main, export = Store(real_redis, base), Store(real_redis, base.rstrip(":") + "-export:")
    off = {"rebuild_interval_s": 0, "retention_interval_s": 0, "metrics_port": 0}
    try:
        with (
            celery_workers(worker_env(base, REDIS_URL, discover_interval_s=1, **off), tmp) as w1,
            celery_workers(worker_env(export.keys.prefix, REDIS_URL, **off), tmp) as w2,
        ):
            w1.start("main", concurrency=2, extra=("-B", "-s", str(tmp / "beat-schedule")))
            w2.start("export", concurrency=1)
            yield Deployment(main, export, relay_python, tmp)
    finally:
        main.delete_prefix()
        export.delete_prefix()


# --------------------------------------------------------------- agent -> us


@pytest.fixture(scope="module")
def learned(deployment: Deployment) -> str:
    """4 runs of a NeMo Relay agent (recommended configuration, plus the
    exporter to the second prefix), learned by the workers."""
    d = deployment
    agent = "relay-agent"
    out = relay(
        d.python,
        "agent_runs.py",
        *d.args(
            agent, "--runs", "4", "--surface", SURFACE, "--export-prefix", d.export.keys.prefix
        ),
    )
    assert out["exported"] == 4 and out["exporter_errors"] == 0 and out["flushed"]
    d.learned(agent, 4)
    d.learned(agent, 4, d.export)
    return agent


def test_runtime_runs_are_learned_once_and_equal_replay(
    deployment: Deployment, learned: str, real_redis: redis.Redis
) -> None:
    d, agent = deployment, learned
    stored = records(d.store, agent)
    assert len(stored) == 4
    assert all(r["calls"][0].get("annotated_request") for r in stored)
    assert root_count(d.store, agent) == 4  # each run learned exactly once
    assert d.store.dead_letter_count() == 0
    ours = agent_state(real_redis, d.store.keys.prefix, agent)
    assert {k.split(":", 1)[0] for k in ours} == {
        "plan",
        "trie",
        "accumulators",
        "acg_observations",
        "acg_stability",
    }
    assert ours == replay_state(real_redis, stored, agent, d.tmp)


def test_subscriber_exporter_sends_the_runtime_records(
    deployment: Deployment, learned: str, real_redis: redis.Redis
) -> None:
    """The exporter's records equal the runtime's bar the run id; learned the same."""
    d, agent = deployment, learned
    runtime, exported = records(d.store, agent), records(d.export, agent)
    assert [{**r, "id": None} for r in exported] == [{**r, "id": None} for r in runtime]
    assert all(uuid.UUID(r["id"]).version == 7 for r in exported)
    ids = {e["id"]: r["id"] for e, r in zip(exported, runtime, strict=True)}
    theirs = agent_state(real_redis, d.export.keys.prefix, agent)
    plan = theirs[f"plan:{agent}"]["metadata_template"]
    plan["run_id"] = ids[plan["run_id"]]  # the plan names the last run that added cohorts
    assert theirs == agent_state(real_redis, d.store.keys.prefix, agent)
    assert root_count(d.export, agent) == 4


# --------------------------------------------------------------- us -> agent


def test_fresh_agent_loads_our_state_and_sends_our_hints(
    deployment: Deployment, learned: str
) -> None:
    d, agent = deployment, learned
    stability = d.store.get_stability(agent)
    assert stability is not None and stability.stable_prefix_length > 0
    assert stability.total_observations >= 3
    plan = d.store.get_plan(agent)
    assert plan is not None and plan.parallel_groups

    loaded = relay(d.python, "agent_load.py", *d.args(agent, "--runs", "2"))
    control = relay(
        d.python,
        "agent_load.py",
        *d.args(agent, "--runs", "2", "--no-hints", prefix=f"test:{uuid.uuid4().hex[:12]}:"),
    )

    # Prompt caching planned from our stability: the facts report our stable
    # prefix, and every Anthropic request carries a cache breakpoint.
    assert loaded["facts"]["stable_prefix_length"] == stability.stable_prefix_length
    assert "acg_stability_unavailable" in control["facts"]["missing_facts"]
    assert all(r["cache_control"] for r in loaded["requests"])
    assert not any(r["cache_control"] for r in control["requests"])
    # Schedule mode gates the tools of our plan's parallel groups.
    assert all(n > 0 for n in loaded["serialized"]), loaded["serialized"]
    assert control["serialized"] == [0, 0]

    # Our hints, in the header and in nvext.agent_hints, equal load_hints.
    from adaptive_worker_client import StateReader

    reader = StateReader(
        load_settings(_env_file=None, redis_url=REDIS_URL, key_prefix=d.store.keys.prefix),
        ttl_s=0.0,
    )
    assert loaded["hints"] == {"injected": 4, "without": 0, "errors": 0}
    for request in loaded["requests"]:
        expected = reader.load_hints(agent, (SURFACE,), request["position"])
        assert expected is not None
        assert request["header"] == expected
        assert request["body"] == expected
    assert all(r["header"] is None and r["body"] is None for r in control["requests"])


def test_long_lived_agent_picks_up_newer_state(deployment: Deployment) -> None:
    """StateWatcher replaces the runtime when our published version brings new values."""
    d, agent = deployment, "watch-agent"
    proc = subprocess.Popen(
        [str(d.python), str(SCRIPTS / "agent_watch.py"), *d.args(agent)],
        cwd=ROOT,
        env=_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None

    def ask(command: str | None = None) -> dict[str, Any]:
        if command is not None:
            proc.stdin.write(command + "\n")
            proc.stdin.flush()
        line = proc.stdout.readline()
        assert line, f"agent_watch.py died:\n{proc.stderr.read() if proc.stderr else ''}"
        return json.loads(line)

    try:
        assert ask() == {"ready": True, "loaded": 0}
        assert ask("refresh")["swapped"] is False  # nothing published yet
        for _ in range(3):
            before = ask("run")
            assert before["serialized"] == 0 and not any(before["cache_control"])
        d.learned(agent, 3)
        version = d.store.cursor(agent).version
        stability = d.store.get_stability(agent)
        assert stability is not None and stability.total_observations >= 3
        swap = ask("refresh")
        assert swap["swapped"] is True and swap["loaded"] == version and swap["swaps"] == 2
        assert ask("refresh")["swapped"] is False  # same version: one HGET, no swap
        after = ask("run")
        assert after["serialized"] > 0
        assert all(after["cache_control"])
        assert after["facts"]["stable_prefix_length"] == stability.stable_prefix_length
        assert ask("quit")["bye"] is True
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    d.learned(agent, 4)  # the runtime of the new registration stored its run too


# --------------------------------------------------------------------- mixed


def test_mixed_mode_is_detected_and_rebuilt(
    deployment: Deployment, real_redis: redis.Redis
) -> None:
    """The runtime's own learners and our workers on one agent: every run is
    learned twice. We detect it and a rebuild restores our state; the next
    run the runtime learns itself is detected again."""
    d, agent = deployment, "mixed-agent"
    learners = "latency_sensitivity,tool_parallelism,acg"
    relay(d.python, "agent_runs.py", *d.args(agent, "--runs", "4", "--learners", learners))
    d.learned(agent, 4)

    assert root_count(d.store, agent) > 4  # counted by the runtime and by us
    report = check_foreign_writes(d.store, agent, config=CONFIG)
    assert report.verified and report.full
    assert f"accumulators:{agent}" in report.foreign
    assert f"acg_stability:{agent}" in report.foreign

    recover(d.store, agent, config=CONFIG)
    assert root_count(d.store, agent) == 4
    clean = check_foreign_writes(d.store, agent, config=CONFIG)
    assert clean.clean and clean.full
    again = check_foreign_writes(d.store, agent, config=CONFIG)
    assert again.clean and not again.full  # remembered digests: no re-fold
    stored = records(d.store, agent)
    assert agent_state(real_redis, d.store.keys.prefix, agent) == replay_state(
        real_redis, stored, agent, d.tmp
    )

    relay(d.python, "agent_runs.py", *d.args(agent, "--runs", "1", "--learners", learners))
    d.learned(agent, 5)
    assert check_foreign_writes(d.store, agent, config=CONFIG).foreign


def test_foreign_write_at_unchanged_version_is_named_without_a_refold(prefix: str) -> None:
    store = Store(fakeredis.FakeRedis(decode_responses=True), prefix)
    from bench.workload import synthetic_runs

    ingest(store, [json.dumps(r) for r in synthetic_runs(6, agent_id="a")], 1 << 20)
    catch_up(store, "a", max_runs=100, config=CONFIG)
    assert check_foreign_writes(store, "a", config=CONFIG).clean
    plan = json.loads(store.client.get(store.keys.plan("a")))
    plan["parallel_groups"] = plan["parallel_groups"][:1]
    store.client.set(store.keys.plan("a"), json.dumps(plan))
    report = check_foreign_writes(store, "a", config=CONFIG)
    assert report.foreign == ("plan:a",) and not report.full
    recover(store, "a", config=CONFIG)
    assert check_foreign_writes(store, "a", config=CONFIG).clean


# ----------------------------------------------------------------- bad state


def test_the_runtime_parses_everything_our_writers_write(
    relay_python: Path, real_redis: redis.Redis, tmp_path: Path
) -> None:
    """Random run streams through our ingest + learn; a real runtime registers on
    each result (plan + stability, and observations alone) and must not drop
    any value. A deliberately broken value shows the check can fail."""
    base = f"test:{uuid.uuid4().hex[:12]}:"
    cases: list[dict[str, Any]] = []
    kinds = {"plan": 0, "stability": 0, "observations": 0}

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(stream=st.lists(run_streams(), min_size=1, max_size=10))
    def write(stream: list[dict[str, Any]]) -> None:
        prefix = f"{base}{len(cases)}:"
        store = Store(real_redis, prefix)
        result = ingest(store, [json.dumps(r) for r in stream], 1 << 24)
        assert not result.rejected
        catch_up(store, PROP_AGENT, max_runs=500, config=CONFIG)
        keys = store.keys
        has_plan = store.client.exists(keys.plan(PROP_AGENT))
        has_stability = store.client.exists(keys.acg_stability(PROP_AGENT))
        kinds["plan"] += has_plan
        kinds["stability"] += has_stability
        cases.append({"prefix": prefix, "agent": PROP_AGENT, "redis_url": REDIS_URL})
        if has_stability:  # the runtime reads observations only without stability
            alone = f"{prefix}obs:"
            value = store.client.get(keys.acg_observations(PROP_AGENT))
            real_redis.set(f"{alone}acg_observations:{PROP_AGENT}", value)
            kinds["observations"] += 1
            cases.append({"prefix": alone, "agent": PROP_AGENT, "redis_url": REDIS_URL})

    try:
        write()
        assert kinds["plan"] and kinds["stability"] and kinds["observations"], kinds
        broken = f"{base}broken:"
        plan = {"agent_id": PROP_AGENT, "parallel_groups": [], "metadata_template": {}}
        real_redis.set(f"{broken}plan:{PROP_AGENT}", json.dumps(plan))
        cases.append({"prefix": broken, "agent": PROP_AGENT, "redis_url": REDIS_URL})
        spec = tmp_path / "cases.json"
        spec.write_text(json.dumps(cases))
        proc = subprocess.run(
            [str(relay_python), str(SCRIPTS / "load_state.py"), str(spec)],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        per_case = _warnings_per_case(proc.stderr, len(cases))
        bad = {cases[n]["prefix"]: lines for n, lines in enumerate(per_case[:-1]) if lines}
        assert not bad, f"the runtime dropped values our writers wrote: {bad}"
        assert any("adaptive_hot_cache_seed_failed" in line for line in per_case[-1])
    finally:
        for key in real_redis.scan_iter(base.replace("*", r"\*") + "*", count=1000):
            real_redis.delete(key)


def _warnings_per_case(stderr: str, n: int) -> list[list[str]]:
    per_case: list[list[str]] = [[] for _ in range(n)]
    current = None
    for line in stderr.splitlines():
        if line.startswith("@@case "):
            current = int(line.split()[1])
        elif line.startswith("@@end"):
            current = None
        elif current is not None and any(e in line for e in SEED_FAILURE_EVENTS):
            per_case[current].append(line)
    return per_case


# ------------------------------------------------------- exporter, no runtime


def test_runtime_timestamp_layout() -> None:
    assert runtime_timestamp("2026-11-29T22:36:19.411124754+00:00") == (
        "2026-11-29T22:36:19.411124754Z"
    )
    assert runtime_timestamp("2026-11-29T22:36:19.411124000+00:00") == (
        "2026-11-29T22:36:19.411124Z"
    )
    assert runtime_timestamp("2026-11-29T22:36:19.411000000+00:00") == "2026-11-29T22:36:19.411Z"
    assert runtime_timestamp("2026-11-29T22:36:19.000000000+00:00") == "2026-11-29T22:36:19Z"
    assert runtime_timestamp("2026-11-29T22:36:19+00:00") == "2026-11-29T22:36:19Z"


def test_uuid7_is_time_ordered() -> None:
    first = uuid7()
    time.sleep(0.002)
    second = uuid7()
    assert uuid.UUID(first).version == 7 and uuid.UUID(first).variant == uuid.RFC_4122
    assert first < second


def test_exporter_follows_the_runtime_run_rules() -> None:
    """Nested scopes belong to their run, end events close the last open call of
    the name, calls outside a run are ignored, nested agent scopes are runs."""
    out: list[dict[str, Any]] = []
    exporter = RunRecordExporter("a", out.append)
    t = iter(range(10, 60))

    def ev(cat: str, phase: str, uid: str, parent: str | None, name: str = "x", **p: Any) -> None:
        exporter(
            {
                "kind": "scope",
                "category": cat,
                "scope_category": phase,
                "uuid": uid,
                "parent_uuid": parent,
                "name": name,
                "category_profile": p or None,
                "timestamp": f"2026-01-01T00:00:{next(t)}.500000000+00:00",
            }
        )

    ev("tool", "start", "orphan", None, "t")  # outside any run: ignored
    ev("agent", "start", "A", "root")
    ev("function", "start", "F", "A")
    ev("llm", "start", "L1", "F", "m", annotated_request={"messages": []})
    resp = {"usage": {"completion_tokens": 5, "prompt_tokens": 7}, "model": "m1", "tool_calls": [1]}
    ev("llm", "end", "L1", "F", "m", annotated_response=resp)
    ev("function", "end", "F", "A")
    ev("tool", "start", "T1", "A", "t")
    ev("tool", "start", "T2", "A", "t")
    ev("tool", "end", "T1", "A", "t")  # closes the LAST open call named t
    ev("agent", "end", "A", "root")
    assert len(out) == 1 and exporter.exported == 1
    (run,) = out
    assert run["agent_id"] == "a" and run["started_at"] == "2026-01-01T00:00:11.500Z"
    llm, t1, t2 = run["calls"]
    assert list(llm) == [
        "kind",
        "name",
        "started_at",
        "ended_at",
        "output_tokens",
        "prompt_tokens",
        "model_name",
        "tool_call_count",
        "annotated_request",
        "annotated_response",
    ]
    assert (llm["output_tokens"], llm["prompt_tokens"], llm["tool_call_count"]) == (5, 7, 1)
    assert "ended_at" not in t1 and t2["ended_at"] == "2026-01-01T00:00:18.500Z"
    assert exporter.errors == 0


# --------------------------------------------- StateWatcher, runtime faked


class _FakeRuntime:
    """Stands in for AdaptiveRuntime: records register, drain wait and shutdown."""

    made: ClassVar[list[_FakeRuntime]] = []
    fail_next: ClassVar[bool] = False

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.events: list[str] = []
        _FakeRuntime.made.append(self)

    async def register(self) -> None:
        if _FakeRuntime.fail_next:
            _FakeRuntime.fail_next = False
            raise RuntimeError("register failed")
        self.events.append("register")

    def wait_for_idle(self) -> None:
        self.events.append("idle")

    async def shutdown(self) -> None:
        self.events.append("shutdown")


@pytest.fixture
def fake_relay(monkeypatch: pytest.MonkeyPatch) -> type[_FakeRuntime]:
    import types

    import adaptive_worker_client.relay._common as relay_common

    async def flush_async() -> None:
        return None

    fake = types.SimpleNamespace(
        adaptive=types.SimpleNamespace(AdaptiveRuntime=_FakeRuntime),
        subscribers=types.SimpleNamespace(flush_async=flush_async),
    )
    monkeypatch.setattr(relay_common, "_relay", lambda: fake)
    _FakeRuntime.made = []
    _FakeRuntime.fail_next = False
    return _FakeRuntime


def test_state_watcher_replaces_the_runtime_only_for_new_loadable_state(
    fake_relay: type[_FakeRuntime], prefix: str
) -> None:
    import asyncio

    from adaptive_worker_client.relay import StateWatcher
    from bench.workload import synthetic_runs

    client = fakeredis.FakeRedis(decode_responses=True)
    store = Store(client, prefix)
    s = load_settings(_env_file=None, redis_url="redis://127.0.0.1:1/0", key_prefix=prefix)
    now = [0.0]
    watcher = StateWatcher(
        "a",
        {"agent_id": "a"},
        settings=s,
        redis_client=client,
        poll_interval_s=10,
        clock=lambda: now[0],
    )

    def learn(n: int, seed: int) -> None:
        runs = [json.dumps(r) for r in synthetic_runs(n, agent_id="a", seed=seed)]
        ingest(store, runs, 1 << 20)
        catch_up(store, "a", max_runs=100, config=CONFIG)

    async def scenario() -> None:
        await watcher.start()
        assert watcher.loaded is not None and watcher.loaded.version == 0
        assert await watcher.refresh() is False
        learn(3, 1)  # writes plan and stability: version 1
        assert await watcher.maybe_refresh() is True
        first, second = fake_relay.made
        assert first.events == ["register", "idle", "shutdown"]  # drained, then replaced
        assert second.events == ["register"] and second.config == {"agent_id": "a"}
        assert watcher.loaded.version == store.cursor("a").version == 1
        learn(1, 2)
        assert await watcher.maybe_refresh() is False  # within poll_interval_s
        now[0] = 11.0
        assert await watcher.maybe_refresh() is True
        # A commit that changes only the trie moves the version, not what loads.
        c = store.cursor("a")
        store.commit("a", c.learned, c.learned, {store.keys.trie("a"): "{}"})
        assert await watcher.refresh() is False
        # A failed registration leaves no runtime and is retried by the next refresh.
        fake_relay.fail_next = True
        assert await watcher.refresh(force=True) is False
        assert watcher.runtime is None and "register failed" in (watcher.last_error or "")
        assert await watcher.refresh() is True and watcher.runtime is not None
        # Background polling swaps on its own.
        watcher.poll_interval_s = 0.01
        task = watcher.start_polling()
        swaps = watcher.swaps
        learn(1, 3)
        for _ in range(100):
            if watcher.swaps > swaps:
                break
            await asyncio.sleep(0.01)
        assert watcher.swaps == swaps + 1
        await watcher.close()
        assert task.done() and watcher.runtime is None
        assert fake_relay.made[-1].events[-1] == "shutdown"

    asyncio.run(scenario())
