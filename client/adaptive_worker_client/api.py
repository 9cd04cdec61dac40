"""The module-level API: one run client and one state reader per process, made on first use.

`submit_run(run)` and `load_plan(agent_id)` are what most agents call; both
use objects built from the process's agent settings (`config.get_settings`)
and never raise into the agent.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from adaptive_worker_client.publisher import RunClient
from adaptive_worker_client.reader import StateReader

if TYPE_CHECKING:
    from adaptive_worker_client.encode import RunInput
    from adaptive_worker_client.wire import ExecutionPlan, StabilityAnalysisResult

__all__ = [
    "default_client",
    "default_reader",
    "flush",
    "load_hints",
    "load_plan",
    "load_stability",
    "stats",
    "submit_run",
    "submit_runs",
]

# ---------------------------------------------------- the default client

_default: RunClient | None = None
_default_lock = threading.Lock()


def default_client() -> RunClient:
    """The process's client, made on first use from the process settings."""
    global _default
    client = _default
    if client is None:
        with _default_lock:
            if _default is None:
                _default = RunClient()
            client = _default
    return client


def submit_run(run: RunInput) -> None:
    """Hand one finished run to the workers (see `RunClient.submit_run`)."""
    (_default or default_client()).submit_run(run)


def submit_runs(runs: Iterable[RunInput]) -> None:
    (_default or default_client()).submit_runs(runs)


def flush(timeout: float = 5.0) -> bool:
    return (_default or default_client()).flush(timeout)


def stats() -> dict[str, int | bool | str | None]:
    return (_default or default_client()).stats()


# ---------------------------------------------------- the default reader

_default_reader: StateReader | None = None


def default_reader() -> StateReader:
    """The process's state reader, made on first use from the process settings."""
    global _default_reader
    reader = _default_reader
    if reader is None:
        with _default_lock:
            if _default_reader is None:
                _default_reader = StateReader()
            reader = _default_reader
    return reader


def load_plan(agent_id: str) -> ExecutionPlan | None:
    """The agent's tool-parallelism plan, cached (see `StateReader.load_plan`)."""
    return (_default_reader or default_reader()).load_plan(agent_id)


def load_hints(
    agent_id: str, path: Sequence[str] = (), call_index: int = 1
) -> dict[str, Any] | None:
    """Agent hints for one LLM call, cached (see `StateReader.load_hints`)."""
    return (_default_reader or default_reader()).load_hints(agent_id, path, call_index)


def load_stability(agent_id: str) -> StabilityAnalysisResult | None:
    """The agent's ACG seed stability, cached (see `StateReader.load_stability`)."""
    return (_default_reader or default_reader()).load_stability(agent_id)
