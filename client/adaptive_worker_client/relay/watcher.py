"""Keeping an agent's runtime on the state our workers last published."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from adaptive_worker_client.contract import (
    CURSOR_KEY_TEMPLATE,
    PUBLISHED_VERSION_FIELD,
    runtime_key,
)
from adaptive_worker_client.relay import _common
from adaptive_worker_client.relay._common import log, settings_or_default
from adaptive_worker_client.relay.config import _config_dict, recommended_config

if TYPE_CHECKING:  # pragma: no cover - typing only
    from adaptive_worker_client.config import AgentSettings

__all__ = ["Snapshot", "StateWatcher", "loadable_digest", "published_version"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a registering runtime would load, as of one published version."""

    version: int
    digest: str


def _watch_client(settings: AgentSettings) -> redis.Redis:
    """The agent-side reader's client (short timeouts: reads run on the agent's loop)."""
    from adaptive_worker_client.reader import state_client

    if settings.redis_url is None:
        raise ValueError("StateWatcher needs a real Redis URL (ADAPTIVE_REDIS_URL)")
    return state_client(settings)


def published_version(client: redis.Redis, prefix: str, agent_id: str) -> int:
    """Our published state version of the agent: bumped by every learn commit
    and every rebuild (the `version` field of our cursor hash)."""
    key = CURSOR_KEY_TEMPLATE.format(prefix=prefix, agent_id=agent_id)
    return int(client.hget(key, PUBLISHED_VERSION_FIELD) or 0)


def loadable_digest(client: redis.Redis, prefix: str, agent_id: str) -> str:
    """sha256 of exactly what a registering runtime reads: `plan:{agent}` and
    `acg_stability:{agent}`, or `acg_observations:{agent}` when that is absent."""
    plan, stability = client.mget(
        [
            runtime_key("plan", prefix, agent_id=agent_id),
            runtime_key("acg_stability", prefix, key=agent_id),
        ]
    )
    h = hashlib.sha256()
    for part in (plan, stability):
        h.update(b"\x00" if part is None else b"\x01" + part.encode() + b"\x00")
    if stability is None:
        observations = client.get(runtime_key("acg_observations", prefix, key=agent_id))
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
        settings: AgentSettings | None = None,
        redis_client: redis.Redis | None = None,
        poll_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.agent_id = agent_id
        self.settings = settings = settings_or_default(settings)
        self.prefix = settings.key_prefix
        self.poll_interval_s = float(poll_interval_s)
        self._config = config
        self._client = redis_client or _watch_client(settings)
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
        version = published_version(self._client, self.prefix, self.agent_id)
        return Snapshot(version, loadable_digest(self._client, self.prefix, self.agent_id))

    def changed(self) -> bool:
        """Whether a registration now would load other values than the current one did.

        One HGET when our version has not moved since the last check.
        """
        self.checks += 1
        if self._loaded is None:
            return True
        version = published_version(self._client, self.prefix, self.agent_id)
        if version == self._seen_version:
            return False
        digest = loadable_digest(self._client, self.prefix, self.agent_id)
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
        relay = _common._relay()
        try:
            await relay.subscribers.flush_async()
            await asyncio.to_thread(old.wait_for_idle)
        finally:
            await old.shutdown()

    async def _swap(self) -> None:
        relay = _common._relay()
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
