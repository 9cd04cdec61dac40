"""The client spool belongs to one deployment and one user.

A spooled run is replayed into the broker of whichever client adopts the
spool, so a spool root shared by two deployments (the default
`~/.cache/adaptive-worker/spool` is one per user, whatever the broker or key
prefix) published one deployment's runs into the other. Adoption is also a
way in: whoever can write a spool file chooses what we publish. Here: only a
client of the same broker (credentials aside), key prefix and queue adopts a
spool; a spool that another user owns, or that group or others can write, is
refused, logged and left in place; and every directory the client makes is
0700 whatever the umask.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from adaptive_worker_client import RunClient, spool_scope
from adaptive_worker_client.contract import INGEST_QUEUE
from tests.pipeline import message_body
from tests.private_redis import PrivateRedis, private_redis
from worker.settings import Settings, load_settings

pytestmark = pytest.mark.redis

REDIS = "redis://127.0.0.1:6379/15"


def settings_for(prefix: str, spool: Path, broker: str) -> Settings:
    return load_settings(
        _env_file=None,
        redis_url=broker,
        key_prefix=prefix,
        client_spool_dir=spool,
        client_retry_interval_s=0.1,
        client_exit_timeout_s=5.0,
    )


def run(i: int) -> dict[str, Any]:
    return {
        "id": str(uuid.UUID(int=i + 1)),
        "agent_id": "scoped",
        "calls": [],
        "started_at": "2025-01-01T00:00:00Z",
        "seq": i,
    }


def queued_seqs(client: redis.Redis, prefix: str) -> list[int]:
    """Seqs of the runs in the prefix's ingest queue (Celery protocol 2, JSON, base64)."""
    out: list[int] = []
    for raw in reversed(client.lrange(f"{prefix}adaptive_worker:celery:{INGEST_QUEUE}", 0, -1)):
        args, _kwargs, _embed = json.loads(message_body(json.loads(raw)))
        out += [json.loads(text)["seq"] for text in args[0]]
    return out


def spooled_seqs(spool: Path) -> list[int]:
    return [
        json.loads(json.loads(line)["run"])["seq"]
        for segment in sorted(spool.glob("*/*.jsonl"))
        for line in segment.read_text().splitlines()
    ]


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("ADAPTIVE_")]:
        monkeypatch.delenv(var)


@pytest.fixture
def prefixes() -> Iterator[list[str]]:
    """Fresh key prefixes; their keys on the shared Redis are removed afterwards."""
    made: list[str] = []
    yield made
    shared = redis.Redis.from_url(REDIS)
    for prefix in made:
        keys = list(shared.scan_iter(f"{prefix}*", count=1000))
        if keys:
            shared.delete(*keys)
    shared.close()


def new_prefix(made: list[str]) -> str:
    made.append(f"test:{uuid.uuid4().hex[:12]}:")
    return made[-1]


@pytest.fixture
def clients() -> Iterator[list[RunClient]]:
    made: list[RunClient] = []
    yield made
    for c in made:
        c.close(timeout=2.0)


# ------------------------------------------------------------------ scope


def test_the_scope_names_the_deployment_not_its_credentials() -> None:
    base = spool_scope("redis://broker.example:6379/1", "nemo_relay:")
    assert len(base) == 16 and int(base, 16) >= 0
    # The same deployment: credentials, their rotation, TLS query options,
    # and the case of the scheme and host do not change it.
    for same in (
        "redis://user:old-secret@broker.example:6379/1",
        "redis://:new-secret@broker.example:6379/1",
        "redis://broker.example:6379/1?ssl_cert_reqs=required",
        "REDIS://Broker.Example:6379/1",
    ):
        assert spool_scope(same, "nemo_relay:") == base, same
    # Another deployment: any other broker, database, port, scheme, prefix or queue.
    others = {
        spool_scope("redis://broker.example:6379/2", "nemo_relay:"),
        spool_scope("redis://broker.example:6380/1", "nemo_relay:"),
        spool_scope("redis://other.example:6379/1", "nemo_relay:"),
        spool_scope("rediss://broker.example:6379/1", "nemo_relay:"),
        spool_scope("amqp://broker.example:6379/1", "nemo_relay:"),
        spool_scope("redis://broker.example:6379/1", "nemo_flow:"),
        spool_scope("redis://broker.example:6379/1", "nemo_relay:", "private.ingest"),
    }
    assert base not in others and len(others) == 7
    # No secret reaches a directory name.
    assert "secret" not in spool_scope("redis://u:secret@h/0", "p:")


