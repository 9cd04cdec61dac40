"""Python's cyclic garbage collector, tuned for a worker that parses runs all day.

Why: parsing a run allocates hundreds of dicts and lists (orjson's value,
pydantic's models, the engine's view), and CPython runs a young-generation
collection every 700 such allocations, and from time to time a full one
that walks every container in the process: Celery, kombu, pydantic's
schemas, the modules themselves. A profile of the ingest + fold path
(`bench.profile`) spent about half of each run's CPU in those walks,
although what a run allocates is freed by reference counting (our models,
orjson values and the engine's state hold no reference cycles).

What: each process that runs tasks (a prefork pool child, or the main
process of a solo or threads pool, and the consumer that decodes messages)
freezes the heap it has once started (`gc.freeze()`: start-up objects are
never walked again; after a fork this also keeps the parent's pages shared)
and raises the young generation's threshold from 700 to
`ADAPTIVE_WORKER_GC_THRESHOLD`. CPython counts that threshold in live
containers gained since the last collection (allocations minus frees), and
a 500-run ingest message keeps ~85,000 alive until its task ends: at 20,000
the collector still walked them several times per message (12% of a pool
process's CPU, gen-1 walks of ~40 ms each). At 500,000 a collection comes
only when something really accumulates; peak memory of a draining pool
process was the same (215-219 MB), and cyclic garbage waits for at most
that many objects. 0 leaves the collector as Python configured it.
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Any

from celery.signals import worker_process_init, worker_ready

from worker.settings import Settings

log = logging.getLogger(__name__)
_installed = False


def tune(threshold: int) -> bool:
    """Freeze what is alive now and collect young objects only once `threshold`
    more containers are alive; False (and nothing changed) when `threshold` is 0."""
    if threshold <= 0:
        return False
    _, older, oldest = gc.get_threshold()
    gc.collect()  # start-up garbage freed now, not frozen for the process's life
    gc.freeze()
    gc.set_threshold(threshold, older, oldest)
    return True


def install(settings: Settings) -> None:
    """Tune every worker process once it is ready to run tasks (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True

    def _tune(**_: Any) -> None:
        if tune(settings.worker_gc_threshold):
            log.info(
                "gc tuned in process %d: %d start-up objects frozen, young collections"
                " once %d more containers are alive",
                os.getpid(),
                gc.get_freeze_count(),
                settings.worker_gc_threshold,
            )

    # weak=False: the receivers are closures that nothing else references.
    worker_process_init.connect(_tune, weak=False)  # each prefork pool child
    worker_ready.connect(_tune, weak=False)  # the main process (consumer; solo/threads pools)
