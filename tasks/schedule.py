"""The beat schedule: which maintenance tasks run periodically, and how often.

It lives with the tasks (their names come from the contract) rather than in
`worker.celery`, which only wires it into the app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adaptive_worker_client.contract import DISCOVER_TASK, REBUILD_ALL_TASK, RETENTION_TASK

if TYPE_CHECKING:
    from worker.settings import Settings

__all__ = ["beat_schedule"]


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Periodic tasks; each period comes from settings and None switches it off.

    Every entry is idempotent, and `expires` drops a run that waited longer
    than its own period (a backlog must not replay a pile of sweeps).
    """
    entries = {
        "discover": (DISCOVER_TASK, settings.discover_interval_s),
        "rebuild-all": (REBUILD_ALL_TASK, settings.rebuild_interval_s),
        "retention": (RETENTION_TASK, settings.retention_interval_s),
    }
    return {
        name: {"task": task, "schedule": period, "options": {"expires": period}}
        for name, (task, period) in entries.items()
        if period
    }