def test_clients_of_other_deployments_never_adopt_a_spool(
    tmp_path: Path, prefixes: list[str], clients: list[RunClient]
) -> None:
    spool = tmp_path / "spool"  # one spool root for every client, as by default
    mine, other = new_prefix(prefixes), new_prefix(prefixes)
    with private_redis(tmp_path, db=15, started=False) as server:
        down = RunClient(settings_for(mine, spool, server.url))
        clients.append(down)
        down.submit_runs([run(i) for i in range(5)])
        assert down.flush(5) is False  # the broker is down: all five spooled
        assert down.close() is False
        assert spooled_seqs(spool) == [0, 1, 2, 3, 4]

        # Same prefix, another broker (the shared Redis): must not take them.
        elsewhere = RunClient(settings_for(mine, spool, REDIS))
        clients.append(elsewhere)
        elsewhere.submit_run(run(100))
        assert elsewhere.flush(10)
        shared = redis.Redis.from_url(REDIS)
        assert queued_seqs(shared, mine) == [100]
        assert elsewhere.stats()["replayed"] == 0

        server.start()
        # Same broker, another prefix: must not take them either.
        neighbour = RunClient(settings_for(other, spool, server.url))
        clients.append(neighbour)
        neighbour.submit_run(run(200))
        assert neighbour.flush(10)
        assert queued_seqs(server.client(), other) == [200]
        assert neighbour.stats()["replayed"] == 0
        assert spooled_seqs(spool) == [0, 1, 2, 3, 4]  # still there, untouched

        # The same deployment comes back: its spool is replayed into it.
        back = RunClient(settings_for(mine, spool, server.url))
        clients.append(back)
        assert back.flush(10)
        assert queued_seqs(server.client(), mine) == [0, 1, 2, 3, 4]
        assert back.stats()["replayed"] == 5
        assert spooled_seqs(spool) == []
        assert queued_seqs(shared, mine) == [100]  # nothing went to the other broker
        shared.close()


# ------------------------------------------------------------ ownership

Defect = Callable[[Path], None]


