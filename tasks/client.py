"""The client agents call: hand a finished run to the workers, fire-and-forget.

Why it looks like this:

- A plain Celery `apply_async` costs the caller ~0.6 ms p50 and raises after
  ~0.7 s when the broker is down. An agent must not pay that, so
  `submit_run` only serializes the run (no validation: the worker validates
  and dead-letters) and appends it to a bounded in-memory buffer; a daemon
  publisher thread sends the buffer to the broker, several runs per
  `adaptive.ingest_runs` message when a backlog forms.
- The agent never sees an exception unless it asks for `strict=True`;
  everything that goes wrong is counted in `stats()` and logged.
- Nothing is lost to a broker outage or to the process exiting: what the
  broker did not take goes to a bounded spool on local disk and is replayed
  when the broker answers again. A spool left behind by a process that died
  or exited during an outage is adopted and replayed by the next client of
  the same deployment (broker URL without credentials, key prefix, queue)
  using the same spool directory, never by another deployment's client.
- Delivery is at-least-once (a batch whose publish timed out may have
  arrived, a spool segment may be replayed twice after a crash); ingest on
  the worker is idempotent per run id, so duplicates cost nothing.

Order: runs reach the broker in submission order per client; while the
spool holds anything, new runs go behind it instead of overtaking it.

Spool layout: `<spool_dir>/<scope>-<host>-<pid>-<random>/` per client,
where `<scope>` (`spool_scope`) names the deployment, holding `owner.lock`
(flock'ed while the owner lives: a directory whose lock can be taken belongs
to a dead process and may be adopted) and segment files
`NNNNNNNNNNNN.jsonl`, one JSON object per line: `{"agent_id": ..., "run":
<the submitted JSON text, as a string>}`. Directories (and the missing
parents we create) are 0700 and files 0600 because runs carry prompts; a
spool that another user owns or that group or others can write is never
adopted (logged, left in place).

fsync policy (`client_spool_fsync`, default on): every spool write (one
batch of runs) is fsync'ed, and so is the directory when a segment is
created, so a spooled run survives power loss, not only a crash. Off, writes
reach the OS page cache at once (surviving a process crash) and disk later.

Full buffer or spool (`client_overflow`): `drop_oldest` (default: the newest
runs best reflect the agent as it is now) discards the oldest runs to make
room; `drop_newest` refuses the incoming ones. Either way every dropped run
is counted in `stats()["dropped"]` and logged (at most once a minute).
The spool holds at most `client_spool_max_bytes` of live runs; its disk use
can exceed that by one partly replayed segment (1/8 of the limit).

Reading the learned state back (`load_plan`, `load_hints`, `load_stability`,
`StateReader`): a NeMo Relay agent reads `plan` and `acg_stability` once, at
registration, and never the trie (SPEC 6c), so latency hints reach an agent
only through this client, and only if it can afford to ask on every LLM
call. Hence a per-process read cache: one Redis GET per key per
`client_state_ttl_s`, parsed once per GET, served from memory in between;
Redis trouble never reaches the agent unless it asks for `strict=True`.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401  (see _warm_up)
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import secrets
import socket
import stat
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeAlias

import redis
from celery import Celery
from redis.backoff import NoBackoff
from redis.retry import Retry

from storage import strictjson
from storage.connection import connect, redis_tls_options
from storage.errors import InvalidRecord
from storage.keys import Keys, agent_id_problem
from storage.models import (
    ExecutionPlan,
    RunRecord,
    StabilityAnalysisResult,
    TrieEnvelope,
    parse_wire,
)
from worker.celery import (
    AMQP_SCHEMES,
    INGEST_QUEUE,
    INGEST_TASK,
    REDIS_SCHEMES,
    broker_scheme,
    configure,
)
from worker.engine.latency import agent_hints
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)

__all__ = [
    "BufferFull",
    "ClientClosed",
    "ClientError",
    "RunClient",
    "StateReader",
    "StateUnavailable",
    "default_client",
    "default_reader",
    "flush",
    "load_hints",
    "load_plan",
    "load_stability",
    "stats",
    "submit_run",
    "submit_runs",
]


class SupportsToJson(Protocol):
    def to_json(self) -> str: ...


RunInput: TypeAlias = Mapping[str, Any] | str | bytes | bytearray | SupportsToJson
Overflow: TypeAlias = Literal["drop_oldest", "drop_newest"]
# (JSON text of the run, its agent id when known cheaply, len of the text)
Record: TypeAlias = tuple[str, str | None, int]


class ClientError(RuntimeError):
    """Raised on the agent thread only in strict mode."""


class BufferFull(ClientError):
    """Strict mode: the in-memory buffer cannot take the run."""


class ClientClosed(ClientError):
    """Strict mode: the client was closed (at exit), runs are no longer accepted."""


class StateUnavailable(ClientError):
    """Strict mode: the learned state could not be read from Redis (the cause is chained)."""


# Compact, refusing NaN/Infinity (not JSON; the worker and the runtime refuse
# them too), and leaving non-ASCII text as is so that a lone surrogate fails
# the UTF-8 check below instead of becoming an escape the worker must refuse.
_ENCODER = json.JSONEncoder(
    separators=(",", ":"), allow_nan=False, ensure_ascii=False, check_circular=False
)
_AGENT_RE = re.compile(r'"agent_id"\s*:\s*"((?:[^"\\]|\\.){1,200})"')
_ORPHAN_SCAN_S = 60.0
_DROP_LOG_S = 60.0
_REPLAY_BATCHES_PER_CYCLE = 16


def _invalid(message: str) -> InvalidRecord:
    return InvalidRecord("RunRecord", [("", message)])


def _encode(run: RunInput) -> tuple[str, str | None]:
    """JSON text and agent id of one run: the whole agent-side cost, kept minimal."""
    cls = type(run)
    if cls is str:
        return run, None  # type: ignore[return-value]
    if cls is dict:
        try:
            # The C encoder of the standard library: orjson is faster but
            # turns NaN into null silently, and the one rule on every door
            # is that NaN/Infinity are refused (storage/strictjson.py).
            text = _ENCODER.encode(run)
        except (TypeError, ValueError, RecursionError) as exc:
            raise _invalid(f"not JSON serializable: {exc}") from None
        agent = run.get("agent_id")  # type: ignore[union-attr]
        return text, agent if type(agent) is str else None
    if isinstance(run, str):
        return str(run), None
    if isinstance(run, bytes | bytearray):
        try:
            return bytes(run).decode("utf-8"), None
        except UnicodeDecodeError as exc:
            raise _invalid(f"not UTF-8: {exc}") from None
    to_json = getattr(run, "to_json", None) or getattr(run, "model_dump_json", None)
    if to_json is not None:
        text = to_json()
        if not isinstance(text, str):
            raise _invalid(f"to_json() returned {type(text).__name__}, not str")
        agent = getattr(run, "agent_id", None)
        return text, agent if isinstance(agent, str) else None
    if isinstance(run, Mapping):
        return _encode(dict(run))
    raise _invalid(f"expected a dict, JSON text or a model with to_json(), got {cls.__name__}")


def _agent_of(record: Record) -> str | None:
    text, agent, _ = record
    if agent is not None:
        return agent
    match = _AGENT_RE.search(text, 0, 4096)
    return match.group(1) if match else None


def _argsrepr(records: Sequence[Record]) -> str:
    """What Flower shows instead of megabytes of prompts: count, size, agents."""
    agents = list(dict.fromkeys(a for a in map(_agent_of, records) if a is not None))
    size = sum(r[2] for r in records)
    shown = ", ".join(agents[:5]) + (f" +{len(agents) - 5} more" if len(agents) > 5 else "")
    text = f"<{len(records)} runs, {size} bytes, agents: {shown or '?'}>"
    return text if len(text) <= 300 else text[:296] + "...>"


# --------------------------------------------------------------------- spool

_LOCK_NAME = "owner.lock"
_SEGMENT_GLOB = "*.jsonl"


@dataclass(slots=True)
class _Segment:
    path: Path
    runs: int
    size: int
    offset: int = 0  # bytes replayed or dropped from the front (in memory)
    done: int = 0  # runs replayed or dropped from the front

    @property
    def live_runs(self) -> int:
        return self.runs - self.done

    @property
    def live_bytes(self) -> int:
        return self.size - self.offset


@dataclass(slots=True)
class _Chunk:
    """Runs read from the head of a spool, to be consumed once published."""

    segment: _Segment
    records: list[Record]
    lines: int
    end: int
    corrupt: int = 0


@dataclass
class Spool:
    """One owner's spool directory; only the publisher thread (or close) touches it."""

    path: Path
    lock_fd: int
    max_bytes: int
    fsync: bool
    segments: deque[_Segment] = field(default_factory=deque)
    writable: bool = True
    _writer: Any = None
    _seq: int = 0
    closed: bool = False

    @property
    def segment_bytes(self) -> int:
        return max(64 * 1024, self.max_bytes // 8)

    @property
    def live_runs(self) -> int:
        return sum(s.live_runs for s in self.segments)

    @property
    def live_bytes(self) -> int:
        return sum(s.live_bytes for s in self.segments)

    # ---- creation and adoption

    @classmethod
    def create(cls, root: Path, scope: str, max_bytes: int, fsync: bool) -> Spool:
        """A new spool for this process, named `<scope>-<host>-<pid>-<random>` under `root`.

        The scope (see `spool_scope`) is in the name so that only a client of
        the same deployment ever adopts it.
        """
        _make_private_dirs(root)
        host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"
        path = root / f"{scope}-{host}-{os.getpid()}-{secrets.token_hex(4)}"
        path.mkdir(mode=0o700)
        os.chmod(path, 0o700)  # exactly, whatever the umask
        fd = os.open(path / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if fsync:
            _fsync_dir(path)
            _fsync_dir(root)
        return cls(path, fd, max_bytes, fsync)

    @classmethod
    def adopt(cls, path: Path, max_bytes: int, fsync: bool) -> Spool | None:
        """Take over the spool of a dead owner, or None if its owner lives (or it vanished).

        Raises `UnsafeSpool` (nothing taken, nothing deleted) when the
        directory or one of its files is not ours or is writable by group or
        others: whoever could write it could make us publish runs of their
        choosing into this deployment.
        """
        lock_path = path / _LOCK_NAME
        try:
            _check_private(os.lstat(path), path, directory=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except UnsafeSpool:
            raise
        except OSError:
            return None
        try:
            _check_private(os.fstat(fd), lock_path)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Another adopter may have emptied and unlinked it meanwhile.
            if os.stat(lock_path).st_ino != os.fstat(fd).st_ino:
                raise FileNotFoundError(lock_path)
            seg_paths = sorted(path.glob(_SEGMENT_GLOB))
            for seg_path in seg_paths:
                _check_private(os.lstat(seg_path), seg_path)
        except UnsafeSpool:
            os.close(fd)
            raise
        except OSError:
            os.close(fd)
            return None
        spool = cls(path, fd, max_bytes, fsync, writable=False)
        for seg_path in seg_paths:
            data = seg_path.read_bytes()
            runs = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
            spool.segments.append(_Segment(seg_path, runs, len(data)))
        return spool

    # ---- writing

    def append(self, records: Sequence[Record], overflow: Overflow) -> tuple[int, int]:
        """Write runs behind the others; returns (written, dropped) run counts."""
        lines = [_spool_line(r) for r in records]
        dropped = 0
        new = sum(map(len, lines))
        live = self.live_bytes
        if live + new > self.max_bytes and overflow == "drop_newest":
            room, keep = self.max_bytes - live, 0
            while keep < len(lines) and len(lines[keep]) <= room:
                room -= len(lines[keep])
                keep += 1
            dropped, lines = len(lines) - keep, lines[:keep]
        elif live + new > self.max_bytes:
            while lines and new > self.max_bytes:
                new -= len(lines[0])
                lines.pop(0)
                dropped += 1
        if lines:
            # Raises OSError with nothing written (and nothing dropped yet).
            self._write(b"".join(lines), len(lines))
        if overflow == "drop_oldest" and self.live_bytes > self.max_bytes:
            # Only after the write succeeded: a failed write must not cost
            # the spooled runs too.
            try:
                dropped += self._drop_head(self.live_bytes - self.max_bytes)
            except OSError as exc:  # retried by the next append
                log.error("cannot trim the spool %s: %s", self.path, exc)
        return len(lines), dropped

    def _write(self, data: bytes, runs: int) -> None:
        active = self.segments[-1] if self.segments and self._writer is not None else None
        if active is None or active.size >= self.segment_bytes:
            active = self._new_segment()
        writer = self._writer
        start = active.size
        try:
            writer.write(data)
            writer.flush()
            if self.fsync:
                os.fsync(writer.fileno())
        except OSError:
            # Keep the file made of whole lines: cut the partial write off.
            with contextlib.suppress(OSError):
                writer.truncate(start)
                writer.seek(start)
            raise
        active.size += len(data)
        active.runs += runs

    def _new_segment(self) -> _Segment:
        if self._writer is not None:
            self._writer.close()
        self._seq += 1
        path = self.path / f"{self._seq:012d}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._writer = os.fdopen(fd, "ab")
        if self.fsync:
            _fsync_dir(self.path)
        segment = _Segment(path, 0, 0)
        self.segments.append(segment)
        return segment

    def _drop_head(self, need: int) -> int:
        """Discard the oldest runs until `need` bytes are free; returns how many runs."""
        dropped = 0
        while need > 0 and self.segments:
            head = self.segments[0]
            if head.live_bytes <= need:
                need -= head.live_bytes
                dropped += head.live_runs
                self._remove_head()
                continue
            with open(head.path, "rb") as f:
                f.seek(head.offset)
                while need > 0:
                    line = f.readline()
                    if not line:  # shorter than we wrote: truncated behind our back
                        need -= head.live_bytes
                        dropped += head.live_runs
                        self._remove_head()
                        break
                    need -= len(line)
                    head.offset += len(line)
                    head.done += 1
                    dropped += 1
        return dropped

    # ---- reading (replay)

    def read(self, max_runs: int, max_bytes: int) -> _Chunk | None:
        """The next runs from the head (one segment at most), without consuming them."""
        while self.segments and self.segments[0].live_bytes <= 0:
            self._remove_head()
        if not self.segments:
            return None
        head = self.segments[0]
        records: list[Record] = []
        lines = corrupt = size = 0
        end = head.offset
        with open(head.path, "rb") as f:
            f.seek(head.offset)
            while len(records) < max_runs and end < head.size:
                line = f.readline(head.size - end)
                if not line:
                    break
                if records and size + len(line) > max_bytes:
                    break
                end += len(line)
                lines += 1
                try:
                    obj = json.loads(line)
                    text = obj["run"]
                    agent = obj.get("agent_id")
                    if not isinstance(text, str):
                        raise TypeError("run is not a string")
                except (ValueError, KeyError, TypeError, AttributeError):
                    corrupt += 1
                    continue
                size += len(line)
                records.append((text, agent if isinstance(agent, str) else None, len(text)))
        if lines == 0:
            # Nothing readable where runs should be (truncated behind our
            # back): count them as corrupt and move on rather than spin.
            return _Chunk(head, [], head.live_runs, head.size, head.live_runs)
        return _Chunk(head, records, lines, end, corrupt)

    def consume(self, chunk: _Chunk) -> None:
        segment = chunk.segment
        if self.closed or not self.segments or self.segments[0] is not segment:
            return
        segment.offset = chunk.end
        segment.done += chunk.lines
        if segment.live_bytes <= 0:
            self._remove_head()

    def discard_head(self) -> int:
        """Forget the head segment (its file is gone); returns its live runs."""
        if not self.segments:
            return 0
        lost = self.segments[0].live_runs
        self._remove_head()
        return lost

    def _remove_head(self) -> None:
        head = self.segments.popleft()
        if not self.segments and self._writer is not None:
            self._writer.close()
            self._writer = None
        with contextlib.suppress(FileNotFoundError):
            head.path.unlink()

    # ---- closing

    def close(self) -> None:
        """Release the lock; remove the directory when empty, else leave it for adoption."""
        if self.closed:
            return
        self.closed = True
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        try:
            if self.live_runs == 0:
                for segment in self.segments:
                    with contextlib.suppress(FileNotFoundError):
                        segment.path.unlink()
                self.segments.clear()
                for stray in self.path.glob("*.tmp"):  # a trim cut short by a crash
                    with contextlib.suppress(FileNotFoundError):
                        stray.unlink()
                with contextlib.suppress(FileNotFoundError):
                    (self.path / _LOCK_NAME).unlink()
                with contextlib.suppress(OSError):
                    self.path.rmdir()
            else:
                self._trim_head()
        finally:
            os.close(self.lock_fd)

    def _trim_head(self) -> None:
        """Rewrite a partly replayed/dropped head segment so an adopter skips that part."""
        head = self.segments[0] if self.segments else None
        if head is None or head.offset == 0:
            return
        tmp = head.path.with_suffix(".tmp")
        with open(head.path, "rb") as src, open(tmp, "wb") as dst:
            os.fchmod(dst.fileno(), 0o600)
            src.seek(head.offset)
            while chunk := src.read(1 << 20):
                dst.write(chunk)
            dst.flush()
            if self.fsync:
                os.fsync(dst.fileno())
        os.replace(tmp, head.path)
        head.size -= head.offset
        head.runs -= head.done
        head.offset = head.done = 0

    def forget(self) -> None:
        """After fork, in the child: the parent still owns this spool."""
        self.closed = True
        if self._writer is not None:
            with contextlib.suppress(OSError):
                self._writer.close()
        with contextlib.suppress(OSError):
            os.close(self.lock_fd)


def _spool_line(record: Record) -> bytes:
    text, agent, _ = record
    return (json.dumps({"agent_id": agent, "run": text}, separators=(",", ":")) + "\n").encode()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_spool_dir() -> Path:
    """The spool root when `client_spool_dir` is unset; each deployment's
    spools live in it side by side, told apart by `spool_scope`."""
    return Path.home() / ".cache" / "adaptive-worker" / "spool"


def spool_scope(broker_url: str, key_prefix: str, queue: str = INGEST_QUEUE) -> str:
    """The deployment a spool belongs to, as 16 hex digits (the start of its directory names).

    A spooled run is replayed into whatever broker the adopting client uses,
    so a spool shared by two deployments (one spool root, two brokers or two
    key prefixes) published one deployment's runs into the other. The scope
    is a hash of the broker URL without its credentials (a rotated password
    must not orphan a spool, and no secret may reach a directory name) and
    without its query (TLS options do not make another deployment), the key
    prefix and the ingest queue.
    """
    scheme, sep, rest = broker_url.partition("://")
    if not sep:
        scheme, rest = "", broker_url
    location = re.split(r"[?#]", rest, maxsplit=1)[0]
    netloc, slash, path = location.partition("/")
    hostport = netloc.rpartition("@")[2].lower()
    identity = json.dumps([scheme.lower(), hostport, slash + path, key_prefix, queue])
    return hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class UnsafeSpool(OSError):
    """A spool directory or file that another user owns or could have written."""


def _check_private(st: os.stat_result, path: Path, *, directory: bool = False) -> None:
    """Raise `UnsafeSpool` unless `st` is our own file (or directory) that only we can write."""
    kind_ok = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    if not kind_ok:
        kind = "a directory" if directory else "a regular file"
        raise UnsafeSpool(f"{path} is not {kind} (a symlink or special file?)")
    uid = os.geteuid()
    if st.st_uid != uid:
        raise UnsafeSpool(f"{path} is owned by uid {st.st_uid}, not by this user (uid {uid})")
    if st.st_mode & 0o022:
        mode = oct(stat.S_IMODE(st.st_mode))
        raise UnsafeSpool(f"{path} is writable by group or others (mode {mode})")


def _make_private_dirs(path: Path) -> None:
    """Create `path` and every missing parent with mode 0700 (exactly, whatever the umask).

    `Path.mkdir(parents=True, mode=...)` gives the parents the umask's
    default (usually 0755): the spool holds prompts, and even its directory
    names tell who spools what.
    """
    missing: list[Path] = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue  # made meanwhile by another process: not ours to chmod
        os.chmod(directory, 0o700)


# -------------------------------------------------------------------- client


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
        settings: Settings | None = None,
        *,
        strict: bool = False,
        queue: str = INGEST_QUEUE,
    ) -> None:
        self.settings = settings = settings or get_settings()
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
        _ALL.add(self)

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
            text, agent = _encode(run)
            self._check(text, encoded_here=type(run) is dict, agent=agent)
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

    def _check(self, text: str, *, encoded_here: bool, agent: str | None) -> None:
        """The worker's own strict-JSON rule, so a run it would refuse is refused here.

        Text we encoded ourselves has no NaN (the encoder refused it), so it
        only needs the cheap checks; text from the caller is parsed strictly.
        """
        try:
            if encoded_here:
                raw = strictjson.utf8(text)
                if len(raw) > self._max_run_bytes:
                    raise ValueError(f"larger than max_run_bytes ({self._max_run_bytes})")
                strictjson.check_depth(raw, max_depth=self._max_depth)
            else:
                strictjson.check_text(
                    text, max_depth=self._max_depth, max_bytes=self._max_run_bytes
                )
        except ValueError as exc:
            raise _invalid(str(exc)) from None
        problem = agent_id_problem(agent) if agent is not None else None
        if problem:
            raise InvalidRecord("RunRecord", [("agent_id", problem)])

    def _validate(self, text: str) -> None:
        run = parse_wire(RunRecord, text)
        problem = agent_id_problem(run.agent_id)
        if problem:
            raise InvalidRecord("RunRecord", [("agent_id", problem)])

    def _refuse(self, exc: Exception) -> None:
        if not isinstance(exc, InvalidRecord):
            exc = _invalid(f"{type(exc).__name__}: {exc}")
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
            _LIVE.add(self)

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
        _LIVE.discard(self)
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
        }

    # -------------------------------------------------------- publisher side

    def _make_app(self) -> Celery:
        """A private app: the publisher's short timeouts must not reach the worker's app."""
        settings = self.settings
        app = configure(Celery("adaptive-client", set_as_current=False), settings)
        timeout = settings.client_connect_timeout_s
        options = dict(app.conf.broker_transport_options)
        scheme = broker_scheme(settings.effective_broker_url)
        if scheme in REDIS_SCHEMES:
            options.update(socket_connect_timeout=timeout, socket_timeout=timeout)
        elif scheme in AMQP_SCHEMES:
            options.update(read_timeout=timeout, write_timeout=timeout)
        app.conf.update(
            broker_transport_options=options,
            broker_connection_timeout=timeout,
            broker_pool_limit=2,
            # Nobody services heartbeats on a publish-only connection; an
            # idle one dropped by the server is revived by the publish retry.
            broker_heartbeat=0,
        )
        return app

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
        if pending:
            return max(0.0, self._retry_at - now)
        return max(0.0, self._next_scan - now)

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

    def _batches(self, records: Sequence[Record]) -> Iterable[list[Record]]:
        max_runs = self.settings.client_batch_max_runs
        max_bytes = self.settings.client_batch_max_bytes
        batch: list[Record] = []
        size = 0
        for record in records:
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
        argsrepr = _argsrepr(batch)
        try:
            self._app.send_task(
                INGEST_TASK,
                args=[[r[0] for r in batch]],
                queue=self.queue,
                argsrepr=argsrepr,
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


# ------------------------------------------------------------ learned state

_U32_MAX = 0xFFFFFFFF
_STATE_LOG_S = 60.0


@dataclass(slots=True)
class _Entry:
    """One cached key and the lock that makes its refresh single-flight.

    `state` is (parsed value or None, clock time of the last read attempt or
    None if never read), always replaced as one tuple so that the lock-free
    fast path never pairs the value of one read with the time of another.
    """

    state: tuple[Any, float | None] = (None, None)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _parse_plan(raw: str | bytes) -> ExecutionPlan:
    return parse_wire(ExecutionPlan, raw)


def _parse_stability(raw: str | bytes) -> StabilityAnalysisResult:
    return parse_wire(StabilityAnalysisResult, raw)


def _parse_trie(raw: str | bytes) -> dict[str, Any]:
    """Validated like everything an agent reads, then kept as the plain dict
    the lookup walks; dumped from the model so every number has its type."""
    return parse_wire(TrieEnvelope, raw).model_dump(by_alias=True)


def _state_client(settings: Settings) -> redis.Redis:
    """A Redis client fit for the agent's thread: short timeouts, one retry.

    `storage.connection.connect` is made for workers (5 s connect, 30 s
    socket timeout, retry on timeout): a stalled Redis would stall the agent
    that long on each read. Here a read costs at most two short timeouts: the
    one immediate retry only covers a pooled connection the server dropped
    while idle.
    """
    if settings.redis_url is None:
        return connect(None)  # the embedded fakeredis the workers share
    timeout = settings.client_state_timeout_s
    return redis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 1),
        retry_on_timeout=False,
        **redis_tls_options(settings.redis_url, settings),  # rediss://: verified
    )


