"""Flower, started the documented way, is secure by default.

`celery -A worker flower` on the real Redis under a private prefix, with the
login in the environment (`FLOWER_BASIC_AUTH`, or a secret file named by
`FLOWER_BASIC_AUTH_FILE`), never on the command line:

- without a login it refuses to start (one line, exit 2, nothing listens),
  unless `ADAPTIVE_FLOWER_INSECURE_NO_AUTH=true` says otherwise; a
  `--basic_auth` argument is refused too (`ps` shows it to every user);
- it listens on 127.0.0.1 only unless told another address, and the password
  is nowhere in its `/proc/<pid>/cmdline`;
- the health check answers without a login (compose's healthcheck needs it),
  every page and API call without the configured credentials, or with wrong
  ones, is refused with 401, and with them Flower's API lists the worker that
  `adaptive-worker run` started, which shows it watches our broker keys
  (kombu's `global_keyprefix` under the prefix).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from storage.store import Store
from tests.conftest import REDIS_URL
from worker.flower import FlowerRefused, _callback, harden
from worker.settings import load_settings

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
USER, PASSWORD = "flower-user", "s3cret-pass"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _listening(port: int) -> set[str]:
    """Addresses with a socket listening on TCP `port` (from /proc/net/tcp and tcp6)."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            if len(address) == 8:  # IPv4, little-endian
                found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
            else:
                words = [bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, 32, 8)]
                found.add(socket.inet_ntop(socket.AF_INET6, b"".join(words)))
    return found


@dataclass
class Flower:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _command(port: int, *extra: str) -> list[str]:
    return [str(BIN / "celery"), "-A", "worker", "flower", f"--port={port}", *extra]


@pytest.fixture(scope="module")
def env(
    real_redis: redis.Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """One private prefix for the module; no login of the developer's leaks in."""
    prefix = f"test:flower-{uuid.uuid4().hex[:12]}:"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("ADAPTIVE_", "FLOWER_", "CELERY_"))
    }
    env.update(
        ADAPTIVE_REDIS_URL=REDIS_URL,
        ADAPTIVE_KEY_PREFIX=prefix,
        ADAPTIVE_METRICS_PORT="0",
        HOME=str(tmp_path_factory.mktemp("home")),
        PYTHONUNBUFFERED="1",
    )
    yield env
    Store(real_redis, prefix).delete_prefix()


def _start(env: dict[str, str], logdir: Path, *extra: str) -> Iterator[Flower]:
    """A running Flower (health check answers), stopped (process group) afterwards."""
    for attempt in range(3):
        port = _free_port()
        log = logdir / f"flower-{attempt}.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                _command(port, *extra), cwd=ROOT, env=env, stdout=sink,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        flower = Flower(proc, port, log)
        deadline = time.monotonic() + 60
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    if _get(f"{flower.base}/healthcheck")[0] == 200:
                        break
                except OSError:
                    time.sleep(0.2)
            else:
                text = log.read_text()
                if "Address already in use" in text:  # the free port was taken meanwhile
                    continue
                pytest.fail(f"flower did not start:\n{text[-3000:]}")
            yield flower
            return
        finally:
            _stop(proc)
    pytest.skip("no free port for flower after 3 attempts")


@pytest.fixture(scope="module")
def flower_proc(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flower]:
    """Flower as the README starts it: the login in the environment, no address given."""
    login = {**env, "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"}
    yield from _start(login, tmp_path_factory.mktemp("flower"))


@pytest.fixture(scope="module")
def flower(flower_proc: Flower) -> str:
    return flower_proc.base


