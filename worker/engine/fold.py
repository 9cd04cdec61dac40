"""One entry point: fold a batch of runs into an agent's learned state.

The runtime learns one run at a time (load, add, store) with three learners;
this folds any number of runs in one pass and reports exactly which stored
values changed, so the caller writes each key once per batch. Folding runs one
at a time or all at once gives identical state (tested), because every
learner is a left fold whose stored form round-trips exactly.

Pure: the clock and the id source are injected (they only feed `generated_at`,
`created_at` and `ir_id`, which the runtime also takes from the clock and
from random UUIDs).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from worker.engine import acg, parallelism
from worker.engine.latency import DEFAULT_SENSITIVITY, Accumulators, SensitivityConfig, build_trie
from worker.engine.records import RunLike, utc_now


@dataclass(frozen=True, slots=True)
class EngineConfig:
    observation_window: int = 100
    sensitivity: SensitivityConfig = DEFAULT_SENSITIVITY


@dataclass(slots=True)
class AgentState:
    """The learned state one fold needs, as stored (wire dicts).

    `windows` must hold the stored observation window of every learning key
    the runs touch (`required_windows`); a key that is not there is empty.
    """

    agent_id: str
    accumulators: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None
    windows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Changes:
    """Every stored value the fold changed, by kind, in wire form.

    `observations` and `stability` are keyed by learning key and include the
    agent-level seed copy under the plain agent id when a run had a prompt.
    """

    accumulators: dict[str, Any] | None = None
    trie: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None
    observations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    stability: dict[str, dict[str, Any]] = field(default_factory=dict)

    def then(self, later: Changes) -> Changes:
        """What two successive folds changed together (the later value wins)."""
        return Changes(
            accumulators=later.accumulators or self.accumulators,
            trie=later.trie or self.trie,
            plan=later.plan or self.plan,
            observations={**self.observations, **later.observations},
            stability={**self.stability, **later.stability},
        )

    def changed(self) -> list[tuple[str, str]]:
        """(kind, key) pairs that changed, e.g. ("acg_stability", learning key)."""
        out = [
            (kind, "")
            for kind, value in (
                ("accumulators", self.accumulators),
                ("trie", self.trie),
                ("plan", self.plan),
            )
            if value is not None
        ]
        out += [("acg_observations", k) for k in self.observations]
        out += [("acg_stability", k) for k in self.stability]
        return out


def required_windows(agent_id: str, runs: Sequence[RunLike]) -> list[str]:
    """Learning keys whose stored windows a fold of `runs` needs, first-use order."""
    keys: dict[str, None] = {}
    for run in runs:
        keys.update(dict.fromkeys(acg.run_learning_keys(run, agent_id)))
    return list(keys)


# Fields a fold writes anew every time, from the injected clock and id source
# (by kind of stored value): two folds of the same runs differ only in these.
VOLATILE_FIELDS: dict[str, tuple[str, ...]] = {
    "trie": ("generated_at",),
    "acg_observations": ("ir_id", "created_at"),
}


def without_volatile(kind: str, value: Any) -> Any:
    """A stored value (parsed JSON) of `kind` with its `VOLATILE_FIELDS` set to None.

    What comparing learned state means everywhere (the foreign-write check,
    replay and pipeline tests): equal but for time and random ids. A value
    of an unexpected shape (someone else wrote it) is returned unchanged.
    """
    fields = VOLATILE_FIELDS.get(kind)
    if not fields:
        return value
    blank = dict.fromkeys(fields)
    if isinstance(value, dict):  # the trie envelope
        return {**value, **blank}
    if isinstance(value, list):  # an observation window
        return [{**item, **blank} if isinstance(item, dict) else item for item in value]
    return value


def fold(
    state: AgentState,
    runs: Sequence[RunLike],
    *,
    config: EngineConfig = EngineConfig(),
    clock: Callable[[], str] = utc_now,
    new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
) -> Changes:
    """Learn `runs`, in order, into `state` (updated in place) and say what changed.

    Like the runtime, every run rewrites accumulators and trie (even one
    without LLM calls); the plan only when a run had overlapping tools; ACG
    keys only when a call had a recorded request.
    """
    if not runs:
        return Changes()
    agent = state.agent_id
    acc = Accumulators.from_wire(state.accumulators)
    plan = state.plan
    for run in runs:
        acc.add_run(run, config.sensitivity)
        plan = parallelism.merge_run(plan, run, agent)
    accumulators = acc.to_wire()
    trie = build_trie(acc, agent, clock(), config.sensitivity)
    plan_changed = plan is not state.plan
    state.accumulators = accumulators
    state.plan = plan

    result = acg.fold_acg(
        state.windows,
        runs,
        agent_id=agent,
        window_size=config.observation_window,
        clock=clock,
        new_id=new_id,
    )
    observations = {k: state.windows[k] for k in result.touched_keys}
    stability = dict(result.stability)
    if result.seed_key is not None:
        observations[agent] = observations[result.seed_key]
        stability[agent] = stability[result.seed_key]
    return Changes(
        accumulators=accumulators,
        trie=trie,
        plan=plan if plan_changed else None,
        observations=observations,
        stability=stability,
    )
