"""`report AGENT`: what learning buys one agent, in the terminal, as HTML or as JSON.

Every number comes from `tasks.insight.build_report` (this module only
formats: seconds shown as milliseconds, shares as percentages). The HTML is
one self-contained file: inline CSS and SVG drawn here, no script, no
external reference, and a Content-Security-Policy that forbids loading
anything, so it opens offline and a hostile agent id or tool name (escaped
everywhere) could not run or fetch anything even if escaping failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

import typer

from worker.cli.options import (
    EXIT_BAD_INPUT,
    AgentArg,
    AsJson,
    Prefix,
    RedisUrl,
    fail,
    guard,
    open_store,
    settings_from,
)

if TYPE_CHECKING:
    from tasks.insight import LlmRow, Quantiles, Report, StabilityRow

SPARK = "▁▂▃▄▅▆▇█"
# Most points of a terminal sparkline, an HTML sparkline and an HTML plot
# line (more runs are averaged in consecutive buckets: insight.downsample).
TERMINAL_TREND_POINTS = 24
SPARK_POINTS = 40
PLOT_POINTS = 120
# Runs listed in the terminal's and the HTML's run tables (the newest).
TERMINAL_RUNS = 20
HTML_RUNS = 50
# Most call-index lines drawn in the HTML latency plot (the table has all).
MAX_PLOT_SERIES = 8
PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f")

SECTIONS = (
    ("llm", "LLM calls"),
    ("tools", "Tools"),
    ("groups", "Parallel groups"),
    ("runs", "Run time vs tool time"),
    ("stability", "Prompt stability"),
    ("health", "Learning health"),
)


# ------------------------------------------------------------------- numbers


def ms(value_s: float | None) -> str:
    return "-" if value_s is None else f"{value_s * 1000:.1f}"


def num(value: float | int | None) -> str:
    return "-" if value is None else f"{value:g}"


def pct(share: float | None) -> str:
    return "-" if share is None else f"{share:.0%}"


def triple(q: Quantiles, fmt: Any = num) -> str:
    """p50 / p90 / p99 in one cell."""
    return "-" if not q.count else f"{fmt(q.p50)} / {fmt(q.p90)} / {fmt(q.p99)}"


def path_name(path: str) -> str:
    return "(root)" if path == "" else path


def index_name(index: int | None) -> str:
    return "any" if index is None else f"#{index}"


def sparkline(values: Sequence[float | None]) -> str:
    """Unicode sparkline scaled to the row's own range; a gap where a run had no such call."""
    present = [v for v in values if v is not None]
    if not present:
        return ""
    low, high = min(present), max(present)
    span = high - low
    top = len(SPARK) - 1
    return "".join(
        " " if v is None else SPARK[round((v - low) / span * top) if span > 0 else top // 2]
        for v in values
    )


# ------------------------------------------------------------------ terminal


def print_terminal(report: Report) -> None:
    from rich.text import Text

    from tasks.insight import downsample
    from worker.cli.render import kv_table, out, safe, table

    h = report.health
    out.rule(
        Text.assemble(
            "report of ",
            (safe(report.agent_id), "bold"),
            f" ({len(report.run_ids)} runs read, {h.runs_learned} of {h.runs_stored} learned)",
        )
    )
    out.print("LLM calls", style="bold", highlight=False)
    out.print(
        "per trie path and call index (#n; any: all). Learned (t-digests of the trie's "
        "accumulators): requests, output tokens, iat ms, sensitivity; measured on the runs "
        "read: latency ms and its trend over them (oldest to newest). "
        "Triples are p50 / p90 / p99.",
        highlight=False,
    )
    if report.llm:
        llm = table(None)
        columns = ("call", "requests", "output tokens", "iat ms", "sens", "latency ms", "trend")
        for column in columns:
            llm.add_column(
                column,
                overflow="fold",
                justify="left" if column in {"call", "trend"} else "right",
                no_wrap=column == "trend",
            )
        for row in report.llm:
            llm.add_row(
                f"{path_name(row.path)} {index_name(row.call_index)}",
                str(row.requests),
                triple(row.output_tokens),
                triple(row.interarrival_ms),
                num(row.latency_sensitivity),
                triple(row.latency_s, ms),
                sparkline(downsample(row.trend_s, TERMINAL_TREND_POINTS)),
            )
        out.print(llm)
    else:
        out.print("no LLM call learned or found in the runs", highlight=False)

    out.print("Tools", style="bold", highlight=False)
    if report.tools:
        tools = table(None)
        for column in ("tool", "calls", "latency ms p50 / p90 / p99", "mean ms", "unfinished"):
            tools.add_column(
                column, overflow="fold", justify="left" if column == "tool" else "right"
            )
        for tool in report.tools:
            tools.add_row(
                tool.name,
                str(tool.latency_s.count),
                triple(tool.latency_s, ms),
                ms(tool.latency_s.mean),
                str(tool.unfinished),
            )
        out.print(tools)
    else:
        out.print("no tool call in the runs read", highlight=False)

    out.print("Parallel groups (the plan)", style="bold", highlight=False)
    if report.groups:
        groups = table(None)
        for column in ("group", "tools", "ran together", "runs with all its tools"):
            groups.add_column(
                column, overflow="fold", justify="left" if column in {"group", "tools"} else "right"
            )
        for g in report.groups:
            groups.add_row(
                g.group_id, ", ".join(g.tool_names), str(g.runs_together), str(g.runs_with_tools)
            )
        out.print(groups)
    else:
        out.print("no plan: no tools were seen running side by side", highlight=False)

    out.print("Run time vs tool time (ms)", style="bold", highlight=False)
    t = report.totals
    if report.runs:
        runs = table(None)
        for column in ("run", "wall", "LLM", "tools 1 by 1", "tools busy", "saved"):
            runs.add_column(column, overflow="fold", justify="left" if column == "run" else "right")
        shown = report.runs[-TERMINAL_RUNS:]
        for r in shown:
            runs.add_row(
                r.run_id,
                ms(r.wall_s),
                ms(r.llm_s),
                ms(r.tool_sum_s),
                ms(r.tool_busy_s),
                ms(r.saved_s),
            )
        runs.add_row(
            f"all {t.runs} runs",
            ms(t.wall_s),
            "",
            ms(t.tool_sum_s),
            ms(t.tool_busy_s),
            ms(t.saved_s),
        )
        out.print(runs)
        if len(shown) < len(report.runs):
            out.print(f"(the newest {len(shown)} runs shown; --json has all)", highlight=False)
        out.print(
            f"running tools side by side saved {ms(t.saved_s)} ms of {ms(t.tool_sum_s)} ms "
            f"of tool time ({pct(t.saved_share)})",
            highlight=False,
        )
    else:
        out.print("no runs read", highlight=False)

    out.print("Prompt stability", style="bold", highlight=False)
    if report.stability:
        for s in report.stability:
            rows = stability_rows(s)
            out.print(kv_table(None, rows))
    else:
        out.print("no prompt stability learned", highlight=False)

    out.print(kv_table("Learning health", health_rows(report)))
    for note_text in report.notes:
        out.print(f"note: {note_text}", highlight=False)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value)


