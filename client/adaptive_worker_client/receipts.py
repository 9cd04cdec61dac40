"""End-to-end receipts: a published run is kept until the state Redis shows it stored.

Why: on the Redis broker kombu pops a message (BRPOP) and records it as
unacked in a second step, so a worker killed between the two loses that
ingest message and its runs; neither the broker nor the worker can notice.
Only the sender can: the client keeps every run it published in this
in-memory ledger until it sees the run stored, and republishes one that did
not arrive within `client_receipt_timeout_s` (then after twice that, four
times, ... capped at 16 times). Storage is idempotent per run id, so a
republished run that did arrive meanwhile costs one refused duplicate.

Seen stored: the run id is in the agent's stored-at zset (written by the
store script in the same atomic step as the run) or in its tombstone zset
(retention moved it there when it deleted the run, so a trimmed run does not
loop), or, for ids in neither, its run key exists (a run the runtime wrote
itself has no stored-at entry). One check is one pipelined round trip for
every run due: two ZMSCORE per agent whatever the number of its runs, plus
one EXISTS per run found in neither zset (normally only runs not stored yet).

A run that never arrives (the worker dead-letters it: it is invalid, or
another run holds its id with other bytes) is republished at most
`client_receipt_max_republish` times, then given up: counted `unconfirmed`
and logged. The ledger holds at most `client_receipt_max_bytes` of runs;
beyond that the oldest are checked at once, and those still not stored are
given up the same way.

The ledger lives in memory: a run published by a process that exits before
its receipt relies on the broker alone. Only the publisher thread touches a
ledger (stats() reads plain counters).
"""

from __future__ import annotations

import heapq
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adaptive_worker_client.broker import REDIS_SCHEMES, broker_scheme
from adaptive_worker_client.contract import (
    STORED_AT_KEY_TEMPLATE,
    TOMBSTONES_KEY_TEMPLATE,
    agent_id_problem,
    runtime_key,
)

if TYPE_CHECKING:
    import redis

    from adaptive_worker_client.config import AgentSettings
    from adaptive_worker_client.encode import Record

__all__ = ["ReceiptLedger", "receipts_enabled", "run_identity"]

# The publisher's logger: one logger name for everything the run client logs.
log = logging.getLogger("adaptive_worker_client.publisher")

_MAX_BACKOFF = 16  # a republished run waits at most 16 timeouts for its next check
# A missing run with no later run of ours seen stored is held (a backlog,
# not a loss) for at most this many timeouts, then republished anyway: the
# last message before a quiet spell has no later run to vouch for the loss.
_HOLD_FACTOR = 4
_CHECK_BATCH = 2000  # runs per pipelined check (bounds one round trip's size)
_LOG_S = 60.0


def receipts_enabled(settings: AgentSettings) -> bool:
    """Receipts need the state Redis; `auto` turns them on for Redis brokers only.

    On RabbitMQ with publisher confirms the broker itself does not lose an
    acknowledged message, so the check is optional there (`on`). With
    Sentinel the state is the primary the sentinels name (no `redis_url`
    needed; see `reader.state_client`): a failover is exactly when a
    Sentinel broker loses the messages its old primary had not replicated,
    and only the receipts notice and republish them.
    """
    mode = settings.client_receipts
    if (settings.redis_url is None and settings.redis_sentinels is None) or mode == "off":
        return False
    return mode == "on" or broker_scheme(settings.effective_broker_url) in REDIS_SCHEMES


def run_identity(text: str) -> tuple[str, str] | None:
    """(agent id, run id) as the worker stores the run, or None if it will never be stored.

    The id is normalised as the worker does (lowercase hyphenated UUID). None
    for a run the worker is sure to dead-letter (not an object, no valid id
    or agent id): waiting for its receipt would only republish it in vain.
    """
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    agent, run_id = obj.get("agent_id"), obj.get("id")
    if not isinstance(agent, str) or not agent or agent_id_problem(agent):
        return None
    if not isinstance(run_id, str):
        return None
    try:
        return agent, str(uuid.UUID(run_id))
    except ValueError:
        return None


