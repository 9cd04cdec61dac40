"""`make run` on the embedded default, as the README's first command.

Runs the real command in a subprocess with no ADAPTIVE_ variable set (so no
Redis: fakeredis, in-memory broker and a worker thread inside the process),
and checks what it prints against the captures of the real runtime: each
sample agent's plan groups, its default hints and its stable prompt prefix.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from adaptive_worker_client.hints import default_hints
from tests.goldens import load_capture

ROOT = Path(__file__).resolve().parents[1]
AGENTS = {"travel-openai": "relay-openai", "travel-anthropic": "relay-anthropic"}


def _sections(text: str) -> dict[str, str]:
    """The printed report split per agent (each starts with a rule naming it)."""
    starts = sorted((text.index(f"{agent}: "), agent) for agent in AGENTS)
    ends = [pos for pos, _ in starts[1:]] + [len(text)]
    return {agent: text[pos:end] for (pos, agent), end in zip(starts, ends, strict=True)}


@pytest.fixture(scope="module")
def make_run() -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTIVE_")}
    for var in ("COLUMNS", "LINES", "MAKEFLAGS", "MAKELEVEL"):
        env.pop(var, None)
    if shutil.which("make") is None:  # pragma: no cover - make is part of the README's setup
        pytest.fail("`make` is not installed; the README's `make run` needs it")
    return subprocess.run(
        ["make", "--no-print-directory", "run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_make_run_succeeds_without_a_traceback(
    make_run: subprocess.CompletedProcess[str],
) -> None:
    assert make_run.returncode == 0, make_run.stdout + make_run.stderr
    assert "Traceback" not in make_run.stdout + make_run.stderr
    assert "embedded default" in make_run.stderr
    assert "learned 8 runs" in make_run.stderr


@pytest.mark.parametrize("agent", list(AGENTS))
def test_make_run_prints_the_learned_plan_hints_and_stable_prefix(
    make_run: subprocess.CompletedProcess[str], agent: str
) -> None:
    capture = load_capture(AGENTS[agent])
    section = _sections(make_run.stdout)[agent]
    assert "4 of 4 runs learned" in section

    rows = re.findall(r"(fanout:\S+)\s*│\s*([\w, ]+?)\s*│", section)
    groups = capture.value("plan")["parallel_groups"]
    expected = [(g["group_id"], ", ".join(g["tool_names"])) for g in groups]
    assert rows == expected

    hints = default_hints(capture.value("trie"))
    assert hints is not None
    for name, value in hints.items():
        assert re.search(rf"│ {name}\s+│ {re.escape(str(value))}\s+│", section), (name, section)

    stability = capture.value("acg_stability")
    assert stability["stable_prefix_length"] == 6
    observations = stability["total_observations"]
    assert f"stable prompt prefix: 6 blocks over {observations} observations" in section
    for n, score in enumerate(stability["scores"][:6], start=1):
        assert f"  {n}. {score['span_id']}\n" in section
