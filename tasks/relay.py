"""Using the workers from a NeMo Relay agent (`nemo-relay` 0.10.x), agent side.

`nemo_relay` is an optional dependency: it is imported only when a function
here needs it, so the workers never load it.

Why each piece exists (everything below was checked against the real
`nemo-relay` 0.10.4; see docs/interop.md):

- Runs to the workers. The runtime has no callback that hands a finished
  RunRecord to Python. What it does offer: with a telemetry section whose
  learner list is EMPTY it still stores every finished run (`runs:{agent}:{id}`
  plus RPUSH `runs_index:{agent}`) in the Redis it is configured with, and
  learns nothing. The workers' `discover` beat task finds those runs and learns
  them exactly once. That is the recommended configuration
  (`recommended_config()`): no code in the agent, and the records are the
  runtime's own. Alternative (`install_exporter()`): the telemetry section off
  and a subscriber that rebuilds each RunRecord from the public event stream
  and hands it to our buffered, spooling `RunClient` (for agents that must not
  write to the state Redis, or use another broker).
- Hints. The runtime reads the latency trie nowhere (SPEC 6c), so its own
  hints intercept has nothing learned to send. `install_hints()` registers a
  request intercept that injects our `StateReader.load_hints` the way the
  runtime injects its own: JSON object in the `x-nemo-relay-adaptive-agent-hints`
  header and in the body at `nvext.agent_hints`.
- New plans. The runtime reads `plan` and `acg_stability` when it registers
  (and `plan` again after each finished run, when telemetry is on), never the
  stability again. `StateWatcher` polls our published state version and
  replaces the AdaptiveRuntime when what it would load has changed. Replace,
  not re-register: a runtime with a telemetry section refuses a second
  `register()` ("telemetry already registered").
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import logging
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import redis

from storage.keys import Keys

if TYPE_CHECKING:  # pragma: no cover - typing only
    from tasks.client import RunClient, StateReader
    from worker.settings import Settings

log = logging.getLogger(__name__)

RELAY_VERSION = "0.10.4"
HINTS_HEADER = "x-nemo-relay-adaptive-agent-hints"
HINTS_INTERCEPT = "adaptive-worker-hints"
EXPORT_SUBSCRIBER = "adaptive-worker-export"
# The runtime's own hints intercept runs at 100 (lower first): ours runs after
# it, so when both are on, ours is what the provider sees.
HINTS_PRIORITY = 200
# WARN events (visible with NEMO_RELAY_LOG=warn) the runtime logs when it
# drops a value it cannot parse, naming neither key nor error.
SEED_FAILURE_EVENTS = ("adaptive_hot_cache_seed_failed", "adaptive_acg_cache_seed_failed")

ExportMode = Literal["runtime", "subscriber"]
ToolMode = Literal["observe_only", "inject_hints", "schedule"]
Provider = Literal["anthropic", "openai", "passthrough"]


def _relay() -> Any:
    """The `nemo_relay` package, with a clear message when it is missing."""
    try:
        import nemo_relay
        import nemo_relay.adaptive
        import nemo_relay.intercepts
        import nemo_relay.subscribers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"tasks.relay needs nemo-relay (pip install nemo-relay=={RELAY_VERSION}): {exc}"
        ) from exc
    return nemo_relay


def _settings(settings: Settings | None) -> Settings:
    if settings is not None:
        return settings
    from worker.settings import get_settings

    return get_settings()


# ------------------------------------------------------------ configuration


def recommended_config(
    agent_id: str,
    *,
    settings: Settings | None = None,
    redis_url: str | None = None,
    key_prefix: str | None = None,
    provider: Provider = "openai",
    tool_parallelism: ToolMode = "schedule",
    export: ExportMode = "runtime",
    runtime_hints: bool = False,
) -> Any:
    """The AdaptiveConfig for an agent whose learning is done by our workers.

    - `state`: the Redis and key prefix the workers use (`settings`, i.e. the
      `ADAPTIVE_REDIS_URL` / `ADAPTIVE_KEY_PREFIX` the workers read, unless
      given), so the agent loads what they write.
    - `telemetry`: `TelemetryConfig(learners=[])` for `export="runtime"` (the
      runtime stores finished runs, learns nothing; `discover` picks them up);
      None for `export="subscriber"` (nothing written by the runtime; use
      `install_exporter`). Never both: every run would be learned twice.
      No learner may be listed: the runtime's learners would overwrite the
      workers' plan and double-count every run (see `tasks.mixed`).
    - `adaptive_hints`: off by default, since the runtime has no trie to hint
      from; `install_hints` injects ours. `runtime_hints=True` keeps the
      runtime's intercept (for `set_latency_sensitivity`); ours still wins.
    - `tool_parallelism`: `schedule` gates the tools of the plan's parallel
      groups (needs the plan AND a stability with >= 3 observations).
    - `acg`: the provider whose cache breakpoints the runtime places from the
      loaded stability (Anthropic: only for prompts of >= 1024 tokens).
    """
    relay = _relay()
    ad = relay.adaptive
    if redis_url is None or key_prefix is None:
        s = _settings(settings)
        redis_url = redis_url or s.redis_url
        key_prefix = s.key_prefix if key_prefix is None else key_prefix
    if not redis_url:
        raise ValueError(
            "the NeMo Relay runtime needs a real Redis URL (ADAPTIVE_REDIS_URL), "
            "not the embedded in-process default"
        )
    if export not in ("runtime", "subscriber"):
        raise ValueError(f"export must be 'runtime' or 'subscriber', got {export!r}")
    return ad.AdaptiveConfig(
        agent_id=agent_id,
        state=ad.StateConfig(backend=ad.BackendSpec.redis(redis_url, key_prefix=key_prefix)),
        telemetry=ad.TelemetryConfig(learners=[]) if export == "runtime" else None,
        adaptive_hints=ad.AdaptiveHintsConfig() if runtime_hints else None,
        tool_parallelism=ad.ToolParallelismConfig(mode=tool_parallelism),
        acg=ad.AcgConfig(provider=provider),
    )


def _config_dict(config: Any) -> dict[str, Any]:
    return dict(config.to_dict()) if hasattr(config, "to_dict") else dict(config)


# ------------------------------------------------------------------ exporter

_FRACTION = re.compile(r"^(.*T\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(?:Z|z|[+-]00:00)$")
_CALL_FIELDS = (
    "kind",
    "name",
    "started_at",
    "ended_at",
    "metadata_snapshot",
    "output_tokens",
    "prompt_tokens",
    "total_tokens",
    "model_name",
    "tool_call_count",
    "annotated_request",
    "annotated_response",
)


def runtime_timestamp(stamp: str) -> str:
    """An event timestamp in the form the runtime stores (chrono's `AutoSi`, `Z`).

    Events carry `...:19.411124000+00:00`; stored records carry
    `...:19.411124Z`: 0, 3, 6 or 9 fraction digits, the fewest that are exact.
    """
    m = _FRACTION.match(stamp)
    if m is None:
        return stamp
    head, frac = m.group(1), m.group(2) or ""
    ns = int(frac.ljust(9, "0")) if frac else 0
    if ns == 0:
        return f"{head}Z"
    if ns % 1_000_000 == 0:
        return f"{head}.{ns // 1_000_000:03d}Z"
    if ns % 1_000 == 0:
        return f"{head}.{ns // 1_000:06d}Z"
    return f"{head}.{ns:09d}Z"


def uuid7() -> str:
    """A UUIDv7 (the runtime mints v7 run ids; Python 3.11 has no uuid7)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


def _field(event: Any, name: str) -> Any:
    if isinstance(event, Mapping):
        return event.get(name)
    return getattr(event, name, None)


@dataclass(slots=True)
class _OpenRun:
    record: dict[str, Any]
    calls: list[dict[str, Any]]


class RunRecordExporter:
    """A subscriber callback that rebuilds the runtime's RunRecords from events.

    Same rules as the runtime's own run accumulator (crate `adaptive`,
    `drain.rs`), so the records equal the ones the runtime would store except
    for the run id (a fresh UUIDv7): every Agent scope starts a run of
    `agent_id` (nested Agent scopes too, as in the runtime), LLM and tool
    scopes inside it become calls, an end event closes the last open call of
    the same name; an LLM end adds token counts, model name and tool-call
    count from the annotated response. Calls outside any run are ignored.

    `on_run(record)` is called with the finished record (a dict) on the
    thread that delivers events; it must be cheap (`RunClient.submit_run`
    is). Thread-safe. Takes event objects or their `to_dict()` form.
    """

    def __init__(self, agent_id: str, on_run: Callable[[dict[str, Any]], None]) -> None:
        self.agent_id = agent_id
        self.on_run = on_run
        self.exported = 0
        self.errors = 0
        self._open: dict[str, _OpenRun] = {}
        self._roots: dict[str, str] = {}  # event/scope uuid -> run root uuid
        self._lock = threading.Lock()

    def __call__(self, event: Any) -> None:
        if _field(event, "kind") != "scope":
            return
        try:
            with self._lock:
                done = self._process(event)
        except Exception:  # an exporter bug must never reach the agent
            self.errors += 1
            log.exception("run exporter: cannot process an event")
            return
        if done is not None:
            self.exported += 1
            try:
                self.on_run(done)
            except Exception:
                self.errors += 1
                log.exception("run exporter: on_run failed")

    def _root_of(self, uid: str, parent: str | None) -> str | None:
        return self._roots.get(uid) or (self._roots.get(parent) if parent else None)

    def _process(self, event: Any) -> dict[str, Any] | None:
        category = _field(event, "category")
        start = _field(event, "scope_category") == "start"
        uid = str(_field(event, "uuid"))
        stamp = runtime_timestamp(str(_field(event, "timestamp")))
        if category == "agent":
            if start:
                self._roots[uid] = uid
                record = {"id": uuid7(), "agent_id": self.agent_id, "calls": []}
                record["started_at"] = stamp
                self._open[uid] = _OpenRun(record, [])
                return None
            run = self._open.pop(self._roots.pop(uid, uid), None)
            if run is None:
                return None
            run.record["calls"] = [_ordered(call) for call in run.calls]
            run.record["ended_at"] = stamp
            return run.record
        parent = _field(event, "parent_uuid")
        root = self._root_of(uid, parent)
        if category not in ("llm", "tool"):  # function and other nested scopes
            if start and root is not None:
                self._roots[uid] = root
            elif not start:
                self._roots.pop(uid, None)
            return None
        if root is None:
            return None
        run = self._open.get(root)
        name = str(_field(event, "name"))
        if start:
            self._roots[uid] = root
            if run is not None:
                call: dict[str, Any] = {"kind": category, "name": name, "started_at": stamp}
                if category == "llm":
                    profile = _field(event, "category_profile") or {}
                    if profile.get("annotated_request") is not None:
                        call["annotated_request"] = profile["annotated_request"]
                run.calls.append(call)
            return None
        if run is not None:
            for call in reversed(run.calls):
                if call["name"] == name and "ended_at" not in call:
                    call["ended_at"] = stamp
                    if category == "llm":
                        profile = _field(event, "category_profile") or {}
                        _finish_llm(call, profile.get("annotated_response"))
                    break
        self._roots.pop(uid, None)
        return None


def _finish_llm(call: dict[str, Any], response: Mapping[str, Any] | None) -> None:
    if response is None:
        return
    usage = response.get("usage") or {}
    for source, target in (
        ("completion_tokens", "output_tokens"),
        ("prompt_tokens", "prompt_tokens"),
        ("total_tokens", "total_tokens"),
    ):
        if usage.get(source) is not None:
            call[target] = usage[source]
    if response.get("model") is not None:
        call["model_name"] = response["model"]
    if response.get("tool_calls") is not None:
        call["tool_call_count"] = len(response["tool_calls"])
    call["annotated_response"] = dict(response)


def _ordered(call: dict[str, Any]) -> dict[str, Any]:
    """The runtime's field order (not needed for learning; keeps records diffable)."""
    out = {k: call[k] for k in _CALL_FIELDS if k in call}
    out.update((k, v) for k, v in call.items() if k not in out)
    return out


@dataclass
class Installed:
    """A registration made here; `remove()` undoes it (idempotent)."""

    kind: Literal["subscriber", "llm_request_intercept"]
    name: str
    target: Any

    def remove(self) -> bool:
        if self.target is None:
            return False
        relay = _relay()
        if self.kind == "subscriber":
            removed = bool(relay.subscribers.deregister(self.name))
        else:
            removed = bool(relay.intercepts.deregister_llm_request(self.name))
        self.target = None
        return removed


def install_exporter(
    agent_id: str, client: RunClient | None = None, *, name: str = EXPORT_SUBSCRIBER
) -> Installed:
    """Send every finished run of this process to the workers through `client`.

    For agents configured with `recommended_config(export="subscriber")` (no
    telemetry section): with the runtime's own run storage on as well, each
    run would be stored twice under two ids and learned twice. `client`
    defaults to the process's `RunClient` (settings from `ADAPTIVE_*`).
    `Installed.target` is the `RunRecordExporter` (counters `exported`,
    `errors`).
    """
    relay = _relay()
    if client is None:
        from tasks.client import default_client

        client = default_client()
    exporter = RunRecordExporter(agent_id, client.submit_run)
    relay.subscribers.register(name, exporter)
    return Installed("subscriber", name, exporter)


# --------------------------------------------------------------------- hints

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
                key = str(_relay().scope.get_handle().uuid)
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
        relay = _relay()
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
    relay = _relay()
    if reader is None:
        from tasks.client import default_reader

        reader = default_reader()
    hook = HintsIntercept(
        agent_id, reader, header=header, body=body, call_index=call_index, path=path
    )
    relay.intercepts.register_llm_request(name, priority, False, hook)
    return Installed("llm_request_intercept", name, hook)


# -------------------------------------------------------------- new plans


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a registering runtime would load, as of one published version."""

    version: int
    digest: str


def _state_client(settings: Settings) -> redis.Redis:
    """The agent-side reader's client (short timeouts: reads run on the agent's loop)."""
    from tasks.client import _state_client as reader_client

    if settings.redis_url is None:
        raise ValueError("StateWatcher needs a real Redis URL (ADAPTIVE_REDIS_URL)")
    return reader_client(settings)


def published_version(client: redis.Redis, keys: Keys, agent_id: str) -> int:
    """Our published state version of the agent: bumped by every learn commit
    and every rebuild (the `version` field of our cursor hash)."""
    return int(client.hget(keys.cursor(agent_id), "version") or 0)


def loadable_digest(client: redis.Redis, keys: Keys, agent_id: str) -> str:
    """sha256 of exactly what a registering runtime reads: `plan:{agent}` and
    `acg_stability:{agent}`, or `acg_observations:{agent}` when that is absent."""
    plan, stability = client.mget([keys.plan(agent_id), keys.acg_stability(agent_id)])
    h = hashlib.sha256()
    for part in (plan, stability):
        h.update(b"\x00" if part is None else b"\x01" + part.encode() + b"\x00")
    if stability is None:
        observations = client.get(keys.acg_observations(agent_id))
        h.update(b"\x00" if observations is None else b"\x01" + observations.encode())
    return h.hexdigest()


class StateWatcher:
    """Keeps an agent's AdaptiveRuntime on the state our workers last published.

    A registered runtime never reads `acg_stability` again (and `plan` only
    when telemetry is on). So: poll our published version (one HGET), and
    when it moved, hash what a new registration would load; when that
    differs from what the current runtime loaded, replace the runtime:
    flush the subscribers, wait for its drain (so the last run is stored),
    `shutdown()`, then a NEW `AdaptiveRuntime(config)` and `register()`. A
    runtime with a telemetry section cannot be registered twice, so the
    object is always replaced, never re-registered.

    Swapping drops the runtime's bookkeeping of a run still in flight (its
    record is never stored), so swap between runs: call `await
    maybe_refresh()` after each run (it checks at most every
    `poll_interval_s`), or use `start_polling()` where runs are short and an
    occasional lost record is acceptable. Our `install_hints` and
    `install_exporter` registrations are separate and survive swaps.

    `config`: an AdaptiveConfig, its dict, a callable returning either
    (called at every swap), or None for `recommended_config(agent_id)`.
    Redis errors while checking are logged and leave the runtime as it is.
    """

    def __init__(
        self,
        agent_id: str,
        config: Any = None,
        *,
        settings: Settings | None = None,
        redis_client: redis.Redis | None = None,
        poll_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.agent_id = agent_id
        self.settings = settings = _settings(settings)
        self.keys = Keys(settings.key_prefix)
        self.poll_interval_s = float(poll_interval_s)
        self._config = config
        self._client = redis_client or _state_client(settings)
        self._clock = clock
        self._runtime: Any = None
        self._loaded: Snapshot | None = None  # what the current runtime loaded
        self._seen_version: int | None = None  # last version checked
        self._next_check = -float("inf")
        self._poll_task: asyncio.Task[None] | None = None
        self._swap_lock = asyncio.Lock()
        self.swaps = 0
        self.checks = 0
        self.last_error: str | None = None

    # ---- state
    @property
    def runtime(self) -> Any:
        """The AdaptiveRuntime currently registered (None before `start`)."""
        return self._runtime

    @property
    def loaded(self) -> Snapshot | None:
        """Version and digest of the state the current runtime registered on."""
        return self._loaded

    def _config_dict(self) -> dict[str, Any]:
        config = self._config
        if config is None:
            config = recommended_config(self.agent_id, settings=self.settings)
        elif callable(config) and not hasattr(config, "to_dict"):
            config = config()
        return _config_dict(config)

    def _snapshot(self) -> Snapshot:
        version = published_version(self._client, self.keys, self.agent_id)
        return Snapshot(version, loadable_digest(self._client, self.keys, self.agent_id))

    def changed(self) -> bool:
        """Whether a registration now would load other values than the current one did.

        One HGET when our version has not moved since the last check.
        """
        self.checks += 1
        if self._loaded is None:
            return True
        version = published_version(self._client, self.keys, self.agent_id)
        if version == self._seen_version:
            return False
        digest = loadable_digest(self._client, self.keys, self.agent_id)
        if digest == self._loaded.digest:  # e.g. a commit that changed only the trie
            self._seen_version = version
            return False
        return True  # stays True until a swap: `_seen_version` is not advanced

    # ---- lifecycle
    async def start(self) -> Any:
        """Register the first runtime (errors propagate: the agent asked for it)."""
        await self._swap()
        return self._runtime

    async def refresh(self, *, force: bool = False) -> bool:
        """Replace the runtime if our published state changed; True if it was replaced."""
        try:
            if not force and not self.changed():
                return False
        except redis.RedisError as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("cannot check the published state of %s: %s", self.agent_id, exc)
            return False
        try:
            await self._swap()
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("re-registering the adaptive runtime of %s failed", self.agent_id)
            return False
        return True

    async def maybe_refresh(self) -> bool:
        """`refresh()` at most once per `poll_interval_s`; cheap enough after every run."""
        now = self._clock()
        if now < self._next_check:
            return False
        self._next_check = now + self.poll_interval_s
        return await self.refresh()

    def start_polling(self) -> asyncio.Task[None]:
        """Refresh in the background every `poll_interval_s` (see the class notes)."""
        if self._poll_task is None or self._poll_task.done():
            self._poll_task = asyncio.get_running_loop().create_task(self._poll())
        return self._poll_task

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            await self.refresh()

    async def close(self) -> None:
        """Stop polling and shut the runtime down (its last runs are stored first)."""
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
            self._poll_task = None
        async with self._swap_lock:
            await self._retire()

    async def _retire(self) -> None:
        old, self._runtime, self._loaded = self._runtime, None, None
        if old is None:
            return
        relay = _relay()
        try:
            await relay.subscribers.flush_async()
            await asyncio.to_thread(old.wait_for_idle)
        finally:
            await old.shutdown()

    async def _swap(self) -> None:
        relay = _relay()
        async with self._swap_lock:
            await self._retire()
            # Read BEFORE registering: a write in between is newer than what
            # we record, so the next check swaps again rather than missing it.
            snapshot = self._snapshot()
            runtime = relay.adaptive.AdaptiveRuntime(self._config_dict())
            await runtime.register()
            self._runtime, self._loaded = runtime, snapshot
            self._seen_version = snapshot.version
            self.swaps += 1
            log.info(
                "adaptive runtime of %s registered on published state version %d",
                self.agent_id,
                snapshot.version,
            )


__all__ = [
    "EXPORT_SUBSCRIBER",
    "HINTS_HEADER",
    "HINTS_INTERCEPT",
    "HINTS_PRIORITY",
    "RELAY_VERSION",
    "SEED_FAILURE_EVENTS",
    "HintsIntercept",
    "Installed",
    "RunRecordExporter",
    "Snapshot",
    "StateWatcher",
    "hints_run",
    "install_exporter",
    "install_hints",
    "loadable_digest",
    "published_version",
    "recommended_config",
    "runtime_timestamp",
    "uuid7",
]
