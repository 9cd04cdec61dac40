"""Our learned hints injected into each LLM request, as the runtime injects its own."""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from adaptive_worker_client.relay import _common
from adaptive_worker_client.relay._common import (
    HINTS_HEADER,
    HINTS_INTERCEPT,
    HINTS_PRIORITY,
    Installed,
    log,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from adaptive_worker_client.reader import StateReader

__all__ = ["HintsIntercept", "hints_run", "install_hints"]


# A per-run call counter the agent can set explicitly (`hints_run`). It holds
# a mutable dict because intercepts run in a copy of the caller's context:
# a ContextVar.set() made inside one is lost.
_RUN_COUNTERS: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar(
    "adaptive_worker_hints_run", default=None
)
_MAX_TRACKED_RUNS = 4096


@contextlib.contextmanager
def hints_run() -> Iterator[None]:
    """Count hinted LLM calls per run from here on, whatever scopes nest inside.

    Without it, `install_hints` counts per innermost scope, which is the run
    when LLM calls are made directly in the agent scope (the usual shape).
    """
    token = _RUN_COUNTERS.set({})
    try:
        yield
    finally:
        _RUN_COUNTERS.reset(token)


class HintsIntercept:
    """The LLM request intercept `install_hints` registers (see there)."""

    def __init__(
        self,
        agent_id: str,
        reader: StateReader,
        *,
        header: bool = True,
        body: bool = True,
        call_index: Literal["run", "process"] = "run",
        path: Callable[[str], Sequence[str]] | None = None,
    ) -> None:
        if call_index not in ("run", "process"):
            raise ValueError(f"call_index must be 'run' or 'process', got {call_index!r}")
        self.agent_id = agent_id
        self.reader = reader
        self.header = header
        self.body = body
        self.call_index = call_index
        self.path = path or (lambda name: (name,))
        self.injected = 0
        self.without_hints = 0
        self.errors = 0
        self._lock = threading.Lock()
        self._process_calls = 0
        self._runs: OrderedDict[str, dict[str, int]] = OrderedDict()

    def _next_index(self, call_name: str) -> int:
        with self._lock:
            if self.call_index == "process":
                self._process_calls += 1
                return self._process_calls
            counters = _RUN_COUNTERS.get()
            if counters is None:
                key = str(_common._relay().scope.get_handle().uuid)
                counters = self._runs.get(key)
                if counters is None:
                    counters = self._runs[key] = {}
                    while len(self._runs) > _MAX_TRACKED_RUNS:
                        self._runs.popitem(last=False)
                else:
                    self._runs.move_to_end(key)
            counters[call_name] = index = counters.get(call_name, 0) + 1
            return index

    def __call__(self, name: str, request: Any, annotated: Any) -> Any:
        relay = _common._relay()
        try:
            index = self._next_index(name)
            hints = self.reader.load_hints(self.agent_id, tuple(self.path(name)), index)
            if hints is None:
                self.without_hints += 1
                return relay.LLMRequestInterceptOutcome(request, annotated)
            headers = dict(request.headers)
            if self.header:
                headers[HINTS_HEADER] = dict(hints)
            if annotated is not None:
                # With a codec the body is re-encoded from `annotated`, and
                # changing request.content is refused: the hints go into the
                # annotated request's extra fields.
                if self.body:
                    extra = dict(annotated.extra or {})
                    extra["nvext"] = {**(extra.get("nvext") or {}), "agent_hints": dict(hints)}
                    annotated.extra = extra
                outcome = relay.LLMRequestInterceptOutcome(
                    relay.LLMRequest(headers, request.content), annotated
                )
            else:
                content = dict(request.content)
                if self.body:
                    nvext = {**(content.get("nvext") or {}), "agent_hints": dict(hints)}
                    content["nvext"] = nvext
                outcome = relay.LLMRequestInterceptOutcome(relay.LLMRequest(headers, content), None)
            self.injected += 1
            return outcome
        except Exception:  # hints are advisory: never fail the agent's call
            self.errors += 1
            log.exception("hints intercept failed; request sent without our hints")
            return relay.LLMRequestInterceptOutcome(request, annotated)


def install_hints(
    agent_id: str,
    reader: StateReader | None = None,
    *,
    name: str = HINTS_INTERCEPT,
    priority: int = HINTS_PRIORITY,
    header: bool = True,
    body: bool = True,
    call_index: Literal["run", "process"] = "run",
    path: Callable[[str], Sequence[str]] | None = None,
) -> Installed:
    """Inject our learned latency hints into every LLM request of this process.

    Per request: `reader.load_hints(agent_id, path(call name), call_index)`
    (cached, see `StateReader`), written where the runtime writes its own
    hints: the `x-nemo-relay-adaptive-agent-hints` header and the body's
    `nvext.agent_hints` (both a JSON object). No learned trie yet: the request
    is left alone, as the runtime does.

    - `path`: default `(call name,)`, the path the workers learn (SPEC 4).
    - `call_index`: `"run"` (default) counts calls of the same name within one
      run, which is what the trie's per-index predictions mean; a run is the
      innermost scope of the call, or the block of a `hints_run()`.
      `"process"` counts every request of the process, as the runtime's own
      intercept does.
    - `priority`: after the runtime's hints intercept (100), so ours wins
      when both are on.

    `reader` defaults to the process's `StateReader` (`ADAPTIVE_*` settings).
    `Installed.target` is the intercept (counters `injected`,
    `without_hints`, `errors`).
    """
    relay = _common._relay()
    if reader is None:
        from adaptive_worker_client.api import default_reader

        reader = default_reader()
    hook = HintsIntercept(
        agent_id, reader, header=header, body=body, call_index=call_index, path=path
    )
    relay.intercepts.register_llm_request(name, priority, False, hook)
    return Installed("llm_request_intercept", name, hook)
