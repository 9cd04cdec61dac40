"""docker-compose.yml, Dockerfile and .dockerignore: valid, safe by default, in step with Settings.

No container engine runs here, so nothing is built or started. What can be
checked without one is checked: `docker compose config` renders and validates
the file when the compose plugin is installed (it needs no engine), and the
rest parses the files themselves (PyYAML, a dev dependency), so a renamed
setting, a queue added to the app, a dashboard left open, a password on a
command line, an unpinned or published Redis, a beat schedule lost at every
recreate or an unbounded log fails here instead of in a deployment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.celery import QUEUES
from worker.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SERVICES = {"redis", "worker", "beat", "flower"}
# Started only with `--profile observability` (tests/test_prometheus.py checks them further).
OBSERVABILITY = {"prometheus", "grafana"}
APP_SERVICES = ("worker", "beat", "flower")
# Variables of compose itself (interpolation), not of the application.
COMPOSE_ONLY = {
    "FLOWER_BASIC_AUTH",
    "FLOWER_BIND",
    "FLOWER_PORT",
    "REDIS_MAXMEMORY",
    "GRAFANA_BIND",
    "GRAFANA_PORT",
}


def compose_text() -> str:
    return COMPOSE.read_text(encoding="utf-8")


def settings_env_names() -> set[str]:
    return {ENV_PREFIX + name.upper() for name in Settings.model_fields}


@cache
def compose_doc() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(compose_text())
    return doc


def strings(node: Any) -> Iterator[str]:
    """Every string in a parsed YAML node, keys included."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


# ------------------------------------------------------------ static checks


def test_every_adaptive_variable_in_compose_is_a_setting() -> None:
    used = set(re.findall(r"\bADAPTIVE_[A-Z0-9_]+\b", compose_text()))
    unknown = used - settings_env_names() - {"ADAPTIVE_IMAGE"}  # the image tag, compose's own
    assert used, "docker-compose.yml configures nothing through ADAPTIVE_ variables"
    assert not unknown, f"not fields of worker.settings.Settings: {sorted(unknown)}"


def test_every_worker_setting_reaches_the_containers() -> None:
    """A new worker-side setting must be passed through, or compose could not set it.

    The agent-side client's settings (client_*) do not apply to these processes.
    """
    text = compose_text()
    missing = sorted(
        name
        for name in settings_env_names()
        if not name.startswith(f"{ENV_PREFIX}CLIENT_")
        and not re.search(rf"^\s+{name}:", text, re.MULTILINE)
    )
    assert not missing, (
        f"add to x-adaptive-environment in docker-compose.yml (empty value = pass-through): "
        f"{missing}"
    )


def test_compose_defaults_are_safe() -> None:
    text = compose_text()
    # Compose stops without a Flower login, which is published on loopback only.
    assert "${FLOWER_BASIC_AUTH:?" in text
    assert '"${FLOWER_BIND:-127.0.0.1}:${FLOWER_PORT:-5555}:5555"' in text
    # Redis keeps what it has (AOF) and never evicts runs or broker messages.
    assert re.search(r"- --appendonly\s+- \"yes\"", text)
    assert re.search(r"- --maxmemory-policy\s+- noeviction", text)
    # The worker consumes every queue the app routes to.
    assert f"- {','.join(QUEUES)}" in text


def test_dockerfile_and_ignore_file() -> None:
    docker = DOCKERFILE.read_text(encoding="utf-8")
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in docker
    assert re.search(r"pip install [^\n]*\buv==", docker)
    assert "uv sync --locked --no-dev" in docker
    user = re.findall(r"^USER\s+(\S+)", docker, re.MULTILINE)
    assert user and user[-1].split(":")[0] not in {"0", "root"}, "the image must not run as root"
    assert "ENV PATH=/opt/venv/bin:$PATH" in docker
    assert f'"-Q", "{",".join(QUEUES)}"' in docker
    # Allow-list: everything is excluded first, so `.env` (secrets), `.git`
    # and `.venv` can never reach the build context.
    lines = [
        ln.strip()
        for ln in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "uv.lock", "README.md", "storage", "tasks", "worker"}
    # Everything the Dockerfile copies is allowed in.
    copied = set(re.findall(r"^COPY (?!--from)(.+) \S+$", docker, re.MULTILINE))
    assert {p for group in copied for p in group.split()} <= allowed


def test_yaml_structure() -> None:
    doc = compose_doc()
    services = doc["services"]
    assert set(services) == SERVICES | OBSERVABILITY
    for name in OBSERVABILITY:
        assert services[name]["profiles"] == ["observability"], name
    assert "redis-data" in doc["volumes"]
    assert services["redis"]["healthcheck"]["test"][-1].startswith("redis-cli ping")
    for name in APP_SERVICES:
        service = services[name]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        env = service["environment"]
        assert env["ADAPTIVE_REDIS_URL"] == "redis://redis:6379/0"
        assert env["ADAPTIVE_BROKER_URL"].startswith("redis://redis:6379/")
    assert services["worker"]["environment"]["REMAP_SIGTERM"] == "SIGQUIT"


def test_redis_is_pinned_and_not_published_on_the_host() -> None:
    services = compose_doc()["services"]
    image = services["redis"]["image"]
    # An exact version (optionally a variant and a digest), never `redis:7` or `latest`.
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+(-[a-z0-9.]+)?(@sha256:[0-9a-f]{64})?", image), image
    # No host port: 6379 collides with a local Redis (and `make test`), and
    # this Redis has no password.
    assert "ports" not in services["redis"]
    published = [p for service in services.values() for p in service.get("ports", [])]
    assert published == [
        "${FLOWER_BIND:-127.0.0.1}:${FLOWER_PORT:-5555}:5555",
        "${GRAFANA_BIND:-127.0.0.1}:${GRAFANA_PORT:-3000}:3000",  # a read-only view
    ]


