"""Every Redis key, in one place.

The first seven kinds are the runtime's own layout (SPEC section 2) and must
match it byte for byte. Our bookkeeping lives under one extra first segment,
`adaptive_worker:`, which is none of the runtime's kinds; since the agent id
is always the LAST part of our keys and our second segments are fixed words,
no agent id can make one of our keys equal to a runtime key or to another of
ours.
"""

from __future__ import annotations

from dataclasses import dataclass

RUNTIME_KINDS = (
    "runs",
    "runs_index",
    "plan",
    "trie",
    "accumulators",
    "acg_observations",
    "acg_stability",
)
OWN = "adaptive_worker"


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str

    # ---- the runtime's layout
    def run(self, agent_id: str, run_id: str) -> str:
        return f"{self.prefix}runs:{agent_id}:{run_id}"

    def run_key_prefix(self, agent_id: str) -> str:
        """`run(agent, id)` is this plus the run id (used inside Lua scripts)."""
        return f"{self.prefix}runs:{agent_id}:"

    def runs_index(self, agent_id: str) -> str:
        return f"{self.prefix}runs_index:{agent_id}"

    def plan(self, agent_id: str) -> str:
        return f"{self.prefix}plan:{agent_id}"

    def trie(self, agent_id: str) -> str:
        return f"{self.prefix}trie:{agent_id}"

    def accumulators(self, agent_id: str) -> str:
        return f"{self.prefix}accumulators:{agent_id}"

    def acg_observations(self, key: str) -> str:
        """`key` is a learning key, or the plain agent id for the seed profile."""
        return f"{self.prefix}acg_observations:{key}"

    def acg_stability(self, key: str) -> str:
        return f"{self.prefix}acg_stability:{key}"

    def runs_index_pattern(self) -> str:
        """SCAN pattern matching every agent's run index."""
        return f"{_glob_escape(self.prefix)}runs_index:*"

    # ---- ours
    def cursor(self, agent_id: str) -> str:
        """Hash: `learned` and `base` (absolute index offsets) and `version`.

        `base` is how many index entries retention has trimmed from the front,
        so absolute offsets stay meaningful: list position = offset - base.
        """
        return f"{self.prefix}{OWN}:cursor:{agent_id}"

    def pending(self, agent_id: str) -> str:
        """Marker (SET NX EX) meaning: a learn for this agent is already queued."""
        return f"{self.prefix}{OWN}:pending:{agent_id}"

    def lease(self, agent_id: str) -> str:
        """Learn lease (SET NX PX token): one learner per agent at a time, to save
        CPU. Correctness never depends on it: the commit's offset check does."""
        return f"{self.prefix}{OWN}:lease:{agent_id}"

    def agents(self) -> str:
        """Set of agent ids that ever had a run stored through us."""
        return f"{self.prefix}{OWN}:agents"

    def dead_letters(self) -> str:
        """List of rejected payloads (JSON: raw, reason, time), newest last."""
        return f"{self.prefix}{OWN}:dead_letters"

    def counters(self) -> str:
        """Hash of monotonically increasing counters (ingested, learned, conflicts...)."""
        return f"{self.prefix}{OWN}:counters"

    def tombstones(self, agent_id: str) -> str:
        """Sorted set of run ids retention trimmed (score: when), capped.

        Lets `store_runs` refuse a late duplicate of a trimmed run, which
        would otherwise be stored and learned a second time.
        """
        return f"{self.prefix}{OWN}:tombstones:{agent_id}"

    def staging(self, agent_id: str, n: int) -> str:
        """Scratch key `n` of a rebuild in progress, swapped in by RENAME."""
        return f"{self.prefix}{OWN}:staging:{n}:{agent_id}"

    def learning_keys(self, agent_id: str) -> str:
        """Set of the agent's ACG learning keys (`{agent}::model=...`) with state.

        Rebuild and retention enumerate an agent's windows from this set,
        never with a `{agent}::*` glob, which would also match the keys of an
        agent whose id merely starts with `{agent}::`.
        """
        return f"{self.prefix}{OWN}:learning_keys:{agent_id}"

    def stored_at(self, agent_id: str) -> str:
        """Sorted set: run id -> Redis server time (s) when we stored it.

        Age retention goes by this, not by the run's own timestamps, so one
        client with a bad clock cannot pin an agent's history.
        """
        return f"{self.prefix}{OWN}:stored_at:{agent_id}"

    def all_pattern(self) -> str:
        """SCAN pattern for every key under the prefix, the runtime's and ours."""
        return f"{_glob_escape(self.prefix)}*"


LEARNING_KEY_SEPARATOR = "::"


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


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)
