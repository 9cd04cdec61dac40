"""Moved to `adaptive_worker_client.errors` (the client distribution): the run-record
format and its rules are the contract between agents, the runtime and the workers,
so they are defined once, in the package agents install. Re-exported here so every
server import keeps working.
"""

from adaptive_worker_client.errors import *  # noqa: F403
from adaptive_worker_client.errors import __all__  # noqa: F401
