"""End-to-end pipeline figures with real `celery worker` processes on the local Redis.

1. Saturation: N capture-shaped runs for 4 agents are handed to the client at
   once; learned runs/s from the first submit until every agent's lag is 0,
   with 1 and with 2 worker pool processes.
2. Redis bytes written per learned run: the server's `total_net_input_bytes`
   over the saturation run (everything clients sent: broker messages, run
   storage, learn commits), divided by the runs learned.
3. Submit-to-visible latency at half the saturation rate: one agent submits
   at a steady pace; a monitor polls the learned offset every 5 ms; a run is
   visible once the learned offset passes its index position.
4. Worker CPU per learned run: user + system time of every process of the
   worker (the consumer and its pool), read from /proc before it stops.
5. The worker alone (drain): the same runs published first, then a worker
   started; runs/s from its "ready" until all are learned (the
   publishing agent's encoding is not timed, and it competes for no core).
Each is measured with ingest's fast path off (the learn task learns every
run: the baseline) and on, in the same run, next to the engine alone
folding 100 runs at a time (`bench.learn.engine_baseline`: the better of
Python's garbage collector as it comes and as the worker tunes it).
The agent-side submit cost against a bare RPUSH is `python -m bench.submit`.

Usage: python -m bench.pipeline [--runs N] [--drain-runs N] [--redis-url URL] [--modes off,on]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from adaptive_worker_client import RunClient
from bench.learn import engine_baseline
from bench.workload import synthetic_runs
from storage.store import Store
from tests.pipeline import caught_up, celery_workers, wait_until, worker_env
from worker.settings import load_settings


def _client(url: str, prefix: str, spool: Path) -> RunClient:
    return RunClient(
        load_settings(_env_file=None, redis_url=url, key_prefix=prefix, client_spool_dir=spool)
    )


def _tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` and its live descendants (/proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def _workload(n: int, seed: int) -> tuple[list[str], list[dict[str, Any]], dict[str, int]]:
    """n capture-shaped runs of 4 agents, and how many each agent must end with."""
    agents = [f"agent-{i}" for i in range(4)]
    runs: list[dict[str, Any]] = []
    for i, agent in enumerate(agents):
        runs += synthetic_runs(n // 4, agent_id=agent, seed=seed + i)
    return agents, runs, dict.fromkeys(agents, n // 4)


def saturation(url: str, n: int, processes: int, tmp: Path, fast_path: bool) -> dict[str, float]:
    """Learned runs/s, Redis input bytes and worker CPU seconds per learned run."""
    prefix = f"bench-pipe:{uuid.uuid4().hex[:8]}:"
    client_redis = redis.Redis.from_url(url, decode_responses=True)
    store = Store(client_redis, prefix)
    agents, runs, expected = _workload(n, seed=100)
    env = worker_env(prefix, url, ingest_fast_path=fast_path)
    try:
        with celery_workers(env, tmp) as workers:
            worker = workers.start(f"sat{processes}{fast_path}", concurrency=processes)
            client = _client(url, prefix, tmp / f"spool{processes}{fast_path}")
            cpu_before = _tree_cpu_s(worker.proc.pid)
            before = int(client_redis.info("stats")["total_net_input_bytes"])
            start = time.perf_counter()
            client.submit_runs(runs)
            client.flush(120)
            wait_until(lambda: caught_up(store, agents, expected), 600, "saturation run")
            elapsed = time.perf_counter() - start
            after = int(client_redis.info("stats")["total_net_input_bytes"])
            cpu = _tree_cpu_s(worker.proc.pid) - cpu_before
            client.close(5)
        return {
            "rate": n / elapsed,
            "bytes": (after - before) / n,
            "cpu_ms": cpu / n * 1e3,
            "fast": store.counters().get("fast_path_runs", 0) / n,
        }
    finally:
        store.delete_prefix()


WARM_UP_RUNS = 200


def drain(url: str, n: int, processes: int, tmp: Path, fast_path: bool) -> float:
    """Learned runs/s of the worker alone: the runs are published first (the
    client's encoding and publishing are not timed), then the worker starts.

    A warm-up agent's runs are queued before them, and the clock starts when
    those are learned: a fresh pool's first tasks pay for lazy imports, Lua
    script loads and new connections once, and over a few seconds of drain
    that moved the result by a tenth. Offsets are polled every 10 ms (at
    0.2 s the poll alone was up to 8% of a 2.5 s drain).
    """
    prefix = f"bench-pipe:{uuid.uuid4().hex[:8]}:"
    store = Store(redis.Redis.from_url(url, decode_responses=True), prefix)
    agents, runs, expected = _workload(n, seed=200)
    warm = {"warm-up": WARM_UP_RUNS}
    env = worker_env(prefix, url, ingest_fast_path=fast_path)
    try:
        client = _client(url, prefix, tmp / f"spool-drain{processes}{fast_path}")
        batches = [list(synthetic_runs(WARM_UP_RUNS, agent_id="warm-up", seed=201))]
        batches += [runs[i : i + 2000] for i in range(0, len(runs), 2000)]
        for batch in batches:  # within the client's buffer, in queue order
            client.submit_runs(batch)
            assert client.flush(120), "publishing did not finish"
        client.close(5)
        with celery_workers(env, tmp) as workers:
            workers.start(f"drain{processes}{fast_path}", concurrency=processes)
            wait_until(lambda: caught_up(store, list(warm), warm), 120, "warm-up", poll=0.01)
            start = time.perf_counter()
            wait_until(lambda: caught_up(store, agents, expected), 600, "drain run", poll=0.01)
            return n / (time.perf_counter() - start)
    finally:
        store.delete_prefix()


def visible_latency(
    url: str, rate: float, seconds: float, tmp: Path, fast_path: bool
) -> list[float]:
    prefix = f"bench-pipe:{uuid.uuid4().hex[:8]}:"
    store = Store(redis.Redis.from_url(url, decode_responses=True), prefix)
    agent = "latency-agent"
    runs = list(synthetic_runs(int(rate * seconds), agent_id=agent, seed=7))
    submitted: dict[str, float] = {}
    learned_at: list[tuple[float, int]] = []
    stop = threading.Event()

    def monitor() -> None:
        while not stop.is_set():
            learned_at.append((time.perf_counter(), store.cursor(agent).learned))
            time.sleep(0.005)

    try:
        with celery_workers(worker_env(prefix, url, ingest_fast_path=fast_path), tmp) as workers:
            workers.start(f"lat{fast_path}", concurrency=2)
            client = _client(url, prefix, tmp / f"spool-lat{fast_path}")
            watcher = threading.Thread(target=monitor, daemon=True)
            watcher.start()
            interval = 1.0 / rate
            next_at = time.perf_counter()
            for run in runs:
                now = time.perf_counter()
                if next_at > now:
                    time.sleep(next_at - now)
                submitted[run["id"]] = time.perf_counter()
                client.submit_run(run)
                next_at += interval
            client.flush(60)
            wait_until(lambda: caught_up(store, [agent], {agent: len(runs)}), 120, "latency run")
            stop.set()
            watcher.join()
            client.close(5)
        positions = {run_id: i for i, run_id in enumerate(store.run_ids(agent))}
        latencies = []
        for run_id, t_submit in submitted.items():
            pos = positions[run_id]
            seen = next(t for t, learned in learned_at if learned > pos)
            latencies.append(seen - t_submit)
        return latencies
    finally:
        store.delete_prefix()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--runs", type=int, default=4000)
    ap.add_argument("--drain-runs", type=int, default=8000, help="runs of the worker-alone drain")
    ap.add_argument("--latency-seconds", type=float, default=20.0)
    ap.add_argument("--modes", default="off,on", help="ingest fast path: off (baseline), on")
    args = ap.parse_args()
    modes = [m.strip() == "on" for m in args.modes.split(",")]
    # The best of three: one short run moves by tens of percent on a shared
    # machine, and the best is the conservative baseline for the ratios.
    baseline = engine_baseline()
    engine = baseline["best"]
    print(
        f"engine only, 100 runs per fold (best of 3): {engine:.0f} runs/s (Python's gc"
        f" {baseline['default gc']:.0f}, the worker's {baseline['worker gc']:.0f})"
    )
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        print(
            "| fast path | worker processes | learned runs/s from submit | vs engine | "
            "worker alone (drain) | vs engine | Redis input / learned run | "
            "worker CPU / learned run | learned by ingest |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        halves: dict[bool, float] = {}
        for fast in modes:
            for p in (1, 2):
                r = saturation(args.redis_url, args.runs, p, tmp, fast)
                d = drain(args.redis_url, args.drain_runs, p, tmp, fast)
                print(
                    f"| {'on' if fast else 'off'} | {p} | {r['rate']:.0f} | "
                    f"{r['rate'] / engine:.0%} | {d:.0f} | {d / engine:.0%} | "
                    f"{r['bytes'] / 1024:.1f} KiB | {r['cpu_ms']:.2f} ms | {r['fast']:.0%} |",
                    flush=True,
                )
                if p == 2:
                    halves[fast] = r["rate"] / 2
        print()
        for fast in modes:
            half = halves[fast]
            lat = visible_latency(args.redis_url, half, args.latency_seconds, tmp, fast)
            print(
                f"fast path {'on' if fast else 'off'}: submit-to-visible at {half:.0f} runs/s "
                f"({len(lat)} runs): p50 {statistics.median(lat) * 1e3:.0f} ms, "
                f"p99 {_pct(lat, 0.99) * 1e3:.0f} ms, max {max(lat) * 1e3:.0f} ms",
                flush=True,
            )


if __name__ == "__main__":
    main()
