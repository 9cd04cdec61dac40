"""Learning in the agent (NeMo Relay's own learners) vs learning in our workers.

The same capture-shaped runs (tests/interop/common.py, `shape="capture"`:
the captured agent's prompt and call sequence, LLM -> 3 tools at once ->
2 tools -> LLM (-> LLM), no provider or tool delays, so only the runtime's
own work is timed) are run by a real NeMo Relay 0.10.4 agent process
(`.venv-relay`, built by `make relay-venv`) in three configurations:

  in-process   telemetry with the three learners (latency_sensitivity,
               tool_parallelism, acg), Redis state backend: the runtime learns
               each run in its background drain, inside the agent process.
  workers      `recommended_config`: telemetry with no learners; the runtime
               only stores runs + runs_index. Our workers (`celery worker`,
               2 pool processes, tests/pipeline.py) learn them after one
               `discover`, started when the agent is done.
  exporter     no telemetry section; `install_exporter` rebuilds each run from
               the event stream and hands it to our RunClient; the workers
               learn while the agent runs.

Reported per configuration: the agent's wall time per run (what its caller
waits for), the agent process's CPU per run (every thread: the runtime's
drain and learners too, until the drain is idle), and learned runs/s: for
in-process, runs / (first run start .. drain idle); for the workers, runs /
(discover sent .. learned offset caught up), with the workers' CPU per run
(all processes of the worker node, from /proc). Learners on minus learners
off is the runtime's in-process learning cost. Both sides are warm when the
clock starts: the runtime learns 5 warm-up runs first, and the worker
learns 40 synthetic runs of another agent in 4 messages (connections,
scripts and first-task costs of a freshly started pool, which a long-running
worker paid long ago; they were up to a third of a 300-run backlog's time).
One agent, so both learn one run stream serially (our lease keeps one
learner per agent); the machine's 2 cores are shared by agent, workers and
Redis.

Usage: python -m bench.vs_relay [--runs N] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from functools import cache
from pathlib import Path
from typing import Any

import redis

from adaptive_worker_client import RunClient
from bench.workload import synthetic_runs
from storage.store import Store
from tests.pipeline import caught_up, celery_workers, wait_until, worker_env
from worker.celery import DISCOVER_TASK, create_app
from worker.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
RELAY_PYTHON = ROOT / ".venv-relay" / "bin" / "python"
AGENT_SCRIPT = ROOT / "tests" / "interop" / "agent_runs.py"
LEARNERS = "latency_sensitivity,tool_parallelism,acg"
AGENT = "bench-relay-agent"
WARM_UP_AGENT = "bench-relay-warm-up"
WARM_UP_RUNS = 40
_TICK = os.sysconf("SC_CLK_TCK")


@cache
def relay_python() -> Path:
    subprocess.run(["make", "-s", "relay-venv"], cwd=ROOT, check=True)
    return RELAY_PYTHON


def run_agent(url: str, prefix: str, runs: int, *extra: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTIVE_")}
    cmd = [str(relay_python()), str(AGENT_SCRIPT), "--redis-url", url, "--prefix", prefix]
    cmd += ["--agent", AGENT, "--runs", str(runs), "--surface", "openai", "--shape", "capture"]
    cmd += ["--fast", "--warmup", "5", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"agent failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) of every live process in a process group."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:  # state, ppid, pgrp, ... after the name
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


def wait_learned(store: Store, runs: int, timeout: float = 600) -> float:
    """Seconds until the agent's learned offset covers `runs` index entries."""
    start = time.perf_counter()
    while True:
        c = store.cursor(AGENT)
        if c.index_length >= runs and c.learned >= runs:
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"learned {c.learned} of {runs}")
        time.sleep(0.01)


def warm_up(url: str, prefix: str, spool: Path) -> None:
    """A started worker learns a few runs of another agent, in several messages
    so that both pool processes run tasks, before anything is timed."""
    settings = load_settings(
        _env_file=None, redis_url=url, key_prefix=prefix, client_spool_dir=spool
    )
    client = RunClient(settings)
    runs = list(synthetic_runs(WARM_UP_RUNS, seed=1, agent_id=WARM_UP_AGENT))
    try:
        for i in range(0, WARM_UP_RUNS, 10):
            client.submit_runs(runs[i : i + 10])
            if not client.flush(60):
                raise TimeoutError("warm-up runs not published")
    finally:
        client.close(5)
    store = Store(redis.Redis.from_url(url, decode_responses=True), prefix)
    warm = {WARM_UP_AGENT: WARM_UP_RUNS}
    wait_until(lambda: caught_up(store, list(warm), warm), 120, "warm-up runs", poll=0.05)


def per_run_ms(values: list[float]) -> tuple[float, float]:
    ms = sorted(1000 * v for v in values)
    return statistics.fmean(ms), ms[min(len(ms) - 1, int(0.95 * len(ms)))]


