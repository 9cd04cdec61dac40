"""What agents and workers agree on, defined once (the server imports it from here).

An agent process and a worker process share no code at run time but this
package, so every name one side sends and the other side routes, and every
key one side writes and the other reads, lives here:

- queues and task names (the worker's routes and the client's publishes);
- the ingest message: task `INGEST_TASK`, positional args `[[run, ...]]`
  where each run is the JSON text of one run record (`wire.RunRecord`);
- the runtime's key layout the client reads (SPEC section 2): the server's
  `storage.keys.Keys` builds these kinds from `RUNTIME_KEY_TEMPLATES`;
- the prefix of the broker's own keys on a Redis broker.

Plain constants and string formatting only: importing this costs nothing.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CURSOR_KEY_TEMPLATE",
    "DISCOVER_TASK",
    "INGEST_QUEUE",
    "INGEST_TASK",
    "LEARNING_KEY_SEPARATOR",
    "LEARN_QUEUE",
    "LEARN_TASK",
    "MAINTENANCE_QUEUE",
    "OWN",
    "PUBLISHED_VERSION_FIELD",
    "QUEUES",
    "REBUILD_ALL_TASK",
    "REBUILD_TASK",
    "RETENTION_TASK",
    "RUNTIME_KEY_TEMPLATES",
    "STORED_AT_KEY_TEMPLATE",
    "TOMBSTONES_KEY_TEMPLATE",
    "agent_id_problem",
    "broker_key_prefix",
    "ingest_args",
    "runtime_key",
]

# ---- queues and tasks
INGEST_QUEUE: Final = "adaptive.ingest"
LEARN_QUEUE: Final = "adaptive.learn"
MAINTENANCE_QUEUE: Final = "adaptive.maintenance"
QUEUES: Final = (INGEST_QUEUE, LEARN_QUEUE, MAINTENANCE_QUEUE)

INGEST_TASK: Final = "adaptive.ingest_runs"
LEARN_TASK: Final = "adaptive.learn_agent"
DISCOVER_TASK: Final = "adaptive.discover"
REBUILD_TASK: Final = "adaptive.rebuild_agent"
REBUILD_ALL_TASK: Final = "adaptive.rebuild_all"
RETENTION_TASK: Final = "adaptive.retention"


def ingest_args(runs: list[str]) -> list[list[str]]:
    """Positional args of one `INGEST_TASK` message: one list of run JSON texts.

    A list of texts rather than parsed objects: the worker validates each run
    on its own (one bad run is one dead letter, not a lost batch), and the
    text the agent produced is what gets stored.
    """
    return [runs]


# ---- the runtime's key layout (SPEC section 2), byte for byte
RUNTIME_KEY_TEMPLATES: Final[dict[str, str]] = {
    "runs": "{prefix}runs:{agent_id}:{run_id}",
    "runs_index": "{prefix}runs_index:{agent_id}",
    "plan": "{prefix}plan:{agent_id}",
    "trie": "{prefix}trie:{agent_id}",
    "accumulators": "{prefix}accumulators:{agent_id}",
    "acg_observations": "{prefix}acg_observations:{key}",
    "acg_stability": "{prefix}acg_stability:{key}",
}
# Our own keys (never read by the client) live under this first segment,
# which is none of the runtime's kinds.
OWN: Final = "adaptive_worker"
LEARNING_KEY_SEPARATOR: Final = "::"


# Our per-agent cursor hash; its `version` field is the published state
# version (bumped by every learn commit and rebuild), which the NeMo Relay
# integration polls to know when to reload (`relay.watcher`).
CURSOR_KEY_TEMPLATE: Final = "{prefix}" + OWN + ":cursor:{agent_id}"
PUBLISHED_VERSION_FIELD: Final = "version"

# Read by the client's receipts (`receipts.py`) to learn which runs arrived:
# the store script adds a run id to the agent's stored-at zset in the same
# atomic step that stores the run, and retention moves it from there to the
# tombstone zset when it deletes the run, so an id is in one of the two from
# the moment its run is stored on.
STORED_AT_KEY_TEMPLATE: Final = "{prefix}" + OWN + ":stored_at:{agent_id}"
TOMBSTONES_KEY_TEMPLATE: Final = "{prefix}" + OWN + ":tombstones:{agent_id}"


def runtime_key(kind: str, prefix: str, **parts: str) -> str:
    """One key of the runtime's layout: `runtime_key("plan", "nemo_relay:", agent_id="a")`."""
    return RUNTIME_KEY_TEMPLATES[kind].format(prefix=prefix, **parts)


def broker_key_prefix(key_prefix: str) -> str:
    """Prefix of every broker key on a Redis broker (kombu `global_keyprefix`).

    The publishing client and the consuming worker must agree on it, or runs
    go to a queue nobody reads.
    """
    return f"{key_prefix}{OWN}:celery:"


def agent_id_problem(agent_id: str) -> str | None:
    """Why `agent_id` cannot be accepted, or None.

    The runtime names an agent's ACG learning keys `{agent}::model=...` and
    its seed profile plain `{agent}` (SPEC section 2), so an agent whose id
    contains `::` could equal another agent's learning key and overwrite
    its window. No other character can make two agents' keys meet: every
    other key ends with the agent id after a fixed word, or with the agent
    id and a run UUID. Keys are binary-safe, so anything else is fine.
    """
    if LEARNING_KEY_SEPARATOR in agent_id:
        return "must not contain '::' (it separates an agent id from its ACG learning keys)"
    return None
