"""TLS: every `rediss://` connection verifies the server, unless the operator opts out.

kombu connects a `rediss://` broker URL without `ssl_cert_reqs` with
CERT_NONE (a warning in the log, and anyone on the path can read and forge
every message), while redis-py verifies: the state was checked and the
broker was not. Here a redis-server of the test's own listens with TLS
(`--tls-port`, a certificate for IP 127.0.0.1 signed by a CA made here with
`openssl`; its plain port is kept only to look at what arrived), and every
client we make is tried against it: the state connection (workers, CLI), the
broker (a Celery app's connection), the agent-side publisher and state
reader, and a real `celery worker` process.

- with `tls_ca_file` = that CA: each connects, and runs make the whole trip;
- without it (the system's CAs), with another CA, or by a host name the
  certificate does not name: each fails with the certificate error, and
  the worker never becomes ready;
- with `tls_verify=false` (the explicit opt-out): each connects.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

import storage.connection as connection_module
from adaptive_worker_client import RunClient, StateReader, StateUnavailable
from storage.connection import broker_tls_options, connect, redis_tls_options
from storage.errors import InvalidRecord
from storage.store import Store
from tests.pipeline import caught_up, celery_workers, wait_until, worker_env
from tests.private_redis import PrivateRedis, free_port
from worker.celery import create_app
from worker.settings import Settings, load_settings

pytestmark = pytest.mark.redis

VERIFY_FAILED = "certificate verify failed"


# ------------------------------------------------------------ certificates


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA that signed the server's certificate
    other_ca: Path  # a CA that did not
    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl binary to make a test CA")
    d = tmp_path_factory.mktemp("pki")
    ca, ca_key = _make_ca(d, "test-ca")
    other_ca, _ = _make_ca(d, "other-ca")
    key, csr, cert = d / "server.key", d / "server.csr", d / "server.crt"
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", "/CN=adaptive-test-redis", cwd=d,
    )  # fmt: skip
    (d / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1\n"  # not "localhost": a name it does not cover
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", "server.ext", cwd=d,
    )  # fmt: skip
    return Pki(ca, other_ca, cert, key)


@dataclass
class TlsRedis:
    server: PrivateRedis
    tls_port: int

    def url(self, db: int = 0, host: str = "127.0.0.1") -> str:
        return f"rediss://{host}:{self.tls_port}/{db}"

    def plain(self, db: int = 0) -> redis.Redis:
        """What arrived, seen through the plain port (kept for the test only)."""
        return redis.Redis.from_url(
            f"redis://127.0.0.1:{self.server.port}/{db}", decode_responses=True
        )


@pytest.fixture(scope="module")
def tls_redis(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    tls_port = free_port()
    server = PrivateRedis(
        tmp_path_factory.mktemp("tls-redis"),
        extra=[
            "--tls-port", str(tls_port),
            "--tls-cert-file", str(pki.cert),
            "--tls-key-file", str(pki.key),
            "--tls-ca-cert-file", str(pki.ca),
            "--tls-auth-clients", "no",
        ],
    )  # fmt: skip
    try:
        server.start()
    except BaseException:
        pytest.skip("redis-server could not start with --tls-port (built without TLS?)")
    try:
        yield TlsRedis(server, tls_port)
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("ADAPTIVE_")]:
        monkeypatch.delenv(var)


def tls_settings(url: str, tmp_path: Path, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": url,
        "key_prefix": f"test:tls-{uuid.uuid4().hex[:8]}:",
        "client_spool_dir": tmp_path / "spool",
        "client_retry_interval_s": 0.2,
        "client_connect_timeout_s": 3.0,
        "client_state_timeout_s": 3.0,
        "client_exit_timeout_s": 1.0,
    }
    values.update(over)
    return load_settings(_env_file=None, **values)


def broker_connects(settings: Settings) -> None:
    """Open the broker connection the way workers and the publisher do; raises on failure."""
    app = create_app(settings, name="tls-test")
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=5)
        conn.default_channel.client.ping()


# ---------------------------------------------- state and broker connections


def test_with_the_ca_state_and_broker_connect_and_verify(
    tls_redis: TlsRedis, pki: Pki, tmp_path: Path
) -> None:
    settings = tls_settings(tls_redis.url(), tmp_path, tls_ca_file=pki.ca)
    client = connect(settings.redis_url, settings)
    key = f"test:tls:{uuid.uuid4().hex}"
    assert client.set(key, "over tls") is True
    assert tls_redis.plain().get(key) == "over tls"  # the same server, really
    tls_redis.plain().delete(key)
    broker_connects(settings)
    # What the broker is given: verification on, against this CA.
    conf = create_app(settings).conf
    assert conf.broker_use_ssl == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_check_hostname": True,
        "ssl_ca_certs": str(pki.ca),
    }


@pytest.mark.parametrize("ca", ["system", "other"])
def test_without_the_right_ca_state_and_broker_refuse_to_connect(
    tls_redis: TlsRedis, pki: Pki, tmp_path: Path, ca: str
) -> None:
    over = {} if ca == "system" else {"tls_ca_file": pki.other_ca}
    settings = tls_settings(tls_redis.url(), tmp_path, **over)
    with pytest.raises(redis.ConnectionError, match=VERIFY_FAILED):
        connect(settings.redis_url, settings).ping()
    with pytest.raises(Exception, match=VERIFY_FAILED):
        broker_connects(settings)


def test_a_certificate_for_another_host_name_is_refused(
    tls_redis: TlsRedis, pki: Pki, tmp_path: Path
) -> None:
    """The right CA, but the certificate names 127.0.0.1, not `localhost`."""
    settings = tls_settings(tls_redis.url(host="localhost"), tmp_path, tls_ca_file=pki.ca)
    with pytest.raises(redis.ConnectionError, match="match"):
        connect(settings.redis_url, settings).ping()
    with pytest.raises(Exception, match="match"):
        broker_connects(settings)


def test_the_explicit_opt_out_connects_without_verifying(
    tls_redis: TlsRedis, tmp_path: Path
) -> None:
    settings = tls_settings(tls_redis.url(host="localhost"), tmp_path, tls_verify=False)
    assert connect(settings.redis_url, settings).ping() is True
    broker_connects(settings)


def test_callers_that_pass_only_a_url_get_the_process_settings(
    tls_redis: TlsRedis, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers and the CLI call `connect(settings.redis_url)`: the CA must still apply."""
    settings = tls_settings(tls_redis.url(), tmp_path, tls_ca_file=pki.ca)
    monkeypatch.setattr("worker.settings.get_settings", lambda: settings)
    assert connect(tls_redis.url()).ping() is True
    unverified = tls_settings(tls_redis.url(), tmp_path)
    monkeypatch.setattr("worker.settings.get_settings", lambda: unverified)
    with pytest.raises(redis.ConnectionError, match=VERIFY_FAILED):
        connect(tls_redis.url()).ping()
    assert connection_module.redis_tls_options("redis://127.0.0.1/0") == {}