def _chown_nobody(path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can give a file to another user")
    os.chown(path, 65534, 65534, follow_symlinks=False)


def _symlink_segment(owner: Path) -> None:
    segment = owner / "000000000001.jsonl"
    target = owner.parent / "elsewhere.jsonl"
    target.write_bytes(segment.read_bytes())
    segment.unlink()
    segment.symlink_to(target)


DEFECTS: dict[str, tuple[Defect, str]] = {
    "directory of another user": (lambda d: _chown_nobody(d), "is owned by uid 65534"),
    "segment of another user": (
        lambda d: _chown_nobody(d / "000000000001.jsonl"),
        "is owned by uid 65534",
    ),
    "lock file of another user": (lambda d: _chown_nobody(d / "owner.lock"), "owned by uid"),
    "world-writable directory": (lambda d: d.chmod(0o777), "writable by group or others"),
    "group-writable segment": (
        lambda d: (d / "000000000001.jsonl").chmod(0o620),
        "writable by group or others",
    ),
    "world-writable segment": (
        lambda d: (d / "000000000001.jsonl").chmod(0o666),
        "writable by group or others",
    ),
    "symlinked segment": (_symlink_segment, "not a regular file"),
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_a_spool_someone_else_could_write_is_refused_and_kept(
    defect: str,
    tmp_path: Path,
    prefixes: list[str],
    clients: list[RunClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    spool = tmp_path / "spool"
    prefix = new_prefix(prefixes)
    settings = settings_for(prefix, spool, REDIS)
    # A dead owner's spool of this very deployment, as a crash leaves it.
    owner = spool / f"{spool_scope(REDIS, prefix)}-host-99999-dead"
    owner.mkdir(parents=True, mode=0o700)
    (owner / "owner.lock").touch(mode=0o600)
    line = json.dumps({"agent_id": "scoped", "run": json.dumps(run(7))}) + "\n"
    (owner / "000000000001.jsonl").write_text(line)
    (owner / "000000000001.jsonl").chmod(0o600)
    apply, reason = DEFECTS[defect]
    apply(owner)

    c = RunClient(settings)
    clients.append(c)
    with caplog.at_level(logging.ERROR, logger="adaptive_worker_client.publisher"):
        c.submit_run(run(1))
        assert c.flush(10)
        assert c.flush(10)  # a second scan neither adopts nor logs it again
    shared = redis.Redis.from_url(REDIS)
    assert queued_seqs(shared, prefix) == [1]  # run 7 was not published
    shared.close()
    stats = c.stats()
    assert stats["replayed"] == 0 and stats["errors"] == 1
    assert reason in str(stats["last_error"])
    refusals = [r.getMessage() for r in caplog.records if "not adopting" in r.getMessage()]
    assert len(refusals) == 1 and reason in refusals[0] and str(owner) in refusals[0]
    # Left as it was: nothing deleted, nothing taken over.
    assert (owner / "000000000001.jsonl").read_text() == line
    assert (owner / "owner.lock").exists()


def test_our_own_private_spool_is_still_adopted(
    tmp_path: Path, prefixes: list[str], clients: list[RunClient]
) -> None:
    """The same setup as above without a defect: the checks refuse only what they must."""
    spool = tmp_path / "spool"
    prefix = new_prefix(prefixes)
    owner = spool / f"{spool_scope(REDIS, prefix)}-host-99999-dead"
    owner.mkdir(parents=True, mode=0o700)
    (owner / "owner.lock").touch(mode=0o600)
    (owner / "000000000001.jsonl").write_text(
        json.dumps({"agent_id": "scoped", "run": json.dumps(run(7))}) + "\n"
    )
    (owner / "000000000001.jsonl").chmod(0o640)  # group-readable is not a way in
    c = RunClient(settings_for(prefix, spool, REDIS))
    clients.append(c)
    assert c.flush(10)
    shared = redis.Redis.from_url(REDIS)
    assert queued_seqs(shared, prefix) == [7]
    shared.close()
    assert c.stats()["errors"] == 0 and not owner.exists()


# ----------------------------------------------------------- permissions


def test_every_directory_the_spool_creates_is_0700_whatever_the_umask(
    tmp_path: Path, prefixes: list[str], clients: list[RunClient]
) -> None:
    root = tmp_path / "made" / "by" / "the-client" / "spool"
    old_umask = os.umask(0)  # the worst case: every default mode would be 0777
    try:
        with private_redis(tmp_path, started=False) as server:
            c = RunClient(settings_for(new_prefix(prefixes), root, server.url))
            clients.append(c)
            c.submit_runs([run(i) for i in range(3)])
            assert c.flush(5) is False  # down: spooled
            made = [
                tmp_path / "made",
                tmp_path / "made" / "by",
                tmp_path / "made" / "by" / "the-client",
                root,
                *root.iterdir(),
            ]
            modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in made}
            assert len(modes) == 5
            assert modes == dict.fromkeys(modes, 0o700)
            files = [p for p in root.rglob("*") if p.is_file()]
            assert {p.name for p in files} == {"owner.lock", "000000000001.jsonl"}
            assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o600}
    finally:
        os.umask(old_umask)


def test_the_spool_of_a_deployment_lives_under_its_scope(
    tmp_path: Path, prefixes: list[str], clients: list[RunClient]
) -> None:
    prefix = new_prefix(prefixes)
    with private_redis(tmp_path, started=False) as server:
        c = RunClient(settings_for(prefix, tmp_path / "spool", server.url))
        clients.append(c)
        c.submit_run(run(0))
        assert c.flush(5) is False
        (owner,) = (tmp_path / "spool").iterdir()
        assert owner.name.startswith(spool_scope(server.url, prefix) + "-")
        assert isinstance(server, PrivateRedis)
