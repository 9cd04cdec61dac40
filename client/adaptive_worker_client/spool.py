"""The disk spool: runs the broker did not take, kept until it takes them.

Nothing is lost to a broker outage or to the process exiting: what the
broker did not take goes to a bounded spool on local disk and is replayed
when the broker answers again. A spool left behind by a process that died
or exited during an outage is adopted and replayed by the next client of
the same deployment (broker URL without credentials, key prefix, queue)
using the same spool directory, never by another deployment's client.

Layout: `<spool_dir>/<scope>-<host>-<pid>-<random>/` per client, where
`<scope>` (`spool_scope`) names the deployment, holding `owner.lock`
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
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import stat
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptive_worker_client.contract import INGEST_QUEUE
from adaptive_worker_client.encode import Overflow, Record

__all__ = ["Spool", "UnsafeSpool", "default_spool_dir", "make_private_dirs", "spool_scope"]

# The publisher's logger: one logger name for everything the run client logs.
log = logging.getLogger("adaptive_worker_client.publisher")


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
        make_private_dirs(root)
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


def make_private_dirs(path: Path) -> None:
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