def test_tls_options_only_for_tls_urls(tmp_path: Path, pki: Pki) -> None:
    settings = tls_settings("redis://127.0.0.1:6379/0", tmp_path, tls_ca_file=pki.ca)
    # A plain URL must not get TLS switched on (kombu would, for any broker_use_ssl).
    for plain in ("redis://h/0", "amqp://h//", "memory://", "unix:///tmp/r.sock"):
        assert broker_tls_options(plain, settings) is None, plain
        assert redis_tls_options(plain, settings) == {}, plain
    assert create_app(settings).conf.broker_use_ssl is None
    # amqps://: py-amqp checks the host name only when given server_hostname
    # (None: kombu fills in the URL's host).
    assert broker_tls_options("amqps://h//", settings) == {
        "cert_reqs": ssl.CERT_REQUIRED,
        "ca_certs": str(pki.ca),
        "server_hostname": None,
    }
    off = tls_settings("redis://127.0.0.1:6379/0", tmp_path, tls_verify=False)
    assert broker_tls_options("amqps://h//", off) == {"cert_reqs": ssl.CERT_NONE}
    assert redis_tls_options("rediss://h/0", off) == {
        "ssl_cert_reqs": "none",
        "ssl_check_hostname": False,
    }


def test_a_missing_ca_file_is_a_setting_error(tmp_path: Path) -> None:
    from worker.settings import SettingsError

    with pytest.raises(SettingsError, match="ADAPTIVE_TLS_CA_FILE"):
        tls_settings("rediss://127.0.0.1:1/0", tmp_path, tls_ca_file=tmp_path / "nope.pem")


