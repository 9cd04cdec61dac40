"""Sample run records shipped with the package (see README.md in this directory).

They are derived from the captures of the real runtime in `shared/fixtures`,
which are not shipped, so that `adaptive-worker run` has something real to
learn on a machine that has only the installed package.
"""

from __future__ import annotations

from importlib.resources import files

# Agent id -> file name; each file is JSON Lines, one run record per line.
SAMPLES: dict[str, str] = {
    "travel-openai": "travel-openai.jsonl",
    "travel-anthropic": "travel-anthropic.jsonl",
}
# The agent id of the captures, replaced by the sample's own agent id.
CAPTURE_AGENT_ID = "cap-agent"


def sample_runs() -> dict[str, list[str]]:
    """Agent id -> its run records as JSON text, in the order they were learned."""
    root = files(__name__)
    return {
        agent: [
            line
            for line in root.joinpath(name).read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        for agent, name in SAMPLES.items()
    }


__all__ = ["CAPTURE_AGENT_ID", "SAMPLES", "sample_runs"]
