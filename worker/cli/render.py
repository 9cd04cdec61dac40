"""Everything the commands print: the literal consoles, tables, JSON and messages.

Everything that came from data (agent ids, tool names, payloads, reasons)
is printed literally: the consoles interpret no markup, and control
characters and lone surrogates are shown as escapes. Rich is imported with
this module, which commands import when they run (never for `--help`).
"""

from __future__ import annotations

import re
from typing import Any

import typer
from rich.console import Console
from rich.highlighter import JSONHighlighter
from rich.table import Table
from rich.text import Text

from tasks.operations import json_text

# Characters a terminal would act on rather than show (C0/C1 controls, among
# them ESC; line and paragraph separators; bidi overrides) and lone
# surrogates, which cannot even be written out as UTF-8.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_UNSAFE_OR_NEWLINE_OK = re.compile(
    r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(value: object, *, newlines: bool = False) -> str:
    """`value` as text a terminal shows as it is: unsafe characters become escapes.

    Data (agent ids, payloads, reasons) can hold anything; an ESC sequence
    would drive the operator's terminal, a lone surrogate would make the
    write itself fail. Newlines are escaped too unless `newlines` (a
    multi-line payload), so an error stays one line.
    """
    text = value if isinstance(value, str) else str(value)
    return (_UNSAFE_OR_NEWLINE_OK if newlines else _UNSAFE).sub(_escape, text)


class LiteralConsole(Console):
    """A console that prints every string literally.

    Rich reads `[...]` in strings as markup, so an agent named `[/]` made
    every table listing it fail and `[bold]x` was shown bold. Here no string
    is markup or emoji code, and each one passes `safe` on its way to the
    terminal (table cells and titles included: they are rendered through
    `render_str` too). Styling is done with `Text` objects, built from
    escaped parts.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(markup=False, emoji=False, highlight=False, **options)

    def render_str(self, text: str, **options: Any) -> Text:
        options["markup"] = False
        options["emoji"] = False
        return super().render_str(safe(text, newlines=True), **options)


out = LiteralConsole()
err = LiteralConsole(stderr=True, soft_wrap=True)

# Most per-record error lines one command prints (the rest: a count).
MAX_ERROR_LINES = 20


def error(message: str) -> None:
    """One `error:` line on stderr (newlines and control characters escaped)."""
    err.print(Text.assemble(("error:", "bold red"), " ", safe(message)))


def note(message: str) -> None:
    """One `note:` line on stderr: something the operator should know, not a failure."""
    err.print(Text.assemble(("note:", "bold yellow"), " ", safe(message)))


def emit_json(data: Any) -> None:
    """One JSON document on stdout (plain text: no markup, no wrapping)."""
    typer.echo(json_text(data))


def table(title: str | None, **options: Any) -> Table:
    """A table at least as wide as its title, so the title stays on one line."""
    width = len(safe(title or ""))
    return Table(title=title, title_justify="left", min_width=width, **options)


def kv_table(title: str | None, rows: dict[str, Any]) -> Table:
    result = table(title, show_header=False)
    result.add_column(style="bold")
    result.add_column(overflow="fold")
    for name, value in rows.items():
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        result.add_row(str(name), "-" if shown is None else str(shown))
    return result


def groups_table(title: str, groups: list[dict[str, Any]]) -> Table:
    result = table(title)
    result.add_column("group", overflow="fold")
    result.add_column("tools run in parallel", overflow="fold")
    for group in groups:
        result.add_row(group["group_id"], ", ".join(group["tool_names"]))
    return result


def payload_text(raw: str) -> Text:
    """A raw payload for the terminal: indented and coloured when it is JSON
    (a lone surrogate shown as its escape), else as it is; never markup, and
    never a RecursionError for a payload nested deeper than Python recurses."""
    import json

    try:
        shown = json_text(json.loads(raw))
    except (ValueError, RecursionError):
        return Text(safe(raw, newlines=True))
    text = Text(safe(shown, newlines=True))
    JSONHighlighter().highlight(text)
    return text


def print_agent_report(agent: str, item: dict[str, Any]) -> None:
    """The embedded run's report of one agent: plan groups, default hints, stable prefix."""
    out.print()
    out.rule(
        Text.assemble((safe(agent), "bold"), f": {item['learned']} of {item['runs']} runs learned")
    )
    groups = item["parallel_groups"]
    if groups:
        out.print(groups_table("tool-parallelism plan", groups))
    else:
        out.print("tool-parallelism plan: none learned (no tools ran in parallel)")
    hints = item["default_hints"]
    if hints:
        out.print(kv_table("default hints", hints))
    else:
        out.print("default hints: none (no finished LLM call learned)")
    prefix = item["stable_prefix"]
    if prefix is None:
        out.print("stable prompt prefix: none learned")
        return
    out.print(
        f"stable prompt prefix: {prefix['stable_prefix_length']} blocks over "
        f"{prefix['total_observations']} observations",
        highlight=False,
    )
    for n, span in enumerate(prefix["span_ids"], start=1):
        out.print(f"  {n}. {span}", highlight=False)
    fingerprint = prefix["stable_prefix_fingerprint"] or "-"
    out.print(f"  fingerprint {fingerprint}", highlight=False, soft_wrap=True)
