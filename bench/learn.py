"""Learning throughput, and proof that per-run cost does not grow with history.

Measures, in one process on capture-shaped runs (bench/workload.py):
  1. engine only: `fold` one run at a time (the runtime's own granularity)
     and in batches of 100, learned runs/s (and without the t-digest's C
     kernel, when it is built);
  2. the per-run cost of learning one more run for an agent with 100 prior
     runs and for one with N prior runs, through the real store (Redis) and
     commit path, probed alternately so noise hits both alike; the ratio
     must stay within 1.2x because learning never reads history.
Usage: python -m bench.learn [--redis-url URL] [--history N]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from bench.workload import synthetic_runs
from storage.models import RunRecord, parse_wire
from storage.store import Store
from tasks.learning import catch_up, ingest
from worker.engine import native
from worker.engine.fold import AgentState, EngineConfig, fold
from worker.gc_tuning import tune
from worker.settings import Settings


def _records(n: int, seed: int) -> list[RunRecord]:
    return [parse_wire(RunRecord, r) for r in synthetic_runs(n, seed=seed)]


@contextmanager
def worker_gc() -> Iterator[None]:
    """The garbage collector as a worker process runs it (worker/gc_tuning.py),
    so the engine's baseline gets the same help as the pipeline it is compared
    with; restored after."""
    threshold = gc.get_threshold()
    tune(Settings.model_fields["worker_gc_threshold"].default)
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def engine_baseline(n: int = 2000, batch: int = 100, repeats: int = 3) -> dict[str, float]:
    """Engine runs/s, the best of `repeats`, with Python's collector as it comes
    and as a worker tunes it; "best" is the higher, the conservative baseline."""
    default = max(engine_throughput(n, batch) for _ in range(repeats))
    with worker_gc():
        tuned = max(engine_throughput(n, batch) for _ in range(repeats))
    return {"default gc": default, "worker gc": tuned, "best": max(default, tuned)}


def engine_throughput(n: int, batch: int) -> float:
    runs = _records(n, seed=1)
    state = AgentState("bench-agent")
    start = time.perf_counter()
    for i in range(0, n, batch):
        fold(state, runs[i : i + batch])
    return n / (time.perf_counter() - start)


def interleaved_costs(
    store: Store, agents: tuple[str, str], probes: dict[str, list[dict]], config: EngineConfig
) -> dict[str, float]:
    """Median seconds to ingest + learn one run (one run per commit, as the runtime does),
    probing the two agents alternately so machine noise hits both alike."""
    times: dict[str, list[float]] = {a: [] for a in agents}
    for pair in zip(*(probes[a] for a in agents), strict=True):
        for agent, run in zip(agents, pair, strict=True):
            t0 = time.perf_counter()
            ingest(store, [run], 8 << 20)
            catch_up(store, agent, max_runs=1, config=config)
            times[agent].append(time.perf_counter() - t0)
    return {a: statistics.median(t) for a, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--history", type=int, default=100_000)
    ap.add_argument("--probes", type=int, default=300)
    args = ap.parse_args()

    single = engine_throughput(2000, 1)
    batched = engine_throughput(2000, 100)
    print(f"engine, 1 run per fold:   {single:8.0f} runs/s")
    print(f"engine, 100 runs per fold: {batched:8.0f} runs/s (t-digest: {native.IMPLEMENTATION})")
    with worker_gc():
        tuned = engine_throughput(2000, 100)
    print(f"  the same with the worker's gc tuning: {tuned:8.0f} runs/s")
    if native.KERNEL is not None:
        native.use_kernel(None)
        try:
            loop = engine_throughput(2000, 100)
        finally:
            native.use_kernel(native.KERNEL)
        print(f"  the same without the C kernel: {loop:8.0f} runs/s ({batched / loop:.2f}x)")

    client = redis.Redis.from_url(args.redis_url, decode_responses=True)
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    store = Store(client, prefix)
    config = EngineConfig()
    try:
        late, early = "agent-late", "agent-early"
        history = list(synthetic_runs(args.history + args.probes, agent_id=late, seed=2))
        t0 = time.perf_counter()
        for i in range(0, args.history, 1000):
            ingest(store, history[i : i + 1000], 8 << 20)
            catch_up(store, late, max_runs=500, config=config)
        bulk = args.history / (time.perf_counter() - t0)
        young = list(synthetic_runs(100 + args.probes, agent_id=early, seed=3))
        ingest(store, young[:100], 8 << 20)
        catch_up(store, early, max_runs=500, config=config)
        probes = {late: history[args.history :], early: young[100:]}
        cost = interleaved_costs(store, (early, late), probes, config)
        print(f"store+learn, batches of 500: {bulk:8.0f} runs/s (ingest included)")
        print(f"one run after 100 prior runs:     {cost[early] * 1e3:7.3f} ms")
        print(f"one run after {args.history} prior runs: {cost[late] * 1e3:7.3f} ms")
        print(f"ratio late/early: {cost[late] / cost[early]:.3f} (target <= 1.2)")
    finally:
        store.delete_prefix()


if __name__ == "__main__":
    main()
