"""The JSON Schema of a run record, generated from the wire model.

For agents that do not use NeMo Relay and produce run records themselves:
`python -m adaptive_worker_client.schema > run-record.schema.json`. The
copy in the repository (docs/run-record.schema.json) is checked against
this output by the tests, so it never drifts from what the workers accept.
The schema describes the shape; the strict-JSON rule (no NaN/Infinity, no
lone surrogates, nesting at most 128 levels) and the size limit apply on
top, as JSON Schema cannot say them.
"""

from __future__ import annotations

import json
from typing import Any

SCHEMA_ID = "urn:adaptive-worker:run-record"


def run_record_schema() -> dict[str, Any]:
    from adaptive_worker_client.wire import RunRecord

    schema = RunRecord.model_json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **schema,
    }


def main() -> None:
    print(json.dumps(run_record_schema(), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
