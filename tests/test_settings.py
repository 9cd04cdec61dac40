"""Settings: defaults, environment, and errors that name the variable."""

from __future__ import annotations

import pytest

from worker.settings import SettingsError, load_settings


def test_defaults_are_the_embedded_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ADAPTIVE_REDIS_URL", "ADAPTIVE_BROKER_URL", "ADAPTIVE_KEY_PREFIX"):
        monkeypatch.delenv(var, raising=False)
    s = load_settings(_env_file=None)
    assert s.embedded and s.redis_url is None
    assert s.effective_broker_url == "memory://"
    assert s.key_prefix == "nemo_relay:"
    assert s.observation_window == 100
    assert s.max_run_bytes == 8 * 1024 * 1024


def test_broker_defaults_to_the_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTIVE_REDIS_URL", "redis://127.0.0.1:6379/3")
    monkeypatch.setenv("ADAPTIVE_KEY_PREFIX", "nemo_flow:")
    s = load_settings(_env_file=None)
    assert not s.embedded
    assert s.effective_broker_url == "redis://127.0.0.1:6379/3"
    assert s.key_prefix == "nemo_flow:"


def test_dotenv_is_read(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADAPTIVE_LEARN_BATCH_SIZE", raising=False)
    env = tmp_path / ".env"
    env.write_text("ADAPTIVE_LEARN_BATCH_SIZE=42\n")
    assert load_settings(_env_file=env).learn_batch_size == 42


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("ADAPTIVE_OBSERVATION_WINDOW", "0"),
        ("ADAPTIVE_MAX_RUN_BYTES", "lots"),
        ("ADAPTIVE_REDIS_URL", "http://example.invalid"),
        ("ADAPTIVE_KEY_PREFIX", "has space:"),
    ],
)
def test_invalid_setting_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=var):
        load_settings(_env_file=None)


def test_every_setting_is_documented_in_the_readme() -> None:
    from pathlib import Path

    from worker.settings import ENV_PREFIX, Settings

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [
        ENV_PREFIX + name.upper()
        for name in Settings.model_fields
        if f"| `{ENV_PREFIX}{name.upper()}` |" not in readme
    ]
    assert not missing, f"README configuration table lacks {missing}"
