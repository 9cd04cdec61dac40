"""Every Redis key, in one place.

The first seven kinds are the runtime's own layout (SPEC section 2) and must
match it byte for byte. Our bookkeeping lives under one extra first segment,
`adaptive_worker:`, which is none of the runtime's kinds; since the agent id
is always the LAST part of our keys and our second segments are fixed words,
no agent id can make one of our keys equal to a runtime key or to another of
ours.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# The runtime's layout is part of the agent/worker contract: defined once in
# the client package, built here from its templates.
from adaptive_worker_client.contract import (
    CURSOR_KEY_TEMPLATE,
    LEARNING_KEY_SEPARATOR,
    OWN,
    RUNTIME_KEY_TEMPLATES,
    STORED_AT_KEY_TEMPLATE,
    TOMBSTONES_KEY_TEMPLATE,
    agent_id_problem,
    broker_key_prefix,
)

__all__ = ["LEARNING_KEY_SEPARATOR", "OWN", "RUNTIME_KINDS", "Keys", "agent_id_problem"]

RUNTIME_KINDS = tuple(RUNTIME_KEY_TEMPLATES)
_T = RUNTIME_KEY_TEMPLATES


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str

    # ---- the runtime's layout
    def run(self, agent_id: str, run_id: str) -> str:
        return _T["runs"].format(prefix=self.prefix, agent_id=agent_id, run_id=run_id)

    def run_key_prefix(self, agent_id: str) -> str:
        """`run(agent, id)` is this plus the run id (used inside Lua scripts)."""
        return _T["runs"].format(prefix=self.prefix, agent_id=agent_id, run_id="")

    def runs_index(self, agent_id: str) -> str:
        return _T["runs_index"].format(prefix=self.prefix, agent_id=agent_id)

    def plan(self, agent_id: str) -> str:
        return _T["plan"].format(prefix=self.prefix, agent_id=agent_id)

    def trie(self, agent_id: str) -> str:
        return _T["trie"].format(prefix=self.prefix, agent_id=agent_id)

    def accumulators(self, agent_id: str) -> str:
        return _T["accumulators"].format(prefix=self.prefix, agent_id=agent_id)

    def acg_observations(self, key: str) -> str:
        """`key` is a learning key, or the plain agent id for the seed profile."""
        return _T["acg_observations"].format(prefix=self.prefix, key=key)

    def acg_stability(self, key: str) -> str:
        return _T["acg_stability"].format(prefix=self.prefix, key=key)

    def runs_index_pattern(self) -> str:
        """SCAN pattern matching every agent's run index."""
        return _T["runs_index"].format(prefix=_glob_escape(self.prefix), agent_id="*")

    # ---- ours
    def cursor(self, agent_id: str) -> str:
        """Hash: `learned` and `base` (absolute index offsets) and `version`.

        `base` is how many index entries retention has trimmed from the front,
        so absolute offsets stay meaningful: list position = offset - base.
        """
        return CURSOR_KEY_TEMPLATE.format(prefix=self.prefix, agent_id=agent_id)

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
        return TOMBSTONES_KEY_TEMPLATE.format(prefix=self.prefix, agent_id=agent_id)

    def staging(self, agent_id: str, n: int) -> str:
        """Scratch key `n` of a rebuild in progress, swapped in by RENAME."""
        return f"{self.prefix}{OWN}:staging:{n}:{agent_id}"

    def learning_key_set(self, agent_id: str) -> str:
        """Set of the agent's ACG learning keys (`{agent}::model=...`) with state.

        Rebuild and retention enumerate an agent's windows from this set,
        never with a `{agent}::*` glob, which would also match the keys of an
        agent whose id merely starts with `{agent}::`.
        """
        return f"{self.prefix}{OWN}:learning_keys:{agent_id}"

    def stored_at(self, agent_id: str) -> str:
        """Sorted set: run id -> Redis server time (s) when we stored it.

        Age retention goes by this, not by the run's own timestamps, so one
        client with a bad clock cannot pin an agent's history. The client's
        receipts read it too (hence its template in the contract).
        """
        return STORED_AT_KEY_TEMPLATE.format(prefix=self.prefix, agent_id=agent_id)

    def verified(self, agent_id: str) -> str:
        """Hash: the last clean foreign-write check (`version`, `digests` JSON), see tasks.mixed."""
        return f"{self.prefix}{OWN}:verified:{agent_id}"

    def broker_prefix(self) -> str:
        """Prefix of every broker key on a Redis broker (kombu `global_keyprefix`).

        Under our own segment, so queues and unacked bookkeeping never meet
        the runtime's keys. Defined by the contract: the publishing client
        must agree on it.
        """
        return broker_key_prefix(self.prefix)

    def agent_state(self, agent_id: str, learning_keys: Iterable[str] = ()) -> list[str]:
        """Every learned-state key of the agent: plan, accumulators, trie, the seed
        profile's window and stability, and the window and stability of each
        of `learning_keys` (which the caller names exactly, never by a glob)."""
        keys = [self.plan(agent_id), self.accumulators(agent_id), self.trie(agent_id)]
        keys += [self.acg_observations(agent_id), self.acg_stability(agent_id)]
        for key in learning_keys:
            keys += [self.acg_observations(key), self.acg_stability(key)]
        return list(dict.fromkeys(keys))

    def runtime_kind(self, key: str) -> str | None:
        """Which runtime kind `key` (a full key) is, or None (ours, or not under the prefix)."""
        if not key.startswith(self.prefix):
            return None
        kind = key[len(self.prefix) :].split(":", 1)[0]
        return kind if kind in RUNTIME_KINDS else None

    def all_pattern(self) -> str:
        """SCAN pattern for every key under the prefix, the runtime's and ours."""
        return f"{_glob_escape(self.prefix)}*"


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)
