"""adaptive-worker-client: the agent side of adaptive-worker.

Hand finished runs to the workers (`submit_run`, `submit_runs`, `flush`,
`RunClient`) and read what they learned (`load_plan`, `load_hints`,
`load_stability`, `StateReader`). Fire-and-forget and read-through-cache:
nothing here raises into the agent unless it asks for `strict=True`, and a
bad setting in the environment is logged and replaced by its default.

Importing the package is nearly free: each name below is imported from its
module when first used (PEP 562), and those modules import Celery and
pydantic only when they publish or parse. The NeMo Relay integration is
`adaptive_worker_client.relay` (extra `adaptive-worker-client[relay]`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "submit_run": "api",
    "submit_runs": "api",
    "flush": "api",
    "stats": "api",
    "load_plan": "api",
    "load_hints": "api",
    "load_stability": "api",
    "default_client": "api",
    "default_reader": "api",
    "RunClient": "publisher",
    "StateReader": "reader",
    "ClientSettings": "config",
    "load_client_settings": "config",
    "ClientError": "errors",
    "BufferFull": "errors",
    "ClientClosed": "errors",
    "StateUnavailable": "errors",
    "InvalidRecord": "errors",
    "spool_scope": "spool",
}

__all__ = [
    "BufferFull",
    "ClientClosed",
    "ClientError",
    "ClientSettings",
    "InvalidRecord",
    "RunClient",
    "StateReader",
    "StateUnavailable",
    "default_client",
    "default_reader",
    "flush",
    "load_client_settings",
    "load_hints",
    "load_plan",
    "load_stability",
    "spool_scope",
    "stats",
    "submit_run",
    "submit_runs",
]

if TYPE_CHECKING:
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
    from adaptive_worker_client.config import ClientSettings, load_client_settings
    from adaptive_worker_client.errors import (
        BufferFull,
        ClientClosed,
        ClientError,
        InvalidRecord,
        StateUnavailable,
    )
    from adaptive_worker_client.publisher import RunClient
    from adaptive_worker_client.reader import StateReader
    from adaptive_worker_client.spool import spool_scope


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
