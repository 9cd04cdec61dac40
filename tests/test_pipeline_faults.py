"""Faults, end to end: a broker outage, hostile input, and a flood of small messages.

Real `celery worker` processes (tests/pipeline.py) on a real Redis:

- outage: a private `redis-server` (AOF on, like the production compose
  file) is stopped for 30 s while an agent keeps submitting, then restarted
  on the same port; the client spools and replays, the workers reconnect,
  and every run is learned exactly once. The shared Redis on 6379 is never
  touched.
- bad input: malformed, mistyped, oversize and unknown-kind runs are
  dead-lettered with a reason; a pickle-serialized task message is refused
  unread; the good runs around them are all learned.
- debounce: 1,000 single-run ingest messages for one agent cause far fewer
  learn tasks than runs, and every run is learned once.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from adaptive_worker_client import RunClient
from bench.workload import synthetic_runs
from storage.store import Store
from tests.conftest import REDIS_URL
from tests.pipeline import Workers, caught_up, celery_workers, wait_until, worker_env
from worker.celery import INGEST_TASK, create_app
from worker.settings import Settings, load_settings

pytestmark = pytest.mark.slow

# Fast redelivery and short markers, so recovery after a fault takes seconds:
# a message unacked for 10 s is restored (checked every second), tasks stay
# well inside that, and a pending-learn marker whose learn was lost expires
# after 10 s instead of 2 min.
FAST_RECOVERY: dict[str, Any] = {
    "broker_visibility_timeout_s": 10,
    "broker_restore_interval_s": 1,
    "broker_restore_throttle": 1,
    "task_time_limit_s": 5,
    "learn_time_budget_s": 2,
    "learn_pending_ttl_s": 10,
    "metrics_port": 0,
}


def _settings(redis_url: str, prefix: str, tmp_path: Path, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "key_prefix": prefix,
        "client_spool_dir": tmp_path / "spool",
        "client_retry_interval_s": 0.2,
    }
    values.update(over)
    return load_settings(_env_file=None, **values)


def _root_call1_count(store: Store, agent: str) -> int:
    raw = store.client.get(store.keys.accumulators(agent))
    assert raw is not None, f"no accumulators for {agent}"
    return json.loads(raw)["nodes"][""]["remaining_calls"]["1"]["count"]


def _assert_learned_once(store: Store, agent: str, run_ids: set[str]) -> None:
    index = store.run_ids(agent)
    assert len(index) == len(set(index)) == len(run_ids)
    assert set(index) == run_ids
    cursor = store.cursor(agent)
    assert cursor.learned == cursor.end == len(run_ids)
    assert _root_call1_count(store, agent) == len(run_ids)


# ------------------------------------------------------------ private Redis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private `redis-server` that a test may stop and restart on the same port."""

    def __init__(self, binary: str, datadir: Path) -> None:
        self.binary = binary
        self.datadir = datadir
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 20.0) -> None:
        self.datadir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = (self.datadir / f"redis-{self.starts}.log").open("wb")
        # AOF on and fsync'ed every second, as in production; SIGTERM makes
        # redis fsync it before exiting, so a restart finds every key.
        cmd = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--dir", str(self.datadir),
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        with log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        probe = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
                try:
                    if probe.ping():
                        return
                except (redis.ConnectionError, redis.BusyLoadingError):
                    time.sleep(0.05)
        finally:
            probe.close()
        raise TimeoutError("private redis-server did not answer")

    def stop(self) -> None:
        """SIGTERM: the graceful shutdown an orchestrator does (the AOF is fsync'ed)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@contextmanager
def private_redis(datadir: Path) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server binary not found: cannot stop and restart a private Redis")
    server = RedisServer(binary, datadir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ----------------------------------------------------------------- outage


class Agent(threading.Thread):
    """Submits a run every `interval` seconds from its own thread, as an agent would."""

    def __init__(self, client: RunClient, agent_id: str, interval: float) -> None:
        super().__init__(name=f"agent-{agent_id}", daemon=True)
        self.client = client
        self.interval = interval
        self.runs = synthetic_runs(100_000, agent_id=agent_id, seed=4242)
        self.submitted: list[str] = []  # run ids, in submission order
        self.errors: list[BaseException] = []
        self.slowest = 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            run = next(self.runs)
            start = time.monotonic()
            try:
                self.client.submit_run(run)
            except BaseException as exc:  # the assertion: this list stays empty
                self.errors.append(exc)
            self.slowest = max(self.slowest, time.monotonic() - start)
            self.submitted.append(run["id"])
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        assert not self.is_alive()


class Supervisor:
    """Restarts a worker that exited, as `restart: unless-stopped` does in docker-compose.yml.

    celery 5.7.0 / kombu 5.7.0 on Redis: a worker that holds an unacked
    message when the broker connection drops can die with "Unrecoverable
    error: AttributeError('NoneType' object has no attribute 'hostname')"
    (kombu/transport/redis.py `_connparams`, reached from the consumer's
    `connection.close()` -> `QoS.restore_unacked_once()`). Production
    restarts it; so does this test, and it says so in a warning.
    """

    def __init__(self, workers: Workers) -> None:
        self.workers = workers
        self.crashes: list[str] = []
        self._seen: set[str] = set()

    def check(self) -> None:
        for worker in list(self.workers.started):
            if worker.name in self._seen or worker.proc.poll() is None:
                continue
            self._seen.add(worker.name)
            lines = worker.log.read_text(errors="replace").splitlines()
            why = next((ln for ln in lines if "Unrecoverable error" in ln), lines[-1:] or ["?"])
            self.crashes.append(f"{worker.name} exited ({worker.proc.returncode}): {why}")
            self.workers.start(f"{worker.name}r", concurrency=2)

    def report(self) -> None:
        for crash in self.crashes:
            warnings.warn(
                f"worker crashed during the outage and was restarted: {crash}", stacklevel=2
            )


def test_redis_outage_of_30s_while_an_agent_submits(tmp_path: Path) -> None:
    agent_id = "outage-agent"
    prefix = "outage:"
    with private_redis(tmp_path / "redis") as server:
        store = Store(redis.Redis.from_url(server.url, decode_responses=True), prefix)
        env = worker_env(prefix, server.url, learn_batch_size=50, **FAST_RECOVERY)
        with celery_workers(env, tmp_path) as workers:
            workers.start("w1", concurrency=2)
            workers.start("w2", concurrency=2)
            supervisor = Supervisor(workers)
            client = RunClient(_settings(server.url, prefix, tmp_path))
            agent = Agent(client, agent_id, interval=0.06)
            agent.start()
            try:
                # Before: the pipeline works, runs are learned as they come.
                wait_until(lambda: len(agent.submitted) >= 40, 30, "runs before the outage")
                wait_until(lambda: store.cursor(agent_id).learned >= 30, 60, "learning to start")
                before = len(agent.submitted)

                server.stop()
                down_at = time.monotonic()
                time.sleep(30)
                during = len(agent.submitted) - before
                spooled_during = client.stats()["spool_runs"]
                server.start()
                up_in = time.monotonic() - down_at
                supervisor.check()

                # After: the agent keeps going while the client replays its spool.
                after_start = len(agent.submitted)
                wait_until(lambda: len(agent.submitted) >= after_start + 50, 30, "runs after")
            finally:
                agent.stop()
            flushed = client.flush(60)
            stats = client.stats()
            client.close(5)
            submitted = set(agent.submitted)

            def learned_all() -> bool:
                supervisor.check()
                return caught_up(store, [agent_id], {agent_id: len(submitted)})

            wait_until(learned_all, 90, "learning to catch up after the outage")
            alive = [w.name for w in workers.started if w.proc.poll() is None]

        print(
            f"\noutage: {before} runs before, {during} during ({up_in:.1f} s down), "
            f"{len(submitted) - before - during} after; slowest submit {agent.slowest * 1000:.1f}"
            f" ms; client {stats}; learn tasks {store.counters().get('learn_tasks')};"
            f" worker crashes {supervisor.crashes}"
        )
        supervisor.report()
        assert len(alive) == 2  # reconnected, or restarted after a crash
        assert agent.errors == []
        assert len(submitted) == len(agent.submitted)  # ids are distinct
        assert during >= 200  # the agent really submitted through the outage
        assert spooled_during > 0 and stats["replayed"] >= spooled_during
        assert flushed and stats["spool_runs"] == 0 and stats["dropped"] == 0
        assert stats["broker_up"] is True
        _assert_learned_once(store, agent_id, submitted)
        assert store.counters()["runs_learned"] == len(submitted)
        assert store.dead_letter_count() == 0
        store.client.close()


# -------------------------------------------------------------- bad input


class _Canary:
    """Unpickling this creates `path` and yields a valid run: proof the pickle ran."""

    def __init__(self, path: Path, run_text: str) -> None:
        self.path = path
        self.run_text = run_text

    def __reduce__(self) -> tuple[Any, ...]:
        expr = f"(open({str(self.path)!r}, 'w').close(), {self.run_text!r})[1]"
        return (eval, (expr,))


def test_bad_input_is_dead_lettered_or_refused_and_good_runs_are_learned(
    real_store: Store, tmp_path: Path
) -> None:
    prefix = real_store.keys.prefix
    agent_id = "bad-input-agent"
    max_run_bytes = 20_000
    good = [json.dumps(r) for r in synthetic_runs(40, agent_id=agent_id, seed=7)]
    template = json.loads(good[0])

    def variant(**changes: Any) -> str:
        run = {**template, "id": str(uuid.uuid4()), **changes}
        return json.dumps(run)

    unknown_kind_calls = [dict(template["calls"][0], kind="agent"), *template["calls"][1:]]
    # The client applies the worker's strict-JSON rule: text that is not JSON
    # at all is refused on the agent's side (counted), never sent.
    malformed = '{"id": "' + str(uuid.uuid4()) + '", "agent_id": '
    bad: dict[str, tuple[str, str]] = {  # name -> (payload, a fragment of the reason)
        "not an object": ("[1, 2, 3]", "object"),
        "calls not a list": (variant(calls="nope"), "calls"),
        "started_at not a timestamp": (variant(started_at=12345), "started_at"),
        "negative token count": (
            variant(calls=[dict(template["calls"][0], output_tokens=-1)]),
            "output_tokens",
        ),
        "oversize": (variant(padding="x" * max_run_bytes), f"limit is {max_run_bytes}"),
        "unknown call kind": (variant(calls=unknown_kind_calls), "kind"),
    }

    # A message from another publisher whose payload list holds non-strings:
    # each bad element is dead-lettered, the good run beside them is kept.
    mixed_good = good[20]
    mixed_bad = [42, None, 1.5, True]
    before, after = good[:20], good[21:]

    pickled_ids = [str(uuid.uuid4()) for _ in range(2)]
    pickled = [variant(id=i) for i in pickled_ids]
    canary = tmp_path / "pickle-was-executed"

    env = worker_env(prefix, REDIS_URL, max_run_bytes=max_run_bytes, **FAST_RECOVERY)
    # The agent-side client does not validate (the worker does), and its
    # own size limit is the default 8 MiB: the oversize run reaches the worker.
    client = RunClient(_settings(REDIS_URL, prefix, tmp_path))
    with celery_workers(env, tmp_path) as workers:
        worker = workers.start("w1", concurrency=2)
        client.submit_runs(before)
        assert client.flush(30)
        for payload, _ in bad.values():
            client.submit_run(payload)
        client.submit_run(malformed)
        assert client.flush(30)
        assert client.stats()["invalid"] == 1

        # Anyone who can write to the broker could send a pickle body; the
        # worker must refuse it unread (JSON only), whatever task it names.
        producer_app = create_app(_settings(REDIS_URL, prefix, tmp_path))
        producer_app.conf.accept_content = ["json", "pickle"]
        producer_app.send_task(
            INGEST_TASK, args=[[_Canary(canary, pickled[0]), pickled[1]]], serializer="pickle"
        )

        producer_app.send_task(INGEST_TASK, args=[[*mixed_bad[:2], mixed_good, *mixed_bad[2:]]])

        client.submit_runs(after)
        assert client.flush(30)
        client.close(5)
        good_ids = {json.loads(g)["id"] for g in good}
        wait_until(
            lambda: caught_up(real_store, [agent_id], {agent_id: len(good_ids)}),
            90,
            "the good runs to be learned",
        )
        wait_until(
            lambda: real_store.dead_letter_count() >= len(bad) + len(mixed_bad) + 1,
            30,
            "the bad runs dead-lettered",
        )
        refused = ("refus", "disallow", "ContentDisallowed")
        wait_until(
            lambda: any(w in worker.log.read_text() for w in refused),
            30,
            "the worker to log that it refused the pickle message",
        )
        time.sleep(1)  # anything still in flight would show up now
        log_text = worker.log.read_text()

    assert not canary.exists(), "the worker unpickled (and so executed) a pickle message"
    for run_id in pickled_ids:
        assert real_store.get_run(agent_id, run_id) is None
    assert "pickle" in log_text or "application/x-python-serialize" in log_text
    # Discarded, not left to be redelivered: no message is queued or unacked.
    broker = f"{prefix}adaptive_worker:celery:"
    assert real_store.client.llen(broker + "adaptive.ingest") == 0
    assert real_store.client.hlen(broker + "unacked") == 0

    _assert_learned_once(real_store, agent_id, good_ids)
    counters = real_store.counters()
    assert counters["runs_learned"] == counters["runs_ingested"] == len(good_ids)

    dead = [json.loads(d) for d in real_store.dead_letters()]
    assert len(dead) == len(bad) + len(mixed_bad) + 1
    (refused_pickle,) = [d for d in dead if d["stage"] == "message"]
    assert "application/x-python-serialize" in refused_pickle["reason"]
    by_raw = {d["raw"]: d for d in dead}
    for value in mixed_bad:
        entry = by_raw.get(json.dumps(value))
        assert entry is not None, f"{value!r} in a payload list was not dead-lettered"
        assert entry["stage"] == "ingest" and entry["reason"]
    for name, (payload, fragment) in bad.items():
        entry = by_raw.get(payload)
        assert entry is not None, f"{name} was not dead-lettered"
        assert entry["stage"] == "ingest", name
        assert fragment in entry["reason"], (name, entry["reason"])


# --------------------------------------------------------------- debounce


def test_a_thousand_ingest_messages_cause_few_learn_tasks(
    real_store: Store, tmp_path: Path
) -> None:
    prefix = real_store.keys.prefix
    agent_id = "debounce-agent"
    runs = [json.dumps(r) for r in synthetic_runs(1000, agent_id=agent_id, seed=11)]
    app = create_app(_settings(REDIS_URL, prefix, tmp_path))
    env = worker_env(prefix, REDIS_URL, **FAST_RECOVERY)
    with celery_workers(env, tmp_path) as workers:
        workers.start("w1", concurrency=2)
        workers.start("w2", concurrency=2)
        with app.producer_or_acquire() as producer:
            for payload in runs:
                app.send_task(INGEST_TASK, args=[[payload]], producer=producer)
        wait_until(
            lambda: caught_up(real_store, [agent_id], {agent_id: 1000}),
            120,
            "1,000 runs to be learned",
        )
        time.sleep(1)  # a learn still queued would run (and count) now

    counters = real_store.counters()
    print(f"\ndebounce: {counters}")
    assert 0 < counters["learn_tasks"] <= 100
    assert counters["runs_ingested"] == counters["runs_learned"] == 1000
    _assert_learned_once(real_store, agent_id, {json.loads(r)["id"] for r in runs})
    assert real_store.dead_letter_count() == 0
