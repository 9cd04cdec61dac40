"""What one learned run costs Redis: commands, bytes and server CPU (docs/scaling.md).

Counts, not timings, so they hold on any machine: a private redis-server
(no other client) receives the ingest and learn of N capture-shaped runs
for A agents through the real storage and learning code, in batches as the
workers make them (one ingest script per client batch of 100, one learn
commit per `--learn-batch` runs), and INFO's own counters are read before
and after. Server CPU (used_cpu_user + used_cpu_sys) is a timing and
varies with the machine; it is reported beside the counts.

With `--fast-path` the workers' ingest fast path is measured instead: the
client groups each agent's runs in a message (as RunClient does), and each
ingest learns its runs from memory (`learn_ingested`): no learn read-back.

Usage: python -m bench.capacity [--runs 2000] [--agents 8] [--learn-batch 100]
       [--client-batch 100] [--fast-path]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

import redis

from bench.workload import synthetic_runs
from storage.store import Store
from tasks.learning import catch_up, ingest, learn_ingested
from worker.engine.fold import EngineConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _stats(client: redis.Redis) -> dict[str, float]:
    info = client.info("all")
    calls = sum(
        int(v["calls"]) for k, v in info.items() if k.startswith("cmdstat_") and isinstance(v, dict)
    )
    return {
        "commands": calls,
        "net_in": int(info["total_net_input_bytes"]),
        "net_out": int(info["total_net_output_bytes"]),
        "cpu_s": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
        "memory": int(info["used_memory"]),
    }


def measure(
    runs: int, agents: int, learn_batch: int, client_batch: int = 100, fast_path: bool = False
) -> dict[str, Any]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found")
    port = _free_port()
    with tempfile.TemporaryDirectory() as workdir:
        cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        proc = subprocess.Popen(
            [*cmd, "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL
        )
        try:
            client = redis.Redis(port=port, decode_responses=True)
            for _ in range(100):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            store = Store(client, "cap:")
            payloads = [
                json.dumps(r)
                for i in range(agents)
                for r in synthetic_runs(runs // agents, agent_id=f"agent-{i}", seed=i)
            ]
            per = runs // agents
            if fast_path:  # each message one agent's runs, as RunClient groups them
                order = payloads[: per * agents]
            else:  # interleave agents as a shared broker queue would
                order = [payloads[a * per + k] for k in range(per) for a in range(agents)]
            config = EngineConfig()
            client.config_resetstat()
            before = _stats(client)
            for i in range(0, len(order), client_batch):
                result = ingest(store, order[i : i + client_batch], 8 << 20)
                if fast_path:
                    learn_ingested(store, result, config=config, max_runs=learn_batch)
            mid = _stats(client)
            for a in range(agents):
                catch_up(store, f"agent-{a}", max_runs=learn_batch, config=config)
            after = _stats(client)
            learned = store.counters().get("runs_learned", 0)
            assert learned == len(order), f"learned {learned} of {len(order)}"
        finally:
            proc.terminate()
            proc.wait(10)
    n = len(order)

    def per_run(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        return {k: (b[k] - a[k]) / n for k in ("commands", "net_in", "net_out", "cpu_s")}

    return {
        "runs": n,
        "agents": agents,
        "learn_batch": learn_batch,
        "client_batch": client_batch,
        "fast_path": fast_path,
        "ingest": per_run(before, mid),
        "learn": per_run(mid, after),
        "total": per_run(before, after),
        "memory_per_run": (after["memory"] - before["memory"]) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--learn-batch", type=int, default=100)
    parser.add_argument("--client-batch", type=int, default=100)
    parser.add_argument("--fast-path", action="store_true")
    args = parser.parse_args()
    result = measure(args.runs, args.agents, args.learn_batch, args.client_batch, args.fast_path)
    print(json.dumps(result, indent=2))
    t = result["total"]
    print(
        f"per learned run: {t['commands']:.2f} commands, {t['net_in'] / 1024:.1f} KiB in,"
        f" {t['net_out'] / 1024:.1f} KiB out, {t['cpu_s'] * 1e6:.0f} us Redis CPU,"
        f" {result['memory_per_run'] / 1024:.1f} KiB memory"
    )


if __name__ == "__main__":
    main()
