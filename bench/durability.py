"""What `ADAPTIVE_DURABILITY_REPLICAS=1` costs per stored run.

Starts a private primary and one replica (redis-server on free ports, no
persistence), then stores the same capture-shaped runs (bench/workload.py)
through `Store.store_runs` with WAIT off (N=0) and on (N=1), in batches of 1
(one ingest message per run: the worst case) and of 100 (the client's
default message size). Rounds alternate N=0 and N=1 so noise hits both
alike; each round uses a fresh key prefix, so every run is new. Medians of
`--rounds`. One learn commit pays the same single extra round trip per
commit as one stored batch.
Usage: python -m bench.durability [--runs 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from bench.workload import synthetic_runs
from storage.models import RunRecord, parse_wire
from storage.store import Store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def primary_and_replica() -> Iterator[tuple[int, int]]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found")
    procs: list[subprocess.Popen[bytes]] = []
    ports = (_free_port(), _free_port())
    with tempfile.TemporaryDirectory() as workdir:
        try:
            for i, port in enumerate(ports):
                extra = ["--replicaof", "127.0.0.1", str(ports[0])] if i else []
                extra += ["--repl-diskless-sync-delay", "0"]
                cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
                cmd += ["--appendonly", "no", "--dir", workdir, *extra]
                procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
            primary = redis.Redis(port=ports[0])
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    # The primary counts the replica for WAIT once it acked.
                    if primary.wait(1, 200) >= 1:
                        break
                except redis.ConnectionError:
                    pass
                time.sleep(0.1)
            else:
                raise SystemExit("replica did not sync")
            yield ports
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)


def per_run_ms(client: redis.Redis, runs: list[RunRecord], batch: int, replicas: int) -> float:
    store = Store(client, f"bench-dur:{uuid.uuid4().hex[:8]}:", durability_replicas=replicas)
    start = time.perf_counter()
    for i in range(0, len(runs), batch):
        store.store_runs(runs[i : i + batch])
    elapsed = time.perf_counter() - start
    store.delete_prefix()
    return elapsed * 1000 / len(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    runs = [parse_wire(RunRecord, r) for r in synthetic_runs(args.runs, seed=3)]
    with primary_and_replica() as (primary, _replica):
        client = redis.Redis(port=primary, decode_responses=True)
        print(f"{args.runs} runs, medians of {args.rounds} alternating rounds")
        print("| batch | N=0 ms/run | N=1 ms/run | WAIT cost ms/run | x |")
        print("|---:|---:|---:|---:|---:|")
        for batch in (1, 100):
            timings: dict[int, list[float]] = {0: [], 1: []}
            for _ in range(args.rounds):
                for replicas in (0, 1):
                    timings[replicas].append(per_run_ms(client, runs, batch, replicas))
            off = statistics.median(timings[0])
            on = statistics.median(timings[1])
            print(f"| {batch} | {off:.3f} | {on:.3f} | {on - off:.3f} | {on / off:.2f} |")


if __name__ == "__main__":
    main()
