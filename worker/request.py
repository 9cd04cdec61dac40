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

from typing import Any

from celery.worker.request import Request


class DecodedRequest(Request):  # type: ignore[misc]  # Celery is untyped
    """A `Request` built from the body the guard already decoded (see module doc)."""

    def __init__(
        self, message: Any, *args: Any, body: Any = None, decoded: bool = False, **kwargs: Any
    ) -> None:
        # Celery's strategy passes protocol-2 messages as (message.body, not decoded).
        if not decoded and (body is None or body is message.body):
            body, decoded = message.payload, True
        super().__init__(message, *args, body=body, decoded=decoded, **kwargs)
