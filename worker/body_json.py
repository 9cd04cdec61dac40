"""Task message bodies decoded as plain JSON, by orjson.

Why: the worker's consumer decodes every body once (the guard's checks,
`worker/guard.py`), the pool process runs the task on that value
(`worker/request.py`), and it waits for its next message while the
consumer decodes. kombu's decoder is Python's `json` with an object hook,
~1.8 ms per 100 capture-shaped runs; orjson takes ~0.4 ms.

Plain JSON: kombu's hook turns any object shaped `{"__type__": ..,
"__value__": ..}` into a datetime, UUID, Decimal or bytes, so a run whose
metadata happened to hold one was dead-lettered ("UUID is not a JSON value")
instead of stored as sent. Our task bodies carry only JSON values (Celery's
own eta and expiry travel in headers), so no hook is applied.

Text orjson refuses (NaN, lone surrogate escapes, integers past 64 bits,
more than 1024 levels of nesting, invalid UTF-8) is decoded by Python's
`json` exactly as kombu did, so such a body meets the same checks as
before: a NaN inside one run still rejects that run only, and too deep
text still raises RecursionError for the guard to refuse.
"""

from __future__ import annotations

import json
from typing import Any

import kombu.serialization
import orjson
from kombu.utils import json as kombu_json

CONTENT_TYPE = "application/json"


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """The body's JSON value; what orjson refuses, Python's json decides."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        if isinstance(data, memoryview):
            data = data.tobytes()
        return json.loads(data.decode("utf-8") if isinstance(data, bytes | bytearray) else data)


def install() -> None:
    """Decode `application/json` bodies with `loads` in this process (and in the
    pool processes forked from it); bodies are still encoded by kombu."""
    kombu.serialization.register(
        "json", kombu_json.dumps, loads, content_type=CONTENT_TYPE, content_encoding="utf-8"
    )
