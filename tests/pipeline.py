"""Real `celery worker` processes for pipeline tests (no Docker, no eager mode).

Each worker runs in its own session (`setsid`) so a test can kill the whole
process group (main process and pool children) with SIGKILL, as a crash or an
OOM kill would. Configuration reaches the workers only through `ADAPTIVE_`
environment variables, as in production.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from storage.keys import OWN, RUNTIME_KINDS
from storage.store import Store
from worker.engine.fold import without_volatile

CELERY = str(Path(sys.executable).with_name("celery"))
ROOT = Path(__file__).resolve().parents[1]


def message_body(envelope: dict[str, Any]) -> bytes:
    """The Celery body of a Redis-broker envelope: base64 decoded, inflated if zlib."""
    body = base64.b64decode(envelope["body"])
    if envelope["headers"].get("compression") == "application/x-gzip":
        body = zlib.decompress(body)
    return body


def worker_env(prefix: str, redis_url: str, **settings: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTIVE_")}
    env.update(
        {
            "ADAPTIVE_REDIS_URL": redis_url,
            "ADAPTIVE_KEY_PREFIX": prefix,
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update({f"ADAPTIVE_{k.upper()}": str(v) for k, v in settings.items()})
    return env


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def ready(self) -> bool:
        """Celery logged " ready.": the worker consumes from now on."""
        return b" ready." in self.log.read_bytes()

    def kill_group(self) -> None:
        """SIGKILL the worker and its pool children at once (a crash, not a shutdown)."""
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill_group()


@dataclass
class Workers:
    env: dict[str, str]
    logdir: Path
    started: list[Worker] = field(default_factory=list)
    # Prepended to the command: `("ip", "netns", "exec", ns)` runs the worker on
    # another "host" (tests/netns.py); it execs, so the pid is still celery's.
    launcher: tuple[str, ...] = ()

    def start(
        self, name: str, concurrency: int = 2, timeout: float = 60.0, extra: tuple[str, ...] = ()
    ) -> Worker:
        worker = self.spawn(name, concurrency, extra)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if worker.proc.poll() is not None:
                raise RuntimeError(f"worker {name} exited:\n{worker.log.read_text()[-3000:]}")
            if worker.ready():
                return worker
            time.sleep(0.1)
        raise TimeoutError(f"worker {name} not ready:\n{worker.log.read_text()[-3000:]}")

    def spawn(self, name: str, concurrency: int = 2, extra: tuple[str, ...] = ()) -> Worker:
        """Start a worker without waiting for it (a restart that boots while others work)."""
        log = self.logdir / f"{name}.log"
        cmd = [
            *self.launcher,
            CELERY,
            "-A",
            "worker",
            "worker",
            "-Q",
            "adaptive.ingest,adaptive.learn,adaptive.maintenance",
            "-c",
            str(concurrency),
            "-n",
            f"{name}@%h",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=INFO",
            *extra,
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        worker = Worker(name, proc, log)
        self.started.append(worker)
        return worker

    def stop_all(self) -> None:
        for w in self.started:
            w.stop()


@contextmanager
def celery_workers(env: dict[str, str], logdir: Path) -> Iterator[Workers]:
    workers = Workers(env, logdir)
    try:
        yield workers
    finally:
        workers.stop_all()


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    state: Callable[[], str] = lambda: "",
    poll: float = 0.2,
) -> float:
    """Poll until `predicate()`; returns the seconds it took. `state` explains a timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{state()}")
        time.sleep(poll)
    return time.monotonic() - start


def caught_up(store: Store, agents: list[str], expected: dict[str, int]) -> bool:
    for agent in agents:
        cursor = store.cursor(agent)
        if cursor.index_length != expected[agent] or cursor.lag:
            return False
    return True


def dump_state(client: redis.Redis, prefix: str) -> dict[str, Any]:
    """Learned state under `prefix` (runtime kinds but runs), volatile fields blanked."""
    out: dict[str, Any] = {}
    for key in client.scan_iter(prefix.replace("*", r"\*") + "*"):
        rest = key[len(prefix) :]
        kind = rest.split(":", 1)[0]
        if rest.startswith(OWN + ":") or kind in ("runs", "runs_index"):
            continue
        assert kind in RUNTIME_KINDS, key
        out[rest] = without_volatile(kind, json.loads(client.get(key)))
    return out
