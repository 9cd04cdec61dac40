"""The key layout against every key the real runtime wrote."""

from __future__ import annotations

import json

import pytest

from storage.keys import RUNTIME_KINDS, Keys
from tests.goldens import CAPTURES, load_capture


@pytest.mark.parametrize("capture", CAPTURES)
def test_every_captured_key_is_built_by_keys(capture: str) -> None:
    cap = load_capture(capture)
    keys = Keys(cap.prefix)
    agent = cap.agent_id
    learning_key = cap.learning_key()
    built = {
        keys.runs_index(agent),
        keys.plan(agent),
        keys.trie(agent),
        keys.accumulators(agent),
        keys.acg_observations(agent),
        keys.acg_stability(agent),
        keys.acg_observations(learning_key),
        keys.acg_stability(learning_key),
        *(keys.run(agent, json.loads(raw)["id"]) for raw in cap.runs),
    }
    assert built == {e.key for e in cap.keys}


@pytest.mark.parametrize("agent", ["a", "runs", "plan:x", "adaptive_worker", "x:cursor:y", ""])
def test_own_keys_never_collide_with_runtime_keys(agent: str) -> None:
    keys = Keys("nemo_relay:")
    own = {keys.cursor(agent), keys.pending(agent), keys.agents(), keys.dead_letters()}
    assert len(own) == 4
    for key in own:
        rest = key.removeprefix("nemo_relay:")
        assert rest.split(":", 1)[0] not in RUNTIME_KINDS
    # Nor with another agent's own keys: the agent id is the fixed-length tail.
    other = agent + ":z"
    assert keys.cursor(agent) != keys.pending(other)


def test_prefix_is_configurable() -> None:
    assert Keys("nemo_flow:").plan("a") == "nemo_flow:plan:a"
    assert Keys("nemo_relay:").run("a", "r") == "nemo_relay:runs:a:r"
