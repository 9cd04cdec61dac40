"""The agent-side client, against the real brokers: what reaches them, and what survives.

Every test gets its own key prefix, and the app puts every broker key under
it (kombu `global_keyprefix`), so tests on the shared Redis (DB 15) never see
each other's queues. Assertions read what actually reached the broker: the
Redis list of the ingest queue, decoded as a Celery protocol-2 message.
Timing is never asserted here (bench/submit.py measures the agent-side cost).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import adaptive_worker_client.api as client_module
import adaptive_worker_client.config as client_config
from adaptive_worker_client import BufferFull, RunClient, spool_scope
from adaptive_worker_client.contract import INGEST_QUEUE, INGEST_TASK
from adaptive_worker_client.errors import InvalidRecord
from adaptive_worker_client.wire import RunRecord, parse_wire
from tests.conftest import AMQP_URL, needs_rabbitmq
from tests.goldens import load_capture
from tests.hostile import json_depth, nested, violations
from tests.pipeline import message_body
from tests.private_redis import PrivateRedis, private_redis
from worker.celery import broker_key_prefix
from worker.settings import Settings, load_settings

pytestmark = pytest.mark.redis

REDIS = "redis://127.0.0.1:6379/15"
DOWN = "redis://127.0.0.1:1/15"  # nothing listens on port 1
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ helpers


def make_settings(prefix: str, spool: Path, broker: str = REDIS, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": broker,
        "key_prefix": prefix,
        "client_spool_dir": spool,
        "client_retry_interval_s": 0.1,
        "client_exit_timeout_s": 5.0,
    }
    values.update(over)
    return load_settings(_env_file=None, **values)


def run(i: int, agent: str = "agent-a", pad: int = 0) -> dict[str, Any]:
    return {
        "id": str(uuid.UUID(int=i + 1)),
        "agent_id": agent,
        "calls": [],
        "started_at": "2025-01-01T00:00:00.123456789Z",
        "note": "x" * pad,
        "seq": i,
    }


def ingest_messages(r: redis.Redis, prefix: str, queue: str = INGEST_QUEUE) -> list[dict]:
    """Every message in the queue, oldest first, with the decoded Celery body."""
    key = f"{prefix}adaptive_worker:celery:{queue}"
    out = []
    # kombu LPUSHes and consumes from the tail: the oldest message is last.
    for raw in reversed(r.lrange(key, 0, -1)):
        envelope = json.loads(raw)
        assert envelope["content-type"] == "application/json"
        assert envelope["properties"]["body_encoding"] == "base64"
        args, kwargs, _embed = json.loads(message_body(envelope))
        out.append({"headers": envelope["headers"], "args": args, "kwargs": kwargs})
    return out


def payloads(messages: list[dict]) -> list[str]:
    return [p for m in messages for p in m["args"][0]]


def per_agent(runs: list[dict]) -> dict[str, list[dict]]:
    """Each agent's runs in order: what the client keeps (it groups agents per message)."""
    grouped: dict[str, list[dict]] = {}
    for r in runs:
        grouped.setdefault(r["agent_id"], []).append(r)
    return grouped


def seqs(texts: list[str]) -> list[int]:
    return [json.loads(t)["seq"] for t in texts]


def spool_lines(spool_root: Path) -> list[dict]:
    lines = []
    for seg in sorted(spool_root.glob("*/*.jsonl")):
        lines += [json.loads(line) for line in seg.read_text().splitlines()]
    return lines


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test passes counts, not the developer's ADAPTIVE_* variables."""
    for var in [v for v in os.environ if v.startswith("ADAPTIVE_")]:
        monkeypatch.delenv(var)


@pytest.fixture
def rds() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS)
    try:
        client.ping()
    except redis.ConnectionError as exc:  # pragma: no cover - .ci/run starts Redis
        pytest.fail(f"the real Redis at {REDIS} is required: {exc}")
    yield client
    client.close()