class StateReader:
    """Cached reads of an agent's learned state, cheap enough for every LLM call.

    Cache: per Redis key, at most one GET per `ttl_s` (default
    `client_state_ttl_s`) per reader; the value is parsed once per GET and
    the parsed object is served from memory until the TTL runs out (a missing
    key is cached as None the same way). Workers rewrite the state after
    every learn step, so a few seconds of staleness cost nothing while a
    Redis round trip per LLM call would. Thread-safe: when a value goes
    stale, one thread reads it again while the others keep getting the
    previous value; threads asking for a key never read before wait for the
    first read. `clock` (seconds, monotonic) is injectable for tests.

    Failures: a Redis error makes the read return the last good value (None
    if there never was one) and counts an error, and for one TTL no key is
    read again (an outage costs the agent one timeout per TTL, not one per
    call or per key). A stored value that does not parse, or a key of the
    wrong Redis type, is treated as absent (None), as the runtime drops such
    a key (SPEC 6c), and counted as `invalid`. Nothing raises into the agent
    unless `strict=True`: then a failed read raises `StateUnavailable` and an
    unusable value `InvalidRecord`, and nothing is cached for that read.

    Returned models are shared by every caller until the next read: treat
    them as read-only. `redis_client` lets a process share a client it
    already has (one that decodes responses); by default one is made on
    first use from `settings.redis_url` (see `_state_client`).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        ttl_s: float | None = None,
        strict: bool = False,
        redis_client: redis.Redis | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings = settings or get_settings()
        self.ttl_s = settings.client_state_ttl_s if ttl_s is None else float(ttl_s)
        if not self.ttl_s >= 0.0:
            raise ValueError(f"ttl_s must be >= 0, got {ttl_s!r}")
        self.strict = strict
        self.keys = Keys(settings.key_prefix)
        self._clock = clock
        self._client = redis_client
        self._init_state()
        _READERS.add(self)

    def _init_state(self) -> None:
        self._lock = threading.Lock()  # counters, entry creation, client creation
        self._entries: dict[str, _Entry] = {}
        self._down_until = -math.inf
        self._next_log = -math.inf
        self._reads = 0
        self._hits = 0
        self._errors = 0
        self._invalid = 0
        self._skipped = 0
        self._redis_up: bool | None = None
        self._last_error: str | None = None

    # ------------------------------------------------------------- reading

    def load_plan(self, agent_id: str) -> ExecutionPlan | None:
        """The tool-parallelism plan (`plan:{agent_id}`), or None.

        The key a NeMo Relay agent reads once at registration; this one
        follows later learning (within a TTL).
        """
        plan: ExecutionPlan | None = self._get(self.keys.plan(agent_id), _parse_plan)
        return plan

    def load_stability(self, agent_id: str) -> StabilityAnalysisResult | None:
        """The ACG seed profile (`acg_stability:{agent_id}`, the plain agent id), or None."""
        result: StabilityAnalysisResult | None = self._get(
            self.keys.acg_stability(agent_id), _parse_stability
        )
        return result

    def load_hints(
        self, agent_id: str, path: Sequence[str] = (), call_index: int = 1
    ) -> dict[str, Any] | None:
        """The agent hints for one LLM call, from the learned trie (`trie:{agent_id}`).

        The dict is what NeMo Relay's hints intercept injects as
        `nvext.agent_hints` (and as the `x-nemo-relay-adaptive-agent-hints`
        header): `osl`, `iat`, `priority`, `latency_sensitivity`,
        `prefix_id`, `total_requests`, computed as the runtime computes them
        (`worker.engine.latency.agent_hints`). A new dict on every call, so
        the caller may put it into its request as it is.

        - `path`: names walked from the trie's root while each is a child of
          the node reached; every node reached offers its prediction for
          `call_index`, else its any-index prediction, and the deepest one
          found is used. Learned paths are `[call name]` (SPEC 4): `(name,)`
          reaches the node of the LLM calls with that name; `()`, or a path
          whose first name is not in the trie, uses the root, which holds
          every call. `prefix_id` is `{agent_id}-d{len(path)}`.
        - `call_index` (1-based) chooses the per-index prediction and is
          added to the predicted remaining calls:
          `total_requests = round(remaining_calls.mean) + call_index`. The
          trie counts calls of the same name within one run, so with
          `path=(name,)` pass this call's position among the run's calls to
          `name`; `total_requests` is then the predicted number of those
          calls in the run. The runtime itself passes its scope stack as
          `path` and a per-process request counter (1, 2, 3, ... across
          runs) as `call_index`; passing the same reproduces its hints.
        - No prediction anywhere on the walk: the runtime's defaults (the
          root's any-index prediction, `prefix_id` "default"). No trie (the
          agent has no finished LLM call learned yet, or its trie cannot be
          used): None, and the runtime injects nothing either.

        The runtime's manual latency-sensitivity override (scope metadata)
        is not applied: that input lives in the agent, not in Redis.
        """
        if isinstance(path, str | bytes):
            raise TypeError("path is a sequence of names, not one string: use (name,)")
        if (
            not isinstance(call_index, int)
            or isinstance(call_index, bool)
            or not 1 <= call_index <= _U32_MAX
        ):
            raise ValueError(f"call_index must be an int in [1, 2**32), got {call_index!r}")
        key = self.keys.trie(agent_id)
        trie: dict[str, Any] | None = self._get(key, _parse_trie)
        if trie is None:
            return None
        try:
            return agent_hints(trie, tuple(path), call_index, agent_id)
        except Exception as exc:  # a trie that validated yet cannot be walked
            return self._invalid_value(key, None, self._clock(), exc)

    def stats(self) -> dict[str, int | bool | str | None]:
        """Counters since start: `reads` (GETs sent), `hits` (served from memory),
        `errors` (failed reads), `invalid` (values that could not be used),
        `skipped` (reads not tried because Redis failed within the TTL)."""
        with self._lock:
            return {
                "reads": self._reads,
                "hits": self._hits,
                "errors": self._errors,
                "invalid": self._invalid,
                "skipped": self._skipped,
                "cached_keys": len(self._entries),
                "redis_up": self._redis_up,
                "last_error": self._last_error,
            }

    def clear(self) -> None:
        """Forget every cached value: the next call for each key reads Redis."""
        with self._lock:
            self._entries = {}
            self._down_until = -math.inf

    # ------------------------------------------------------------ the cache

    def _get(self, key: str, parse: Callable[[str | bytes], Any]) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            with self._lock:
                entry = self._entries.setdefault(key, _Entry())
        value, read_at = entry.state
        if read_at is not None and self._clock() - read_at < self.ttl_s:
            with self._lock:
                self._hits += 1
            return value
        # Stale: one thread reads again, the others keep the previous value
        # meanwhile. Never read: everyone waits for the first read.
        if not entry.lock.acquire(blocking=read_at is None):
            with self._lock:
                self._hits += 1
            return value
        try:
            value, read_at = entry.state
            if read_at is not None and self._clock() - read_at < self.ttl_s:
                with self._lock:
                    self._hits += 1
                return value  # another thread read it while we waited
            return self._refresh(key, entry, parse)
        finally:
            entry.lock.release()

    def _refresh(self, key: str, entry: _Entry, parse: Callable[[str | bytes], Any]) -> Any:
        """One GET and parse; called with the entry's lock held."""
        previous = entry.state[0]
        now = self._clock()
        if not self.strict and now < self._down_until:
            with self._lock:
                self._skipped += 1
            return previous
        try:
            client = self._redis()
            with self._lock:
                self._reads += 1
            raw = client.get(key)
        except redis.ResponseError as exc:
            if str(exc).startswith("WRONGTYPE"):  # not a string key: dropped like bad JSON
                return self._invalid_value(key, entry, now, exc)
            return self._failed(key, entry, now, exc)
        except Exception as exc:
            return self._failed(key, entry, now, exc)
        with self._lock:
            self._redis_up = True
        if raw is None:
            entry.state = (None, now)
            return None
        try:
            value = parse(raw)
        except (InvalidRecord, ValueError, TypeError) as exc:
            return self._invalid_value(key, entry, now, exc)
        entry.state = (value, now)
        return value

    def _failed(self, key: str, entry: _Entry, now: float, exc: Exception) -> Any:
        with self._lock:
            self._errors += 1
            self._redis_up = False
            self._last_error = f"{type(exc).__name__}: {exc}"
            should_log = self._should_log(now)
        if self.strict:
            raise StateUnavailable(f"cannot read {key}: {exc}") from exc
        self._down_until = now + self.ttl_s
        previous = entry.state[0]
        entry.state = (previous, now)
        if should_log:
            log.warning(
                "cannot read learned state from Redis (%s: %s); serving the last good values",
                type(exc).__name__,
                exc,
            )
        return previous

    def _invalid_value(self, key: str, entry: _Entry | None, now: float, exc: Exception) -> None:
        with self._lock:
            self._invalid += 1
            self._last_error = f"{key}: {exc}"
            should_log = self._should_log(now)
        if self.strict:
            if isinstance(exc, InvalidRecord):
                raise exc
            raise InvalidRecord(key, [("", f"{type(exc).__name__}: {exc}")]) from exc
        if entry is not None:
            entry.state = (None, now)
        if should_log:
            log.warning("ignoring %s: the stored value cannot be used (%s)", key, exc)
        return None

    def _should_log(self, now: float) -> bool:
        """Called under _lock: at most one warning a minute per reader."""
        if now < self._next_log:
            return False
        self._next_log = now + _STATE_LOG_S
        return True

    def _redis(self) -> redis.Redis:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = _state_client(self.settings)
                client = self._client
        return client

    def _after_fork_in_child(self) -> None:
        # Locks another thread held at fork time would never be released in
        # the child; the cached values stay valid. redis-py's pool notices
        # the new pid and opens its own connections.
        self._lock = threading.Lock()
        self._entries = {k: _Entry(e.state) for k, e in self._entries.items()}


