"""RFC 3339 timestamps at nanosecond precision.

The runtime writes `2026-11-29T07:00:04.028940237Z`; Python's datetime stops at
microseconds, so timestamps stay strings in the models (exact round trip) and
are turned into integer nanoseconds only where arithmetic needs them.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from functools import lru_cache

__all__ = [
    "format_ns",
    "parse_ns",
]

_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(Z|z|[+-]\d{2}:\d{2})$"
)


_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


@lru_cache(maxsize=4096)
def _day_start_s(year: int, month: int, day: int) -> int:
    """Seconds from the epoch to the day's midnight UTC; ValueError for a day that
    does not exist (a run's dozens of stamps share a day or two)."""
    return (date(year, month, day).toordinal() - _EPOCH_ORDINAL) * 86_400


@lru_cache(maxsize=32_768)
def parse_ns(value: str) -> int:
    """Nanoseconds since the Unix epoch; raises ValueError on anything not RFC 3339.

    Cached: a worker parses each stamp twice, when it validates the run and
    when the engine reads its times (~17 stamps per capture-shaped run, so
    the cache spans a whole ingest batch of 500 runs and more). The calendar
    arithmetic is integer math on the cached day, not a datetime per stamp.
    """
    m = _RFC3339.match(value)
    if m is None:
        raise ValueError(f"not an RFC 3339 timestamp: {value!r}")
    year, month, day, hour, minute, second, frac, offset = m.groups()
    try:
        day_start = _day_start_s(int(year), int(month), int(day))
    except ValueError as exc:
        raise ValueError(f"not an RFC 3339 timestamp: {value!r} ({exc})") from None
    h, mi, sec = int(hour), int(minute), int(second)
    if h > 23 or mi > 59 or sec > 59:
        raise ValueError(f"not an RFC 3339 timestamp: {value!r} (time of day out of range)")
    seconds = day_start + h * 3600 + mi * 60 + sec
    if offset not in ("Z", "z"):
        sign = 1 if offset[0] == "+" else -1
        seconds -= sign * (int(offset[1:3]) * 3600 + int(offset[4:6]) * 60)
    nanos = int(frac.ljust(9, "0")) if frac else 0
    return seconds * 1_000_000_000 + nanos


def format_ns(ns: int) -> str:
    """The runtime's own layout for `generated_at`-style stamps (`+00:00`, 9 digits)."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    base = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{nanos:09d}+00:00"
