"""Hand-off: a pool process gets its next job before the consumer decodes another message.

Why: the consumer is one event loop. When a task ends, Celery acks it and
fetches the next message, and writes the job already reserved to the now
idle pool process, 64 KB per loop turn. If the fetched message is handled
meanwhile (a 500-run body: ~10 ms to inflate, decode and check), the job
waits for it, half written, and so does the pool process: with a prefetch
of 2 the next message was reserved and decoded in time, and still each
task started ~27 ms after the previous one ended (Celery's task signals
in a one-process drain). So a message that arrives while a job is being
written to a pool process (or waits for an idle one) is held back, in
order, until the write is done, or for `MAX_HOLD_S` at most.

Pool pipes are made 1 MiB (Linux's limit for unprivileged processes) for
the same reason: a 4 MB job then takes 4 loop turns, not 64.

Only Celery's prefork pool on an event loop has jobs in flight; with any
other pool (solo, threads) or an attribute Celery no longer has, messages
are handled at once, as before.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import time
from collections.abc import Callable
from typing import Any

__all__ = ["HandOff"]

log = logging.getLogger(__name__)

F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ from Python 3.10 on, Linux only
F_GETPIPE_SZ = 1032
WATCHED = ("_active_writes", "_busy_workers", "_all_inqueues", "outbound_buffer")
PIPE_BYTES = 1 << 20
POLL_S = 0.0005
MAX_HOLD_S = 0.05


class HandOff:
    """Wraps the consumer's message handler (see the module doc)."""

    def __init__(self, consumer: Any, handle: Callable[[Any], None]) -> None:
        self._consumer = consumer
        self._handle = handle
        self._held: collections.deque[tuple[float, Any]] = collections.deque()
        self._piped: set[tuple[int, int]] = set()
        self._announced = False

    def __call__(self, message: Any) -> None:
        hub, jobs = getattr(self._consumer, "hub", None), self._jobs()
        if hub is None or jobs is None:
            self._handle(message)
            return
        self._grow_pipes(jobs)
        if not self._announced:
            self._announce(jobs)
        if not self._held and not _writing(jobs):
            self._handle(message)
            return
        self._held.append((time.monotonic(), message))
        if len(self._held) == 1:
            hub.call_later(POLL_S, self._release)

    def reset(self) -> None:
        """Forget held messages: the connection they came on is gone, and the
        broker gives them out again (Redis restores them, RabbitMQ requeues)."""
        self._held.clear()

    def _release(self) -> None:
        jobs = self._jobs()
        while self._held:
            since, message = self._held[0]
            if jobs is not None and _writing(jobs) and time.monotonic() - since < MAX_HOLD_S:
                break
            self._held.popleft()
            self._handle(message)
        if self._held:
            self._consumer.hub.call_later(POLL_S, self._release)

    def _jobs(self) -> Any:
        """Celery's asynchronous prefork pool, once started (None otherwise)."""
        jobs = getattr(getattr(self._consumer, "pool", None), "_pool", None)
        return jobs if hasattr(jobs, "outbound_buffer") else None

    def _announce(self, jobs: Any) -> None:
        """Say once whether the hand-off works: it reads attributes of Celery's
        pool that a Celery upgrade could rename (then messages go straight
        through, as before; tests/test_pipeline.py looks for this line)."""
        self._announced = True
        missing = [name for name in WATCHED if not hasattr(jobs, name)]
        if missing:
            log.warning("hand-off off: Celery's pool has no %s", ", ".join(missing))
            return
        sizes = sorted({_pipe_size(fd) for _, fd in _inqueues(jobs)})
        log.info("hand-off on: jobs in flight watched; pool pipes of %s bytes", sizes)

    def _grow_pipes(self, jobs: Any) -> None:
        """1 MiB pipes to each pool process, set once per pipe, best effort."""
        for proc, fd in _inqueues(jobs):
            if (id(proc), fd) in self._piped:
                continue
            self._piped.add((id(proc), fd))
            try:
                fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_BYTES)
            except OSError as exc:  # not Linux, or a lower limit: 64 KB still works
                log.debug("pool pipe %d stays at its size: %s", fd, exc)


def _inqueues(jobs: Any) -> list[tuple[Any, int]]:
    """(process, the write end of its job pipe) for each pool process."""
    procs = list(getattr(jobs, "_pool", ()))
    return [(p, fd) for p in procs if isinstance(fd := getattr(p, "inqW_fd", None), int)]


def _pipe_size(fd: int) -> int:
    try:
        return fcntl.fcntl(fd, F_GETPIPE_SZ)
    except OSError:
        return -1


def _writing(jobs: Any) -> bool:
    """A job is being written to a pool process, or waits while one is idle."""
    if getattr(jobs, "_active_writes", None):
        return True
    busy, pipes = getattr(jobs, "_busy_workers", None), getattr(jobs, "_all_inqueues", None)
    if busy is None or pipes is None:
        return False
    return bool(jobs.outbound_buffer) and len(busy) < len(pipes)
