"""Reading the learned state back: `load_plan`, `load_hints`, `load_stability`.

A NeMo Relay agent reads `plan` and `acg_stability` once, at registration,
and never the trie (SPEC 6c), so latency hints reach an agent only through
this client, and only if it can afford to ask on every LLM call. Hence a
per-process read cache: one Redis GET per key per `client_state_ttl_s`,
parsed once per GET, served from memory in between; Redis trouble never
reaches the agent unless it asks for `strict=True`. The wire models
(pydantic) are imported on the first value parsed, not with this module.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from adaptive_worker_client import config, hooks
from adaptive_worker_client.broker import redis_tls_options, sentinel_connection_options
from adaptive_worker_client.contract import runtime_key
from adaptive_worker_client.errors import InvalidRecord, StateUnavailable
from adaptive_worker_client.hints import agent_hints

if TYPE_CHECKING:
    from adaptive_worker_client.config import AgentSettings
    from adaptive_worker_client.wire import ExecutionPlan, StabilityAnalysisResult

__all__ = ["StateReader"]

log = logging.getLogger(__name__)


_U32_MAX = 0xFFFFFFFF
_STATE_LOG_S = 60.0


@dataclass(slots=True)
class _Entry:
    """One cached key and the lock that makes its refresh single-flight.

    `state` is (parsed value or None, clock time of the last read attempt or
    None if never read), always replaced as one tuple so that the lock-free
    fast path never pairs the value of one read with the time of another.
    """

    state: tuple[Any, float | None] = (None, None)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _parse_plan(raw: str | bytes) -> ExecutionPlan:
    from adaptive_worker_client.wire import ExecutionPlan, parse_wire

    return parse_wire(ExecutionPlan, raw)


def _parse_stability(raw: str | bytes) -> StabilityAnalysisResult:
    from adaptive_worker_client.wire import StabilityAnalysisResult, parse_wire

    return parse_wire(StabilityAnalysisResult, raw)


def _parse_trie(raw: str | bytes) -> dict[str, Any]:
    """Validated like everything an agent reads, then kept as the plain dict
    the lookup walks; dumped from the model so every number has its type."""
    from adaptive_worker_client.wire import TrieEnvelope, parse_wire

    return parse_wire(TrieEnvelope, raw).model_dump(by_alias=True)


def state_client(settings: AgentSettings) -> redis.Redis:
    """A Redis client fit for the agent's thread: short timeouts, one retry.

    The workers' connections are made for workers (5 s connect, 30 s
    socket timeout, retry on timeout): a stalled Redis would stall the agent
    that long on each read. Here a read costs at most two short timeouts: the
    one immediate retry only covers a pooled connection the server dropped
    while idle.

    With `redis_sentinels` set it is the primary the sentinels name, asked
    again on every new connection (redis-py `Sentinel.master_for`), as the
    workers' state connection is: after a failover the agent reads (and the
    receipts check) the promoted node, not the dead one nor the demoted one
    `redis_url` may still name. Each sentinel hop has the same short
    timeouts.
    """
    timeout = settings.client_state_timeout_s
    agent_socket: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "retry": Retry(NoBackoff(), 1),
        "retry_on_timeout": False,
    }
    if settings.redis_sentinels is not None:
        return sentinel_state_client(settings, agent_socket)
    if settings.redis_url is None:
        from adaptive_worker_client.embedded import embedded_client

        return embedded_client()  # type: ignore[no-any-return]  # the workers' fakeredis
    return redis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        **agent_socket,
        **redis_tls_options(settings.redis_url, settings),  # rediss://: verified
    )


def sentinel_state_client(settings: AgentSettings, socket: dict[str, Any]) -> redis.Redis:
    """The service's primary through the sentinels, with `socket` options on
    the primary's connections and the same timeouts on the sentinel hops.

    Password and TLS apply to both hops (`sentinel_connection_options`).
    redis.sentinel is imported here: only a Sentinel deployment pays for it.
    """
    from redis.sentinel import Sentinel

    assert settings.redis_sentinels is not None
    auth = sentinel_connection_options(settings)
    hop = {
        "socket_connect_timeout": socket.get("socket_connect_timeout"),
        "socket_timeout": socket.get("socket_timeout"),
    }
    sentinel = Sentinel(
        config.parse_sentinels(settings.redis_sentinels),
        sentinel_kwargs={**hop, **auth},
        **auth,
    )
    client: redis.Redis = sentinel.master_for(
        settings.redis_sentinel_service, decode_responses=True, **socket
    )
    return client


class StateReader:
    """Cached reads of an agent's learned state, cheap enough for every LLM call.

    Cache: per Redis key, at most one GET per `ttl_s` (default
    `client_state_ttl_s`) per reader; the value is parsed once per GET and
    the parsed object is served from memory until the TTL runs out (a missing
    key is cached as None the same way). Workers rewrite the state after
    every learn step, so a few seconds of staleness cost nothing while a
    Redis round trip per LLM call would. Thread-safe: when a value goes
    stale, one thread reads it again while the others keep getting the
    previous value; threads asking for a key never read before wait for the
    first read. `clock` (seconds, monotonic) is injectable for tests.

    Failures: a Redis error makes the read return the last good value (None
    if there never was one) and counts an error, and for one TTL no key is
    read again (an outage costs the agent one timeout per TTL, not one per
    call or per key). A stored value that does not parse, or a key of the
    wrong Redis type, is treated as absent (None), as the runtime drops such
    a key (SPEC 6c), and counted as `invalid`. Nothing raises into the agent
    unless `strict=True`: then a failed read raises `StateUnavailable` and an
    unusable value `InvalidRecord`, and nothing is cached for that read.

    Returned models are shared by every caller until the next read: treat
    them as read-only. `redis_client` lets a process share a client it
    already has (one that decodes responses); by default one is made on
    first use from `settings.redis_url`, or through `settings.redis_sentinels`
    when set (see `state_client`).
    """

    def __init__(
        self,
        settings: AgentSettings | None = None,
        *,
        ttl_s: float | None = None,
        strict: bool = False,
        redis_client: redis.Redis | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings = settings or config.get_settings()
        self.ttl_s = settings.client_state_ttl_s if ttl_s is None else float(ttl_s)
        if not self.ttl_s >= 0.0:
            raise ValueError(f"ttl_s must be >= 0, got {ttl_s!r}")
        self.strict = strict
        self.prefix = settings.key_prefix
        self._clock = clock
        self._client = redis_client
        self._init_state()
        hooks.READERS.add(self)

    def _init_state(self) -> None:
        self._lock = threading.Lock()  # counters, entry creation, client creation
        self._entries: dict[str, _Entry] = {}
        self._down_until = -math.inf
        self._next_log = -math.inf
        self._reads = 0
        self._hits = 0
        self._errors = 0
        self._invalid = 0
        self._skipped = 0
        self._redis_up: bool | None = None
        self._last_error: str | None = None

    # ------------------------------------------------------------- reading

    def load_plan(self, agent_id: str) -> ExecutionPlan | None:
        """The tool-parallelism plan (`plan:{agent_id}`), or None.

        The key a NeMo Relay agent reads once at registration; this one
        follows later learning (within a TTL).
        """
        plan: ExecutionPlan | None = self._get(
            runtime_key("plan", self.prefix, agent_id=agent_id), _parse_plan
        )
        return plan

    def load_stability(self, agent_id: str) -> StabilityAnalysisResult | None:
        """The ACG seed profile (`acg_stability:{agent_id}`, the plain agent id), or None."""
        result: StabilityAnalysisResult | None = self._get(
            runtime_key("acg_stability", self.prefix, key=agent_id), _parse_stability
        )
        return result

    def load_hints(
        self, agent_id: str, path: Sequence[str] = (), call_index: int = 1
    ) -> dict[str, Any] | None:
        """The agent hints for one LLM call, from the learned trie (`trie:{agent_id}`).

        The dict is what NeMo Relay's hints intercept injects as
        `nvext.agent_hints` (and as the `x-nemo-relay-adaptive-agent-hints`
        header): `osl`, `iat`, `priority`, `latency_sensitivity`,
        `prefix_id`, `total_requests`, computed as the runtime computes them
        (`adaptive_worker_client.hints.agent_hints`). A new dict on every call, so
        the caller may put it into its request as it is.

        - `path`: names walked from the trie's root while each is a child of
          the node reached; every node reached offers its prediction for
          `call_index`, else its any-index prediction, and the deepest one
          found is used. Learned paths are `[call name]` (SPEC 4): `(name,)`
          reaches the node of the LLM calls with that name; `()`, or a path
          whose first name is not in the trie, uses the root, which holds
          every call. `prefix_id` is `{agent_id}-d{len(path)}`.
        - `call_index` (1-based) chooses the per-index prediction and is
          added to the predicted remaining calls:
          `total_requests = round(remaining_calls.mean) + call_index`. The
          trie counts calls of the same name within one run, so with
          `path=(name,)` pass this call's position among the run's calls to
          `name`; `total_requests` is then the predicted number of those
          calls in the run. The runtime itself passes its scope stack as
          `path` and a per-process request counter (1, 2, 3, ... across
          runs) as `call_index`; passing the same reproduces its hints.
        - No prediction anywhere on the walk: the runtime's defaults (the
          root's any-index prediction, `prefix_id` "default"). No trie (the
          agent has no finished LLM call learned yet, or its trie cannot be
          used): None, and the runtime injects nothing either.

        The runtime's manual latency-sensitivity override (scope metadata)
        is not applied: that input lives in the agent, not in Redis.
        """
        if isinstance(path, str | bytes):
            raise TypeError("path is a sequence of names, not one string: use (name,)")
        if (
            not isinstance(call_index, int)
            or isinstance(call_index, bool)
            or not 1 <= call_index <= _U32_MAX
        ):
            raise ValueError(f"call_index must be an int in [1, 2**32), got {call_index!r}")
        key = runtime_key("trie", self.prefix, agent_id=agent_id)
        trie: dict[str, Any] | None = self._get(key, _parse_trie)
        if trie is None:
            return None
        try:
            return agent_hints(trie, tuple(path), call_index, agent_id)
        except Exception as exc:  # a trie that validated yet cannot be walked
            return self._invalid_value(key, None, self._clock(), exc)

    def stats(self) -> dict[str, int | bool | str | None]:
        """Counters since start: `reads` (GETs sent), `hits` (served from memory),
        `errors` (failed reads), `invalid` (values that could not be used),
        `skipped` (reads not tried because Redis failed within the TTL)."""
        with self._lock:
            return {
                "reads": self._reads,
                "hits": self._hits,
                "errors": self._errors,
                "invalid": self._invalid,
                "skipped": self._skipped,
                "cached_keys": len(self._entries),
                "redis_up": self._redis_up,
                "last_error": self._last_error,
            }

    def clear(self) -> None:
        """Forget every cached value: the next call for each key reads Redis."""
        with self._lock:
            self._entries = {}
            self._down_until = -math.inf

    # ------------------------------------------------------------ the cache

    def _get(self, key: str, parse: Callable[[str | bytes], Any]) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            with self._lock:
                entry = self._entries.setdefault(key, _Entry())
        value, read_at = entry.state
        if read_at is not None and self._clock() - read_at < self.ttl_s:
            with self._lock:
                self._hits += 1
            return value
        # Stale: one thread reads again, the others keep the previous value
        # meanwhile. Never read: everyone waits for the first read.
        if not entry.lock.acquire(blocking=read_at is None):
            with self._lock:
                self._hits += 1
            return value
        try:
            value, read_at = entry.state
            if read_at is not None and self._clock() - read_at < self.ttl_s:
                with self._lock:
                    self._hits += 1
                return value  # another thread read it while we waited
            return self._refresh(key, entry, parse)
        finally:
            entry.lock.release()

    def _refresh(self, key: str, entry: _Entry, parse: Callable[[str | bytes], Any]) -> Any:
        """One GET and parse; called with the entry's lock held."""
        previous = entry.state[0]
        now = self._clock()
        if not self.strict and now < self._down_until:
            with self._lock:
                self._skipped += 1
            return previous
        try:
            client = self._redis()
            with self._lock:
                self._reads += 1
            raw = client.get(key)
        except redis.ResponseError as exc:
            if str(exc).startswith("WRONGTYPE"):  # not a string key: dropped like bad JSON
                return self._invalid_value(key, entry, now, exc)
            return self._failed(key, entry, now, exc)
        except Exception as exc:
            return self._failed(key, entry, now, exc)
        with self._lock:
            self._redis_up = True
        if raw is None:
            entry.state = (None, now)
            return None
        try:
            value = parse(raw)
        except (InvalidRecord, ValueError, TypeError) as exc:
            return self._invalid_value(key, entry, now, exc)
        entry.state = (value, now)
        return value

    def _failed(self, key: str, entry: _Entry, now: float, exc: Exception) -> Any:
        with self._lock:
            self._errors += 1
            self._redis_up = False
            self._last_error = f"{type(exc).__name__}: {exc}"
            should_log = self._should_log(now)
        if self.strict:
            raise StateUnavailable(f"cannot read {key}: {exc}") from exc
        self._down_until = now + self.ttl_s
        previous = entry.state[0]
        entry.state = (previous, now)
        if should_log:
            log.warning(
                "cannot read learned state from Redis (%s: %s); serving the last good values",
                type(exc).__name__,
                exc,
            )
        return previous

    def _invalid_value(self, key: str, entry: _Entry | None, now: float, exc: Exception) -> None:
        with self._lock:
            self._invalid += 1
            self._last_error = f"{key}: {exc}"
            should_log = self._should_log(now)
        if self.strict:
            if isinstance(exc, InvalidRecord):
                raise exc
            raise InvalidRecord(key, [("", f"{type(exc).__name__}: {exc}")]) from exc
        if entry is not None:
            entry.state = (None, now)
        if should_log:
            log.warning("ignoring %s: the stored value cannot be used (%s)", key, exc)
        return None

    def _should_log(self, now: float) -> bool:
        """Called under _lock: at most one warning a minute per reader."""
        if now < self._next_log:
            return False
        self._next_log = now + _STATE_LOG_S
        return True

    def _redis(self) -> redis.Redis:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = state_client(self.settings)
                client = self._client
        return client

    def _after_fork_in_child(self) -> None:
        # Locks another thread held at fork time would never be released in
        # the child; the cached values stay valid. redis-py's pool notices
        # the new pid and opens its own connections.
        self._lock = threading.Lock()
        self._entries = {k: _Entry(e.state) for k, e in self._entries.items()}
