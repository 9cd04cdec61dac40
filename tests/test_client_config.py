"""The client's own settings reader: the agent's environment can never make it raise."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from adaptive_worker_client.config import ClientSettings, load_client_settings
from worker.settings import load_settings


def test_known_values_are_read_with_the_server_names() -> None:
    s = load_client_settings(
        {
            "ADAPTIVE_REDIS_URL": "redis://h:6380/2",
            "ADAPTIVE_KEY_PREFIX": "p:",
            "ADAPTIVE_CLIENT_BUFFER_MAX_RUNS": "7",
            "ADAPTIVE_CLIENT_SPOOL_FSYNC": "false",
            "ADAPTIVE_CLIENT_OVERFLOW": "drop_newest",
        },
        env_file=None,
    )
    assert (s.redis_url, s.key_prefix, s.client_buffer_max_runs) == ("redis://h:6380/2", "p:", 7)
    assert (s.client_spool_fsync, s.client_overflow) == (False, "drop_newest")
    assert s.effective_broker_url == "redis://h:6380/2"


def test_bad_values_fall_back_to_defaults_with_one_line_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = {
        "ADAPTIVE_TASK_TIME_LIMIT_S": "999",  # server-only: the server refuses it, we ignore it
        "ADAPTIVE_CLIENT_BUFFER_MAX_RUNS": "-3",
        "ADAPTIVE_CLIENT_STATE_TTL_S": "soon",
        "ADAPTIVE_BROKER_URL": "http://user:secret@h/",
        "ADAPTIVE_KEY_PREFIX": "has space",
    }
    with caplog.at_level(logging.WARNING, logger="adaptive_worker_client.config"):
        s = load_client_settings(env, env_file=None)
    assert s == ClientSettings()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4
    assert all("\n" not in line for line in lines)
    assert not any("secret" in line for line in lines)
    assert any("ADAPTIVE_CLIENT_BUFFER_MAX_RUNS" in line for line in lines)


def test_dotenv_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("ADAPTIVE_KEY_PREFIX='from-file:'\nADAPTIVE_CLIENT_LINGER_MS=5\n")
    s = load_client_settings({"ADAPTIVE_CLIENT_LINGER_MS": "7"}, env_file=env_file)
    assert (s.key_prefix, s.client_linger_ms) == ("from-file:", 7.0)


def test_client_defaults_equal_the_server_defaults() -> None:
    server = load_settings(_env_file=None)
    client = ClientSettings()
    for name in ClientSettings.__dataclass_fields__:
        assert getattr(client, name) == getattr(server, name), name
