"""The task request our tasks use: the pool process gets the body decoded once.

Why: for every protocol-2 message Celery's request (5.x) hands the prefork
pool both the raw body and the decoded arguments (it puts them in the
request's context), pickled into one job, and the pool process then decodes
the raw body again. For a 500-run ingest message that is a ~10 MB job (the
5 MB body twice) written through a pipe while the pool process waits, plus
~4 ms of JSON decoding in it (strace of a one-process drain: 9.0 MB read
per job).

The guard (`worker/guard.py`) has already decoded and checked every body
before Celery's strategy builds the request, and kombu caches that value on
the message (`message.payload`). Building the request as "decoded" with it
makes the job carry the arguments once (pickle keeps one copy of objects
shared between the context and the body) and the pool process skip the
second decode; the task receives exactly the same arguments.
"""

from __future__ import annotations

import weakref
from typing import Any

from celery.worker.request import Request

from worker import prefetch


class DecodedRequest(Request):  # type: ignore[misc]  # Celery is untyped
    """A `Request` built from the body the guard already decoded (see module doc),
    which also holds the prefetch window down while it is a long task
    (`worker/prefetch.py`), from its arrival until it is settled."""

    _prefetch_hold: prefetch.Hold | None = None

    def __init__(
        self, message: Any, *args: Any, body: Any = None, decoded: bool = False, **kwargs: Any
    ) -> None:
        # Celery's strategy passes protocol-2 messages as (message.body, not decoded).
        if not decoded and (body is None or body is message.body):
            body, decoded = message.payload, True
        super().__init__(message, *args, body=body, decoded=decoded, **kwargs)
        # From here, not from the hand-off to the pool: Celery's per-task
        # request class replaces `execute_using_pool`, and a message fetched
        # between the two would be reserved behind this task after all.
        self._prefetch_hold = prefetch.hold(self.task.name)
        if self._prefetch_hold is not None:
            # A request dropped unsettled (a connection lost, a strategy that
            # failed) gives the window back when it goes.
            weakref.finalize(self, self._prefetch_hold.release)

    def acknowledge(self) -> None:
        super().acknowledge()
        self._release_prefetch()

    def reject(self, requeue: bool = False) -> None:
        super().reject(requeue=requeue)
        self._release_prefetch()

    def _release_prefetch(self) -> None:
        if self._prefetch_hold is not None:
            self._prefetch_hold.release()
            self._prefetch_hold = None
