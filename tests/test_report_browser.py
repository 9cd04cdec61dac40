"""The HTML report in a real browser: Debian's headless chromium renders it
without console messages (no blocked fetch, no script, no error), shows
every section and its plots, and paints a non-blank page.

Skips only when chromium is not installed (`.ci/run` installs it). Each
chromium gets its own profile directory, so parallel runs never share one.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
import redis

from storage.store import Store
from tasks.insight import build_report
from tests.goldens import load_capture
from tests.test_insight import load_into
from tests.test_report import HOSTILE, SECTIONS, hostile_runs
from worker.cli.report import render_html

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="Debian's chromium is not installed (.ci/run installs it with apt-get)",
    ),
]
WIDTH, HEIGHT = 1200, 2400


def chromium(page: Path, profile: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """One headless chromium run on `page`; the console goes to stderr (CONSOLE lines)."""
    assert CHROMIUM is not None
    argv = [
        CHROMIUM,
        "--headless",
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        f"--window-size={WIDTH},{HEIGHT}",
        *(["--no-sandbox"] if os.geteuid() == 0 else []),  # chromium refuses root otherwise
        *flags,
        page.as_uri(),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def png_pixels(path: Path) -> tuple[int, int, bytes]:
    """Width, height and the inflated image data of a PNG (no imaging library)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, zlib.decompress(idat)


@pytest.fixture
def report_page(real_redis: redis.Redis, prefix: str, tmp_path: Path) -> Path:
    capture = load_capture("relay-openai")
    store = load_into(real_redis, prefix, capture)
    try:
        page = tmp_path / "report.html"
        page.write_text(render_html(build_report(store, capture.agent_id)), encoding="utf-8")
    finally:
        store.delete_prefix()
    return page


def test_the_console_check_sees_what_a_page_logs(tmp_path: Path) -> None:
    """The control: the same flags do report a page's console message, so the
    empty console below means something."""
    page = tmp_path / "control.html"
    page.write_text("<!DOCTYPE html><p>x</p><script>console.error('control-42')</script>")
    done = chromium(page, tmp_path / "profile", "--dump-dom")
    assert any("control-42" in line for line in console_lines(done.stderr))


def test_the_report_renders_every_section_without_console_messages(
    report_page: Path, tmp_path: Path
) -> None:
    done = chromium(report_page, tmp_path / "profile", "--dump-dom")
    assert console_lines(done.stderr) == []
    dom = done.stdout
    for heading in SECTIONS:
        assert re.search(rf"<h2>{re.escape(heading)}</h2>", dom), heading
    # The plots survived parsing as SVG: polylines in the line charts and the
    # sparklines, rects in the bar charts.
    assert dom.count("<svg") >= 12
    assert dom.count("<polyline") >= 10 and dom.count("<rect") >= 10
    assert "<script" not in dom


def test_the_screenshot_is_a_painted_page(report_page: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    done = chromium(report_page, tmp_path / "profile", f"--screenshot={shot}")
    assert console_lines(done.stderr) == []
    width, height, pixels = png_pixels(shot)
    assert (width, height) == (WIDTH, HEIGHT)
    assert shot.stat().st_size > 50_000  # a blank page compresses to a few KB
    # Text, tables and coloured plots: many distinct byte values (a blank
    # page has the background colour and PNG filter bytes only).
    assert len(set(pixels)) > 100


def test_a_hostile_agent_id_stays_text_in_the_browser(
    real_redis: redis.Redis, prefix: str, tmp_path: Path
) -> None:
    from tasks.learning import catch_up, ingest
    from worker.engine.fold import EngineConfig

    store = Store(real_redis, prefix)
    try:
        ingest(store, hostile_runs(load_capture("relay-openai")), 8 << 20)
        catch_up(store, HOSTILE, max_runs=100, config=EngineConfig())
        page = tmp_path / "hostile.html"
        page.write_text(render_html(build_report(store, HOSTILE)), encoding="utf-8")
    finally:
        store.delete_prefix()
    done = chromium(page, tmp_path / "profile", "--dump-dom")
    assert console_lines(done.stderr) == []  # nothing ran, nothing was blocked
    assert "<script" not in done.stdout
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in done.stdout
