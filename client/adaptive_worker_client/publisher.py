"""The run client: hand finished runs to the workers, fire-and-forget.

Why it looks like this:

- A plain Celery `apply_async` costs the caller ~0.6 ms p50 and raises after
  ~0.7 s when the broker is down. An agent must not pay that, so
  `submit_run` only serializes the run (no validation: the worker validates
  and dead-letters) and appends it to a bounded in-memory buffer; a daemon
  publisher thread sends the buffer to the broker, several runs per
  `adaptive.ingest_runs` message when a backlog forms.
- The agent never sees an exception unless it asks for `strict=True`;
  everything that goes wrong is counted in `stats()` and logged.
- What the broker did not take goes to the disk spool (`spool.py`) and is
  replayed when the broker answers again.
- On a Redis broker a message can still vanish after the broker took it
  (kombu pops it, then records it as unacked: a worker killed in between
  loses it). With receipts on (`client_receipts`, `receipts.py`) every
  published run is kept until the state Redis shows it stored, and
  republished if it does not show up in time.
- Delivery is at-least-once (a batch whose publish timed out may have
  arrived, a spool segment may be replayed twice after a crash); ingest on
  the worker is idempotent per run id, so duplicates cost nothing.

Order: runs reach the broker in submission order per client; while the
spool holds anything, new runs go behind it instead of overtaking it.

Full buffer or spool (`client_overflow`): `drop_oldest` (default: the newest
runs best reflect the agent as it is now) discards the oldest runs to make
room; `drop_newest` refuses the incoming ones. Either way every dropped run
is counted in `stats()["dropped"]` and logged (at most once a minute).
The spool holds at most `client_spool_max_bytes` of live runs; its disk use
can exceed that by one partly replayed segment (1/8 of the limit).
"""

from __future__ import annotations

import concurrent.futures.thread  # noqa: F401  (see _warm_up)
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from adaptive_worker_client import config, hooks
from adaptive_worker_client.broker import REDIS_SCHEMES, broker_scheme, publisher_app
from adaptive_worker_client.contract import INGEST_QUEUE, INGEST_TASK, agent_id_problem, ingest_args
from adaptive_worker_client.encode import (
    Overflow,
    Record,
    RunInput,
    argsrepr,
    check,
    encode,
    invalid,
)
from adaptive_worker_client.errors import BufferFull, ClientClosed, InvalidRecord
from adaptive_worker_client.receipts import ReceiptLedger, receipts_enabled
from adaptive_worker_client.spool import Spool, UnsafeSpool, default_spool_dir, spool_scope

if TYPE_CHECKING:
    import redis
    from celery import Celery

    from adaptive_worker_client.config import AgentSettings

__all__ = ["RunClient"]

log = logging.getLogger(__name__)

_ORPHAN_SCAN_S = 60.0
_DROP_LOG_S = 60.0
_REPLAY_BATCHES_PER_CYCLE = 16
_RECEIPT_STATS = (
    "receipts_pending",
    "receipts_pending_bytes",
    "confirmed",
    "republished",
    "receipts_held",
    "unconfirmed",
    "untracked",
    "receipt_checks",
    "receipt_commands",
)


def _agent_of(record: Record) -> str:
    return record[1] or ""


