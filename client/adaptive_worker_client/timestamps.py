"""RFC 3339 timestamps at nanosecond precision.

The runtime writes `2026-11-29T07:00:04.028940237Z`; Python's datetime stops at
microseconds, so timestamps stay strings in the models (exact round trip) and
are turned into integer nanoseconds only where arithmetic needs them.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from functools import lru_cache

__all__ = [
    "format_ns",
    "parse_ns",
]

# ASCII digits only, and the whole string (`$` would let a trailing newline
# through): serde's RFC 3339 parser, which reads these back, accepts neither
# Unicode digits nor a newline.
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.(\d{1,9}))?(Z|z|[+-]\d{2}:\d{2})",
    re.ASCII,
)
_EPOCH = datetime(1970, 1, 1)
_SECOND = timedelta(seconds=1)


@lru_cache(maxsize=32_768)
def parse_ns(value: str) -> int:
    """Nanoseconds since the Unix epoch; raises ValueError on anything not RFC 3339.

    Cached: a worker parses each stamp twice, when it validates the run and
    when the engine reads its times (~17 stamps per capture-shaped run, so
    the cache spans a whole ingest batch of 500 runs and more). The first
    parse happens for every stamp of every run ingested (~0.3 us of a 7 KB
    run's check each), so the regex only decides the layout, and the
    calendar (days per month, hour <= 23, second <= 59) is datetime's C
    parser on the fixed-width date and time; the fraction and the offset,
    which datetime would round or reject, are integer arithmetic.
    """
    m = _RFC3339.fullmatch(value)
    if m is None:
        raise ValueError(f"not an RFC 3339 timestamp: {value!r}")
    try:
        seconds = (datetime.fromisoformat(value[:19]) - _EPOCH) // _SECOND
    except ValueError as exc:
        raise ValueError(f"not an RFC 3339 timestamp: {value!r} ({exc})") from None
    frac, offset = m.groups()
    if offset != "Z" and offset != "z":
        sign = 1 if offset[0] == "+" else -1
        seconds -= sign * (int(offset[1:3]) * 3600 + int(offset[4:6]) * 60)
    if frac is None:
        return seconds * 1_000_000_000
    return seconds * 1_000_000_000 + int(frac) * 10 ** (9 - len(frac))


def format_ns(ns: int) -> str:
    """The runtime's own layout for `generated_at`-style stamps (`+00:00`, 9 digits)."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    base = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{nanos:09d}+00:00"
