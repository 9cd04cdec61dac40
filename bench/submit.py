"""Agent-side cost of `submit_run` against a bare Redis RPUSH of the same record.

The client's promise is that handing a run to the workers costs the agent no
more than the cheapest thing it could do itself: one RPUSH of the record to
a local Redis. Both are timed per call on the same captured run record
(about 10 KB of JSON), in the same process, in alternating blocks so machine
noise hits both alike:

- `text`: the agent has the JSON text already (RPUSH text / submit text);
- `dict`: the agent has a dict (RPUSH of it JSON-encoded / submit d), the same
  compact encoder on both sides;
- paced: a short sleep between calls, as an agent does work between runs
  (the publisher thread publishes to the real broker meanwhile);
- burst: back-to-back calls, the worst case for contention with the
  publisher thread (which batches them into few messages).

Usage: python -m bench.submit [--redis-url URL] [-n CALLS] [--pace-us US]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from adaptive_worker_client import RunClient
from worker.settings import load_settings

FIXTURES = Path(
    os.environ.get(
        "ADAPTIVE_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
    )
)
RUN_FILE = FIXTURES / "relay-openai" / "raw" / "run_record.01.raw"


def _time_calls(fn: Callable[[Any], object], arg: Any, n: int, pace_s: float) -> list[int]:
    """Nanoseconds per call; `pace_s` of sleep between calls (0: back to back)."""
    out = [0] * n
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        fn(arg)
        out[i] = clock() - t0
        if pace_s:
            time.sleep(pace_s)
    return out


def _pct(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("-n", type=int, default=4000, help="calls per case and mode")
    parser.add_argument("--pace-us", type=float, default=500.0, help="sleep between paced calls")
    parser.add_argument("--rounds", type=int, default=4, help="alternating blocks per case")
    args = parser.parse_args()

    text = RUN_FILE.read_text()
    record = json.loads(text)
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    settings = load_settings(
        _env_file=None,
        redis_url=args.redis_url,
        key_prefix=prefix,
        client_spool_dir=Path(tempfile.mkdtemp(prefix="adaptive-bench-spool-")),
    )
    client = RunClient(settings)
    rds = redis.Redis.from_url(args.redis_url)
    rds.ping()
    list_key = f"{prefix}bare_rpush"

    def rpush_text(t: str) -> None:
        rds.rpush(list_key, t)

    # The same compact encoder the client uses, so only the hand-off differs.
    encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False)

    def rpush_dict(d: dict[str, Any]) -> None:
        rds.rpush(list_key, encoder.encode(d))

    cases: list[tuple[str, Callable[[Any], object], Callable[[Any], object], Any]] = [
        ("text", rpush_text, client.submit_run, text),
        ("dict", rpush_dict, client.submit_run, record),
    ]
    # Warm up: connections, the publisher thread, the Celery app.
    for _ in range(200):
        rpush_text(text)
        client.submit_run(text)
    client.flush(10)

    rows = []
    started = time.perf_counter()
    per_block = max(1, args.n // args.rounds)
    for mode, pace in (("paced", args.pace_us / 1e6), ("burst", 0.0)):
        for name, bare, submit, arg in cases:
            bare_ns: list[int] = []
            submit_ns: list[int] = []
            for _ in range(args.rounds):
                gc.collect()
                bare_ns += _time_calls(bare, arg, per_block, pace)
                rds.delete(list_key)
                gc.collect()
                submit_ns += _time_calls(submit, arg, per_block, pace)
                client.flush(30)
                _clear(rds, prefix)
            rows.append((name, mode, bare_ns, submit_ns))

    stats = client.stats()
    client.close()
    _clear(rds, prefix)

    print(f"record: {RUN_FILE.name}, {len(text)} bytes; {per_block * args.rounds} calls per cell")
    header = (
        f"{'input':<6} {'mode':<6} | {'rpush p50':>9} {'p99':>8} | "
        f"{'submit p50':>10} {'p99':>8} | {'ratio p50':>9} {'p99':>6}"
    )
    print(header)
    print("-" * len(header))
    for name, mode, bare_ns, submit_ns in rows:
        b50, b99 = _pct(bare_ns, 0.50), _pct(bare_ns, 0.99)
        s50, s99 = _pct(submit_ns, 0.50), _pct(submit_ns, 0.99)
        print(
            f"{name:<6} {mode:<6} | {b50:>7.1f}us {b99:>6.1f}us | "
            f"{s50:>8.1f}us {s99:>6.1f}us | {s50 / b50:>9.3f} {s99 / b99:>6.3f}"
        )
    print(
        f"publisher: {stats['published']} runs in {stats['messages']} messages, "
        f"dropped {stats['dropped']}, errors {stats['errors']}; "
        f"{time.perf_counter() - started:.1f} s"
    )


def _clear(rds: redis.Redis, prefix: str) -> None:
    keys = list(rds.scan_iter(f"{prefix}*", count=1000))
    if keys:
        rds.delete(*keys)


if __name__ == "__main__":
    main()