@pytest.fixture
def prefix(rds: redis.Redis) -> Iterator[str]:
    value = f"test:{uuid.uuid4().hex[:12]}:"
    yield value
    keys = list(rds.scan_iter(f"{value}*", count=1000))
    if keys:
        rds.delete(*keys)


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def outage(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A broker of the test's own, down until the test starts it: the same URL
    before and after, as a spool is replayed only into its own deployment."""
    with private_redis(tmp_path, db=15, started=False) as server:
        yield server


def owner_dir(spool: Path, settings: Settings, name: str) -> Path:
    """Where a client of `settings` looks for other owners' spools."""
    return spool / f"{spool_scope(settings.effective_broker_url, settings.key_prefix)}-{name}"


@pytest.fixture
def clients() -> Iterator[list[RunClient]]:
    """Clients made by a test, closed at its end (not at interpreter exit)."""
    made: list[RunClient] = []
    yield made
    for c in made:
        c.close(timeout=2.0)


def new_client(clients: list[RunClient], settings: Settings, **kw: Any) -> RunClient:
    c = RunClient(settings, **kw)
    clients.append(c)
    return c


# -------------------------------------------------------------- delivery


def test_runs_reach_the_broker_batched_in_order(
    rds: redis.Redis, prefix: str, spool: Path, clients: list[RunClient]
) -> None:
    c = new_client(clients, make_settings(prefix, spool, client_batch_max_runs=100))
    runs = [run(i, agent=f"agent-{i % 3}") for i in range(250)]
    c.submit_runs(runs)  # one hand-off: the publisher takes them in one go
    assert c.flush(10)

    messages = ingest_messages(rds, prefix)
    assert [len(m["args"][0]) for m in messages] == [100, 100, 50]
    sent = [json.loads(p) for p in payloads(messages)]
    # Each agent's runs together (a worker learns a message's runs per agent
    # from memory), each agent's in submission order.
    assert sent == sorted(runs, key=lambda r: r["agent_id"])
    first = [json.loads(p)["agent_id"] for p in messages[0]["args"][0]]
    assert first == ["agent-0"] * 84 + ["agent-1"] * 16
    for m in messages:
        h = m["headers"]
        assert h["task"] == INGEST_TASK
        assert m["kwargs"] == {}
        assert len(h["argsrepr"]) <= 300
        assert h["argsrepr"].startswith(f"<{len(m['args'][0])} runs, ")
        shown = h["argsrepr"].split("agents: ", 1)[1].rstrip(">").split(", ")
        assert sorted(shown) == sorted({json.loads(p)["agent_id"] for p in m["args"][0]})
        assert h["ignore_result"] is True
    s = c.stats()
    assert (s["submitted"], s["published"], s["messages"]) == (250, 250, 3)
    assert (s["spooled"], s["dropped"], s["errors"], s["buffered"]) == (0, 0, 0, 0)
    assert not spool.exists()  # no outage, no spool


def test_single_submits_arrive_in_order_with_message_limits(
    rds: redis.Redis, prefix: str, spool: Path, clients: list[RunClient]
) -> None:
    settings = make_settings(prefix, spool, client_batch_max_runs=7, client_batch_max_bytes=4000)
    c = new_client(clients, settings)
    runs = [run(i, pad=900 if i != 20 else 6000) for i in range(60)]
    for r in runs:
        c.submit_run(r)
    assert c.flush(10)

    messages = ingest_messages(rds, prefix)
    assert seqs(payloads(messages)) == list(range(60))
    for m in messages:
        texts = m["args"][0]
        assert 1 <= len(texts) <= 7
        # Over the byte limit only when one run alone is larger.
        assert sum(map(len, texts)) <= 4000 or len(texts) == 1
    (big,) = [m for m in messages if any(json.loads(p)["seq"] == 20 for p in m["args"][0])]
    assert len(big["args"][0]) == 1


def test_every_input_form_is_accepted(
    rds: redis.Redis, prefix: str, spool: Path, clients: list[RunClient]
) -> None:
    capture = load_capture("relay-openai")
    raw = capture.runs[0]
    model = parse_wire(RunRecord, capture.runs[1])
    c = new_client(clients, make_settings(prefix, spool), strict=True)
    c.submit_run(raw)  # JSON text: sent exactly as given
    c.submit_run(capture.runs[2].encode())  # bytes
    c.submit_run(model)  # a wire model
    c.submit_run(json.loads(capture.runs[3]))  # a dict
    assert c.flush(10)

    got = payloads(ingest_messages(rds, prefix))
    assert got[0] == raw
    assert got[1] == capture.runs[2]
    assert got[2] == model.to_json()
    assert json.loads(got[3]) == json.loads(capture.runs[3])
    assert capture.agent_id in ingest_messages(rds, prefix)[0]["headers"]["argsrepr"]


# ------------------------------------------------------------ invalid input


BAD_INPUTS: list[Any] = [
    {"id": "not-a-uuid", "agent_id": "a", "calls": [], "started_at": "2025-01-01T00:00:00Z"},
    {"agent_id": "a", "value": {1, 2}},
    b"\xff\xfe not utf-8",
    42,
]


def test_the_client_refuses_what_the_worker_would(
    rds: redis.Redis, prefix: str, spool: Path, clients: list[RunClient]
) -> None:
    """One strict-JSON rule on every door: NaN/Infinity, lone surrogates, deep
    nesting and colliding agent ids are refused here too, never sent as null."""
    bad = violations()
    c = new_client(clients, make_settings(prefix, spool))
    c.submit_runs([run(1), *bad.values(), run(2)])
    assert c.flush(10)
    got = payloads(ingest_messages(rds, prefix))
    assert [json.loads(p).get("seq") for p in got] == [1, 2]
    assert c.stats()["invalid"] == len(bad)
    strict = new_client(clients, make_settings(prefix, spool), strict=True)
    for name, value in bad.items():
        with pytest.raises(InvalidRecord):
            strict.submit_run(value)
        assert strict.stats()["invalid"] == list(bad).index(name) + 1


def test_strict_mode_raises_on_the_agent_thread(
    rds: redis.Redis, prefix: str, spool: Path, clients: list[RunClient]
) -> None:
    c = new_client(clients, make_settings(prefix, spool), strict=True)
    for bad in BAD_INPUTS:
        with pytest.raises(InvalidRecord):
            c.submit_run(bad)
    with pytest.raises(InvalidRecord):
        c.submit_runs([run(1), BAD_INPUTS[0]])  # all or nothing
    assert c.flush(10)
    assert ingest_messages(rds, prefix) == []
    assert c.stats()["invalid"] == len(BAD_INPUTS) + 1


def test_default_mode_never_raises_and_counts(
    rds: redis.Redis, prefix: str, spool: Path, clients: list[RunClient]
) -> None:
    c = new_client(clients, make_settings(prefix, spool, max_run_bytes=5000))
    for bad in BAD_INPUTS[1:]:  # a bad-but-serializable run is the worker's to reject
        c.submit_run(bad)
    c.submit_run(run(0, pad=6000))  # over max_run_bytes
    c.submit_runs([run(1), BAD_INPUTS[2], run(2)])
    c.submit_run(BAD_INPUTS[0])
    assert c.flush(10)

    got = payloads(ingest_messages(rds, prefix))
    # Grouped by agent: the agent-less (worker-rejected) value sorts first.
    assert [json.loads(p).get("seq") for p in got] == [None, 1, 2]
    s = c.stats()
    assert s["invalid"] == len(BAD_INPUTS[1:]) + 2
    assert s["submitted"] == s["published"] == 3


def test_strict_mode_raises_when_the_buffer_is_full(
    monkeypatch: pytest.MonkeyPatch, prefix: str, spool: Path, clients: list[RunClient]
) -> None:
    c = new_client(clients, make_settings(prefix, spool, client_buffer_max_runs=5), strict=True)
    monkeypatch.setattr(c, "start", lambda: None)  # no publisher: the buffer stays full
    c.submit_runs([run(i) for i in range(5)])
    with pytest.raises(BufferFull):
        c.submit_run(run(5))
    with pytest.raises(BufferFull):
        c.submit_runs([run(6)])
    s = c.stats()
    assert (s["submitted"], s["buffered"], s["dropped"], s["refused"]) == (5, 5, 0, 2)


@pytest.mark.parametrize(
    ("policy", "kept"), [("drop_newest", [0, 1, 2, 3, 4]), ("drop_oldest", [15, 16, 17, 18, 19])]
)
def test_a_full_buffer_drops_by_policy_and_counts(
    rds: redis.Redis,
    prefix: str,
    spool: Path,
    clients: list[RunClient],
    policy: str,
    kept: list[int],
) -> None:
    settings = make_settings(prefix, spool, client_buffer_max_runs=5, client_overflow=policy)
    c = new_client(clients, settings)
    c.submit_runs([run(i) for i in range(20)])  # under one lock: the policy decides
    assert c.flush(10)
    assert seqs(payloads(ingest_messages(rds, prefix))) == kept
    s = c.stats()
    assert (s["submitted"], s["dropped"], s["published"]) == (20, 15, 5)


# ------------------------------------------------------------------ outages


def test_outage_spools_and_the_next_client_replays(
    outage: PrivateRedis, prefix: str, spool: Path, clients: list[RunClient]
) -> None:
    down = new_client(clients, make_settings(prefix, spool, broker=outage.url))
    runs = [run(i, agent=f"agent-{i % 2}") for i in range(30)]
    for r in runs[:10]:
        down.submit_run(r)  # never raises although nothing listens
    down.submit_runs(runs[10:])
    assert down.flush(5) is False

    s = down.stats()
    assert (s["submitted"], s["spooled"], s["published"], s["dropped"]) == (30, 30, 0, 0)
    assert s["broker_up"] is False and "OperationalError" in str(s["last_error"])
    assert s["spool_runs"] == 30
    lines = spool_lines(spool)
    assert per_agent([json.loads(line["run"]) for line in lines]) == per_agent(runs)
    assert {line["agent_id"] for line in lines} == {"agent-0", "agent-1"}
    assert all(
        oct(p.stat().st_mode & 0o777) in ("0o600", "0o700") for p in spool.rglob("*") if p.is_file()
    )
    assert down.close() is False  # the spool stays for whoever comes next
    assert len(spool_lines(spool)) == 30

    outage.start()
    up = new_client(clients, make_settings(prefix, spool, broker=outage.url))
    assert up.flush(10)
    replayed = [json.loads(p) for p in payloads(ingest_messages(outage.client(), prefix))]
    assert per_agent(replayed) == per_agent(runs)
    s = up.stats()
    assert (s["replayed"], s["published"], s["submitted"]) == (30, 30, 0)
    assert list(spool.iterdir()) == []  # the adopted spool is gone once replayed


def test_a_live_owners_spool_is_left_alone(
    rds: redis.Redis, prefix: str, spool: Path, clients: list[RunClient]
) -> None:
    settings = make_settings(prefix, spool)
    owned = owner_dir(spool, settings, "otherhost-1-abcd")
    owned.mkdir(parents=True)
    (owned / "000000000001.jsonl").write_text(
        json.dumps({"agent_id": "a", "run": json.dumps(run(7))}) + "\n"
    )
    fd = os.open(owned / "owner.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the owner is alive
    try:
        c = new_client(clients, settings)
        c.submit_run(run(1))
        assert c.flush(10)
        assert seqs(payloads(ingest_messages(rds, prefix))) == [1]
        assert (owned / "000000000001.jsonl").exists()
    finally:
        os.close(fd)
    # Once the owner is gone, its runs are replayed.
    assert c.flush(10)
    assert seqs(payloads(ingest_messages(rds, prefix))) == [1, 7]
    assert not owned.exists()


def test_a_crashed_owners_torn_spool_is_replayed_without_its_damage(
    rds: redis.Redis, prefix: str, spool: Path, clients: list[RunClient]
) -> None:
    settings = make_settings(prefix, spool)
    crashed = owner_dir(spool, settings, "host-99999-dead")
    crashed.mkdir(parents=True)
    (crashed / "owner.lock").touch()
    good = [json.dumps({"agent_id": "a", "run": json.dumps(run(i))}) for i in (1, 2)]
    (crashed / "000000000001.jsonl").write_text(good[0] + "\n" + "{not json\n")
    (crashed / "000000000002.jsonl").write_text(good[1] + "\n" + good[1][:25])  # torn write
    c = new_client(clients, settings)
    assert c.flush(10)
    assert seqs(payloads(ingest_messages(rds, prefix))) == [1, 2]
    s = c.stats()
    assert (s["replayed"], s["corrupt"]) == (2, 2)
    assert not crashed.exists()


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
def test_a_full_spool_drops_by_policy_and_counts(
    prefix: str, spool: Path, clients: list[RunClient], policy: str
) -> None:
    settings = make_settings(
        prefix, spool, broker=DOWN, client_spool_max_bytes=20_000, client_overflow=policy
    )
    c = new_client(clients, settings)
    runs = [run(i, pad=900) for i in range(60)]  # ~1 KB per spool line
    for r in runs:
        c.submit_run(r)
    assert c.flush(5) is False
    s = c.stats()
    assert s["submitted"] == 60
    assert 0 < s["spool_runs"] < 60
    assert s["spool_bytes"] <= 20_000
    assert s["dropped"] > 0
    assert s["spool_runs"] + s["dropped"] == 60  # every run is on disk or counted
    live = s["spool_runs"]
    c.close()

    on_disk = [json.loads(line["run"])["seq"] for line in spool_lines(spool)]
    expected = list(range(live)) if policy == "drop_newest" else list(range(60 - live, 60))
    assert on_disk == expected


def test_a_long_outage_keeps_the_newest_runs_across_segments(
    outage: PrivateRedis, prefix: str, spool: Path, clients: list[RunClient]
) -> None:
    # 200 KB spool in 64 KiB segments: whole old segments go, then single lines.
    settings = make_settings(prefix, spool, broker=outage.url, client_spool_max_bytes=200_000)
    down = new_client(clients, settings)
    for start in range(0, 500, 50):  # ten spool writes of ~55 KB
        down.submit_runs([run(i, pad=900) for i in range(start, start + 50)])
        assert down.flush(5) is False
    s = down.stats()
    live = s["spool_runs"]
    assert s["spool_bytes"] <= 200_000 and live + s["dropped"] == 500
    assert len(list(spool.glob("*/*.jsonl"))) > 1
    down.close()

    outage.start()
    up = new_client(clients, make_settings(prefix, spool, broker=outage.url))
    assert up.flush(10)
    assert seqs(payloads(ingest_messages(outage.client(), prefix))) == list(range(500 - live, 500))
    assert up.stats()["replayed"] == live


def test_the_same_client_rides_out_a_broker_restart(
    tmp_path: Path, spool: Path, clients: list[RunClient]
) -> None:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server binary not found: cannot stop and restart a private broker")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"
    prefix = "restart:"

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [
                server,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp_path),
            ],
            stdout=subprocess.DEVNULL,
        )
        probe = redis.Redis.from_url(url)
        for _ in range(100):
            try:
                probe.ping()
                return proc
            except redis.ConnectionError:
                time.sleep(0.05)
        proc.kill()
        pytest.fail("private redis-server did not start")

    proc = start()
    try:
        c = new_client(clients, make_settings(prefix, spool, broker=url))
        c.submit_runs([run(i) for i in range(5)])
        assert c.flush(10)

        proc.terminate()
        proc.wait(10)
        c.submit_runs([run(i) for i in range(5, 15)])
        assert c.flush(5) is False
        assert c.stats()["spool_runs"] == 10

        proc = start()  # empty: no persistence, like a lost broker
        c.submit_run(run(15))  # goes behind the spooled runs
        assert c.flush(10)
        got = seqs(payloads(ingest_messages(redis.Redis.from_url(url), prefix)))
        assert got == list(range(5, 16))
        s = c.stats()
        assert (s["replayed"], s["published"], s["spool_runs"]) == (11, 16, 0)
        assert s["broker_up"] is True
    finally:
        proc.kill()
        proc.wait(10)


