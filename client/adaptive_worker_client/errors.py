"""The one error type for values that cannot be accepted.

Callers (ingest, replay, the CLI) need to tell "this input is bad" from every
other failure, and the message must name the field that is wrong so that a
dead letter says why it was rejected.

Part of the contract between agents, the runtime and the workers: the client
refuses a run with the same error (and message) the worker would dead-letter
it with. The server's `storage.errors` re-exports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pydantic is imported only by the code that validates
    from pydantic import ValidationError

__all__ = [
    "BufferFull",
    "ClientClosed",
    "ClientError",
    "InvalidRecord",
    "StateUnavailable",
]


class InvalidRecord(ValueError):
    """A value that does not match the runtime's wire form.

    `problems` holds `(field path, message)` pairs; the string form joins them,
    e.g. `calls.0.started_at: not an RFC 3339 timestamp: 'yesterday'`.
    """

    def __init__(self, kind: str, problems: list[tuple[str, str]]) -> None:
        self.kind = kind
        self.problems = problems
        detail = "; ".join(f"{path or '<root>'}: {msg}" for path, msg in problems)
        super().__init__(f"invalid {kind}: {detail}")

    @classmethod
    def from_validation_error(cls, kind: str, exc: ValidationError) -> InvalidRecord:
        problems = []
        for err in exc.errors(include_url=False):
            path = ".".join(str(p) for p in err["loc"])
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            problems.append((path, msg))
        return cls(kind, problems)


class ClientError(RuntimeError):
    """Raised on the agent thread only in strict mode."""


class BufferFull(ClientError):
    """Strict mode: the in-memory buffer cannot take the run."""


class ClientClosed(ClientError):
    """Strict mode: the client was closed (at exit), runs are no longer accepted."""


class StateUnavailable(ClientError):
    """Strict mode: the learned state could not be read from Redis (the cause is chained)."""
