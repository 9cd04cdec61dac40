"""The client distribution installed ALONE, as an agent installs it.

A fresh venv gets only `adaptive-worker-client` (from `client/`, not
editable), and the agent's working directory holds its own `tasks.py`,
`worker.py` and `storage.py`, the names the server's packages used to take:
the import must not see ours (none are installed there) nor be broken by
theirs. A run submitted from that venv is learned by a real worker running
from the server's venv, and `load_plan` there returns the learned plan.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from bench.workload import synthetic_runs
from tests.conftest import REDIS_URL
from tests.pipeline import celery_workers, worker_env

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
UV = shutil.which("uv")
# As the Makefile finds it: uv on PATH, else the copy pip installed for python3.
UV_CMD = [UV] if UV else ["python3", "-m", "uv"]


def _uv_works() -> bool:
    try:
        return subprocess.run([*UV_CMD, "--version"], capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding the client distribution and its dependencies, nothing else."""
    if not _uv_works():
        pytest.skip("uv is needed to build a fresh venv")
    venv = tmp_path_factory.mktemp("client-venv") / "venv"
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    subprocess.run(
        [*UV_CMD, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, env=env
    )
    subprocess.run(
        [*UV_CMD, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"),
         str(ROOT / "client")],
        check=True, env=env, timeout=300,
    )  # fmt: skip
    return venv


@pytest.fixture
def agent_dir(tmp_path: Path) -> Path:
    """An agent project whose own modules are named like the server's packages."""
    cwd = tmp_path / "agent"
    cwd.mkdir()
    (cwd / "tasks.py").write_text("raise SystemExit('the agent tasks.py was imported')\n")
    (cwd / "worker.py").write_text("raise SystemExit('the agent worker.py was imported')\n")
    (cwd / "storage.py").write_text("raise SystemExit('the agent storage.py was imported')\n")
    return cwd


@pytest.fixture
def prefix() -> Iterator[str]:
    prefix = f"dist-{os.getpid()}-{time.monotonic_ns()}:"
    yield prefix
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        r.delete(*keys)
    r.close()


def _agent_python(venv: Path, cwd: Path, code: str, env: dict[str, str]) -> str:
    """Run `code` as the agent would (`python script.py` in its project directory)."""
    script = cwd / "agent_main.py"
    script.write_text(textwrap.dedent(code))
    done = subprocess.run(
        [str(venv / "bin" / "python"), str(script)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_fresh_venv_holds_only_the_client(client_venv: Path) -> None:
    listed = subprocess.run(
        [*UV_CMD, "pip", "list", "--format", "json", "--python", str(client_venv / "bin/python")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    names = {p["name"] for p in json.loads(listed)}
    assert "adaptive-worker-client" in names
    assert "adaptive-worker" not in names
    # Server-only dependencies stay out of agents.
    assert not names & {"fakeredis", "flower", "typer", "rich", "prometheus-client"}


def test_a_run_submitted_alone_is_learned_and_its_plan_read_back(
    client_venv: Path, agent_dir: Path, prefix: str, tmp_path: Path
) -> None:
    agent = "dist-agent"
    runs = [json.dumps(r) for r in synthetic_runs(3, agent_id=agent)]
    (agent_dir / "runs.json").write_text(json.dumps(runs))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTIVE_")}
    env.update(
        ADAPTIVE_REDIS_URL=REDIS_URL,
        ADAPTIVE_KEY_PREFIX=prefix,
        ADAPTIVE_CLIENT_SPOOL_DIR=str(tmp_path / "spool"),
        ADAPTIVE_CLIENT_STATE_TTL_S="0",
        # A worker-only setting the server would refuse: the client must not care.
        ADAPTIVE_TASK_TIME_LIMIT_S="999999",
        PYTHONPATH="",
        AGENT=agent,
    )
    submitted = _agent_python(
        client_venv,
        agent_dir,
        """
        import json, os, sys
        from adaptive_worker_client import submit_runs, flush, load_plan
        from adaptive_worker_client import stats
        loaded = sorted(m.split(".")[0] for m in sys.modules)
        print(json.dumps({"server": [m for m in ("worker", "storage", "tasks") if m in loaded]}))
        submit_runs(json.load(open("runs.json")))
        assert flush(20), stats()
        plan = load_plan(os.environ["AGENT"])
        print(json.dumps({"published": stats()["published"], "plan": repr(plan)}))
        """,
        env,
    )
    first, second = (json.loads(line) for line in submitted.strip().splitlines())
    assert first == {"server": []}
    assert second == {"published": 3, "plan": "None"}  # nothing learned yet

    with celery_workers(worker_env(prefix, REDIS_URL), tmp_path) as workers:
        workers.start("dist", concurrency=1)
        r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
        deadline = time.monotonic() + 30
        while r.get(f"{prefix}plan:{agent}") is None and time.monotonic() < deadline:
            time.sleep(0.2)
        stored = r.get(f"{prefix}plan:{agent}")
        assert stored is not None, "the worker did not learn the submitted runs"

    read = _agent_python(
        client_venv,
        agent_dir,
        """
        import json, os, sys
        from adaptive_worker_client import load_plan
        plan = load_plan(os.environ["AGENT"])
        assert not {"worker", "storage", "tasks"} & {m.split(".")[0] for m in sys.modules}
        print(plan.to_json())
        """,
        env,
    )
    assert json.loads(read) == json.loads(stored)
