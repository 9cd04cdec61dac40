"""What we publish for agents that produce run records themselves: the JSON
Schema (generated from the wire model), a minimal example, and a glossary.

The schema is checked with an independent validator (`jsonschema`) against
every run the real runtime wrote in the captures, so it describes what real
agents send, not only what our model says.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, FormatChecker

from adaptive_worker_client.schema import run_record_schema
from storage.store import Store
from tasks.learning import catch_up, ingest
from tests.goldens import load_capture
from worker.engine.fold import EngineConfig

DOCS = Path(__file__).resolve().parents[1] / "docs"
SCHEMA_FILE = DOCS / "run-record.schema.json"
EXAMPLE_FILE = DOCS / "examples" / "run-record.json"


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    schema = json.loads(SCHEMA_FILE.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=FormatChecker())


def test_the_published_schema_is_the_generated_one() -> None:
    assert json.loads(SCHEMA_FILE.read_text()) == run_record_schema(), (
        "regenerate: python -m adaptive_worker_client.schema > docs/run-record.schema.json"
    )


@pytest.mark.parametrize("capture", ["relay-openai", "relay-anthropic"])
def test_every_captured_run_fits_the_schema(validator: Draft202012Validator, capture: str) -> None:
    for raw in load_capture(capture).runs:
        errors = [e.message for e in validator.iter_errors(json.loads(raw))]
        assert not errors


def test_the_schema_refuses_what_the_workers_refuse(validator: Draft202012Validator) -> None:
    example = json.loads(EXAMPLE_FILE.read_text())
    bad: list[dict[str, Any]] = [
        {k: v for k, v in example.items() if k != "id"},
        {**example, "id": "not-a-uuid"},
        {**example, "agent_id": "travel::model=x"},
        {**example, "agent_id": ""},
        {**example, "calls": [{**example["calls"][0], "kind": "agent"}]},
        {**example, "calls": [{**example["calls"][0], "output_tokens": -1}]},
        {**example, "started_at": "yesterday"},
    ]
    for run in bad:
        assert not validator.is_valid(run), run


def test_the_example_fits_and_learns_what_the_glossary_says(
    validator: Draft202012Validator, real_store: Store
) -> None:
    example = json.loads(EXAMPLE_FILE.read_text())
    assert validator.is_valid(example)
    assert ingest(real_store, [EXAMPLE_FILE.read_text()], 1 << 20).stored
    assert catch_up(real_store, "travel-planner", max_runs=10, config=EngineConfig()).learned
    plan = real_store.get_plan("travel-planner")
    assert plan is not None
    (group,) = plan.parallel_groups
    names = ["search_flights", "search_hotels"]  # their spans overlap in the example
    digest = "sha256:" + hashlib.sha256("|".join(names).encode()).hexdigest()
    assert group.tool_names == names and group.group_id == "fanout:" + digest[:12]


def test_the_glossary_explains_every_term_users_see() -> None:
    text = (DOCS / "glossary.md").read_text()
    for term in (
        "osl",
        "iat",
        "priority",
        "latency_sensitivity",
        "prefix_id",
        "total_requests",
        "`fanout:` group id",
        "stable prefix",
        "fingerprint",
        "learning key",
        "dead letter",
        "conflicting duplicate",
        "learned / lag",
        "fast path",
        "learned / measured",
        "ran together",
        "estimated prefix tokens",
    ):
        assert f"**{term}" in text, term


def test_the_cli_points_to_the_glossary_and_the_schema() -> None:
    import subprocess
    import sys
    from pathlib import Path as P

    cli = str(P(sys.executable).with_name("adaptive-worker"))
    out = subprocess.run([cli, "--help"], capture_output=True, text=True, check=True).stdout
    assert "docs/glossary.md" in out and "docs/run-record.schema.json" in out
    for name in ("glossary.md", "run-record.schema.json"):
        assert (DOCS / name).is_file()
