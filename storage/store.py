"""The Redis layer: run log, learned state, and the atomic commit.

An agent's `runs_index` is a log; learned state is a fold over it. We keep per
agent how many index entries are learned (`learned`) and how many retention
trimmed from the front (`base`), both absolute, in one cursor hash. Learning
reads a batch past `learned` and commits all changed state keys plus the new
offset in one Lua script that refuses if `learned` moved meanwhile: the
offset is the fencing token, so two learners can race and exactly one wins,
with nothing of the loser visible.

Durability (`durability_replicas` N > 0): storing runs and a learn commit
are followed by `WAIT N timeout` on the same connection (a pipeline: WAIT
cannot run inside Lua), and `NotDurable` is raised when fewer replicas
confirmed, so the caller does not acknowledge what a failover could still
lose; both writes are idempotent, so the retry that follows is safe.

This module knows Redis and formats, nothing about learning. It works the same
on a real server and on fakeredis (the scripts run on both).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import orjson
import redis
from redis.client import NEVER_DECODE

from storage.keys import Keys
from storage.models import (
    AccumulatorState,
    ExecutionPlan,
    PromptIR,
    RunRecord,
    StabilityAnalysisResult,
    TrieEnvelope,
    WireModel,
    observations_json,
    parse_observations,
    parse_wire,
)


def _script(name: str) -> str:
    return files("storage.lua").joinpath(name).read_text(encoding="utf-8")


def dumps(value: Any) -> str:
    """Compact JSON like serde_json writes (floats differ only in layout, see SPEC 3).

    orjson: the learned state is large (observation windows hold up to 100
    full prompts) and stdlib json was the largest cost of a learn step.
    """
    return orjson.dumps(value).decode()


def loads(raw: str | bytes) -> Any:
    return orjson.loads(raw)


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where an agent's learning stands, in absolute index offsets."""

    learned: int = 0
    base: int = 0
    version: int = 0
    index_length: int = 0

    @property
    def end(self) -> int:
        """Absolute offset one past the last index entry."""
        return self.base + self.index_length

    @property
    def lag(self) -> int:
        return max(0, self.end - self.learned)


@dataclass(frozen=True, slots=True)
class LearnBatch:
    """What one learn step reads: the cursor, the next runs, and current state values."""

    cursor: Cursor
    run_ids: list[str]
    runs: list[str | None]  # raw JSON, None where the run key is missing
    state: dict[str, str | None]  # key -> raw JSON of state values asked for


@dataclass(frozen=True, slots=True)
class CommitResult:
    committed: bool
    version: int  # new state version, or -1 on conflict


DEFAULT_DEAD_LETTER_CAP = 10_000


class NotDurable(redis.RedisError):
    """Fewer replicas than asked for confirmed a write within the timeout.

    The write is on the primary and may still replicate; it is not
    acknowledged, so the caller retries (idempotently) instead of acking.
    """

    def __init__(self, what: str, confirmed: int, wanted: int, timeout_ms: int) -> None:
        super().__init__(
            f"{what}: {confirmed} of {wanted} replica(s) confirmed within {timeout_ms} ms"
        )
        self.confirmed = confirmed


@dataclass(frozen=True, slots=True)
class StoreOutcome:
    """What `store_runs` did with one run."""

    new: bool
    conflict: str | None = None  # the stored JSON, when it differs from the submitted run
    position: int | None = None  # absolute index offset of a run stored now