def test_the_beat_schedule_survives_a_recreate() -> None:
    doc = compose_doc()
    beat = doc["services"]["beat"]
    command = beat["command"]
    (schedule,) = [a.split("=", 1)[1] for a in command if a.startswith("--schedule=")]
    assert not any(a in ("-s", "--schedule") for a in command)  # exactly one, in one form
    directory = schedule.rsplit("/", 1)[0]
    mounts = {target: source for source, target in (v.split(":", 1) for v in beat["volumes"])}
    assert directory in mounts, f"{directory} is not a volume of beat: {beat['volumes']}"
    volume = mounts[directory]
    assert volume in doc["volumes"], f"{volume} is not a named volume"
    # The image makes that directory the app user's, or beat could not write it
    # (an empty named volume takes the image directory's owner).
    docker = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(rf"install -d -o 10001 -g 10001 -m 07[05]0 {re.escape(directory)}\b", docker)
    assert "USER 10001:10001" in docker


def test_every_service_rotates_its_logs() -> None:
    for name, service in compose_doc()["services"].items():
        logging = service.get("logging")
        assert logging, f"{name}: no logging section (json-file grows without bound)"
        assert logging["driver"] == "json-file", name
        options = logging["options"]
        assert re.fullmatch(r"\d+[kmg]", str(options["max-size"])), (name, options)
        assert int(options["max-file"]) >= 2, (name, options)


def test_the_flower_login_is_a_secret_never_a_command_line_or_variable() -> None:
    doc = compose_doc()
    flower = doc["services"]["flower"]
    # Nothing of a service mentions the login's value: not its command (`ps`),
    # not its environment or labels (`docker inspect`).
    for name, service in doc["services"].items():
        for text in strings(service):
            assert "basic_auth=" not in text.lower(), (name, text)
            assert "${FLOWER_BASIC_AUTH" not in text, (name, text)
    # It reaches Flower as a file only the app user can read ...
    assert doc["secrets"]["flower_basic_auth"] == {"environment": "FLOWER_BASIC_AUTH"}
    (secret,) = flower["secrets"]
    assert secret["source"] == "flower_basic_auth"
    assert (secret["uid"], secret["gid"], secret["mode"]) == ("10001", "10001", 0o400)
    target = secret.get("target", secret["source"])
    assert flower["environment"]["FLOWER_BASIC_AUTH_FILE"] == f"/run/secrets/{target}"
    # ... listening on every interface of the container, published on loopback.
    assert flower["environment"]["FLOWER_ADDRESS"] == "0.0.0.0"
    assert flower["ports"] == ["${FLOWER_BIND:-127.0.0.1}:${FLOWER_PORT:-5555}:5555"]
    # And compose stops when the login is not set (the check names the variable).
    assert doc["x-flower-login-required"].startswith("${FLOWER_BASIC_AUTH:?set FLOWER_BASIC_AUTH=")


# ---------------------------------------------- docker compose (plugin only)


@cache
def compose_plugin() -> str | None:
    """Why `docker compose` cannot be used here, or None when it can."""
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    try:
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`docker compose version` failed: {exc}"
    if probe.returncode != 0:
        return "the docker compose plugin is not installed (`docker compose version` failed)"
    return None


def compose_config(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    reason = compose_plugin()
    if reason is not None:
        pytest.skip(reason)
    # An empty --env-file, so a developer's `.env` cannot supply FLOWER_BASIC_AUTH.
    empty = tmp_path / "empty.env"
    empty.write_text("")
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in COMPOSE_ONLY and not k.startswith(("ADAPTIVE_", "COMPOSE_"))
    }
    return subprocess.run(
        [
            "docker",
            "compose",
            "--project-directory",
            str(ROOT),
            "-f",
            str(COMPOSE),
            "--env-file",
            str(empty),
            "config",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **env},
    )


def test_compose_config_renders(tmp_path: Path) -> None:
    done = compose_config({"FLOWER_BASIC_AUTH": "user:secret"}, tmp_path)
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = json.loads(done.stdout)
    services = config["services"]
    assert set(services) == SERVICES

    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert redis_cmd[redis_cmd.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v["target"] == "/data" for v in services["redis"]["volumes"])
    assert not services["redis"].get("ports")
    assert services["redis"]["image"] == compose_doc()["services"]["redis"]["image"]

    (flower_port,) = services["flower"]["ports"]
    assert flower_port["host_ip"] == "127.0.0.1"
    assert int(flower_port["target"]) == 5555
    assert "user:secret" not in json.dumps(services)  # not in any command or variable
    assert [s["source"] for s in services["flower"]["secrets"]] == ["flower_basic_auth"]
    assert any(v["target"] == "/var/lib/adaptive-worker" for v in services["beat"]["volumes"])

    for name in APP_SERVICES:
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert services[name]["environment"]["ADAPTIVE_REDIS_URL"] == "redis://redis:6379/0"
    worker_cmd = services["worker"]["command"]
    assert worker_cmd[worker_cmd.index("-Q") + 1] == ",".join(QUEUES)
    assert "-E" in worker_cmd
    for name in ("redis", "worker", "flower"):
        assert services[name]["healthcheck"]["test"], name


def test_compose_config_needs_flower_auth(tmp_path: Path) -> None:
    done = compose_config({}, tmp_path)
    assert done.returncode != 0
    assert "FLOWER_BASIC_AUTH" in done.stderr
