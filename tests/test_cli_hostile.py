"""The operator's side of hostile data: `adaptive-worker` and `celery -A worker`.

Whatever agents, broker messages or anyone with Redis access wrote, every
command prints it literally (no markup, no terminal control), ends with one
line and a documented exit code instead of a traceback, and `replay` goes on
past bad records, naming and dead-lettering each. Commands run in-process
(typer's CliRunner) on the real Redis under a private prefix; the `celery`
entry points run as real subprocesses. Expected values are written out here
or come from the bundled samples, never from the code under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import Result
from typer.testing import CliRunner

from storage.store import Store
from tasks.learning import catch_up, dead_letter, ingest
from tests.conftest import REDIS_URL
from worker.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_NOT_FOUND, app
from worker.engine.fold import EngineConfig
from worker.samples import sample_runs

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parents[1]
CELERY = str(Path(sys.executable).with_name("celery"))
SAMPLE_AGENT = "travel-openai"
# Rich markup, a closing tag with nothing to close, an emoji code, a link.
MARKUP_IDS = ["[/]", "[bold]x", "[red]", ":thumbs_up:", "[link=https://e.x]y[/link]"]
ESC_ID = "esc\x1b[31mred"  # an ANSI colour sequence: a terminal would obey it
HOSTILE_TOOL = "[b]search_flights"  # a tool name from data, in plans and spans


@pytest.fixture(autouse=True)
def _own_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only what a test passes counts; the client spools into the test's directory."""
    for var in [v for v in os.environ if v.startswith("ADAPTIVE_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("ADAPTIVE_CLIENT_SPOOL_DIR", str(tmp_path / "spool"))


@pytest.fixture
def store(real_redis: redis.Redis, prefix: str) -> Iterator[Store]:
    store = Store(real_redis, prefix)
    yield store
    store.delete_prefix()


class Cli:
    """`adaptive-worker ...` in-process, on the real Redis under the test's prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __call__(self, *args: str, redis_url: str = REDIS_URL) -> Result:
        argv = [*args, "--redis-url", redis_url, "--prefix", self.prefix]
        # Wide, so that no table cell is folded in the middle of an id.
        return CliRunner().invoke(app, argv, env={"COLUMNS": "250"})


@pytest.fixture
def cli(store: Store, prefix: str) -> Cli:
    return Cli(prefix)


def no_traceback(result: Result) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output


def one_error_line(result: Result, code: int) -> str:
    """Exit `code`, stderr one `error:` line, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    no_traceback(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def runs_of(agent: str, tool: str = "search_flights") -> list[str]:
    """The sample agent's 4 runs under another agent id (and tool name), as JSON text."""

    def escaped(text: str) -> str:
        return json.dumps(text)[1:-1]  # as it appears inside a JSON string

    return [
        run.replace(SAMPLE_AGENT, escaped(agent)).replace("search_flights", escaped(tool))
        for run in sample_runs()[SAMPLE_AGENT]
    ]


def learn(store: Store, agents: list[str], tool: str = "search_flights") -> None:
    """Store and learn each agent's runs through the worker's own functions."""
    payloads = [run for agent in agents for run in runs_of(agent, tool)]
    result = ingest(store, payloads, 8 * 1024 * 1024)
    assert not result.rejected, result.rejected
    for agent in agents:
        assert catch_up(store, agent, max_runs=500, config=EngineConfig()).learned == 4


# ------------------------------------------------ data is printed literally


@pytest.fixture
def hostile(cli: Cli, store: Store) -> Cli:
    learn(store, MARKUP_IDS, tool=HOSTILE_TOOL)
    return cli


@pytest.mark.parametrize(
    "command",
    [["agents"], ["stats"], ["retention", "--dry-run", "--max-runs", "2"], ["rebuild", "--all"]],
)
def test_every_agent_listing_prints_markup_ids_literally(hostile: Cli, command: list[str]) -> None:
    result = hostile(*command)
    assert result.exit_code == 0, result.output
    no_traceback(result)
    for agent in MARKUP_IDS:
        assert agent in result.stdout, (agent, result.stdout)
    assert "\N{THUMBS UP SIGN}" not in result.output


@pytest.mark.parametrize("agent", MARKUP_IDS)
def test_one_agents_state_prints_ids_tools_and_spans_literally(hostile: Cli, agent: str) -> None:
    plan = hostile("plan", agent)
    assert plan.exit_code == 0, plan.output
    assert f"tool-parallelism plan of {agent}" in plan.stdout
    assert HOSTILE_TOOL in plan.stdout
    stability = hostile("stability", agent)
    assert stability.exit_code == 0, stability.output
    assert f"stable prompt prefix of {agent}" in stability.stdout
    assert f"system-1-{HOSTILE_TOOL}" in stability.stdout
    hints = hostile("hints", agent, "--path", "openai", "--call-index", "2")
    assert hints.exit_code == 0, hints.output
    assert f"{agent}-d1" in hints.stdout  # the runtime's prefix id for that path
    rebuilt = hostile("rebuild", agent)
    assert rebuilt.exit_code == 0 and agent in rebuilt.stdout, rebuilt.output


def test_an_unknown_agent_names_the_markup_ids_in_its_error_line(hostile: Cli) -> None:
    line = one_error_line(hostile("plan", "[/]nobody"), EXIT_NOT_FOUND)
    assert "unknown agent '[/]nobody'" in line
    for agent in MARKUP_IDS:
        assert agent in line


def test_control_characters_in_data_are_shown_as_escapes(cli: Cli, store: Store) -> None:
    learn(store, [ESC_ID])
    shown = "esc\\x1b[31mred"
    for command in (["agents"], ["stats"], ["plan", ESC_ID], ["rebuild", "--all"]):
        result = cli(*command)
        assert result.exit_code == 0, result.output
        assert shown in result.stdout and "\x1b" not in result.output, (command, result.output)
    line = one_error_line(cli("hints", "nobody"), EXIT_NOT_FOUND)
    assert shown in line and "\x1b" not in line


# ------------------------------------------------------------- dead letters


DEEP = "[" * 1500 + "]" * 1500


@pytest.fixture
def odd_dead_letters(store: Store) -> Store:
    """Entries anyone with Redis access could push, next to a real one."""
    entries: list[str | bytes] = [
        dead_letter('{"id": "x"}', "a [bold]real[/bold] reason [/]", "ingest", agent_id="[/]"),
        # Our own entry around a payload nested past Python's recursion limit.
        json.dumps({"reason": "too deep", "stage": "ingest", "raw": DEEP}),
        DEEP,  # not an entry of ours at all, and as deep
        # A payload with a lone surrogate and an ANSI sequence (JSON escapes).
        '{"reason": "sur", "stage": "ingest", "raw": "{\\"a\\": \\"\\ud800 \\u001b[31m\\"}"}',
        b'\xff\xfe{"reason": "not UTF-8"}',
    ]
    store.client.rpush(store.keys.dead_letters(), *entries)
    return store


def test_dead_letters_list_reads_every_entry(cli: Cli, odd_dead_letters: Store) -> None:
    listed = cli("dead-letters", "list", "--json")
    assert listed.exit_code == 0, listed.output
    entries = json.loads(listed.stdout)["entries"]
    assert [e["index"] for e in entries] == [0, 1, 2, 3, 4]
    assert entries[0]["reason"] == "a [bold]real[/bold] reason [/]"
    assert entries[2]["reason"] == "not a dead-letter entry"
    assert entries[2]["raw_bytes"] == 3000
    assert entries[4]["reason"].startswith("not a dead-letter entry: not UTF-8")
    human = cli("dead-letters", "list")
    assert human.exit_code == 0, human.output
    no_traceback(human)
    assert "a [bold]real[/bold] reason [/]" in human.stdout and "[/]" in human.stdout


@pytest.mark.parametrize("index", range(5))
def test_dead_letters_show_prints_any_entry_safely(
    cli: Cli, odd_dead_letters: Store, index: int
) -> None:
    human = cli("dead-letters", "show", str(index))
    assert human.exit_code == 0, human.output
    no_traceback(human)
    assert "\x1b" not in human.output and "\ud800" not in human.output
    as_json = cli("dead-letters", "show", str(index), "--json")
    assert as_json.exit_code == 0, as_json.output
    item = json.loads(as_json.stdout)
    assert item["index"] == index
    expected_raw = {
        0: '{"id": "x"}',
        1: DEEP,
        2: DEEP,
        3: '{"a": "\ud800 \x1b[31m"}',  # the same string, read back from its escapes
        4: '\\xff\\xfe{"reason": "not UTF-8"}',
    }[index]
    assert item["raw"] == expected_raw
    if index == 1:
        assert DEEP in human.stdout  # shown as it is, not parsed
    if index == 3:
        assert '"a": "\\ud800 \\x1b[31m"' in human.stdout
    if index == 4:
        assert '\\xff\\xfe{"reason": "not UTF-8"}' in human.stdout


def test_dead_letters_replay_keeps_what_it_cannot_read(cli: Cli, odd_dead_letters: Store) -> None:
    result = cli("dead-letters", "replay", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["selected"], summary["still_invalid"], summary["removed"]) == (5, 5, 0)
    assert summary["remaining"] == 5


# ------------------------------------------------ files, URLs, stored values


def test_replay_and_submit_refuse_deep_files_with_one_line(cli: Cli, tmp_path: Path) -> None:
    deep_array = tmp_path / "deep.json"
    deep_array.write_text("[" * 1300 + "]" * 1300)
    line = one_error_line(cli("replay", str(deep_array)), EXIT_BAD_INPUT)
    assert "nested more than 128 levels deep" in line and "nothing stored" in line
    line = one_error_line(cli("submit", str(deep_array)), EXIT_BAD_INPUT)
    assert "nested more than 128 levels deep" in line and "nothing submitted" in line

    deep_lines = tmp_path / "deep.jsonl"
    deep_lines.write_text('{"a": ' * 1300 + "1" + "}" * 1300 + "\n")
    line = one_error_line(cli("replay", str(deep_lines)), EXIT_BAD_INPUT)
    assert "line 1: JSON nested more than 128 levels deep" in line
    line = one_error_line(cli("submit", str(deep_lines)), EXIT_BAD_INPUT)
    assert "line 1: JSON nested more than 128 levels deep" in line
    assert not (tmp_path / "spool").exists()


def test_a_bad_redis_url_is_exit_2_with_one_line_and_no_password(cli: Cli) -> None:
    for url in ("redis://u:secret@host:notaport", "redis://u:secret@host:6379/0?db=x"):
        for command in (["agents"], ["replay", "-"], ["dead-letters", "list"]):
            line = one_error_line(cli(*command, redis_url=url), EXIT_BAD_INPUT)
            assert "--redis-url (ADAPTIVE_REDIS_URL): not a valid URL" in line
            assert "secret" not in line


def test_an_unreadable_stored_value_is_exit_1_with_one_line(cli: Cli, store: Store) -> None:
    learn(store, ["fine"])
    store.client.hset(store.keys.counters(), "runs_ingested", "not a number")
    stats = cli("stats")
    assert stats.exit_code in (0, EXIT_FAILED), stats.output
    if stats.exit_code:
        one_error_line(stats, EXIT_FAILED)
    no_traceback(stats)
    # An agent id that is not UTF-8 (Redis keys are bytes).
    bad_key = store.keys.runs_index("").encode() + b"\xff\xfe"
    store.client.rpush(bad_key, "x")
    try:
        for command in (["agents"], ["retention", "--dry-run", "--max-runs", "1"]):
            result = cli(*command)
            assert result.exit_code in (0, EXIT_FAILED), result.output
            if result.exit_code:
                assert "not UTF-8" in one_error_line(result, EXIT_FAILED)
            no_traceback(result)
    finally:
        store.client.delete(bad_key)


# ----------------------------------------------------------------- replay


def test_replay_skips_and_dead_letters_each_bad_line_and_stores_the_rest(
    cli: Cli, store: Store, tmp_path: Path
) -> None:
    good = runs_of("replayed")
    lines = [
        good[0],  # 1
        "{not json",  # 2
        '{"a": ' * 300 + "1" + "}" * 300,  # 3: deeper than the limit
        "",  # 4: blank, not a record
        good[1],  # 5
        '{"id": "not-a-run"}',  # 6: JSON, but not a run
        good[2],  # 7
        '{"x": NaN}',  # 8: not strict JSON
        good[3],  # 9
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe bad bytes\n")  # 10: not UTF-8
    result = cli("replay", str(path), "--json")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    no_traceback(result)
    summary = json.loads(result.stdout)
    assert [s["line"] for s in summary["skipped"]] == [2, 3, 6, 8, 10]
    assert "nested more than 128 levels" in summary["skipped"][1]["reason"]
    assert "not UTF-8" in summary["skipped"][4]["reason"]
    assert (summary["runs_stored"], summary["learned"], summary["rejected"]) == (4, 4, 5)
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 5
    for error, number in zip(errors, [2, 3, 6, 8, 10], strict=True):
        assert error.startswith(f"error: {path}: line {number}: ")
        assert error.endswith("skipped and dead-lettered")
    cursor = store.cursor("replayed")
    assert (cursor.index_length, cursor.learned) == (4, 4)
    dead = [json.loads(e) for e in store.dead_letters()]
    assert len(dead) == 5
    assert sorted(d["stage"] for d in dead) == ["ingest", "replay", "replay", "replay", "replay"]
    raws = {d["raw"] for d in dead}
    assert {"{not json", '{"id": "not-a-run"}', '{"x": NaN}'} <= raws
    assert any(d.get("source") == f"{path} line 2" for d in dead)

    again = cli("replay", str(path))  # human output; the good runs are known now
    assert again.exit_code == EXIT_BAD_INPUT
    assert len(again.stderr.strip().splitlines()) == 5
    assert "already known" in again.stdout


def test_replay_of_many_bad_lines_prints_twenty_and_a_count(
    cli: Cli, store: Store, tmp_path: Path
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(f'{{"bad": {n}\n' for n in range(25)))
    result = cli("replay", str(path))
    assert result.exit_code == EXIT_BAD_INPUT
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 21
    assert errors[19].startswith(f"error: {path}: line 20: ")
    assert "5 more records skipped and dead-lettered" in errors[20]
    assert store.dead_letter_count() == 25


def test_replay_of_a_json_array_names_items(cli: Cli, store: Store, tmp_path: Path) -> None:
    runs = [json.loads(r) for r in runs_of("arrayed")]
    path = tmp_path / "runs.json"
    path.write_text(json.dumps([runs[0], {"id": "nope"}, runs[1], json.dumps(runs[2])]))
    result = cli("replay", str(path), "--json")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    summary = json.loads(result.stdout)
    assert summary["skipped"] == [{"item": 2, "reason": summary["skipped"][0]["reason"]}]
    assert summary["runs_stored"] == 3
    assert "item 2: " in result.stderr
    assert store.cursor("arrayed").learned == 3


# ------------------------------------------------------------------ hints


def test_hints_say_when_a_path_falls_back(cli: Cli, store: Store) -> None:
    learn(store, ["hinted"])
    (root_child,) = json.loads(store.client.get(store.keys.trie("hinted")))["root"]["children"]
    assert root_child == "openai"  # the capture's only LLM scope

    missing = cli("hints", "hinted", "--path", "nosuch", "--json")
    assert missing.exit_code == 0, missing.output
    got = json.loads(missing.stdout)
    assert (got["path"], got["matched_path"], got["fallback"]) == (["nosuch"], [], True)
    assert got["hints"]["prefix_id"] == "hinted-d1"
    note = missing.stderr.strip().splitlines()
    assert len(note) == 1 and note[0].startswith("note: ")
    assert "'nosuch'" in note[0] and "the root" in note[0]

    partial = cli("hints", "hinted", "--path", "openai/deeper", "--json")
    got = json.loads(partial.stdout)
    assert (got["matched_path"], got["fallback"]) == (["openai"], True)
    assert "stops at 'openai'" in partial.stderr

    exact = cli("hints", "hinted", "--path", "openai", "--json")
    got = json.loads(exact.stdout)
    assert (got["matched_path"], got["fallback"], got["call_index"]) == (["openai"], False, 1)
    assert exact.stderr == ""
    human = cli("hints", "hinted", "--path", "nosuch")
    assert human.exit_code == 0 and "note: path 'nosuch'" in human.stderr


# ----------------------------------------------------- celery entry points


def celery_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTIVE_")}
    env.update(
        PYTHONUNBUFFERED="1",
        ADAPTIVE_REDIS_URL=REDIS_URL,
        ADAPTIVE_METRICS_PORT="0",
        **extra,
    )
    return env


@pytest.mark.parametrize("command", [["worker"], ["beat"], ["flower"]])
@pytest.mark.parametrize(
    ("variable", "value"),
    [("ADAPTIVE_TASK_TIME_LIMIT_S", "abc"), ("ADAPTIVE_BROKER_URL", "redis://u:pw@h:notaport")],
)
def test_a_bad_setting_under_celery_is_one_line(
    tmp_path: Path, command: list[str], variable: str, value: str
) -> None:
    done = subprocess.run(
        [CELERY, "-A", "worker", *command], cwd=ROOT, env=celery_env(**{variable: value}),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("adaptive-worker: invalid settings: ") and variable in lines[0]
    assert "Traceback" not in done.stderr + done.stdout and "pw" not in done.stderr


def test_importing_the_app_with_a_bad_setting_raises_instead_of_exiting() -> None:
    """An agent importing the client must get an exception it can catch, not an exit."""
    code = (
        "from worker.settings import SettingsError\n"
        "try:\n    import worker.celery\n"
        "except SettingsError as exc:\n    print('caught', exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT,
        env=celery_env(ADAPTIVE_TASK_TIME_LIMIT_S="abc"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("caught invalid settings: ADAPTIVE_TASK_TIME_LIMIT_S")