# ---------------------------------------------------------- process exit


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("ADAPTIVE_")}, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


EXIT_SCRIPT = """
    import uuid
    from adaptive_worker_client import submit_run
    for i in range(20):
        submit_run({"id": str(uuid.UUID(int=i + 1)), "agent_id": "exit", "calls": [],
                    "started_at": "2025-01-01T00:00:00Z", "seq": i})
    # no flush: the atexit hook must deliver or spool them
"""


def test_exit_without_flush_delivers(rds: redis.Redis, prefix: str, spool: Path) -> None:
    env = {
        "ADAPTIVE_CLIENT_EXIT_TIMEOUT_S": "20",  # generous: the machine may be busy
        "ADAPTIVE_REDIS_URL": REDIS,
        "ADAPTIVE_KEY_PREFIX": prefix,
        "ADAPTIVE_CLIENT_SPOOL_DIR": str(spool),
    }
    done = _python(EXIT_SCRIPT, env)
    assert done.returncode == 0, done.stderr
    assert seqs(payloads(ingest_messages(rds, prefix))) == list(range(20))


def test_exit_during_an_outage_leaves_a_spool_the_next_process_replays(
    outage: PrivateRedis, prefix: str, spool: Path
) -> None:
    env = {
        "ADAPTIVE_REDIS_URL": outage.url,
        "ADAPTIVE_KEY_PREFIX": prefix,
        "ADAPTIVE_CLIENT_SPOOL_DIR": str(spool),
    }
    done = _python(EXIT_SCRIPT, env)
    assert done.returncode == 0, done.stderr
    assert [json.loads(x["run"])["seq"] for x in spool_lines(spool)] == list(range(20))

    outage.start()
    assert ingest_messages(outage.client(), prefix) == []
    done = _python("from adaptive_worker_client import flush; assert flush(10)", env)
    assert done.returncode == 0, done.stderr
    assert seqs(payloads(ingest_messages(outage.client(), prefix))) == list(range(20))
    assert list(spool.iterdir()) == []


