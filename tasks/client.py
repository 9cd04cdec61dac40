"""Deprecated alias of `adaptive_worker_client` (kept for one release).

The agent-side client is now its own distribution, `adaptive-worker-client`,
imported as `adaptive_worker_client`: as `tasks.client` it collided with the
`tasks.py` of every Celery project and pulled the whole worker into the
agent. Import from `adaptive_worker_client` instead; this module re-exports
the same objects (not copies), so either import path sees one client.
"""

from __future__ import annotations

import warnings

from adaptive_worker_client.api import (
    default_client,
    default_reader,
    flush,
    load_hints,
    load_plan,
    load_stability,
    stats,
    submit_run,
    submit_runs,
)
from adaptive_worker_client.errors import (
    BufferFull,
    ClientClosed,
    ClientError,
    StateUnavailable,
)
from adaptive_worker_client.publisher import RunClient
from adaptive_worker_client.reader import StateReader
from adaptive_worker_client.spool import UnsafeSpool, default_spool_dir, spool_scope

__all__ = [
    "BufferFull",
    "ClientClosed",
    "ClientError",
    "RunClient",
    "StateReader",
    "StateUnavailable",
    "UnsafeSpool",
    "default_client",
    "default_reader",
    "default_spool_dir",
    "flush",
    "load_hints",
    "load_plan",
    "load_stability",
    "spool_scope",
    "stats",
    "submit_run",
    "submit_runs",
]

warnings.warn(
    "tasks.client is deprecated: import adaptive_worker_client instead",
    DeprecationWarning,
    stacklevel=2,
)
