"""Process-wide hooks: nothing submitted is lost at exit, nothing is shared across a fork.

Every `RunClient` and `StateReader` registers here (weakly). At exit, every
client is closed, which publishes what it can within `client_exit_timeout_s`
and spools the rest; in a forked child, each object drops the locks, buffer,
spool and sockets it inherited.
"""

from __future__ import annotations

import atexit
import logging
import os
import weakref
from typing import Any

__all__ = ["ALL", "LIVE", "READERS"]

log = logging.getLogger("adaptive_worker_client.publisher")

LIVE: weakref.WeakSet[Any] = weakref.WeakSet()  # run clients started, not closed
ALL: weakref.WeakSet[Any] = weakref.WeakSet()  # every run client
READERS: weakref.WeakSet[Any] = weakref.WeakSet()  # every state reader


def _close_all_at_exit() -> None:
    # Every client, started or not: one whose publisher never started may
    # still hold runs, which close() spools.
    for client in list(ALL):
        try:
            client.close()
        except Exception:
            log.exception("closing the run client at exit failed")


def _after_fork_in_child() -> None:
    # The child has no publisher thread and must not reuse locks another
    # thread held at fork time, nor the parent's buffer, spool or sockets.
    LIVE.clear()
    for client in list(ALL):
        client._after_fork_in_child()
    for reader in list(READERS):
        reader._after_fork_in_child()


atexit.register(_close_all_at_exit)
os.register_at_fork(after_in_child=_after_fork_in_child)