def _refused(env: dict[str, str], *extra: str) -> tuple[int, str, int]:
    """Exit status and output of a Flower that must refuse to start, and its port."""
    port = _free_port()
    try:
        done = subprocess.run(
            _command(port, *extra), cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        pytest.fail("flower started (it must refuse and exit)")
    return done.returncode, done.stdout + done.stderr, port


# ------------------------------------------------------------ refusals


def test_flower_refuses_to_start_without_a_login(env: dict[str, str]) -> None:
    status, output, port = _refused(env)
    assert status == 2
    assert output.strip().splitlines() == [output.strip()]  # one line, no traceback
    assert "without a login" in output and "FLOWER_BASIC_AUTH=user:password" in output
    assert "ADAPTIVE_FLOWER_INSECURE_NO_AUTH=true" in output
    assert _listening(port) == set()


def test_flower_refuses_a_password_on_its_command_line(env: dict[str, str]) -> None:
    status, output, _ = _refused(env, f"--basic_auth={USER}:{PASSWORD}")
    assert status == 2
    assert "--basic_auth on the command line" in output and "FLOWER_BASIC_AUTH" in output
    assert "Traceback" not in output


def test_flower_refuses_an_unreadable_or_malformed_secret_file(
    env: dict[str, str], tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-file"
    status, output, _ = _refused({**env, "FLOWER_BASIC_AUTH_FILE": str(missing)})
    assert status == 2 and f"cannot read FLOWER_BASIC_AUTH_FILE ({missing})" in output
    malformed = tmp_path / "auth"
    malformed.write_text("just-a-user\n")
    status, output, _ = _refused({**env, "FLOWER_BASIC_AUTH_FILE": str(malformed)})
    assert status == 2 and "must hold user:password entries" in output
    assert "just-a-user" not in output and "Traceback" not in output


# ------------------------------------------------------ the running one


def test_flower_listens_on_loopback_only_by_default(flower_proc: Flower) -> None:
    assert _listening(flower_proc.port) == {"127.0.0.1"}
    with pytest.raises(ConnectionRefusedError), socket.socket() as s:
        s.settimeout(5)
        s.connect(("127.0.0.2", flower_proc.port))  # loopback too, but another address


def test_the_password_is_not_on_flowers_command_line(flower_proc: Flower) -> None:
    cmdline = Path(f"/proc/{flower_proc.proc.pid}/cmdline").read_bytes()
    assert b"flower" in cmdline  # the right process
    assert PASSWORD.encode() not in cmdline


def test_flower_health_check_needs_no_login(flower: str) -> None:
    assert _get(f"{flower}/healthcheck") == (200, b"OK")


@pytest.mark.parametrize("path", ["/", "/workers", "/tasks", "/api/workers", "/api/tasks"])
def test_flower_refuses_requests_without_the_credentials(flower: str, path: str) -> None:
    assert _get(f"{flower}{path}")[0] == 401
    assert _get(f"{flower}{path}", (USER, "wrong"))[0] == 401
    assert _get(f"{flower}{path}", ("someone", PASSWORD))[0] == 401
    assert _get(f"{flower}{path}", (USER, PASSWORD))[0] == 200


def test_flower_reads_the_login_from_a_secret_file(env: dict[str, str], tmp_path: Path) -> None:
    secret = tmp_path / "flower_basic_auth"
    secret.write_text(f"{USER}:{PASSWORD}\n")  # as a Docker secret holds it: with a newline
    secret.chmod(0o400)
    started = _start({**env, "FLOWER_BASIC_AUTH_FILE": str(secret)}, tmp_path)
    flower = next(started)
    try:
        assert _get(f"{flower.base}/workers")[0] == 401
        assert _get(f"{flower.base}/workers", (USER, "wrong"))[0] == 401
        assert _get(f"{flower.base}/workers", (USER, PASSWORD))[0] == 200
        assert _listening(flower.port) == {"127.0.0.1"}
    finally:
        started.close()


def test_flower_runs_open_only_when_the_operator_opts_out(
    env: dict[str, str], tmp_path: Path
) -> None:
    started = _start({**env, "ADAPTIVE_FLOWER_INSECURE_NO_AUTH": "true"}, tmp_path)
    flower = next(started)
    try:
        assert _get(f"{flower.base}/workers")[0] == 200  # no login asked
        assert _listening(flower.port) == {"127.0.0.1"}  # still loopback
        assert "WITHOUT a login" in flower.log.read_text()
    finally:
        started.close()


def test_flower_api_lists_the_worker_of_adaptive_worker_run(
    flower: str, env: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    with log.open("wb") as sink:
        worker = subprocess.Popen(
            [str(BIN / "adaptive-worker"), "run", "--no-beat", "-c", "1"],
            cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        workers: dict[str, Any] = {}
        # Flower fills a worker's entry in parts (queues, then registered tasks...).
        while not any(
            name.startswith("adaptive-") and info.get("registered") and info.get("active_queues")
            for name, info in workers.items()
        ):
            assert worker.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"flower never saw the worker: {workers}"
            status, body = _get(f"{flower}/api/workers?refresh=1", (USER, PASSWORD))
            assert status == 200
            workers = json.loads(body)
            time.sleep(0.5)
        name = next(n for n in workers if n.startswith("adaptive-"))
        queues = {q["name"] for q in workers[name].get("active_queues") or []}
        assert queues == {"adaptive.ingest", "adaptive.learn", "adaptive.maintenance"}
        assert "adaptive.ingest_runs" in (workers[name].get("registered") or [])
    finally:
        _stop(worker)


# ----------------------------------------------- the option check itself


def _options(**over: Any) -> SimpleNamespace:
    values: dict[str, Any] = {"address": "", "unix_socket": "", "basic_auth": None, "auth": ""}
    values.update(over)
    return SimpleNamespace(**values)


def test_an_explicit_address_or_socket_is_kept() -> None:
    opts = _options(address="0.0.0.0", basic_auth=["u:p"])
    harden(opts, allow_no_auth=False, environ={}, argv=[])
    assert opts.address == "0.0.0.0"
    opts = _options(unix_socket="/run/flower.sock", basic_auth=["u:p"])
    harden(opts, allow_no_auth=False, environ={}, argv=[])
    assert opts.address == ""  # a unix socket: no TCP address is added


def test_oauth_counts_as_a_login() -> None:
    opts = _options(auth=r".*@example\.com")
    assert harden(opts, allow_no_auth=False, environ={}, argv=[]) == []
    assert opts.address == "127.0.0.1"


@pytest.mark.parametrize(
    ("basic_auth", "environ", "message"),
    [
        (["user-only"], {}, "FLOWER_BASIC_AUTH must hold user:password"),
        (["u:"], {}, "FLOWER_BASIC_AUTH must hold user:password"),
        (["u:p"], {"FLOWER_BASIC_AUTH_FILE": "/x"}, "not both"),
    ],
)
def test_malformed_or_ambiguous_logins_are_refused(
    basic_auth: list[str], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(FlowerRefused, match=message):
        harden(_options(basic_auth=basic_auth), allow_no_auth=False, environ=environ, argv=[])


def test_only_the_final_parse_is_judged_when_a_flowerconfig_exists(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Flower parses the command line, reads flowerconfig.py, and parses again:
    a login set in that file must not be refused at the first parse."""
    settings = load_settings(_env_file=None)
    opts = _options()
    check = _callback(settings, opts, conf_exists=lambda: True)
    check()  # first parse: flowerconfig.py not read yet, nothing judged
    assert opts.address == ""
    opts.basic_auth = ["from:config"]  # what the config file set
    check()
    assert opts.address == "127.0.0.1" and capsys.readouterr().err == ""
    # Without a config file the first parse is the final one.
    lone = _options()
    with pytest.raises(SystemExit) as exit_info:
        _callback(settings, lone, conf_exists=lambda: False)()
    assert exit_info.value.code == 2
    assert "without a login" in capsys.readouterr().err