def stability_rows(s: StabilityRow) -> dict[str, str]:
    tokens = s.prefix_tokens
    return {
        "learning key": s.learning_key,
        "seed profile": "yes (what a starting agent reads)" if s.seed else "no",
        "observations": f"{s.observations} (window {s.window})",
        "stable prefix": f"{s.stable_prefix_blocks} blocks",
        "est. prefix tokens p50 / p90": (
            f"{num(_round(tokens.p50))} / {num(_round(tokens.p90))} ({tokens.count} calls)"
            if tokens.count
            else "- (no prompt token counts in the runs)"
        ),
        "stable spans": f"{s.stable_spans} of {s.spans}",
        "prompt share in the prefix": pct(s.prefix_share),
        "fingerprint": s.fingerprint or "-",
    }


def health_rows(report: Report) -> dict[str, str]:
    h = report.health
    return {
        "runs stored": f"{h.runs_stored} ({h.runs_retained} retained, {h.runs_trimmed} trimmed)",
        "runs learned": str(h.runs_learned),
        "lag": f"{h.lag_runs} runs"
        + (
            f", oldest waiting {h.oldest_unlearned_age_s:.1f} s"
            if h.oldest_unlearned_age_s is not None
            else ""
        ),
        "dead letters": f"{h.dead_letters} (of the newest {h.dead_letters_scanned} of "
        f"{h.dead_letters_total} entries)",
        "last commit": h.last_commit_at or "-",
        "last run stored": h.last_stored_at or "-",
        "state version": str(h.state_version),
        "runs read": f"{h.runs_read} ({h.runs_unreadable} unreadable)",
    }


