"""Import cost of the agent-side client vs a bare `import redis`, same venv, same run.

Each import runs in a fresh interpreter (`python -c`), N times, alternating,
so both see the same machine state; we report the median wall time of the
whole interpreter run and its peak RSS (ru_maxrss of the child). The issue's
budget: the client at most 1.5x bare redis.

    python -m bench.imports [-n 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

CASES = {
    "python (nothing)": "pass",
    "import redis": "import redis",
    "import adaptive_worker_client": "import adaptive_worker_client",
    "from adaptive_worker_client import submit_run, load_plan": (
        "from adaptive_worker_client import submit_run, load_plan"
    ),
}


def measure(code: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one fresh interpreter running `code`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTIVE_")}
    start = time.perf_counter()
    pid = os.posix_spawn(sys.executable, [sys.executable, "-c", code], env)
    _, status, usage = os.wait4(pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{code!r} failed")
    return elapsed, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=15, help="runs per case (median reported)")
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in CASES}
    rss: dict[str, list[float]] = {name: [] for name in CASES}
    for code in CASES.values():
        measure(code)  # warm the file cache
    for _ in range(args.n):
        for name, code in CASES.items():
            t, m = measure(code)
            times[name].append(t)
            rss[name].append(m)
    base_t = statistics.median(times["import redis"])
    base_m = statistics.median(rss["import redis"])
    print(f"{'case':58} {'median s':>9} {'x redis':>8} {'RSS MB':>7} {'x redis':>8}")
    for name in CASES:
        t, m = statistics.median(times[name]), statistics.median(rss[name])
        print(f"{name:58} {t:9.3f} {t / base_t:8.2f} {m:7.1f} {m / base_m:8.2f}")


if __name__ == "__main__":
    main()
