"""Deprecated alias of `adaptive_worker_client.relay` (kept for one release).

The NeMo Relay integration moved into the client distribution, as its
`[relay]` extra: `pip install 'adaptive-worker-client[relay]'` and import
`adaptive_worker_client.relay`. The names below are the same objects.
"""

from __future__ import annotations

import warnings

from adaptive_worker_client.relay import *  # noqa: F403
from adaptive_worker_client.relay import __all__  # noqa: F401

warnings.warn(
    "tasks.relay is deprecated: import adaptive_worker_client.relay instead",
    DeprecationWarning,
    stacklevel=2,
)