class Store:
    """All Redis access for one key prefix."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        *,
        dead_letter_cap: int = DEFAULT_DEAD_LETTER_CAP,
        durability_replicas: int = 0,
        durability_timeout_ms: int = 1000,
    ) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self.dead_letter_cap = dead_letter_cap
        self.durability_replicas = durability_replicas
        self.durability_timeout_ms = durability_timeout_ms
        self._dead_letters = client.register_script(_script("dead_letters.lua"))
        # Sent as EVAL inside MULTI/EXEC (store_runs_detailed): a script the
        # server does not have (a failover to a node without its cache) must
        # fail the whole transaction's purpose loudly, not skip the index.
        self._index_runs = _script("index_runs.lua")
        self._drop_tombstoned = _script("drop_tombstoned.lua")
        self._read_batch = client.register_script(_script("read_batch.lua"))
        self._commit = client.register_script(_script("commit.lua"))
        self._trim = client.register_script(_script("trim.lua"))
        self._swap = client.register_script(_script("swap.lua"))
        self._release = client.register_script(_script("release_lease.lua"))

    # ------------------------------------------------------------------ runs
    def store_runs(
        self, runs: Sequence[RunRecord], encoded: Sequence[str] | None = None
    ) -> list[bool]:
        """Store runs idempotently; True for each run that was new."""
        return [outcome.new for outcome in self.store_runs_detailed(runs, encoded)]

    def store_runs_detailed(
        self, runs: Sequence[RunRecord], encoded: Sequence[str] | None = None
    ) -> list[StoreOutcome]:
        """Store runs idempotently, saying for each whether it was new or conflicts.

        One MULTI/EXEC for the whole batch (then WAIT, with durability on):
        `index_runs.lua` decides which runs are new (no key yet, not dropped
        by retention) and appends those to their agents' indexes; a native
        SET NX per run writes the bodies, which never pass through Lua (the
        server turns script arguments into Lua strings at ~1.1 ms per MB:
        half of a 500-run store's time); `drop_tombstoned.lua` deletes what
        SET NX wrote for a run retention had dropped. No client sees an index
        entry without its run key, and a retried store adds nothing.
        `encoded` is each run's JSON when the caller has it already (ingest
        measured it against the size limit). A run id already stored with
        other bytes is reported with the stored JSON; the first stays (runs
        are immutable).
        """
        if not runs:
            return []
        texts = list(encoded) if encoded is not None else [run.to_json() for run in runs]
        run_keys = [self.keys.run(run.agent_id, run.id) for run in runs]
        keys: list[str] = []
        tombstone_keys: list[str] = []
        for run, run_key in zip(runs, run_keys, strict=True):
            agent = run.agent_id
            tombstones = self.keys.tombstones(agent)
            keys += [run_key, self.keys.runs_index(agent), tombstones]
            keys += [self.keys.stored_at(agent), self.keys.cursor(agent)]
            tombstone_keys += [run_key, tombstones]
        keys.append(self.keys.agents())
        ids = [run.id for run in runs]

        def queue(pipe: Any) -> None:
            pipe.eval(self._index_runs, len(keys), *keys, *ids, *(run.agent_id for run in runs))
            for run_key, text in zip(run_keys, texts, strict=True):
                pipe.set(run_key, text, nx=True)
            pipe.eval(self._drop_tombstoned, len(tombstone_keys), *tombstone_keys, *ids)

        (outcomes, positions), *_ = self._transaction("storing runs", queue)
        present = [i for i, outcome in enumerate(outcomes) if outcome == -1]
        stored = dict(zip(present, self.client.mget([run_keys[i] for i in present]), strict=True))
        return [
            StoreOutcome(
                outcome == 1,
                stored[i] if outcome == -1 and stored[i] not in (None, texts[i]) else None,
                int(position) if outcome == 1 else None,
            )
            for i, (outcome, position) in enumerate(zip(outcomes, positions, strict=True))
        ]

    def store_run(self, run: RunRecord) -> bool:
        return self.store_runs([run])[0]

    def stored_at(self, agent_id: str, run_ids: Sequence[str]) -> list[float | None]:
        """When each run was stored (Redis server time, s), None where unknown."""
        if not run_ids:
            return []
        return [
            None if score is None else float(score)
            for score in self.client.zmscore(self.keys.stored_at(agent_id), list(run_ids))
        ]

    def mark_stored_at(self, agent_id: str, run_ids: Sequence[str], when_s: float) -> None:
        """Record `when_s` for runs without a stored-at time (runs the runtime wrote itself)."""
        if run_ids:
            mapping = dict.fromkeys(run_ids, when_s)
            self.client.zadd(self.keys.stored_at(agent_id), mapping, nx=True)

    def read_runs(self, agent_id: str, offset: int, count: int) -> list[tuple[str, str | None]]:
        """Index entries [offset, offset+count) (list positions) and their runs, one round trip."""
        batch = self._read(agent_id, start=offset, count=count, state_keys=())
        return list(zip(batch.run_ids, batch.runs, strict=True))

    def run_ids(self, agent_id: str) -> list[str]:
        return self.client.lrange(self.keys.runs_index(agent_id), 0, -1)

    def run_ids_range(self, agent_id: str, offset: int, count: int) -> list[str]:
        """Index entries [offset, offset+count) (list positions), ids only."""
        ids: list[str] = self.client.lrange(
            self.keys.runs_index(agent_id), offset, offset + count - 1
        )
        return ids

    def get_run(self, agent_id: str, run_id: str) -> RunRecord | None:
        raw = self.client.get(self.keys.run(agent_id, run_id))
        return None if raw is None else parse_wire(RunRecord, raw)

    # ------------------------------------------------------------- learning
    def cursor(self, agent_id: str) -> Cursor:
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(self.keys.cursor(agent_id), ["learned", "base", "version"])
        pipe.llen(self.keys.runs_index(agent_id))
        (learned, base, version), length = pipe.execute()
        return Cursor(int(learned or 0), int(base or 0), int(version or 0), int(length))

    def cursors(self, agent_ids: Iterable[str]) -> dict[str, Cursor]:
        """`cursor()` of many agents in one pipelined round trip (metrics, `stats`).

        Not a transaction: each agent's hash and index length are read a few
        commands apart, so a run appended in between shows as one more run of
        lag, never as negative lag; a monitoring view needs no more, and
        MULTI would block the server for the whole batch.
        """
        agents = list(dict.fromkeys(agent_ids))
        if not agents:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for agent in agents:
            pipe.hmget(self.keys.cursor(agent), ["learned", "base", "version"])
            pipe.llen(self.keys.runs_index(agent))
        replies = pipe.execute()
        result: dict[str, Cursor] = {}
        for i, agent in enumerate(agents):
            (learned, base, version), length = replies[2 * i], replies[2 * i + 1]
            result[agent] = Cursor(
                int(learned or 0), int(base or 0), int(version or 0), int(length)
            )
        return result

    def read_learn_batch(
        self, agent_id: str, max_runs: int, state_keys: Iterable[str] = ()
    ) -> LearnBatch:
        """The next runs past the learned offset, with the cursor and `state_keys`' values."""
        return self._read(agent_id, start=None, count=max_runs, state_keys=tuple(state_keys))

    def read_state(self, agent_id: str, state_keys: Iterable[str]) -> LearnBatch:
        """The cursor and `state_keys`' values in one round trip, no runs (ingest's fast path)."""
        return self._read(agent_id, start=None, count=0, state_keys=tuple(state_keys))

    def _read(
        self, agent_id: str, *, start: int | None, count: int, state_keys: tuple[str, ...]
    ) -> LearnBatch:
        keys = [self.keys.cursor(agent_id), self.keys.runs_index(agent_id), *state_keys]
        learned, base, version, llen, ids, runs, state = self._read_batch(
            keys=keys,
            args=[self.keys.run_key_prefix(agent_id), count, -1 if start is None else start],
        )
        cursor = Cursor(int(learned), int(base), int(version), int(llen))
        return LearnBatch(
            cursor,
            list(ids),
            [r or None for r in runs],
            {k: (v or None) for k, v in zip(state_keys, state, strict=True)},
        )

    def commit(
        self,
        agent_id: str,
        expected_learned: int,
        new_learned: int,
        writes: Mapping[str, str],
        *,
        runs_learned: int = 0,
        dead_letters: Sequence[str] = (),
        learning_keys: Sequence[str] = (),
    ) -> CommitResult:
        """Write `writes`, dead letters and the new offset iff it is still `expected_learned`.

        `learning_keys` are the ACG keys whose windows `writes` holds; they join
        the agent's own set in the same step.
        """
        keys = [
            self.keys.cursor(agent_id),
            self.keys.dead_letters(),
            self.keys.counters(),
            self.keys.learning_key_set(agent_id),
            *writes.keys(),
        ]
        args: list[str | int] = [
            expected_learned,
            new_learned,
            runs_learned,
            self.dead_letter_cap,
            len(dead_letters),
            len(learning_keys),
            *dead_letters,
            *learning_keys,
            *writes.values(),
        ]
        version = int(self._durably("learn commit", self._commit, keys, args))
        return CommitResult(version >= 0, version)

    def _transaction(self, what: str, queue: Callable[[Any], None]) -> list[Any]:
        """The replies of the commands `queue` adds, run as one MULTI/EXEC
        (then WAIT, as `_durably` does)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.execute_command("MULTI")
        queue(pipe)
        pipe.execute_command("EXEC")
        executed = self._execute_and_wait(what, pipe)[-1]
        for reply in executed:
            if isinstance(reply, Exception):  # a command failed inside EXEC
                raise reply
        return list(executed)

    def _durably(self, what: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run `script`, then (durability on) WAIT on the same connection.

        One non-transactional pipeline holds both, so WAIT counts exactly the
        replication offset the script's writes reached. A conflicting commit
        wrote nothing of its own, but waiting for it costs one round trip.
        """
        if self.durability_replicas <= 0:
            return script(keys=keys, args=args)
        pipe = self.client.pipeline(transaction=False)
        script(keys=keys, args=args, client=pipe)
        return self._execute_and_wait(what, pipe)[0]

    def _execute_and_wait(self, what: str, pipe: Any) -> list[Any]:
        """`pipe`'s replies, after a WAIT on its connection when durability is on
        (NotDurable if fewer replicas than wanted confirmed in time)."""
        wanted = self.durability_replicas
        if wanted <= 0:
            return list(pipe.execute())
        pipe.execute_command("WAIT", wanted, self.durability_timeout_ms)
        *replies, confirmed = pipe.execute()
        if int(confirmed) < wanted:
            raise NotDurable(what, int(confirmed), wanted, self.durability_timeout_ms)
        return replies

    # ------------------------------------------------- retention and rebuild
    def trim(self, agent_id: str, count: int, *, now_s: float, tombstones: int) -> int:
        """Drop up to `count` of the oldest LEARNED runs; returns how many went."""
        keys = [
            self.keys.cursor(agent_id),
            self.keys.runs_index(agent_id),
            self.keys.tombstones(agent_id),
            self.keys.stored_at(agent_id),
        ]
        args = [self.keys.run_key_prefix(agent_id), count, now_s, tombstones]
        return int(self._trim(keys=keys, args=args))

    def swap_state(
        self,
        agent_id: str,
        values: Mapping[str, str],
        learned: int,
        delete: Iterable[str] = (),
        learning_keys: Sequence[str] = (),
    ) -> int:
        """Stage `values` (target key -> JSON), then swap them in with `learned` atomically.

        Staging is written first (it may be large); the swap is one short
        script of RENAMEs, so readers never see half a rebuild. Returns the
        new state version.
        """
        staged = {self.keys.staging(agent_id, i): k for i, k in enumerate(values)}
        pipe = self.client.pipeline(transaction=False)
        for stage, target in staged.items():
            pipe.set(stage, values[target], ex=3600)  # a crashed rebuild leaves no litter
        pipe.execute()
        keys = [self.keys.cursor(agent_id), self.keys.learning_key_set(agent_id)]
        for stage, target in staged.items():
            keys += [stage, target]
        keys += [k for k in delete if k not in values]
        args = [len(staged), learned, len(learning_keys), *learning_keys]
        return int(self._swap(keys=keys, args=args))

    def learning_keys(self, agent_id: str) -> list[str]:
        """The agent's ACG learning keys with state, from its own set (never a glob)."""
        return sorted(self.client.smembers(self.keys.learning_key_set(agent_id)))

    def state_keys(self, agent_id: str) -> list[str]:
        """Every learned-state key of the agent, its learning keys from its own set."""
        return self.keys.agent_state(agent_id, self.learning_keys(agent_id))

    def state_presence(self, agent_ids: Sequence[str]) -> dict[str, dict[str, bool]]:
        """Per agent, whether its plan, trie and (seed) stability exist: one round trip."""
        if not agent_ids:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for agent in agent_ids:
            pipe.exists(self.keys.plan(agent))
            pipe.exists(self.keys.trie(agent))
            pipe.exists(self.keys.acg_stability(agent))
        flags = pipe.execute()
        return {
            agent: {
                "plan": bool(flags[3 * i]),
                "trie": bool(flags[3 * i + 1]),
                "stability": bool(flags[3 * i + 2]),
            }
            for i, agent in enumerate(agent_ids)
        }

    # --------------------------------------------------- foreign-write checks
    def verified_record(self, agent_id: str) -> tuple[int, dict[str, str]] | None:
        """The last clean foreign-write check: (state version, key -> digest), or None."""
        record = self.client.hgetall(self.keys.verified(agent_id))
        if not record:
            return None
        digests: dict[str, str] = orjson.loads(record["digests"])
        return int(record.get("version", -1)), digests

    def record_verified(self, agent_id: str, version: int, digests: Mapping[str, str]) -> None:
        self.client.hset(
            self.keys.verified(agent_id),
            mapping={"version": version, "digests": orjson.dumps(dict(digests)).decode()},
        )

    def forget_verified(self, agent_id: str) -> None:
        self.client.delete(self.keys.verified(agent_id))

    # --------------------------------------------------------- dead letters
    def push_dead_letters(self, entries: Sequence[str]) -> int:
        """Append to the capped dead-letter list; returns how many old entries were trimmed."""
        if not entries:
            return 0
        keys = [self.keys.dead_letters(), self.keys.counters()]
        return int(self._dead_letters(keys=keys, args=[self.dead_letter_cap, *entries]))

    def dead_letters(self, start: int = 0, count: int = -1) -> list[str]:
        stop = -1 if count < 0 else start + count - 1
        return self.client.lrange(self.keys.dead_letters(), start, stop)

    def dead_letter_count(self) -> int:
        return int(self.client.llen(self.keys.dead_letters()))

    def counters(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.client.hgetall(self.keys.counters()).items()}

    def incr_counter(self, name: str, amount: int = 1) -> None:
        self.client.hincrby(self.keys.counters(), name, amount)

    def dead_letters_raw(self, start: int = 0, count: int = -1) -> list[bytes]:
        """Entries as stored, undecoded: one entry that is not UTF-8 must not make
        the whole list unreadable (the client decodes every other reply)."""
        stop = -1 if count < 0 else start + count - 1
        entries: list[bytes] = self.client.execute_command(
            "LRANGE", self.keys.dead_letters(), start, stop, **{NEVER_DECODE: []}
        )
        return entries

    def dead_letter_raw_at(self, index: int) -> bytes | None:
        """`dead_letter_at`, undecoded."""
        entry: bytes | None = self.client.execute_command(
            "LINDEX", self.keys.dead_letters(), index, **{NEVER_DECODE: []}
        )
        return entry

    def remove_dead_letters(self, entries: Sequence[str]) -> int:
        """Remove one occurrence of each entry, by value; returns how many went.

        By value, not by position: ingest and learn push new entries while an
        operator works through the list, and another `dead-letters` command
        may remove some, so positions read earlier can point elsewhere now.
        An entry removed meanwhile is simply not counted.
        """
        if not entries:
            return 0
        pipe = self.client.pipeline(transaction=True)
        for entry in entries:
            pipe.lrem(self.keys.dead_letters(), 1, entry)
        return sum(int(n) for n in pipe.execute())

    def purge_dead_letters(self) -> int:
        """Delete the whole list atomically; returns how many entries it held.

        The `dead_letters` counter is left alone: it counts entries ever
        dead-lettered, as the metric of that name says.
        """
        pipe = self.client.pipeline(transaction=True)
        pipe.llen(self.keys.dead_letters())
        pipe.delete(self.keys.dead_letters())
        length, _ = pipe.execute()
        return int(length)

    # -------------------------------------------------------- learn markers
    def mark_pending(self, agent_ids: Iterable[str], ttl_s: int) -> list[str]:
        """SET NX EX a pending marker per agent; the agents whose marker is new.

        Only those need a learn enqueued: however many runs arrive, at most
        one learn per agent is waiting. The expiry bounds the cost of a lost
        learn message (the next ingest or the beat sweep enqueues again).
        """
        agents = list(dict.fromkeys(agent_ids))
        if not agents:
            return []
        pipe = self.client.pipeline(transaction=False)
        for agent in agents:
            pipe.set(self.keys.pending(agent), "1", nx=True, ex=ttl_s)
        return [a for a, ok in zip(agents, pipe.execute(), strict=True) if ok]

    def acquire_lease(self, agent_id: str, token: str, ttl_ms: int) -> bool:
        return bool(self.client.set(self.keys.lease(agent_id), token, nx=True, px=ttl_ms))

    def release_lease(self, agent_id: str, token: str) -> bool:
        return bool(self._release(keys=[self.keys.lease(agent_id)], args=[token]))

    def clear_pending(self, agent_id: str) -> None:
        self.client.delete(self.keys.pending(agent_id))

    def get_raw(self, key: str) -> str | None:
        """The stored JSON text of one key (built with `self.keys`), as written."""
        raw: str | None = self.client.get(key)
        return raw

    def get_many(self, keys: Sequence[str]) -> dict[str, str | None]:
        if not keys:
            return {}
        return dict(zip(keys, self.client.mget(keys), strict=True))

    # ------------------------------------------------------ learned state
    def _get_model(self, key: str, model: type[WireModel]) -> Any:
        raw = self.get_raw(key)
        return None if raw is None else parse_wire(model, raw)

    def get_plan(self, agent_id: str) -> ExecutionPlan | None:
        return self._get_model(self.keys.plan(agent_id), ExecutionPlan)

    def get_trie(self, agent_id: str) -> TrieEnvelope | None:
        return self._get_model(self.keys.trie(agent_id), TrieEnvelope)

    def get_accumulators(self, agent_id: str) -> AccumulatorState | None:
        return self._get_model(self.keys.accumulators(agent_id), AccumulatorState)

    def get_stability(self, key: str) -> StabilityAnalysisResult | None:
        return self._get_model(self.keys.acg_stability(key), StabilityAnalysisResult)

    def get_observations(self, key: str) -> list[PromptIR] | None:
        raw = self.client.get(self.keys.acg_observations(key))
        return None if raw is None else parse_observations(raw)

    def put_plan(self, plan: ExecutionPlan) -> None:
        self.client.set(self.keys.plan(plan.agent_id), plan.to_json())

    def put_trie(self, agent_id: str, trie: TrieEnvelope) -> None:
        self.client.set(self.keys.trie(agent_id), trie.to_json())

    def put_accumulators(self, agent_id: str, state: AccumulatorState) -> None:
        self.client.set(self.keys.accumulators(agent_id), state.to_json())

    def put_stability(self, key: str, result: StabilityAnalysisResult) -> None:
        self.client.set(self.keys.acg_stability(key), result.to_json())

    def put_observations(self, key: str, observations: list[PromptIR]) -> None:
        self.client.set(self.keys.acg_observations(key), observations_json(observations))

    # ------------------------------------------------------------- agents
    def agent_ids(self) -> list[str]:
        """Agents with a run index, found with SCAN (never KEYS)."""
        head = len(self.keys.runs_index(""))
        return sorted(
            {k[head:] for k in self.client.scan_iter(self.keys.runs_index_pattern(), count=1000)}
        )

    def delete_prefix(self) -> int:
        """Remove every key under the prefix (tests and `purge` only)."""
        pattern = self.keys.all_pattern()
        n = 0
        batch: list[str] = []
        for key in self.client.scan_iter(pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                n += self.client.delete(*batch)
                batch.clear()
        if batch:
            n += self.client.delete(*batch)
        return n


def loads_or_none(raw: str | None) -> Any:
    return None if raw is None else orjson.loads(raw)
