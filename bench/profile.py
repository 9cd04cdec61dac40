"""Where a learned run's worker CPU goes: parse, fold, encode, Redis, the rest.

In one process, on the real Redis, the work the Celery tasks do for
capture-shaped runs arriving in messages of 100 runs of one agent, timed in
process CPU per phase (each function below is wrapped; a phase nested in
another counts only for itself):

- before (fast path off): `ingest` validates and stores, then the learn
  task's `catch_up` reads the runs back, parses them again and folds;
- after (fast path on): `ingest`, then `learn_ingested` folds the runs
  ingest already holds.

Phases: parse (validate_run: strict JSON, pydantic, the run's stored JSON;
learnable_run and engine_run: the engine's view), fold (the engine), encode
(the changed state to JSON), Redis (every Store call: redis-py and the
socket), other (the rest of ingest and learn). What Celery adds on top
(message decode, the pool hand-off, acks) is not in this process:
`bench.pipeline` measures the whole worker's CPU per run, and the
difference is Celery's share.

The process's garbage collector is tuned as a worker tunes it
(worker/gc_tuning.py) unless `--python-gc` leaves it as Python configured it:
with the default, collections walking the whole heap during the parse cost
about as much as the parse itself.

Usage: python -m bench.profile [--runs N] [--redis-url URL] [--python-gc]
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import wraps
from typing import Any

import orjson
import redis

from bench.learn import worker_gc
from bench.workload import synthetic_runs
from storage.store import Store
from tasks import learning
from worker.engine.fold import EngineConfig

PHASES = ("parse", "fold", "encode", "redis", "other")
_WRAPPED = {
    "parse": [(learning, "validate_run"), (learning, "learnable_run"), (learning, "engine_run")],
    "fold": [(learning, "fold"), (learning, "required_windows")],
    "encode": [(learning, "state_writes")],
    "redis": [
        (Store, name)
        for name in (
            "store_runs_detailed",
            "read_learn_batch",
            "read_state",
            "get_many",
            "commit",
            "acquire_lease",
            "release_lease",
            "push_dead_letters",
            "incr_counter",
            "mark_pending",
        )
    ],
}


@contextmanager
def phases() -> Iterator[dict[str, float]]:
    """Wrap each phase's functions; yields CPU seconds per phase (exclusive)."""
    totals = dict.fromkeys(PHASES, 0.0)
    stack: list[list[Any]] = []  # [phase, start] of the calls in progress

    def timed(fn: Callable[..., Any], phase: str) -> Callable[..., Any]:
        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            now = time.process_time()
            if stack:
                totals[stack[-1][0]] += now - stack[-1][1]
            stack.append([phase, now])
            try:
                return fn(*args, **kwargs)
            finally:
                end = time.process_time()
                done = stack.pop()
                totals[done[0]] += end - done[1]
                if stack:
                    stack[-1][1] = end

        return wrapper

    originals = []
    for phase, targets in _WRAPPED.items():
        for owner, name in targets:
            fn = getattr(owner, name)
            originals.append((owner, name, fn))
            setattr(owner, name, timed(fn, phase))
    try:
        yield totals
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument(
        "--python-gc", action="store_true", help="leave the collector as Python configured it"
    )
    args = ap.parse_args()
    with nullcontext() if args.python_gc else worker_gc():
        profile(args.redis_url, args.runs, args.batch)


def profile(redis_url: str, runs: int, batch: int) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    config = EngineConfig()
    messages = [
        [orjson.dumps(r).decode() for r in synthetic_runs(batch, seed=s, agent_id="prof")]
        for s in range(runs // batch)
    ]
    results = {}
    for mode in ("before", "after"):
        store = Store(client, f"bench-prof:{uuid.uuid4().hex[:8]}:")
        try:
            with phases() as totals:
                start = time.process_time()
                for payloads in messages:
                    result = learning.ingest(store, payloads, 8 << 20)
                    if mode == "after":
                        assert learning.learn_ingested(store, result, config=config, max_runs=500)
                    else:
                        learning.catch_up(store, "prof", max_runs=500, config=config)
                total = time.process_time() - start
            totals["other"] += total - sum(totals.values())
            results[mode] = (dict(totals), total)
            assert store.counters()["runs_learned"] == runs
        finally:
            store.delete_prefix()
    n = runs
    print(f"CPU per learned run, ms ({n} runs in messages of {batch}, one agent)")
    print("| path | " + " | ".join(PHASES) + " | total |")
    print("|---" * (len(PHASES) + 2) + "|")
    for mode, (split, total) in results.items():
        cells = " | ".join(f"{split[b] / n * 1e3:.3f}" for b in PHASES)
        print(f"| {mode} | {cells} | {total / n * 1e3:.3f} |")


if __name__ == "__main__":
    main()