# ---------------------------------------------------------------------- HTML


def _esc(value: object) -> str:
    """Text for HTML: terminal-unsafe characters and lone surrogates as escapes
    (the file must encode), then HTML-escaped, quotes included."""
    import html

    from worker.cli.render import safe

    return html.escape(safe(value), quote=True)


def _svg_line_chart(
    series: Sequence[tuple[str, Sequence[float | None]]],
    *,
    unit: str,
    scale: float = 1000.0,
    width: int = 760,
    height: int = 240,
    label: str,
) -> str:
    """Lines over run positions (x: runs in index order), y from 0; None breaks a line."""
    from tasks.insight import downsample

    left, right, top, bottom = 56, 12, 12, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    runs = max((len(vs) for _, vs in series), default=0)
    series = [(name, downsample(vs, PLOT_POINTS)) for name, vs in series]
    values = [v * scale for _, vs in series for v in vs if v is not None]
    n = max((len(vs) for _, vs in series), default=0)
    high = max(values, default=0.0) or 1.0
    parts = [
        f'<svg class="chart" role="img" aria-label="{_esc(label)}" width="{width}" '
        f'height="{height + 18 * ((len(series) + 2) // 3)}" viewBox="0 0 {width} '
        f'{height + 18 * ((len(series) + 2) // 3)}" xmlns="http://www.w3.org/2000/svg">'
    ]
    for k in range(5):
        y = top + plot_h - plot_h * k / 4
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" class="axis" text-anchor="end">'
            f"{high * k / 4:.3g}</text>"
        )
    parts.append(
        f'<text x="{left}" y="{top + plot_h + 16}" class="axis">run 1</text>'
        f'<text x="{width - right}" y="{top + plot_h + 16}" class="axis" text-anchor="end">'
        f"run {runs}</text>"
        f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 16}" class="axis" '
        f'text-anchor="middle">{_esc(unit)} per run, oldest to newest'
        f"{'' if n == runs else f' (each point: the mean of ~{runs / n:.3g} runs)'}</text>"
    )

    def x_of(i: int) -> float:
        return left + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    for s, (name, vs) in enumerate(series):
        color = PALETTE[s % len(PALETTE)]
        segment: list[str] = []
        segments: list[list[str]] = []
        for i, v in enumerate(vs):
            if v is None:
                if segment:
                    segments.append(segment)
                segment = []
                continue
            y = top + plot_h - plot_h * (v * scale) / high
            segment.append(f"{x_of(i):.1f},{y:.1f}")
        if segment:
            segments.append(segment)
        for points in segments:
            if len(points) == 1:
                cx, cy = points[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{color}"/>')
            else:
                parts.append(
                    f'<polyline points="{" ".join(points)}" fill="none" stroke="{color}" '
                    'stroke-width="2"/>'
                )
        lx = left + (s % 3) * (plot_w / 3)
        ly = height + 18 * (s // 3) + 2
        parts.append(
            f'<rect x="{lx:.1f}" y="{ly}" width="12" height="4" fill="{color}"/>'
            f'<text x="{lx + 16:.1f}" y="{ly + 6}" class="legend">{_esc(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _svg_spark(values: Sequence[float | None], width: int = 120, height: int = 22) -> str:
    from tasks.insight import downsample

    values = downsample(values, SPARK_POINTS)
    present = [v for v in values if v is not None]
    if not present:
        return ""
    low, high = min(present), max(present)
    span = (high - low) or 1.0
    n = len(values)
    points = []
    for i, v in enumerate(values):
        if v is not None:
            x = (width - 4) * i / max(n - 1, 1) + 2
            points.append(f"{x:.1f},{height - 3 - (height - 6) * (v - low) / span:.1f}")
    shape = (
        f'<polyline points="{" ".join(points)}" fill="none" stroke="#2563eb" stroke-width="1.5"/>'
        if len(points) > 1
        else f'<circle cx="{points[0].split(",")[0]}" cy="{points[0].split(",")[1]}" r="2" '
        'fill="#2563eb"/>'
    )
    return (
        f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'xmlns="http://www.w3.org/2000/svg">{shape}</svg>'
    )


def _svg_bars(
    rows: Sequence[tuple[str, Sequence[tuple[float, str]], str]],
    *,
    label: str,
    width: int = 760,
    high: float | None = None,
) -> str:
    """Horizontal bars: per row, overlaid (value, color) bars and a text at the end."""
    left, right, bar_h, gap = 200, 150, 14, 10
    plot_w = width - left - right
    top_value = high or max((v for _, bars, _ in rows for v, _ in bars), default=0.0) or 1.0
    height = len(rows) * (bar_h + gap) + gap
    parts = [
        f'<svg class="chart" role="img" aria-label="{_esc(label)}" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">'
    ]
    for i, (name, bars, text) in enumerate(rows):
        y = gap + i * (bar_h + gap)
        shown = name if len(name) <= 30 else name[:29] + "…"
        parts.append(
            f'<text x="{left - 8}" y="{y + bar_h - 3}" class="axis" text-anchor="end">'
            f"{_esc(shown)}</text>"
        )
        for value, color in sorted(bars, key=lambda b: -b[0]):
            w = plot_w * max(0.0, value) / top_value
            parts.append(
                f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}"/>'
            )
        parts.append(
            f'<text x="{left + plot_w + 8}" y="{y + bar_h - 3}" class="axis">{_esc(text)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#111827;
background:#f9fafb}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #e5e7eb;padding-bottom:4px}
.sub{color:#6b7280;margin:0 0 16px} .note{color:#6b7280;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:10px 14px;min-width:150px}
.card b{display:block;font-size:20px} .card span{color:#6b7280;font-size:12px}
table{border-collapse:collapse;background:#fff;margin:8px 0;font-size:13px}
th,td{border:1px solid #e5e7eb;padding:4px 8px;text-align:right;vertical-align:middle}
th{background:#f3f4f6} td.l,th.l{text-align:left}
table.kv{min-width:640px} table.kv th:last-child{text-align:left;word-break:break-all;
font-weight:normal;font-family:ui-monospace,monospace;font-size:12px;max-width:760px}
table.kv td:last-child{text-align:left;word-break:break-all}
.chart{background:#fff;border:1px solid #e5e7eb;border-radius:6px;margin:8px 0}
.grid{stroke:#e5e7eb;stroke-width:1} .axis{font-size:11px;fill:#6b7280}
.legend{font-size:12px;fill:#374151}
code{font-size:12px}
"""


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """An HTML table; the first `left` columns left-aligned. Cells are HTML already."""
    head = "".join(
        f'<th class="l">{_esc(h)}</th>' if i < left else f"<th>{_esc(h)}</th>"
        for i, h in enumerate(headers)
    )
    thead = f"<thead><tr>{head}</tr></thead>" if any(headers) else ""
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>" for i, c in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def _llm_series(report: Report) -> list[tuple[str, Sequence[float | None]]]:
    root = [r for r in report.llm if r.path == ""]
    series: list[tuple[str, Sequence[float | None]]] = []
    for row in root[:MAX_PLOT_SERIES]:
        name = (
            "all LLM calls (mean per run)" if row.call_index is None else f"call {row.call_index}"
        )
        series.append((name, row.trend_s))
    return series


def render_html(report: Report) -> str:
    """The whole report as one self-contained HTML document."""
    h = report.health
    t = report.totals
    root_any: LlmRow | None = next(
        (r for r in report.llm if r.path == "" and r.call_index is None), None
    )
    seeds = [s for s in report.stability if s.seed] or list(report.stability)
    cards = [
        (f"{len(report.run_ids)}", "runs read"),
        (ms(root_any.latency_s.p50) + " ms" if root_any else "-", "LLM call latency p50"),
        (num(root_any.output_tokens.p50) if root_any else "-", "output tokens p50 (learned)"),
        (str(len(report.groups)), "parallel groups in the plan"),
        (pct(t.saved_share), "tool time saved side by side"),
        (f"{seeds[0].stable_prefix_blocks} blocks" if seeds else "-", "stable prompt prefix"),
        (f"{h.lag_runs}", "runs waiting (lag)"),
    ]
    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>adaptive-worker report: {_esc(report.agent_id)}</title>",
        f"<style>{CSS}</style></head><body><main>",
        f"<h1>What learning buys <code>{_esc(report.agent_id)}</code></h1>",
        f'<p class="sub">prefix <code>{_esc(report.prefix)}</code>, generated '
        f"{_esc(report.generated_at)}, from the learned state and the newest "
        f"{len(report.run_ids)} retained runs</p>",
        '<div class="cards">'
        + "".join(
            f'<div class="card"><b>{_esc(v)}</b><span>{_esc(k)}</span></div>' for v, k in cards
        )
        + "</div>",
    ]

    out.append('<section id="llm"><h2>LLM calls</h2>')
    out.append(
        '<p class="note">Per trie path (the call name; the root is all LLM calls) and call '
        "index (any: all of them). Requests, output tokens, inter-arrival time (iat) and "
        "latency sensitivity are LEARNED (t-digest quantiles of the trie's accumulators); "
        "latency is MEASURED on the runs read. Triples are p50 / p90 / p99.</p>"
    )
    if report.llm:
        out.append(
            _svg_line_chart(
                _llm_series(report), unit="ms", label="LLM call latency per run", scale=1000.0
            )
        )
        out.append(
            _table(
                [
                    "path",
                    "index",
                    "requests",
                    "output tokens",
                    "iat ms",
                    "sensitivity",
                    "latency ms",
                    "trend",
                ],
                [
                    [
                        _esc(path_name(r.path)),
                        _esc(index_name(r.call_index)),
                        _esc(r.requests),
                        _esc(triple(r.output_tokens)),
                        _esc(triple(r.interarrival_ms)),
                        _esc(num(r.latency_sensitivity)),
                        _esc(triple(r.latency_s, ms)),
                        _svg_spark(r.trend_s),
                    ]
                    for r in report.llm
                ],
                left=2,
            )
        )
    else:
        out.append("<p>No LLM call learned or found in the runs.</p>")
    out.append("</section>")

    out.append('<section id="tools"><h2>Tools</h2>')
    if report.tools:
        out.append(
            '<p class="note">Measured on the runs read: completed calls per tool; the bar is '
            "the p50 latency, the lighter bar p90.</p>"
        )
        out.append(
            _svg_bars(
                [
                    (
                        tool.name,
                        [
                            (tool.latency_s.p90 or 0.0, "#93c5fd"),
                            (tool.latency_s.p50 or 0.0, "#2563eb"),
                        ],
                        f"p50 {ms(tool.latency_s.p50)} ms",
                    )
                    for tool in report.tools
                ],
                label="tool latency",
            )
        )
        out.append(
            _table(
                ["tool", "calls", "latency ms p50 / p90 / p99", "mean ms", "unfinished"],
                [
                    [
                        _esc(tool.name),
                        _esc(tool.latency_s.count),
                        _esc(triple(tool.latency_s, ms)),
                        _esc(ms(tool.latency_s.mean)),
                        _esc(tool.unfinished),
                    ]
                    for tool in report.tools
                ],
            )
        )
    else:
        out.append("<p>No tool call in the runs read.</p>")
    out.append("</section>")

    out.append('<section id="groups"><h2>Parallel groups</h2>')
    if report.groups:
        out.append(
            '<p class="note">The plan\'s groups: tools the runtime may run side by side. '
            "&ldquo;Ran together&rdquo;: runs in which all of the group's tools were running at "
            "one instant.</p>"
        )
        out.append(
            _table(
                ["group", "tools", "ran together (runs)", "runs with all its tools"],
                [
                    [
                        f"<code>{_esc(g.group_id)}</code>",
                        _esc(", ".join(g.tool_names)),
                        _esc(g.runs_together),
                        _esc(g.runs_with_tools),
                    ]
                    for g in report.groups
                ],
                left=2,
            )
        )
    else:
        out.append("<p>No plan: no tools were seen running side by side.</p>")
    out.append("</section>")

    out.append('<section id="runs"><h2>Run time vs tool time</h2>')
    if report.runs:
        out.append(
            f'<p class="note">Per run: wall time, tool time one after another (the sum of '
            f"tool durations) and the time tools were busy side by side (the union of their "
            f"intervals). Running them side by side saved {_esc(ms(t.saved_s))} ms of "
            f"{_esc(ms(t.tool_sum_s))} ms of tool time over {t.runs} runs "
            f"({_esc(pct(t.saved_share))}).</p>"
        )
        out.append(
            _svg_line_chart(
                [
                    ("wall time", [r.wall_s for r in report.runs]),
                    ("tools one after another", [r.tool_sum_s for r in report.runs]),
                    ("tools side by side (busy)", [r.tool_busy_s for r in report.runs]),
                ],
                unit="ms",
                label="run time vs tool time",
            )
        )
        shown = report.runs[-HTML_RUNS:]
        rows = [
            [
                f"<code>{_esc(r.run_id)}</code>",
                _esc(ms(r.wall_s)),
                _esc(ms(r.llm_s)),
                _esc(ms(r.tool_sum_s)),
                _esc(ms(r.tool_busy_s)),
                _esc(ms(r.saved_s)),
            ]
            for r in shown
        ]
        rows.append(
            [
                _esc(f"all {t.runs} runs"),
                _esc(ms(t.wall_s)),
                "",
                _esc(ms(t.tool_sum_s)),
                _esc(ms(t.tool_busy_s)),
                _esc(ms(t.saved_s)),
            ]
        )
        out.append(
            _table(
                ["run", "wall ms", "LLM ms", "tools one by one ms", "tools busy ms", "saved ms"],
                rows,
            )
        )
        if len(shown) < len(report.runs):
            out.append(f'<p class="note">The newest {len(shown)} runs are listed.</p>')
    else:
        out.append("<p>No runs read.</p>")
    out.append("</section>")

    out.append('<section id="stability"><h2>Prompt stability</h2>')
    if report.stability:
        out.append(
            '<p class="note">Per learning key: the stable prefix (blocks that at least 95% of '
            "the prompts share exactly, in order) is what prompt caching can reuse. The bar is "
            "the share of each prompt's blocks inside it. Prefix tokens are estimated from "
            "the runs' prompt token counts by the prefix's share of the prompt's characters.</p>"
        )
        out.append(
            _svg_bars(
                [
                    (
                        s.learning_key,
                        [(1.0, "#e5e7eb"), (s.prefix_share or 0.0, "#16a34a")],
                        f"{pct(s.prefix_share)} of each prompt",
                    )
                    for s in report.stability
                ],
                label="stable prefix share",
                high=1.0,
            )
        )
        for s in report.stability:
            out.append(
                _table(
                    ["learning key", _esc(s.learning_key)],
                    [
                        [_esc(k), _esc(v)]
                        for k, v in stability_rows(s).items()
                        if k != "learning key"
                    ],
                    left=2,
                ).replace("<table>", '<table class="kv">', 1)
            )
    else:
        out.append("<p>No prompt stability learned.</p>")
    out.append("</section>")

    out.append('<section id="health"><h2>Learning health</h2>')
    out.append(
        _table(["", ""], [[_esc(k), _esc(v)] for k, v in health_rows(report).items()], left=2)
    )
    for note_text in report.notes:
        out.append(f'<p class="note">note: {_esc(note_text)}</p>')
    out.append("</section></main></body></html>")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------- command


@guard
def report(
    agent: AgentArg,
    html: Annotated[
        str | None,
        typer.Option("--html", metavar="FILE", help="write one self-contained HTML file"),
    ] = None,
    runs: Annotated[
        int, typer.Option("--runs", min=1, help="read at most this many of the newest runs")
    ] = 1000,
    redis_url: RedisUrl = None,
    prefix: Prefix = None,
    as_json: AsJson = False,
) -> None:
    """What learning buys AGENT: LLM call latency and tokens, tools and their plan,
    prompt stability, learning health (docs/glossary.md explains the terms).

    Learned numbers come from the agent's stored state (the t-digests of the
    trie's accumulators, the plan, the ACG windows); latencies and run times
    are measured on its newest retained runs (--runs). --html FILE writes one
    self-contained page with plots (no network needed to open it); --json
    prints the same numbers.
    """
    from pathlib import Path

    from tasks.insight import build_report
    from worker.cli.render import emit_json, out
    from worker.cli.state import require_agent

    store = open_store(settings_from(redis_url, prefix))
    require_agent(store, agent)
    result = build_report(store, agent, max_runs=runs)
    if html is not None:
        try:
            Path(html).write_text(render_html(result), encoding="utf-8")
        except OSError as exc:
            raise fail(f"cannot write {html}: {exc.strerror}", EXIT_BAD_INPUT) from None
    if as_json:
        emit_json(result.as_dict())
        return
    if html is not None:
        out.print(f"wrote the report of {agent} to {html}", highlight=False)
        return
    print_terminal(result)


def register(app: typer.Typer) -> None:
    app.command()(report)