# ------------------------------------------------- the agent-side client


def test_the_publisher_verifies_the_broker(tls_redis: TlsRedis, pki: Pki, tmp_path: Path) -> None:
    run = {
        "id": str(uuid.uuid4()),
        "agent_id": "tls",
        "calls": [],
        "started_at": "2025-01-01T00:00:00Z",
    }
    good = tls_settings(tls_redis.url(), tmp_path, tls_ca_file=pki.ca)
    client = RunClient(good)
    try:
        client.submit_run(run)
        assert client.flush(10), client.stats()
        queue = f"{good.key_prefix}adaptive_worker:celery:adaptive.ingest"
        assert tls_redis.plain().llen(queue) == 1
    finally:
        client.close(1.0)
        Store(tls_redis.plain(), good.key_prefix).delete_prefix()

    bad = tls_settings(tls_redis.url(), tmp_path / "bad")  # the system's CAs
    client = RunClient(bad)
    try:
        client.submit_run(run)
        assert client.flush(10) is False  # not published: spooled
        stats = client.stats()
        assert stats["published"] == 0 and stats["spooled"] == 1
        assert VERIFY_FAILED in str(stats["last_error"]).lower()
        queue = f"{bad.key_prefix}adaptive_worker:celery:adaptive.ingest"
        assert tls_redis.plain().llen(queue) == 0
    finally:
        client.close(0.5)


def test_the_state_reader_verifies_redis(tls_redis: TlsRedis, pki: Pki, tmp_path: Path) -> None:
    good = tls_settings(tls_redis.url(), tmp_path, tls_ca_file=pki.ca)
    plan_key = f"{good.key_prefix}plan:tls-agent"
    tls_redis.plain().set(plan_key, "{not a plan")  # any value: it must be READ over TLS
    try:
        reader = StateReader(good, strict=True, ttl_s=0)
        # Read over TLS, then refused as no plan: the value really came back.
        with pytest.raises(InvalidRecord, match="invalid ExecutionPlan"):
            reader.load_plan("tls-agent")
        bad = StateReader(tls_settings(tls_redis.url(), tmp_path), strict=True, ttl_s=0)
        with pytest.raises(StateUnavailable, match=VERIFY_FAILED):
            bad.load_plan("tls-agent")
    finally:
        tls_redis.plain().delete(plan_key)


# --------------------------------------------------- a real celery worker


def _runs(n: int, agent: str) -> list[dict[str, Any]]:
    from bench.workload import synthetic_runs

    return list(synthetic_runs(n, agent_id=agent, seed=3))


@pytest.mark.slow
def test_a_worker_on_a_rediss_broker_learns_with_the_ca_and_refuses_without(
    tls_redis: TlsRedis, pki: Pki, tmp_path: Path
) -> None:
    prefix = f"test:tls-worker-{uuid.uuid4().hex[:8]}:"
    url = tls_redis.url()
    store = Store(tls_redis.plain(), prefix)
    try:
        # Without the CA: the worker logs the certificate error and never consumes.
        blind = worker_env(prefix, url, metrics_port=0)
        with celery_workers(blind, tmp_path) as workers:
            with pytest.raises((RuntimeError, TimeoutError)):
                workers.start("blind", concurrency=1, timeout=8)
            log = (tmp_path / "blind.log").read_text().lower()
            assert VERIFY_FAILED in log and " ready." not in log

        # With it: runs published over TLS are stored and learned over TLS.
        env = worker_env(prefix, url, metrics_port=0, tls_ca_file=pki.ca)
        with celery_workers(env, tmp_path) as workers:
            workers.start("tls", concurrency=1)
            client = RunClient(tls_settings(url, tmp_path, key_prefix=prefix, tls_ca_file=pki.ca))
            try:
                client.submit_runs(_runs(20, "tls-agent"))
                assert client.flush(10), client.stats()
            finally:
                client.close(1.0)
            wait_until(
                lambda: caught_up(store, ["tls-agent"], {"tls-agent": 20}),
                60,
                "the worker to store and learn 20 runs over TLS",
                lambda: f"\n{(tmp_path / 'tls.log').read_text()[-2000:]}",
            )
            assert store.cursor("tls-agent").index_length == 20
    finally:
        store.delete_prefix()
