"""Network partitions between hosts: a stale learner is fenced, an agent spools.

Four "hosts" built from network namespaces on one switch (tests/netns.py):

- data: a redis-server of the test's own, the state (db 0) and the Redis
  broker (db 1);
- w1, w2: one real `celery -A worker worker` each (concurrency 1);
- agent: a submitter process using the real client (`RunClient`, spool,
  receipts) that submits capture-shaped runs for three agents at a steady
  pace from start to end.

Scenario 1, a worker partitioned in the middle of a learn batch. Agent `big`
has a backlog of runs written straight into Redis (as a NeMo Relay agent
writes its own runs), so its first learn step folds a batch of seconds. The
host whose learner holds `big`'s lease (the one its switch port shows
reading the backlog: only a lease holder reads a batch) is cut off
mid-fold, for longer than the lease. The other host must take `big` over
(its learned offset moves while the link is down); when the link returns,
the stale learner's commit reaches Redis and the offset fence refuses it.
(Redis MONITOR would name the host of each command too, but it costs Redis
a full core here and slows every worker tenfold.)

Scenario 2, the agent partitioned: its host is cut off for 30 s while it
keeps submitting; its runs go to the spool and are delivered afterwards.

End state: every run stored once and learned once (root accumulator counts
equal distinct runs), the learned state equal to `adaptive-worker replay` of
the runs in index order, and the stale worker alive (or restarted).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from adaptive_worker_client.contract import DISCOVER_TASK
from bench.workload import synthetic_runs
from storage.store import Store
from tasks import learning
from tests import netns
from tests.pipeline import ROOT, Workers, celery_workers, dump_state, wait_until, worker_env
from tests.test_kill_storm import _root_count
from tests.test_pipeline_faults import Supervisor
from worker.celery import create_app
from worker.cli import app as cli
from worker.settings import load_settings

pytestmark = pytest.mark.slow

PREFIX = "partition:"
BIG = "big"  # the agent whose learn is caught mid-flight
AGENTS = (BIG, "small-1", "small-2")
BACKLOG = 2000  # big's runs already in Redis when the workers start: a fold of seconds
PACE_S = 0.06  # the agent host submits one run this often (round robin over AGENTS)
DATA_PORT = 6379  # the data host is a namespace of its own: every port is free there
BUDGET_S = 2
LEASE_S = BUDGET_S + 10  # tasks/jobs.py: the lease lasts the time budget + 10 s
AGENT_CUT_S = 30.0
SUBMITTER_MAX_S = 600.0
WORKERS = ("w1", "w2")

# A short time budget (so a short lease), one big batch per learn step, and
# a task time limit that outlasts a partition (the stale learner must live
# to send its commit). The Redis broker redelivers after twice that; the
# client's receipts republish sooner whatever a partition cost the broker.
WORKER_SETTINGS: dict[str, Any] = {
    "learn_time_budget_s": BUDGET_S,
    "learn_batch_size": 5000,
    "learn_pending_ttl_s": 10,
    "task_time_limit_s": 60,
    "broker_visibility_timeout_s": 120,
    "broker_restore_interval_s": 1,
    "broker_restore_throttle": 1,
    "metrics_port": 0,
}
CLIENT_SETTINGS: dict[str, Any] = {
    "client_retry_interval_s": 0.5,
    "client_receipts": "on",
    "client_receipt_timeout_s": 10.0,
    "client_receipt_max_republish": 10,
}


# ------------------------------------------------------------ the agent host


def submit_main(out: Path, agents: list[str], pace_s: float) -> None:
    """The agent host's process: submit until `out/stop` exists, then drain.

    Every submitted run's agent and id go to `out/submitted.txt` (one line
    each, flushed at once), the client's stats to `out/stats.json` twice a
    second; after the stop it flushes, waits for every receipt (runs seen
    stored), and writes `out/done.json`.
    """
    from adaptive_worker_client import RunClient, load_client_settings

    client = RunClient(load_client_settings(env_file=None))
    streams = {a: synthetic_runs(100_000, agent_id=a, seed=900 + i) for i, a in enumerate(agents)}
    slowest = 0.0
    errors: list[str] = []

    def report(path: Path, **extra: Any) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"stats": client.stats(), "slowest_s": slowest, **extra}))
        tmp.replace(path)

    start = time.monotonic()
    parent = os.getppid()
    next_report = 0.0
    count = 0
    with (out / "submitted.txt").open("a") as ids:
        # Until told to stop; also if the test died (re-parented) or ran far too long.
        while not (out / "stop").exists():
            if os.getppid() != parent or time.monotonic() - start > SUBMITTER_MAX_S:
                break
            agent = agents[count % len(agents)]
            run = next(streams[agent])
            began = time.monotonic()
            try:
                client.submit_run(run)
            except Exception as exc:  # the test asserts this list stays empty
                errors.append(repr(exc))
            slowest = max(slowest, time.monotonic() - began)
            ids.write(f"{agent} {run['id']}\n")
            ids.flush()
            count += 1
            if time.monotonic() >= next_report:
                report(out / "stats.json", submitted=count)
                next_report = time.monotonic() + 0.5
            delay = start + count * pace_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    flushed = client.flush(60)
    deadline = time.monotonic() + 90
    while client.stats()["receipts_pending"] and time.monotonic() < deadline:
        report(out / "stats.json", submitted=count)
        time.sleep(0.5)
    stats = client.stats()
    client.close(10)
    tmp = out / "done.tmp"
    tmp.write_text(
        json.dumps({"flushed": flushed, "stats": stats, "slowest_s": slowest, "errors": errors})
    )
    tmp.replace(out / "done.json")


@dataclass
class AgentHost:
    """What the test sees of the agent host: the files `submit_main` writes."""

    out: Path
    spool: Path

    def submitted(self) -> list[tuple[str, str]]:
        path = self.out / "submitted.txt"
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        return [(a, r) for a, _, r in (ln.partition(" ") for ln in lines if " " in ln)]

    def stats(self) -> dict[str, Any]:
        with suppress(FileNotFoundError, json.JSONDecodeError):
            return dict(json.loads((self.out / "stats.json").read_text())["stats"])
        return {}

    def spooled_bytes(self) -> int:
        """Bytes of run segments on the spool's disk right now."""
        return sum(p.stat().st_size for p in self.spool.rglob("*.jsonl") if p.is_file())

    def stop(self) -> None:
        (self.out / "stop").touch()

    def done(self) -> dict[str, Any] | None:
        with suppress(FileNotFoundError, json.JSONDecodeError):
            return dict(json.loads((self.out / "done.json").read_text()))
        return None