# ------------------------------------------------------- module functions


def test_module_functions_use_one_lazy_default_client(
    monkeypatch: pytest.MonkeyPatch, rds: redis.Redis, prefix: str, spool: Path
) -> None:
    monkeypatch.setattr(client_module, "_default", None)
    monkeypatch.setattr(client_config, "get_settings", lambda: make_settings(prefix, spool))
    from adaptive_worker_client import default_client, flush, stats, submit_run, submit_runs

    submit_run(run(0))
    submit_runs([run(1), run(2)])
    assert flush(10)
    assert default_client() is default_client()
    assert stats()["published"] == 3
    assert seqs(payloads(ingest_messages(rds, prefix))) == [0, 1, 2]
    default_client().close()


# ---------------------------------------------------------------- RabbitMQ


AMQP = AMQP_URL


@needs_rabbitmq
def test_publish_to_rabbitmq_and_consume_back(spool: Path, clients: list[RunClient]) -> None:
    from kombu import Connection

    queue = f"test.ingest.{uuid.uuid4().hex[:8]}"
    settings = make_settings("amqp:", spool, broker=AMQP)
    c = new_client(clients, settings, queue=queue)
    runs = [run(i, agent="rabbit") for i in range(3)]
    c.submit_runs(runs)
    assert c.flush(10), c.stats()

    with Connection(AMQP, connect_timeout=5) as conn:
        q = conn.SimpleQueue(queue)
        try:
            message = q.get(timeout=5)
            message.ack()
        finally:
            q.close()
            conn.channel().queue_delete(queue)
    args, kwargs, _embed = message.decode()
    assert message.content_type == "application/json"
    assert message.headers["task"] == INGEST_TASK
    assert message.headers["argsrepr"].startswith("<3 runs, ")
    assert [json.loads(p) for p in args[0]] == runs
    assert kwargs == {}


def test_broker_keys_live_under_the_key_prefix(prefix: str, spool: Path) -> None:
    assert broker_key_prefix(make_settings(prefix, spool)) == f"{prefix}adaptive_worker:celery:"


@pytest.mark.parametrize("levels", [0, 3, 40])
def test_a_dict_and_its_text_meet_the_same_nesting_limit(levels: int) -> None:
    """A dict's nesting is checked on the dict (cheaper), text's on the text:
    both refuse exactly the runs nested deeper than the limit."""
    from adaptive_worker_client.encode import check, encode

    value = run(1)
    value["extra"] = nested(levels) if levels else None
    text, agent = encode(value)
    depth = json_depth(json.loads(text))
    for limit in (depth - 1, depth):
        verdicts = []
        for kwargs in ({"encoded_from": value}, {}):
            try:
                check(text, agent=agent, max_bytes=1 << 20, max_depth=limit, **kwargs)
                verdicts.append("ok")
            except InvalidRecord:
                verdicts.append("refused")
        assert verdicts == ["refused" if depth > limit else "ok"] * 2, (limit, depth)
