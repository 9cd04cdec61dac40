"""What one learned run costs a RabbitMQ node (docs/scaling.md), measured on the local node.

A vhost of its own with our quorum queues; N capture-shaped runs of 4 agents
published through RunClient (publisher confirms), then drained by a real
`celery worker`. The node's CPU (every `beam.smp` process, user + system,
from /proc) is read before and after each phase: publishing (the client's
ingest messages, confirmed) and delivering (deliveries, acks, and the learn
messages the workers send among themselves). Quorum queues write every
message to the node's Raft log, so this is the replicated-queue cost, with
one member here; each further member adds roughly its own share.

Usage: python -m bench.rabbitmq [--runs N] [--processes P]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import redis

from adaptive_worker_client import RunClient
from bench.workload import synthetic_runs
from storage.store import Store
from tests.pipeline import caught_up, celery_workers, wait_until, worker_env
from worker.settings import load_settings

_TICK = os.sysconf("SC_CLK_TCK")


def node_cpu_s() -> float:
    """CPU seconds of every RabbitMQ (Erlang VM) process on this machine."""
    pids = subprocess.run(["pgrep", "beam"], capture_output=True, text=True).stdout.split()
    if not pids:
        raise SystemExit("no RabbitMQ (beam.smp) process found")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def measure(runs: int, processes: int, redis_url: str) -> dict[str, float]:
    vhost = f"bench-{uuid.uuid4().hex[:8]}"
    prefix = f"bench-rmq:{uuid.uuid4().hex[:8]}:"
    broker = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    store = Store(redis.Redis.from_url(redis_url, decode_responses=True), prefix)
    agents = [f"agent-{i}" for i in range(4)]
    payloads = []
    for i, agent in enumerate(agents):
        payloads += list(synthetic_runs(runs // 4, agent_id=agent, seed=300 + i))
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        with tempfile.TemporaryDirectory() as tmp:
            settings = load_settings(
                _env_file=None,
                redis_url=redis_url,
                broker_url=broker,
                key_prefix=prefix,
                client_spool_dir=Path(tmp) / "spool",
            )
            client = RunClient(settings)
            client.start()
            client.flush(30)  # connected and the queues declared
            idle0, t_idle = node_cpu_s(), time.perf_counter()
            time.sleep(3.0)
            idle_rate = (node_cpu_s() - idle0) / (time.perf_counter() - t_idle)
            cpu0, t0 = node_cpu_s(), time.perf_counter()
            client.submit_runs(payloads)
            assert client.flush(300), "publishing did not finish"
            cpu1, t1 = node_cpu_s(), time.perf_counter()
            client.close(5)
            env = worker_env(prefix, redis_url, broker_url=broker)
            with celery_workers(env, Path(tmp)) as workers:
                workers.start("rmq", concurrency=processes)
                start = time.perf_counter()
                wait_until(
                    lambda: caught_up(store, agents, dict.fromkeys(agents, runs // 4)), 600, "drain"
                )
                elapsed = time.perf_counter() - start
                cpu2, t2 = node_cpu_s(), time.perf_counter()
        n = len(payloads)
        # The node's own background work (timers, stats) is not the runs' cost.
        return {
            "publish_us": (cpu1 - cpu0 - idle_rate * (t1 - t0)) / n * 1e6,
            "deliver_us": (cpu2 - cpu1 - idle_rate * (t2 - t1)) / n * 1e6,
            "drain_runs_s": n / elapsed,
            "idle_cores": idle_rate,
        }
    finally:
        store.delete_prefix()
        rabbitmqctl("delete_vhost", vhost)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=4000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = ap.parse_args()
    r = measure(args.runs, args.processes, args.redis_url)
    total = r["publish_us"] + r["deliver_us"]
    print(
        f"RabbitMQ node CPU per learned run: publish {r['publish_us']:.0f} us + deliver/ack "
        f"{r['deliver_us']:.0f} us = {total:.0f} us (~{1e6 / total:,.0f} runs/s per busy core); "
        f"worker drain {r['drain_runs_s']:.0f} runs/s with {args.processes} processes "
        f"(node idle: {r['idle_cores'] * 100:.1f}% of a core, subtracted)"
    )


if __name__ == "__main__":
    main()