# ------------------------------------------------------- process-wide hooks

_LIVE: weakref.WeakSet[RunClient] = weakref.WeakSet()  # started, not closed
_ALL: weakref.WeakSet[RunClient] = weakref.WeakSet()
_READERS: weakref.WeakSet[StateReader] = weakref.WeakSet()


def _close_all_at_exit() -> None:
    # Every client, started or not: one whose publisher never started may
    # still hold runs, which close() spools.
    for client in list(_ALL):
        try:
            client.close()
        except Exception:
            log.exception("closing the run client at exit failed")


def _after_fork_in_child() -> None:
    # The child has no publisher thread and must not reuse locks another
    # thread held at fork time, nor the parent's buffer, spool or sockets.
    _LIVE.clear()
    for client in list(_ALL):
        client._after_fork_in_child()
    for reader in list(_READERS):
        reader._after_fork_in_child()


atexit.register(_close_all_at_exit)
os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------- the default client

_default: RunClient | None = None
_default_lock = threading.Lock()


def default_client() -> RunClient:
    """The process's client, made on first use from the process settings."""
    global _default
    client = _default
    if client is None:
        with _default_lock:
            if _default is None:
                _default = RunClient()
            client = _default
    return client


def submit_run(run: RunInput) -> None:
    """Hand one finished run to the workers (see `RunClient.submit_run`)."""
    (_default or default_client()).submit_run(run)


