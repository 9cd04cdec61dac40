"""`adaptive-worker report AGENT`: terminal, `--json` and `--html`, and its exit codes.

Runs in-process through typer's CliRunner on the real Redis under a private
prefix, with the captured `cap-agent` state loaded (tests/test_insight.py).
Expected numbers come from the captures (the runtime's trie and plan) and
from `tasks.insight`, which tests/test_insight.py checks by hand.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import Result
from typer.testing import CliRunner

from storage.store import Store
from tasks import insight
from tests.conftest import REDIS_URL
from tests.goldens import CAPTURES, Capture, load_capture
from tests.test_insight import load_into
from worker.cli import EXIT_BAD_INPUT, EXIT_NOT_FOUND, EXIT_UNAVAILABLE, app

pytestmark = pytest.mark.redis

SECTIONS = (
    "LLM calls",
    "Tools",
    "Parallel groups",
    "Run time vs tool time",
    "Prompt stability",
    "Learning health",
)
HOSTILE = "<script>alert(1)</script>"
MARKUP = "[bold red]loud[/bold red]"


@pytest.fixture(autouse=True)
def _own_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("ADAPTIVE_")]:
        monkeypatch.delenv(var)


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """A terminal wide enough that no table cell wraps (CliRunner's is 80 columns)."""
    from worker.cli import render

    monkeypatch.setattr(render.out, "width", 240)


@pytest.fixture
def store(real_redis: redis.Redis, prefix: str) -> Iterator[Store]:
    store = Store(real_redis, prefix)
    yield store
    store.delete_prefix()


def run_cli(store: Store, *args: str, redis_url: str = REDIS_URL) -> Result:
    argv = [*args, "--redis-url", redis_url, "--prefix", store.keys.prefix]
    return CliRunner().invoke(app, argv)


def one_error_line(result: Result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def captured(store: Store, real_redis: redis.Redis) -> Capture:
    capture = load_capture("relay-openai")
    load_into(real_redis, store.keys.prefix, capture)
    return capture


def without_clock(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != "generated_at"}


# ------------------------------------------------------------------ terminal


def test_terminal_report_shows_every_section(store: Store, captured: Capture, wide: None) -> None:
    result = run_cli(store, "report", captured.agent_id)
    assert result.exit_code == 0, result.output
    for heading in SECTIONS:
        assert heading in result.stdout
    # A few numbers as the captures give them: the trie root's output tokens
    # p50 / p90 / p99 (196.75 / 213 / 213), the plan's groups, the stable prefix.
    assert "196.75 / 213 / 213" in result.stdout
    for group in captured.value("plan")["parallel_groups"]:
        assert group["group_id"] in result.stdout
    assert "6 blocks" in result.stdout
    # search_flights' latency p50, by hand in test_insight: 93.634 ms.
    assert re.search(r"search_flights.*93\.6 /", result.stdout)


# ---------------------------------------------------------------------- JSON


@pytest.mark.parametrize("name", CAPTURES)
def test_json_is_the_insight_report(store: Store, real_redis: redis.Redis, name: str) -> None:
    capture = load_capture(name)
    load_into(real_redis, store.keys.prefix, capture)
    result = run_cli(store, "report", capture.agent_id, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    expected = insight.build_report(store, capture.agent_id).as_dict()
    assert without_clock(data) == without_clock(expected)
    # And against the capture itself, independently of tasks.insight:
    root = capture.value("trie")["root"]["predictions_any_index"]
    (row,) = [r for r in data["llm"] if r["path"] == "" and r["call_index"] is None]
    assert row["requests"] == root["remaining_calls"]["sample_count"] == 10
    assert row["output_tokens"]["p50"] == root["output_tokens"]["p50"]
    assert row["interarrival_ms"]["p90"] == root["interarrival_ms"]["p90"]
    groups = capture.value("plan")["parallel_groups"]
    assert [g["group_id"] for g in data["groups"]] == [g["group_id"] for g in groups]
    stability = capture.value("acg_stability")
    assert data["stability"][0]["stable_prefix_blocks"] == stability["stable_prefix_length"]
    assert data["stability"][0]["fingerprint"] == stability["stable_prefix_fingerprint"]
    assert data["health"]["runs_learned"] == 4 and data["run_ids"] == capture.index


def test_runs_option_bounds_the_runs_read(store: Store, captured: Capture) -> None:
    result = run_cli(store, "report", captured.agent_id, "--json", "--runs", "1")
    data = json.loads(result.stdout)
    assert data["run_ids"] == captured.index[-1:] and data["health"]["runs_read"] == 1


# ---------------------------------------------------------------------- HTML


def external_references(html: str) -> list[str]:
    """Anything a browser would fetch: src/href/xlink:href/CSS url()/@import to
    a scheme or a network path, and script elements at all."""
    found = re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:[a-z][a-z0-9+.-]*:|//)""", html, re.I)
    found += re.findall(r"url\(|@import|<script|<link|<iframe|<object|<embed|<img", html, re.I)
    return found


def test_html_is_one_self_contained_file(store: Store, captured: Capture, tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    result = run_cli(store, "report", captured.agent_id, "--html", str(target))
    assert result.exit_code == 0, result.output
    assert str(target) in result.stdout
    html = target.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert external_references(html) == []
    assert "default-src 'none'" in html  # the CSP forbids fetching anything anyway
    for section_id, heading in zip(
        ("llm", "tools", "groups", "runs", "stability", "health"), SECTIONS, strict=True
    ):
        assert f'<section id="{section_id}"><h2>{heading}</h2>' in html
    assert html.count("<svg") >= 4  # latency plot, tool bars, run plot, prefix bars (+ sparks)
    assert "196.75 / 213 / 213" in html
    assert captured.value("acg_stability")["stable_prefix_fingerprint"] in html


def test_html_and_json_together(store: Store, captured: Capture, tmp_path: Path) -> None:
    target = tmp_path / "r.html"
    result = run_cli(store, "report", captured.agent_id, "--html", str(target), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["agent_id"] == captured.agent_id
    assert target.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def hostile_runs(capture: Capture) -> list[str]:
    """The captured runs as agent HOSTILE, with one tool renamed HOSTILE and
    another MARKUP (new run ids)."""
    lines = []
    for raw in capture.runs:
        run = json.loads(raw)
        run["id"] = str(uuid.uuid4())
        run["agent_id"] = HOSTILE
        for call in run["calls"]:
            if call["name"] == "get_weather":
                call["name"] = HOSTILE
            elif call["name"] == "rank_options":
                call["name"] = MARKUP
        lines.append(json.dumps(run))
    return lines


@pytest.fixture
def hostile(store: Store, tmp_path: Path) -> None:
    records = tmp_path / "hostile.jsonl"
    records.write_text("".join(line + "\n" for line in hostile_runs(load_capture("relay-openai"))))
    result = run_cli(store, "replay", str(records), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["learned"] == 4


def test_html_escapes_a_hostile_agent_id_and_tool_name(
    store: Store, hostile: None, tmp_path: Path
) -> None:
    target = tmp_path / "hostile.html"
    result = run_cli(store, "report", HOSTILE, "--html", str(target))
    assert result.exit_code == 0, result.output
    html = target.read_text(encoding="utf-8")
    assert HOSTILE not in html and "<script" not in html
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert html.count(escaped) >= 3  # title, heading, the tool's rows and bar label
    assert external_references(html) == []
    # The hostile tool ran beside the searches: the plan's groups name it too.
    groups = html.split('<section id="groups">')[1].split("</section>")[0]
    assert escaped in groups
    assert "[bold red]loud[/bold red]" in html  # markup is only text in HTML


def test_terminal_prints_hostile_names_literally(store: Store, hostile: None, wide: None) -> None:
    result = run_cli(store, "report", HOSTILE)
    assert result.exit_code == 0, result.output
    assert HOSTILE in result.stdout  # as text, nothing interpreted
    assert MARKUP in result.stdout  # rich markup shown, not applied
    data = json.loads(run_cli(store, "report", HOSTILE, "--json").stdout)
    assert {HOSTILE, MARKUP} <= {t["name"] for t in data["tools"]}


# ---------------------------------------------------------------- exit codes


def test_an_unknown_agent_is_exit_4(store: Store, captured: Capture) -> None:
    line = one_error_line(run_cli(store, "report", "nobody"), EXIT_NOT_FOUND)
    assert "unknown agent 'nobody'" in line and captured.agent_id in line


def test_unreachable_redis_is_exit_3(store: Store) -> None:
    result = run_cli(store, "report", "x", redis_url="redis://127.0.0.1:1/0")
    one_error_line(result, EXIT_UNAVAILABLE)


def test_an_unwritable_html_file_is_exit_2(store: Store, captured: Capture, tmp_path: Path) -> None:
    target = tmp_path / "missing-dir" / "r.html"
    line = one_error_line(
        run_cli(store, "report", captured.agent_id, "--html", str(target)), EXIT_BAD_INPUT
    )
    assert "cannot write" in line


def test_report_help_imports_no_backend() -> None:
    """`report --help` stays as light as every other command's help (issue 10)."""
    import subprocess
    import sys

    heavy = {"redis", "celery", "kombu", "storage", "tasks", "adaptive_worker_client"}
    code = (
        "import sys\n"
        "from worker.cli import app\n"
        "try:\n    app(['report', '--help'], prog_name='adaptive-worker')\n"
        "except SystemExit:\n    pass\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr)\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "--html" in done.stdout and "--runs" in done.stdout
    assert heavy.isdisjoint(done.stderr.split()), heavy & set(done.stderr.split())