@dataclass(slots=True)
class _Entry:
    record: Record
    agent: str
    run_id: str
    due: float
    seq: int  # publish order
    since: float  # when the broker took it
    republished: int = 0


class ReceiptLedger:
    """Runs published and not yet seen stored, ordered by when each is next checked."""

    def __init__(
        self,
        settings: AgentSettings,
        redis_factory: Callable[[], redis.Redis],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.prefix = settings.key_prefix
        self.timeout_s = settings.client_receipt_timeout_s
        self.max_republish = settings.client_receipt_max_republish
        self.max_bytes = settings.client_receipt_max_bytes
        # Runs become due continuously; checking at most this often makes
        # one round trip cover every run due in the interval.
        self.check_interval_s = min(self.timeout_s / 4, 5.0)
        self._redis_factory = redis_factory
        self._redis: redis.Redis | None = None
        self._clock = clock
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._heap: list[tuple[float, int, tuple[str, str]]] = []
        self._seq = 0
        # Highest publish order seen stored: a missing run published before it
        # was lost; one published after everything seen stored may only be
        # waiting in a backlog (workers busy, killed or restarting), and
        # republishing it then would only add load when workers are scarce.
        self._max_confirmed_seq = 0
        self._next_check = 0.0
        self._next_log = 0.0
        self.bytes = 0
        # counters
        self.untracked = 0
        self.confirmed = 0
        self.republished = 0
        self.held = 0
        self.unconfirmed = 0
        self.checks = 0
        self.commands = 0
        self.errors = 0
        self.last_error: str | None = None

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------ tracking

    def track(self, records: list[Record]) -> None:
        """Remember runs the broker just took; a run already tracked keeps its entry."""
        due = self._clock() + self.timeout_s
        for record in records:
            identity = run_identity(record[0])
            if identity is None:
                self.untracked += 1
                continue
            if identity in self._entries:
                continue  # a republish or a duplicate submit: keep its attempt count
            self._seq += 1
            self._entries[identity] = _Entry(
                record, identity[0], identity[1], due, self._seq, due - self.timeout_s
            )
            heapq.heappush(self._heap, (due, self._seq, identity))
            self.bytes += record[2]

    def wake_at(self) -> float | None:
        """Clock time of the next check, or None if nothing is tracked."""
        if not self._entries:
            return None
        if self.bytes > self.max_bytes:
            return self._next_check
        return max(self._next_check, self._heap[0][0])

    # ------------------------------------------------------------ checking

    def check(self) -> list[Record]:
        """Check the runs due (all of them over the byte bound); returns the runs to republish.

        The caller publishes them and calls `republish_failed` for those the
        broker did not take, so a broker outage is not counted as attempts.
        """
        now = self._clock()
        if not self._entries or now < self._next_check:
            return []
        self._next_check = now + self.check_interval_s
        over = self.bytes - self.max_bytes
        due: list[_Entry] = []
        while self._heap and (self._heap[0][0] <= now or over > 0):
            at, seq, key = heapq.heappop(self._heap)
            entry = self._entries.get(key)
            if entry is None or entry.seq != seq or entry.due != at:
                continue  # stale heap item: the entry was dropped or rescheduled
            due.append(entry)
            over -= entry.record[2]
        out: list[Record] = []
        for start in range(0, len(due), _CHECK_BATCH):
            batch = due[start : start + _CHECK_BATCH]
            try:
                arrived = self._arrived(batch)
            except Exception as exc:  # Redis down: nobody is judged lost on no evidence
                self.errors += 1
                self.last_error = f"receipts: {type(exc).__name__}: {exc}"
                for entry in due[start:]:
                    self._reschedule(entry, now + self.check_interval_s)
                self._log("cannot check run receipts in Redis (%s); retrying", self.last_error)
                break
            for entry, ok in zip(batch, arrived, strict=True):
                if ok:
                    self._max_confirmed_seq = max(self._max_confirmed_seq, entry.seq)
            for entry, ok in zip(batch, arrived, strict=True):
                if ok:
                    self._drop(entry)
                    self.confirmed += 1
                elif entry.due > now:
                    # Checked early for the byte bound and not stored yet.
                    self._give_up(entry, "the receipt ledger is full")
                elif entry.republished >= self.max_republish:
                    self._give_up(entry, f"not stored after {entry.republished} republishes")
                elif (
                    entry.seq > self._max_confirmed_seq
                    and now - entry.since < self.timeout_s * _HOLD_FACTOR
                ):
                    self.held += 1  # behind, not lost (yet): look again later
                    self._reschedule(entry, now + self.timeout_s)
                else:
                    entry.republished += 1
                    self.republished += 1
                    backoff = 2 ** min(entry.republished, 4)
                    self._reschedule(entry, now + self.timeout_s * min(backoff, _MAX_BACKOFF))
                    out.append(entry.record)
        return out

    def republish_failed(self, records: list[Record]) -> None:
        """The broker did not take these republishes: undo their attempt, retry in an interval."""
        at = self._clock() + self.check_interval_s
        for record in records:
            identity = run_identity(record[0])
            entry = self._entries.get(identity) if identity is not None else None
            if entry is not None:
                entry.republished -= 1
                self.republished -= 1
                self._reschedule(entry, at)

    def _arrived(self, batch: list[_Entry]) -> list[bool]:
        """One pipelined round trip (two when some ids are in neither zset)."""
        client = self._redis
        if client is None:
            client = self._redis = self._redis_factory()
        by_agent: dict[str, list[_Entry]] = {}
        for entry in batch:
            by_agent.setdefault(entry.agent, []).append(entry)
        pipe = client.pipeline(transaction=False)
        # stored-at before tombstones: retention moves an id from the first to
        # the second atomically, so reading them in this order cannot miss it.
        for agent, entries in by_agent.items():
            ids = [e.run_id for e in entries]
            pipe.zmscore(STORED_AT_KEY_TEMPLATE.format(prefix=self.prefix, agent_id=agent), ids)
            pipe.zmscore(TOMBSTONES_KEY_TEMPLATE.format(prefix=self.prefix, agent_id=agent), ids)
        replies: list[Any] = pipe.execute()
        self.checks += 1
        self.commands += len(replies)
        found: dict[int, bool] = {}
        for i, entries in enumerate(by_agent.values()):
            stored, trimmed = replies[2 * i], replies[2 * i + 1]
            for entry, a, b in zip(entries, stored, trimmed, strict=True):
                found[entry.seq] = a is not None or b is not None
        missing = [e for e in batch if not found[e.seq]]
        if missing:
            pipe = client.pipeline(transaction=False)
            for e in missing:
                pipe.exists(runtime_key("runs", self.prefix, agent_id=e.agent, run_id=e.run_id))
            for e, exists in zip(missing, pipe.execute(), strict=True):
                found[e.seq] = bool(exists)
            self.commands += len(missing)
        return [found[e.seq] for e in batch]

    # ------------------------------------------------------------ bookkeeping

    def _reschedule(self, entry: _Entry, at: float) -> None:
        entry.due = at
        heapq.heappush(self._heap, (at, entry.seq, (entry.agent, entry.run_id)))

    def _drop(self, entry: _Entry) -> None:
        del self._entries[(entry.agent, entry.run_id)]
        self.bytes -= entry.record[2]

    def _give_up(self, entry: _Entry, why: str) -> None:
        self._drop(entry)
        self.unconfirmed += 1
        self._log(
            "run %s of agent %r never seen stored (%s; dead-lettered?): giving up, %d so far",
            entry.run_id,
            entry.agent,
            why,
            self.unconfirmed,
        )

    def _log(self, msg: str, *args: object) -> None:
        now = self._clock()
        if now >= self._next_log:
            self._next_log = now + _LOG_S
            log.warning(msg, *args)

    def stats(self) -> dict[str, int]:
        return {
            "receipts_pending": len(self._entries),
            "receipts_pending_bytes": self.bytes,
            "confirmed": self.confirmed,
            "republished": self.republished,
            "receipts_held": self.held,
            "unconfirmed": self.unconfirmed,
            "untracked": self.untracked,
            "receipt_checks": self.checks,
            "receipt_commands": self.commands,
        }