def submit_runs(runs: Iterable[RunInput]) -> None:
    (_default or default_client()).submit_runs(runs)


def flush(timeout: float = 5.0) -> bool:
    return (_default or default_client()).flush(timeout)


def stats() -> dict[str, int | bool | str | None]:
    return (_default or default_client()).stats()


# ---------------------------------------------------- the default reader

_default_reader: StateReader | None = None


def default_reader() -> StateReader:
    """The process's state reader, made on first use from the process settings."""
    global _default_reader
    reader = _default_reader
    if reader is None:
        with _default_lock:
            if _default_reader is None:
                _default_reader = StateReader()
            reader = _default_reader
    return reader


def load_plan(agent_id: str) -> ExecutionPlan | None:
    """The agent's tool-parallelism plan, cached (see `StateReader.load_plan`)."""
    return (_default_reader or default_reader()).load_plan(agent_id)


def load_hints(
    agent_id: str, path: Sequence[str] = (), call_index: int = 1
) -> dict[str, Any] | None:
    """Agent hints for one LLM call, cached (see `StateReader.load_hints`)."""
    return (_default_reader or default_reader()).load_hints(agent_id, path, call_index)


def load_stability(agent_id: str) -> StabilityAnalysisResult | None:
    """The agent's ACG seed stability, cached (see `StateReader.load_stability`)."""
    return (_default_reader or default_reader()).load_stability(agent_id)
