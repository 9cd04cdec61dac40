"""RFC 3339 timestamps at nanosecond precision.

The runtime writes `2026-11-29T07:00:04.028940237Z`; Python's datetime stops at
microseconds, so timestamps stay strings in the models (exact round trip) and
are turned into integer nanoseconds only where arithmetic needs them.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

__all__ = [
    "format_ns",
    "parse_ns",
]

_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(Z|z|[+-]\d{2}:\d{2})$"
)


def parse_ns(value: str) -> int:
    """Nanoseconds since the Unix epoch; raises ValueError on anything not RFC 3339."""
    m = _RFC3339.match(value)
    if m is None:
        raise ValueError(f"not an RFC 3339 timestamp: {value!r}")
    year, month, day, hour, minute, second, frac, offset = m.groups()
    try:
        base = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=UTC
        )
    except ValueError as exc:
        raise ValueError(f"not an RFC 3339 timestamp: {value!r} ({exc})") from None
    seconds = int(base.timestamp())
    if offset not in ("Z", "z"):
        sign = 1 if offset[0] == "+" else -1
        seconds -= sign * (int(offset[1:3]) * 3600 + int(offset[4:6]) * 60)
    nanos = int((frac or "").ljust(9, "0")) if frac else 0
    return seconds * 1_000_000_000 + nanos


def format_ns(ns: int) -> str:
    """The runtime's own layout for `generated_at`-style stamps (`+00:00`, 9 digits)."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    base = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{nanos:09d}+00:00"
