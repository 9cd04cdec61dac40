"""Detect state written by someone else (a runtime learning in-process) and recover.

The supported configuration is: NeMo Relay agents with NO learners
(`tasks.relay.recommended_config`), our workers the only writers of learned
state. An agent that keeps its own learners on while our workers learn the
same agent ("mixed mode") breaks that: each run is learned twice (by the
runtime in the agent, and by us when `discover` finds it in `runs_index`),
both sides read-modify-write the same keys without a common lock, so
accumulators double-count and lose updates, ACG windows get every prompt
twice, and the runtime overwrites our plan after every run.

Detection, chosen to need no change to the commit path: our learned state is
by construction the fold of the runs in `runs_index` up to the learned
offset, so re-fold those runs and compare with what is stored. Any key whose
stored value differs (volatile fields aside: the trie's `generated_at`,
observations' `ir_id` / `created_at`), or that exists though the fold does
not produce it, was written by someone else. A clean result is remembered
(`{prefix}adaptive_worker:verified:{agent}`: our version plus a digest per
key), so the next check at the same version costs a few GETs instead of a
fold, and still names the keys rewritten since. The volatile fields and the
re-fold are the engine's (`fold.without_volatile`) and maintenance's
(`maintenance.refold`), shared with rebuild and the tests.

Limits: the fold is O(retained runs). After retention trimmed runs (`base >
0`) the stored state also covers runs no longer kept, so a full check is
impossible until the next rebuild (the report says `verified=False`).

Recovery is `tasks.maintenance.rebuild`: the state is recomputed from the
runs and swapped in atomically. It does not stop a runtime that keeps
learning; only its configuration does.

`python -m tasks.mixed [--recover] [AGENT ...]` checks (and rebuilds) agents
with the `ADAPTIVE_*` settings; without agent ids, every agent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from storage.store import Cursor, Store
from tasks.learning import engine_config, state_writes
from tasks.maintenance import RebuildResult, owned_learning_keys, rebuild, refold
from worker.engine.fold import EngineConfig, without_volatile


@dataclass(frozen=True, slots=True)
class ForeignWriteReport:
    """One check of one agent.

    `foreign`: state keys (without the prefix) whose stored value is not ours.
    `verified`: False when the check could not decide (`reason` says why).
    `full`: whether the runs were re-folded (False: the remembered digests
    at an unchanged version were enough).
    """

    agent_id: str
    version: int
    learned: int
    verified: bool
    foreign: tuple[str, ...] = ()
    full: bool = False
    reason: str = ""

    @property
    def clean(self) -> bool:
        return self.verified and not self.foreign


def verified_key(store: Store, agent: str) -> str:
    """Our record of the last clean check (hash: `version`, `digests` JSON)."""
    return store.keys.verified(agent)


def _state_keys(store: Store, agent: str) -> list[str]:
    """Every learned-state key of the agent, its learning keys named exactly."""
    return store.keys.agent_state(agent, owned_learning_keys(store, agent))


def _normalized(store: Store, key: str, raw: str) -> Any:
    """The value with the fields every write makes anew (time, random ids) blanked."""
    return without_volatile(store.keys.runtime_kind(key) or "", json.loads(raw))


def _digest(raw: str | None) -> str | None:
    return None if raw is None else hashlib.sha256(raw.encode()).hexdigest()


def expected_writes(
    store: Store, agent: str, cursor: Cursor, *, config: EngineConfig, chunk: int = 500
) -> dict[str, str]:
    """Key -> JSON of the state our learning produces from the runs up to `cursor.learned`.

    Runs that learning dead-letters (missing, unparsable, another agent's)
    are skipped as learning skips them (`maintenance.refold`).
    """
    changes, _ = refold(store, agent, cursor.learned - cursor.base, config=config, chunk=chunk)
    return state_writes(store, agent, changes)


def check_foreign_writes(
    store: Store, agent: str, *, config: EngineConfig, chunk: int = 500, attempts: int = 3
) -> ForeignWriteReport:
    """Whether the agent's stored state is exactly what our workers wrote (see module doc)."""
    for _ in range(attempts):
        before = store.cursor(agent)
        keys = _state_keys(store, agent)
        raw = store.get_many(keys)
        record = store.verified_record(agent)
        digests = {key: _digest(value) for key, value in raw.items() if value is not None}
        if record is not None and record[0] == before.version:
            remembered = record[1]
            foreign = sorted(
                key[len(store.keys.prefix) :]
                for key in set(remembered) | set(digests)
                if remembered.get(key) != digests.get(key)
            )
            if store.cursor(agent).version == before.version:
                return ForeignWriteReport(
                    agent, before.version, before.learned, True, tuple(foreign), False
                )
            continue  # a learn committed meanwhile: look again
        if before.base > 0:
            return ForeignWriteReport(
                agent,
                before.version,
                before.learned,
                False,
                reason=f"retention trimmed {before.base} runs the state still covers; "
                "a full check is possible after the next rebuild",
            )
        expected = expected_writes(store, agent, before, config=config, chunk=chunk)
        missing = [key for key in expected if key not in raw]
        if missing:  # keys the fold produces but the first read did not list
            raw.update(store.get_many(missing))
        if store.cursor(agent) != before:
            continue  # learned, trimmed or rebuilt meanwhile: the comparison is moot
        foreign = []
        for key in sorted(set(raw) | set(expected)):
            have, want = raw.get(key), expected.get(key)
            if have is None and want is None:
                continue
            if (
                have is None
                or want is None
                or _normalized(store, key, have) != _normalized(store, key, want)
            ):
                foreign.append(key[len(store.keys.prefix) :])
        if not foreign:
            store.record_verified(
                agent,
                before.version,
                {k: d for k, v in raw.items() if (d := _digest(v)) is not None},
            )
        return ForeignWriteReport(agent, before.version, before.learned, True, tuple(foreign), True)
    return ForeignWriteReport(
        agent, -1, -1, False, reason=f"state kept changing during {attempts} attempts"
    )


def recover(store: Store, agent: str, *, config: EngineConfig, chunk: int = 500) -> RebuildResult:
    """Recompute the agent's state from its runs and swap it in (`maintenance.rebuild`)."""
    store.forget_verified(agent)
    return rebuild(store, agent, config=config, chunk=chunk)


def check_and_recover(
    store: Store, agent: str, *, config: EngineConfig, chunk: int = 500
) -> tuple[ForeignWriteReport, RebuildResult | None]:
    """Check; when foreign writes are found, rebuild. Returns the check and the rebuild."""
    report = check_foreign_writes(store, agent, config=config, chunk=chunk)
    if not report.foreign:
        return report, None
    return report, recover(store, agent, config=config, chunk=chunk)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: one JSON line per agent; exit 1 if foreign writes were found."""
    from storage.connection import connect_state
    from worker.settings import get_settings

    parser = argparse.ArgumentParser(
        prog="python -m tasks.mixed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("agents", nargs="*", help="agent ids (default: every agent)")
    parser.add_argument("--recover", action="store_true", help="rebuild agents found mixed")
    args = parser.parse_args(argv)
    settings = get_settings()
    # The workers' state connection: with Sentinel, the current primary.
    store = Store(connect_state(settings), settings.key_prefix)
    config = engine_config(settings)
    found = False
    for agent in args.agents or store.agent_ids():
        if args.recover:
            report, rebuilt = check_and_recover(
                store, agent, config=config, chunk=settings.learn_batch_size
            )
        else:
            report = check_foreign_writes(
                store, agent, config=config, chunk=settings.learn_batch_size
            )
            rebuilt = None
        found = found or bool(report.foreign)
        line = {**asdict(report), "rebuilt": asdict(rebuilt) if rebuilt else None}
        print(json.dumps(line))
    return 1 if found else 0


if __name__ == "__main__":  # pragma: no cover - CLI
    sys.exit(main())


__all__ = [
    "ForeignWriteReport",
    "check_and_recover",
    "check_foreign_writes",
    "expected_writes",
    "recover",
    "verified_key",
]