# ------------------------------------------------------------------ the test


def _redis_server(net: netns.Network, workdir: Path) -> tuple[str, redis.Redis]:
    """Start the data host's redis-server; (its address, a client from the observer)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server binary not found: the data host runs one")
    workdir.mkdir(parents=True, exist_ok=True)
    address = net.data.address
    cmd = [
        binary, "--bind", address, "--port", str(DATA_PORT), "--protected-mode", "no",
        "--save", "", "--appendonly", "no", "--dir", str(workdir),
        "--logfile", str(workdir / "redis.log"),
    ]  # fmt: skip
    net.popen(net.data.name, cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(address, DATA_PORT, decode_responses=True, socket_timeout=10)
    wait_until(lambda: _answers(client), 20, "the data host's redis-server")
    return address, client


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def _replay_equals(store: Store, agents: list[str], url: str, workdir: Path) -> bool:
    """The learned state equals `adaptive-worker replay` of the stored runs in index order."""
    lines = []
    for agent in agents:
        lines += [raw for _, raw in store.read_runs(agent, 0, 1_000_000) if raw is not None]
    records = workdir / "replay.jsonl"
    records.write_text("\n".join(lines) + "\n")
    replay_prefix = PREFIX.rstrip(":") + "-replay:"
    result = CliRunner().invoke(
        cli, ["replay", str(records), "--redis-url", url, "--prefix", replay_prefix, "--json"]
    )
    assert result.exit_code == 0, result.output
    return dump_state(store.client, PREFIX) == dump_state(store.client, replay_prefix)


def test_partitioned_worker_is_fenced_and_partitioned_agent_spools(tmp_path: Path) -> None:
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(reason)
    began = time.monotonic()
    with ExitStack() as stack:
        net = stack.enter_context(netns.network())
        net.add_data_host("data")
        hosts = {name: net.add_host(name) for name in ("w1", "w2", "agent")}
        data_ip, client = _redis_server(net, tmp_path / "redis")
        url = f"redis://{data_ip}:{DATA_PORT}/0"
        broker = f"redis://{data_ip}:{DATA_PORT}/1"
        store = Store(client, PREFIX)

        # big's backlog, written straight into Redis (ingest's validation and
        # storing, without a learn message: the agent host's first run sends it).
        backlog = [json.dumps(r) for r in synthetic_runs(BACKLOG, agent_id=BIG, seed=1)]
        for i in range(0, BACKLOG, 500):
            learning.ingest(store, backlog[i : i + 500], 8 * 1024 * 1024)
        assert store.cursor(BIG).index_length == BACKLOG
        # What a learner of the backlog reads (the runs as stored: compact JSON).
        backlog_bytes = sum(len(raw or "") for _, raw in store.read_runs(BIG, 0, BACKLOG))

        env = worker_env(PREFIX, url, broker_url=broker, **WORKER_SETTINGS)
        groups: dict[str, Workers] = {}
        for name in WORKERS:
            groups[name] = stack.enter_context(celery_workers(env, tmp_path))
            groups[name].launcher = hosts[name].launcher
            groups[name].spawn(name, concurrency=1)
        for name in WORKERS:
            worker = groups[name].started[0]
            wait_until(lambda w=worker: w.ready() or w.proc.poll() is not None, 60, name)
            assert worker.proc.poll() is None, worker.log.read_text()[-3000:]
        # A worker that exits is restarted on its host, as compose would.
        supervisors = [Supervisor(group) for group in groups.values()]

        def supervise() -> None:
            for sup in supervisors:
                sup.check()

        marks = {"ready": time.monotonic()}
        baseline = {name: net.bytes_to(name) for name in WORKERS}
        agent = AgentHost(tmp_path / "agent", tmp_path / "agent" / "spool")
        agent.out.mkdir()
        agent_env = worker_env(
            PREFIX, url, broker_url=broker, client_spool_dir=agent.spool, **CLIENT_SETTINGS
        )
        cmd = [sys.executable, "-m", "tests.test_partition", str(agent.out), ",".join(AGENTS)]
        submitter = net.popen(
            "agent", [*cmd, str(PACE_S)], cwd=ROOT, env=agent_env,
            stdout=(agent.out / "log").open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip

        # ------------------------------------------ scenario 1: a worker cut
        # The lease holder is the host that read big's backlog: only a
        # learner holding the lease reads a batch, and no other batch comes
        # near that size. Its switch port counted those bytes.
        def reader() -> str | None:
            got = {name: net.bytes_to(name) - baseline[name] for name in WORKERS}
            name = max(got, key=got.__getitem__)
            return name if got[name] >= backlog_bytes else None

        wait_until(lambda: reader() is not None, 60, "a worker host to read big's backlog")
        stale = reader()
        assert stale is not None
        other = next(name for name in WORKERS if name != stale)
        # Mid-flight: its lease is held and nothing of big is committed yet.
        start_offset = store.cursor(BIG).learned
        lease_left_s = client.pttl(store.keys.lease(BIG)) / 1000
        assert start_offset == 0 and lease_left_s > 0, "the batch ended first: raise BACKLOG"
        conflicts_before = store.counters().get("conflicts", 0)
        net.cut(stale)
        cut_at = time.monotonic()
        takeover_s = wait_until(
            lambda: store.cursor(BIG).learned > start_offset, 60, f"{other} to take big over"
        )
        took_over = store.cursor(BIG).learned
        # Longer than the lease (the takeover already waited out what was left of it).
        time.sleep(max(0.0, LEASE_S + 1 - (time.monotonic() - cut_at)))
        net.heal(stale)
        worker_cut_s = time.monotonic() - cut_at
        healed_at = time.monotonic()

        def fenced() -> bool:
            return store.counters().get("conflicts", 0) > conflicts_before

        def stale_logged() -> bool:
            logs = (w.log.read_text(errors="replace") for w in groups[stale].started)
            return any(f"learn conflict for agent {BIG}" in text for text in logs)

        # ------------------------------------------ scenario 2: the agent cut
        # At once: the stale commit (TCP retransmits it within seconds to
        # ~25 s of the heal) is awaited during this cut.
        fenced_s: float | None = None
        before_cut = len(agent.submitted())
        net.cut("agent")
        agent_cut_at = marks["agent cut"] = time.monotonic()
        spool_peak = spool_runs_peak = 0
        while time.monotonic() - agent_cut_at < AGENT_CUT_S:
            spool_peak = max(spool_peak, agent.spooled_bytes())
            spool_runs_peak = max(spool_runs_peak, int(agent.stats().get("spool_runs", 0)))
            if fenced_s is None and fenced():
                fenced_s = time.monotonic() - healed_at
            supervise()
            time.sleep(0.5)
        during_cut = agent.submitted()[before_cut:]
        net.heal("agent")
        agent_healed_at = time.monotonic()
        if fenced_s is None:
            fenced_s = wait_until(fenced, 30, "the stale commit") + agent_healed_at - healed_at
        with suppress(TimeoutError):  # asserted below, after the tally
            wait_until(stale_logged, 30, "the stale learner to log the refusal")
        drained_s = wait_until(
            lambda: agent.stats().get("spool_runs") == 0 and agent.spooled_bytes() == 0,
            60,
            "the agent's spool to drain",
            lambda: f": {agent.stats()}",
        )
        time.sleep(max(0.0, 3 - (time.monotonic() - agent_healed_at)))  # it goes on a little
        agent.stop()
        marks["stop"] = time.monotonic()

        # ------------------------------------------ settle
        beat = create_app(
            load_settings(_env_file=None, redis_url=url, broker_url=broker, key_prefix=PREFIX),
            name="partition-beat",
        )
        next_sweep = 0.0

        def settled() -> bool:
            # Beat's discover sweep, every 2 s (a fast beat): it finds any
            # agent whose learn message a partition cost.
            nonlocal next_sweep
            supervise()
            if time.monotonic() >= next_sweep:
                beat.send_task(DISCOVER_TASK)
                next_sweep = time.monotonic() + 2.0
            if agent.done() is None:
                return False
            counts = _expected_counts(agent.submitted())
            cursors = {a: store.cursor(a) for a in AGENTS}
            return all(c.index_length >= counts[a] and not c.lag for a, c in cursors.items())

        wait_until(settled, 120, "every run stored and learned", lambda: f": {agent.stats()}")
        beat.close()
        submitter.wait(30)
        time.sleep(1)  # a learn or republish still in flight would land now
        marks["settled"] = time.monotonic()
        done = agent.done()
        assert done is not None
        alive = {
            name: [w.name for w in group.started if w.proc.poll() is None]
            for name, group in groups.items()
        }

        # The tally, before any assertion, so a failure still reports it.
        expected: dict[str, set[str]] = {a: set() for a in AGENTS}
        expected[BIG].update(json.loads(run)["id"] for run in backlog)
        submitted = agent.submitted()
        for a, run_id in submitted:
            expected[a].add(run_id)
        stored = {a: store.run_ids(a) for a in AGENTS}
        total = sum(len(ids) for ids in expected.values())
        lost = sum(len(expected[a] - set(stored[a])) for a in AGENTS)
        strays = sum(len(set(stored[a]) - expected[a]) for a in AGENTS)
        duplicated = sum(len(stored[a]) - len(set(stored[a])) for a in AGENTS)
        roots = {a: _root_count(store, a) for a in AGENTS}
        learned_twice = sum(max(0, roots[a] - len(set(stored[a]))) for a in AGENTS)
        counters = store.counters()
        conflicts = counters.get("conflicts", 0) - conflicts_before
        crashes = [c for sup in supervisors for c in sup.crashes]
        print(
            f"\npartition: {len(submitted)} runs submitted by the agent host + {BACKLOG} written"
            f" directly = {total}; {sum(len(set(s)) for s in stored.values())} stored,"
            f" {counters.get('runs_learned', 0)} learned, {lost} lost, {duplicated} stored"
            f" twice, {learned_twice} learned twice"
            f"\n  worker cut: {stale} (lease holder mid-batch, {lease_left_s:.1f} s of lease"
            f" left) cut {worker_cut_s:.1f} s; takeover by {other} {takeover_s:.1f} s after the"
            f" cut (big's offset {start_offset} -> {took_over}); stale commit refused"
            f" {fenced_s:.1f} s after the heal; conflicts {conflicts}"
            f"\n  agent cut: {AGENT_CUT_S:.0f} s, {len(during_cut)} runs submitted during it,"
            f" spool peak {spool_runs_peak} runs / {spool_peak} bytes on disk, drained"
            f" {drained_s:.1f} s after the heal; slowest submit {done['slowest_s'] * 1000:.0f}"
            f" ms; client {done['stats']}"
            f"\n  workers alive {alive}, crashes {crashes}; at"
            f" {', '.join(f'{k} {v - began:.0f} s' for k, v in marks.items())}"
        )

        # Scenario 1: the lease holder was cut mid-batch; the other host took
        # big over while the link was down, once the lease had run out.
        assert takeover_s >= lease_left_s - 0.5
        assert worker_cut_s > LEASE_S
        assert took_over > BACKLOG - 1  # the whole backlog, learned by the other host
        # When the link returned, the stale learner's commit (read at the old
        # offset) reached Redis and was refused; it says so in its log.
        assert conflicts >= 1
        assert stale_logged(), "the stale learner did not log the refusal"
        # It lives on (or was restarted), and so does the other one.
        assert alive[stale] and alive[other]

        # Scenario 2: spooled during the cut, delivered after it.
        assert len(during_cut) >= AGENT_CUT_S / PACE_S / 2
        assert spool_peak > 0 and spool_runs_peak > 0
        assert submitter.returncode == 0
        assert done["errors"] == [] and done["flushed"]
        s = done["stats"]
        assert (s["receipts_pending"], s["unconfirmed"], s["dropped"], s["spool_runs"]) == (
            0,
            0,
            0,
            0,
        ), s
        assert s["replayed"] >= spool_runs_peak
        assert all(run_id in set(stored[a]) for a, run_id in during_cut)

        # End state: exactly once, and the same state as a replay.
        assert (lost, strays, duplicated, learned_twice) == (0, 0, 0, 0)
        for a in AGENTS:
            cursor = store.cursor(a)
            assert cursor.learned == cursor.end == cursor.index_length == len(expected[a])
            assert roots[a] == len(expected[a])
        assert counters["runs_learned"] == total
        assert store.dead_letter_count() == 0
        assert _replay_equals(store, list(AGENTS), url, tmp_path)
        print(f"  replay check {time.monotonic() - marks['settled']:.1f} s")


def _expected_counts(submitted: list[tuple[str, str]]) -> dict[str, int]:
    counts = dict.fromkeys(AGENTS, 0)
    counts[BIG] = BACKLOG
    for a, _ in submitted:
        counts[a] += 1
    return counts


if __name__ == "__main__":  # the agent host's process
    submit_main(Path(sys.argv[1]), sys.argv[2].split(","), float(sys.argv[3]))