class RunClient:
    """Fire-and-forget submission of run records to the ingest queue.

    One instance per process is the norm (see `default_client()`); it is safe
    to call from any number of threads. `settings` defaults to the process
    settings; `strict=True` makes invalid input, a full buffer and a closed
    client raise on the caller's thread instead of being counted; `queue`
    overrides the ingest queue (tests use private queues on shared brokers).
    """

    def __init__(
        self,
        settings: AgentSettings | None = None,
        *,
        strict: bool = False,
        queue: str = INGEST_QUEUE,
    ) -> None:
        self.settings = settings = settings or config.get_settings()
        self.strict = strict
        self.queue = queue
        self._max_runs = settings.client_buffer_max_runs
        self._max_bytes = settings.client_buffer_max_bytes
        self._max_run_bytes = settings.max_run_bytes
        self._max_depth = settings.max_json_depth
        self._overflow: Overflow = settings.client_overflow
        self._spool_root = settings.client_spool_dir or default_spool_dir()
        self._spool_scope = spool_scope(settings.effective_broker_url, settings.key_prefix, queue)
        self._retry_policy = {
            "max_retries": settings.client_publish_retries,
            "interval_start": 0,
            "interval_step": 0.1,
            "interval_max": 0.2,
        }
        self._init_state()
        hooks.ALL.add(self)

    def _init_state(self) -> None:
        """Everything a forked child must not share with its parent."""
        self._lock = threading.Lock()
        self._buffer: deque[Record] = deque()
        self._buffer_bytes = 0
        self._wake = threading.Event()
        self._cond = threading.Condition(threading.Lock())
        self._spool_lock = threading.RLock()
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._started = False
        self._closed = False
        self._stopping = False
        self._sealed = False
        self._app: Celery | None = None
        self._spool: Spool | None = None
        self._adopted: list[Spool] = []
        self._unsafe_spools: set[Path] = set()
        self._inflight: list[Record] = []
        self._flush_requested = 0
        self._flush_done = 0
        self._flush_ok = True
        self._retry_at = 0.0
        self._next_scan = 0.0
        self._broker_up: bool | None = None
        self._last_error: str | None = None
        self._last_drop_log = 0.0
        # counters (agent side, under _lock)
        self._submitted = 0
        self._invalid = 0
        self._dropped_buffer = 0
        self._refused = 0
        # counters (publisher side)
        self._published = 0
        self._messages = 0
        self._spooled = 0
        self._replayed = 0
        self._dropped_spool = 0
        self._corrupt = 0
        self._errors = 0
        self._receipts: ReceiptLedger | None = None
        if receipts_enabled(self.settings):
            self._receipts = ReceiptLedger(self.settings, self._state_redis)

    def _state_redis(self) -> redis.Redis:
        """The receipts' Redis client, made on the first check (imports redis-py then)."""
        from adaptive_worker_client.reader import state_client

        return state_client(self.settings)

    # ------------------------------------------------------------ agent side

    def submit_run(self, run: RunInput) -> None:
        """Queue one run for the workers; returns at once and never raises unless strict."""
        record = self._record(run)
        if record is None:
            return
        with self._lock:
            if self._closed:
                self._refuse_closed(1)
                return
            self._append_locked(record)
        self._wake_publisher()

    def _record(self, run: RunInput) -> Record | None:
        """Encode and size-check one run; None (counted) if refused, strict raises."""
        try:
            text, agent = encode(run)
            check(
                text,
                agent=agent,
                max_bytes=self._max_run_bytes,
                max_depth=self._max_depth,
                encoded_from=run if type(run) is dict else None,
            )
            if self.strict:
                self._validate(text)
        except Exception as exc:  # e.g. a model's to_json() failing
            self._refuse(exc)
            return None
        return (text, agent, len(text))

    def _append_locked(self, record: Record) -> None:
        """Buffer one record (caller holds the lock), making room by the overflow policy."""
        full = len(self._buffer) >= self._max_runs or (
            self._buffer_bytes + record[2] > self._max_bytes
        )
        if full and not self._make_room(1, record[2]):
            return
        self._buffer.append(record)
        self._buffer_bytes += record[2]
        self._submitted += 1

    def _wake_publisher(self) -> None:
        if not self._started:
            self.start()
        if not self._wake.is_set():
            self._wake.set()

    def submit_runs(self, runs: Iterable[RunInput]) -> None:
        """`submit_run` for several runs, with one lock and one wake-up."""
        records = [r for r in map(self._record, runs) if r is not None]
        if not records:
            return
        size = sum(r[2] for r in records)
        with self._lock:
            if self._closed:
                self._refuse_closed(len(records))
                return
            if self.strict and (
                len(self._buffer) + len(records) > self._max_runs
                or self._buffer_bytes + size > self._max_bytes
            ):
                self._refused += len(records)
                raise BufferFull(f"buffer full: {len(self._buffer)} runs queued")
            for record in records:
                self._append_locked(record)
        self._wake_publisher()

    def _validate(self, text: str) -> None:
        # Strict mode only: pydantic is imported when first needed.
        from adaptive_worker_client.wire import RunRecord, parse_wire

        run = parse_wire(RunRecord, text)
        problem = agent_id_problem(run.agent_id)
        if problem:
            raise InvalidRecord("RunRecord", [("agent_id", problem)])

    def _refuse(self, exc: Exception) -> None:
        if not isinstance(exc, InvalidRecord):
            exc = invalid(f"{type(exc).__name__}: {exc}")
        with self._lock:
            self._invalid += 1
        if self.strict:
            raise exc
        self._log_drop("refused an invalid run: %s", exc)

    def _refuse_closed(self, n: int) -> None:
        """Called under _lock."""
        if self.strict:
            self._refused += n
            raise ClientClosed("the client is closed")
        self._submitted += n
        self._dropped_buffer += n

    def _make_room(self, runs: int, size: int) -> bool:
        """Called under _lock when one run does not fit; applies the overflow policy."""
        if self.strict:
            self._refused += runs
            raise BufferFull(f"buffer full: {len(self._buffer)} runs queued")
        if self._overflow == "drop_newest" or size > self._max_bytes:
            self._submitted += runs
            self._dropped_buffer += runs
            self._log_drop_locked()
            return False
        while self._buffer and (
            len(self._buffer) + runs > self._max_runs or self._buffer_bytes + size > self._max_bytes
        ):
            old = self._buffer.popleft()
            self._buffer_bytes -= old[2]
            self._dropped_buffer += 1
        self._log_drop_locked()
        return True

    def _log_drop_locked(self) -> None:
        now = time.monotonic()
        if now - self._last_drop_log >= _DROP_LOG_S:
            self._last_drop_log = now
            log.warning(
                "run buffer full (%d runs, %d bytes): policy %s, %d runs dropped so far",
                len(self._buffer),
                self._buffer_bytes,
                self._overflow,
                self._dropped_buffer,
            )

    def _log_drop(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_drop_log >= _DROP_LOG_S:
            self._last_drop_log = now
            log.warning(msg, *args)

    # ------------------------------------------------------------- control

    def start(self) -> None:
        """Start the publisher (done by the first submit; early start replays orphans sooner)."""
        with self._start_lock:
            if self._started:
                return
            thread = threading.Thread(target=self._run, name="adaptive-run-publisher", daemon=True)
            try:
                thread.start()
            except RuntimeError as exc:  # e.g. at interpreter shutdown
                self._errors += 1
                self._last_error = f"cannot start the publisher: {exc}"
                log.error("%s", self._last_error)
                return
            self._thread = thread
            self._started = True
            hooks.LIVE.add(self)

    def flush(self, timeout: float = 5.0) -> bool:
        """Publish everything submitted so far, retrying the spool now.

        True when every run submitted before the call has reached the broker;
        False on timeout or when runs are still in the spool (broker
        unreachable: they are safe on disk and will be replayed).
        """
        if self._closed:
            return self._flush_ok and not self._buffer
        self.start()
        with self._cond:
            self._flush_requested += 1
            target = self._flush_requested
        self._wake.set()
        with self._cond:
            if not self._cond.wait_for(lambda: self._flush_done >= target, timeout):
                return False
            return self._flush_ok

    def close(self, timeout: float | None = None) -> bool:
        """Flush, stop the publisher, and spool what it could not send; True if all was sent."""
        if self._closed:
            return self._flush_ok
        timeout = self.settings.client_exit_timeout_s if timeout is None else timeout
        ok = self.flush(timeout) if self._started else True
        with self._lock:
            self._closed = True
            leftover = list(self._buffer)
            self._buffer.clear()
            self._buffer_bytes = 0
            inflight = list(self._inflight)
        self._stopping = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(0.5)
        with self._spool_lock:
            # The publisher may be stuck in a publish: keep its batch too (the
            # duplicate, if it did arrive, is harmless).
            if thread is not None and thread.is_alive():
                leftover = inflight + leftover
            if leftover:
                ok = False
                self._to_spool(leftover)
            for spool in [self._spool, *self._adopted]:
                if spool is not None:
                    spool.close()
            self._spool = None
            self._adopted = []
            self._sealed = True
        hooks.LIVE.discard(self)
        return ok

    def stats(self) -> dict[str, int | bool | str | None]:
        """Counters since the client was made; buffer, spool and broker figures are current.

        submitted: valid runs handed in (dropped ones included); published:
        runs the broker took (replayed ones included), in `messages`
        messages; spooled: runs written to the spool; replayed: runs sent
        from a spool (own or adopted); dropped: submitted runs lost to a full
        buffer or spool, a closed client or a spool write error; invalid:
        inputs refused as invalid; refused: strict mode only, runs refused
        with an exception (full buffer, closed client); corrupt: unreadable
        spool lines skipped; errors: failed publishes, spool I/O errors and
        corrupt lines. Without adopted spools, submitted = published +
        dropped + buffered + inflight + spool_runs.

        Receipts (`receipts` True when on, see `receipts.py`):
        receipts_pending(_bytes): published runs not seen stored yet;
        confirmed: runs seen stored; republished: republishes sent (not in
        `published`); unconfirmed: runs given up, never seen stored;
        untracked: published runs the worker will dead-letter at once (no
        valid id or agent id), not waited for; receipt_checks,
        receipt_commands: round trips and Redis commands the checks cost.
        """
        with self._lock:
            buffered, buffered_bytes = len(self._buffer), self._buffer_bytes
            submitted, invalid, refused, dropped_buffer = (
                self._submitted,
                self._invalid,
                self._refused,
                self._dropped_buffer,
            )
        with self._spool_lock:
            spools = [s for s in (self._spool, *self._adopted) if s is not None and not s.closed]
            spool_runs = sum(s.live_runs for s in spools)
            spool_bytes = sum(s.live_bytes for s in spools)
        ledger = self._receipts
        receipts = ledger.stats() if ledger is not None else dict.fromkeys(_RECEIPT_STATS, 0)
        return {
            "submitted": submitted,
            "published": self._published,
            "messages": self._messages,
            "spooled": self._spooled,
            "replayed": self._replayed,
            "dropped": dropped_buffer + self._dropped_spool,
            "invalid": invalid,
            "refused": refused,
            "corrupt": self._corrupt,
            "errors": self._errors,
            "buffered": buffered,
            "buffered_bytes": buffered_bytes,
            "inflight": len(self._inflight),
            "spool_runs": spool_runs,
            "spool_bytes": spool_bytes,
            "broker_up": self._broker_up,
            "last_error": self._last_error,
            "receipts": ledger is not None,
            **receipts,
        }

    # -------------------------------------------------------- publisher side

    def _make_app(self) -> Celery:
        """A private app: the publisher's short timeouts must not reach anyone else's app."""
        return publisher_app(self.settings)

    def _warm_up(self) -> None:
        """Build the app and load the transport now, not in the first publish.

        A first publish can happen during interpreter shutdown (a short
        script submits and exits; atexit flushes), when no module may
        register an atexit hook: redis-py's lazy import of `redis.cluster`
        pulls in `concurrent.futures.thread`, which does, and the publish
        would fail. That module is imported above for the same reason.
        """
        try:
            if self._app is None:
                self._app = self._make_app()
            with self._app.connection_for_write() as conn:
                _ = conn.transport  # imports the transport module and its client
            if broker_scheme(self.settings.effective_broker_url) in REDIS_SCHEMES:
                import redis.cluster  # noqa: F401
        except Exception as exc:  # a bad URL shows up again, counted, on publish
            log.debug("run publisher warm-up failed: %s", exc)

    def _run(self) -> None:
        linger = self.settings.client_linger_ms / 1000.0
        self._warm_up()
        while not self._stopping:
            self._wake.wait(self._wait_time())
            if self._stopping:
                break
            if linger and self._flush_requested <= self._flush_done:
                time.sleep(linger)  # let a burst gather into one message
            # Clear first, then look: a submit or flush after this point sets
            # the event again, one before it is served by this cycle.
            self._wake.clear()
            with self._cond:
                requested = self._flush_requested
            forced = requested > self._flush_done
            try:
                ok = self._cycle(forced)
            except Exception as exc:  # the thread must survive anything
                self._errors += 1
                self._last_error = repr(exc)
                log.exception("run publisher cycle failed")
                ok = False
            if forced:
                with self._cond:
                    self._flush_done = requested
                    self._flush_ok = ok
                    self._cond.notify_all()

    def _wait_time(self) -> float | None:
        now = time.monotonic()
        with self._spool_lock:
            pending = self._spool_pending()
        wake = self._retry_at if pending else self._next_scan
        receipts = self._receipts.wake_at() if self._receipts is not None else None
        if receipts is not None:
            wake = min(wake, receipts)
        return max(0.0, wake - now)

    def _spool_pending(self) -> bool:
        return any(s.live_bytes > 0 for s in (self._spool, *self._adopted) if s is not None)

    def _cycle(self, forced: bool) -> bool:
        """One round: send (or spool) the buffer, then replay the spool if due."""
        with self._lock:
            records = list(self._buffer)
            self._buffer.clear()
            self._buffer_bytes = 0
            self._inflight = records
        try:
            if records:
                self._deliver(records)
        finally:
            self._inflight = []
        now = time.monotonic()
        if forced or now >= self._next_scan:
            self._next_scan = now + _ORPHAN_SCAN_S
            self._adopt_orphans()
        if forced or now >= self._retry_at:
            self._replay(None if forced else _REPLAY_BATCHES_PER_CYCLE)
        if self._receipts is not None:
            self._check_receipts(self._receipts)
        with self._spool_lock:
            return not self._spool_pending() and self._broker_up is not False

    def _deliver(self, records: list[Record]) -> None:
        with self._spool_lock:
            behind = self._spool_pending()
        if behind or time.monotonic() < self._retry_at:
            self._to_spool(records)
            return
        batches = list(self._batches(records))
        for i, batch in enumerate(batches):
            if not self._publish(batch):
                self._to_spool([r for b in batches[i:] for r in b])
                return
            self._published += len(batch)
            if self._receipts is not None:
                self._receipts.track(batch)

    def _check_receipts(self, ledger: ReceiptLedger) -> None:
        """Republish the runs the ledger found missing, straight to the broker.

        Not through the spool: they are in the ledger already, and a failed
        republish is simply tried again one check interval later.
        """
        records = ledger.check()
        if not records:
            return
        log.warning("republishing %d runs not seen stored in time", len(records))
        batches = list(self._batches(records))
        for i, batch in enumerate(batches):
            if not self._publish(batch):
                ledger.republish_failed([r for b in batches[i:] for r in b])
                return

    def _batches(self, records: Sequence[Record]) -> Iterable[list[Record]]:
        """Messages within the size limits, each agent's runs together and in order.

        Grouped by agent (a stable sort: each agent's runs keep their order)
        because a worker learns an ingest's runs from memory per agent: one
        commit rewrites the agent's whole state (~1 MB with full prompts), so
        100 runs of one agent per message cost one commit, where 25 runs of
        each of 4 agents would cost four.
        """
        max_runs = self.settings.client_batch_max_runs
        max_bytes = self.settings.client_batch_max_bytes
        batch: list[Record] = []
        size = 0
        for record in sorted(records, key=_agent_of):
            if batch and (len(batch) >= max_runs or size + record[2] > max_bytes):
                yield batch
                batch, size = [], 0
            batch.append(record)
            size += record[2]
        if batch:
            yield batch

    def _publish(self, batch: list[Record]) -> bool:
        """Send one ingest message; False (broker marked down) if it did not go."""
        if self._app is None:
            self._app = self._make_app()
        shown = argsrepr(batch)
        try:
            self._app.send_task(
                INGEST_TASK,
                args=ingest_args([r[0] for r in batch]),
                queue=self.queue,
                argsrepr=shown,
                kwargsrepr="{}",
                retry=True,
                retry_policy=self._retry_policy,
                ignore_result=True,
                add_to_parent=False,
            )
        except Exception as exc:
            # Any failure keeps the runs (spool + retry): connection errors are
            # the expected case, and dropping data on an unexpected one would
            # be worse than retrying it.
            self._errors += 1
            self._last_error = f"{type(exc).__name__}: {exc}"
            self._retry_at = time.monotonic() + self.settings.client_retry_interval_s
            if self._broker_up is not False:
                log.warning(
                    "publishing runs failed (%s); spooling to %s, retrying every %.1f s",
                    self._last_error,
                    self._spool_root,
                    self.settings.client_retry_interval_s,
                )
            self._broker_up = False
            return False
        if self._broker_up is False:
            log.warning("broker reachable again; replaying the spool")
        self._broker_up = True
        self._retry_at = 0.0
        self._messages += 1
        return True

    def _to_spool(self, records: list[Record]) -> None:
        with self._spool_lock:
            if self._sealed:
                # A publish that outlived close(): close() spooled its batch.
                return
            try:
                if self._spool is None or self._spool.closed:
                    self._spool = Spool.create(
                        Path(self._spool_root),
                        self._spool_scope,
                        self.settings.client_spool_max_bytes,
                        self.settings.client_spool_fsync,
                    )
                written, dropped = self._spool.append(records, self._overflow)
            except OSError as exc:
                self._errors += 1
                self._dropped_spool += len(records)
                self._last_error = f"spool: {exc}"
                log.error(
                    "cannot spool %d runs to %s (%s): dropped", len(records), self._spool_root, exc
                )
                return
            self._spooled += written
            if dropped:
                self._dropped_spool += dropped
                self._log_drop(
                    "spool full (%d bytes): policy %s, %d runs dropped so far",
                    self.settings.client_spool_max_bytes,
                    self._overflow,
                    self._dropped_spool,
                )

    def _replay(self, max_batches: int | None) -> None:
        """Publish spooled runs oldest first: own spool, then adopted ones."""
        settings = self.settings
        sent = 0
        for spool in [self._spool, *self._adopted]:
            while spool is not None and not self._stopping:
                if max_batches is not None and sent >= max_batches:
                    self._wake.set()  # more to do: come back without waiting
                    return
                with self._spool_lock:
                    if spool.closed:
                        break
                    try:
                        chunk = spool.read(
                            settings.client_batch_max_runs, settings.client_batch_max_bytes
                        )
                    except FileNotFoundError as exc:
                        # A segment deleted behind our back: its runs are gone.
                        lost = spool.discard_head()
                        self._dropped_spool += lost
                        self._errors += 1
                        self._last_error = f"spool: {exc}"
                        log.error("spool segment vanished (%s): %d runs lost", exc, lost)
                        continue
                    except OSError as exc:
                        self._errors += 1
                        self._last_error = f"spool: {exc}"
                        self._retry_at = time.monotonic() + settings.client_retry_interval_s
                        log.error("cannot read the spool %s: %s", spool.path, exc)
                        return
                if chunk is None:
                    break
                if chunk.records and not self._publish(chunk.records):
                    return
                with self._spool_lock:
                    spool.consume(chunk)
                self._published += len(chunk.records)
                self._replayed += len(chunk.records)
                if self._receipts is not None:
                    self._receipts.track(chunk.records)
                if chunk.corrupt:
                    self._corrupt += chunk.corrupt
                    self._errors += chunk.corrupt
                    log.error("skipped %d unreadable lines in %s", chunk.corrupt, spool.path)
                sent += 1
        with self._spool_lock:
            for spool in list(self._adopted):
                if spool.live_bytes <= 0:
                    spool.close()
                    self._adopted.remove(spool)

    def _adopt_orphans(self) -> None:
        """Take over spools whose owner process is gone (it died or exited during an outage).

        Only spools of this deployment (same `spool_scope`), and only ones
        this user owns and nobody else can write (refused ones are logged
        once each, and left as they are).
        """
        root = Path(self._spool_root)
        mark = self._spool_scope + "-"
        try:
            candidates = sorted(p for p in root.iterdir() if p.name.startswith(mark))
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot list the spool directory %s: %s", root, exc)
            return
        with self._spool_lock:
            mine = {s.path for s in (self._spool, *self._adopted) if s is not None}
            for path in candidates:
                if path in mine:
                    continue
                try:
                    spool = Spool.adopt(
                        path, self.settings.client_spool_max_bytes, self.settings.client_spool_fsync
                    )
                except UnsafeSpool as exc:
                    if path not in self._unsafe_spools:
                        self._unsafe_spools.add(path)
                        self._errors += 1
                        self._last_error = f"spool: {exc}"
                        log.error("not adopting the spool %s: %s", path, exc)
                    continue
                except OSError as exc:
                    log.warning("cannot adopt the spool %s: %s", path, exc)
                    continue
                if spool is None:
                    continue
                if spool.live_runs:
                    log.warning("adopting %d spooled runs from %s", spool.live_runs, path)
                    self._adopted.append(spool)
                else:
                    spool.close()

    def _after_fork_in_child(self) -> None:
        spools = [s for s in (self._spool, *self._adopted) if s is not None]
        self._init_state()
        for spool in spools:
            spool.forget()