def bench(url: str, runs: int) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(url, decode_responses=True)
    rows: list[dict[str, Any]] = []
    total = runs + 5  # warm-up runs are stored and learned too

    prefix = f"bench-relay:{uuid.uuid4().hex[:8]}:"
    try:
        out = run_agent(url, prefix, runs, "--learners", LEARNERS)
        rows.append(
            {
                "name": "in-process (runtime learners, Redis backend)",
                "agent": per_run_ms(out["agent_s"]),
                "agent_cpu": 1000 * out["cpu_s"] / runs,
                "learned_per_s": runs / out["learn_wall_s"],
                "learner_cpu": None,
                "drain_tail_s": out["drain_wait_s"],
            }
        )
    finally:
        Store(client, prefix).delete_prefix()

    with tempfile.TemporaryDirectory() as tmp:
        for name, extra, pipelined in (
            ("workers (learners off, recommended)", (), False),
            ("exporter -> RunClient -> workers", ("--no-telemetry", "--export-prefix"), True),
        ):
            prefix = f"bench-relay:{uuid.uuid4().hex[:8]}:"
            store = Store(client, prefix)
            args = [*extra, prefix] if pipelined else list(extra)
            env = worker_env(prefix, url, metrics_port=0, discover_interval_s=0)
            try:
                with celery_workers(env, Path(tmp)) as workers:
                    node = workers.start(f"bench{len(rows)}", concurrency=2)
                    warm_up(url, prefix, Path(tmp) / f"warm-up-spool{len(rows)}")
                    cpu0 = group_cpu_s(node.proc.pid)
                    out = run_agent(url, prefix, runs, *args)
                    if pipelined:
                        learn_s = wait_learned(store, total)
                    else:
                        # The app and its broker connection exist before the
                        # clock starts: it times learning, not our set-up.
                        settings = load_settings(_env_file=None, redis_url=url, key_prefix=prefix)
                        app = create_app(settings)
                        with app.connection_for_write() as conn:
                            conn.ensure_connection()
                            sent = time.perf_counter()
                            app.send_task(DISCOVER_TASK, connection=conn)
                        wait_learned(store, total)
                        learn_s = time.perf_counter() - sent
                    worker_cpu = group_cpu_s(node.proc.pid) - cpu0
                rows.append(
                    {
                        "name": name,
                        "agent": per_run_ms(out["agent_s"]),
                        "agent_cpu": 1000 * out["cpu_s"] / runs,
                        "learned_per_s": None if pipelined else total / learn_s,
                        "learner_cpu": 1000 * worker_cpu / total,
                        "caught_up_after_agent_s": learn_s if pipelined else None,
                    }
                )
            finally:
                store.delete_prefix()
    return rows


def table(rows: list[dict[str, Any]], runs: int) -> str:
    inproc, off = rows[0], rows[1]
    # The runtime's learners run on the agent's drain thread: their CPU is what
    # the agent process spends beyond the same runs with learners off.
    inproc["learner_cpu"] = inproc["agent_cpu"] - off["agent_cpu"]
    lines = [
        f"{runs} capture-shaped runs per configuration (+5 warm-up), one agent, "
        f"{os.cpu_count()} cores shared by agent, workers and Redis.",
        "",
        "| configuration | agent wall ms/run (mean / p95) | agent process CPU ms/run "
        "| learner CPU ms/run | learned runs/s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        mean, p95 = r["agent"]
        if r is inproc:
            tail = r["drain_tail_s"]
            learned = f"{r['learned_per_s']:.0f} (first run to drain idle; idle {tail:.2f} s after)"
            where = "agent's drain thread"
        elif r["learned_per_s"] is None:
            tail = r["caught_up_after_agent_s"]
            learned = f"kept pace; caught up {tail:.2f} s after the last run"
            where = "workers"
        else:
            learned = f"{r['learned_per_s']:.0f} (backlog, after one discover)"
            where = "workers"
        lines.append(
            f"| {r['name']} | {mean:.2f} / {p95:.2f} | {r['agent_cpu']:.2f} "
            f"| {r['learner_cpu']:.2f} ({where}) | {learned} |"
        )
    lines += [
        "",
        "In-process learning cost on the agent (learners on minus off): "
        f"{inproc['agent'][0] - off['agent'][0]:+.2f} ms wall per run, "
        f"{inproc['learner_cpu']:+.2f} ms CPU per run "
        f"(~{1000 / max(inproc['learner_cpu'], 1e-9):.0f} runs/s per core); our workers: "
        f"{off['learner_cpu']:.2f} ms CPU per run (~{1000 / off['learner_cpu']:.0f} runs/s "
        "per core, Redis not included in either).",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    a = ap.parse_args()
    print(table(bench(a.redis_url, a.runs), a.runs))


if __name__ == "__main__":
    main()
