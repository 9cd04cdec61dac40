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
The agent-side submit cost against a bare RPUSH is `python -m bench.submit`.

Usage: python -m bench.pipeline [--runs N] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import redis

from adaptive_worker_client import RunClient
from bench.workload import synthetic_runs
from storage.store import Store
from tests.pipeline import caught_up, celery_workers, wait_until, worker_env
from worker.settings import load_settings


def _client(url: str, prefix: str, spool: Path) -> RunClient:
    return RunClient(
        load_settings(_env_file=None, redis_url=url, key_prefix=prefix, client_spool_dir=spool)
    )


def saturation(url: str, n: int, processes: int, tmp: Path) -> tuple[float, float]:
    """(learned runs/s, Redis input bytes per learned run)."""
    prefix = f"bench-pipe:{uuid.uuid4().hex[:8]}:"
    client_redis = redis.Redis.from_url(url, decode_responses=True)
    store = Store(client_redis, prefix)
    agents = [f"agent-{i}" for i in range(4)]
    runs = []
    for i, agent in enumerate(agents):
        runs += list(synthetic_runs(n // 4, agent_id=agent, seed=100 + i))
    expected = {a: n // 4 for a in agents}
    try:
        with celery_workers(worker_env(prefix, url), tmp) as workers:
            workers.start(f"sat{processes}", concurrency=processes)
            client = _client(url, prefix, tmp / f"spool{processes}")
            before = int(client_redis.info("stats")["total_net_input_bytes"])
            start = time.perf_counter()
            client.submit_runs(runs)
            client.flush(120)
            wait_until(lambda: caught_up(store, agents, expected), 600, "saturation run")
            elapsed = time.perf_counter() - start
            after = int(client_redis.info("stats")["total_net_input_bytes"])
            client.close(5)
        return n / elapsed, (after - before) / n
    finally:
        store.delete_prefix()


def visible_latency(url: str, rate: float, seconds: float, tmp: Path) -> list[float]:
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
        with celery_workers(worker_env(prefix, url), tmp) as workers:
            workers.start("lat", concurrency=2)
            client = _client(url, prefix, tmp / "spool-lat")
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
    ap.add_argument("--latency-seconds", type=float, default=20.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        results = {p: saturation(args.redis_url, args.runs, p, tmp) for p in (1, 2)}
        print("| worker processes | learned runs/s | Redis input bytes / learned run |")
        print("|---|---|---|")
        for p, (rate, nbytes) in results.items():
            print(f"| {p} | {rate:.0f} | {nbytes / 1024:.1f} KiB |")
        half = results[2][0] / 2
        lat = visible_latency(args.redis_url, half, args.latency_seconds, tmp)
        print(
            f"\nsubmit-to-visible at {half:.0f} runs/s ({len(lat)} runs): "
            f"p50 {statistics.median(lat) * 1e3:.0f} ms, p99 {_pct(lat, 0.99) * 1e3:.0f} ms, "
            f"max {max(lat) * 1e3:.0f} ms"
        )


if __name__ == "__main__":
    main()
