"""docker-compose.yml, Dockerfile and .dockerignore: valid, safe by default, in step with Settings.

No container engine runs here, so nothing is built or started. What can be
checked without one is checked: `docker compose config` renders and validates
the file when the compose plugin is installed (it needs no engine), and the
rest reads the files themselves, so a renamed setting, a queue added to the
app, or a dashboard left open fails here instead of in a deployment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from worker.celery import QUEUES
from worker.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SERVICES = {"redis", "worker", "beat", "flower"}
APP_SERVICES = ("worker", "beat", "flower")
# Variables of compose itself (interpolation), not of the application.
COMPOSE_ONLY = {"FLOWER_BASIC_AUTH", "FLOWER_BIND", "FLOWER_PORT", "REDIS_BIND", "REDIS_PORT"}


def compose_text() -> str:
    return COMPOSE.read_text(encoding="utf-8")


def settings_env_names() -> set[str]:
    return {ENV_PREFIX + name.upper() for name in Settings.model_fields}


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
    # Flower refuses to start without a login, and binds to loopback by default.
    assert "--basic_auth=${FLOWER_BASIC_AUTH:?" in text
    assert '"${FLOWER_BIND:-127.0.0.1}:${FLOWER_PORT:-5555}:5555"' in text
    assert '"${REDIS_BIND:-127.0.0.1}:${REDIS_PORT:-6379}:6379"' in text
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
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed in this venv")
    doc = yaml.safe_load(compose_text())
    services = doc["services"]
    assert set(services) == SERVICES
    assert "redis-data" in doc["volumes"]
    assert services["redis"]["healthcheck"]["test"][-1].startswith("redis-cli ping")
    for name in APP_SERVICES:
        service = services[name]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        env = service["environment"]
        assert env["ADAPTIVE_REDIS_URL"] == "redis://redis:6379/0"
        assert env["ADAPTIVE_BROKER_URL"].startswith("redis://redis:6379/")
    assert services["worker"]["environment"]["REMAP_SIGTERM"] == "SIGQUIT"


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

    (flower_port,) = services["flower"]["ports"]
    assert flower_port["host_ip"] == "127.0.0.1"
    assert int(flower_port["target"]) == 5555
    assert "--basic_auth=user:secret" in services["flower"]["command"]

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
