"""What every command shares: exit codes, the common options, the error guard,
and turning options into settings and a connected store.

Only typer and the standard library are imported here at module level:
every command module imports this one while the app is built, also for
`--help`, which must not pay for redis, pydantic or Celery. Those are
imported by the functions below, when a command runs.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import typer

if TYPE_CHECKING:
    from storage.store import Store
    from worker.settings import Settings

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
EXIT_NOT_FOUND = 4

# The settings' environment prefix (worker.settings.ENV_PREFIX, which a test
# checks this equals): messages name variables before settings are imported.
ENV_PREFIX = "ADAPTIVE_"

P = ParamSpec("P")
R = TypeVar("R")

RedisUrl = Annotated[
    str | None,
    typer.Option(
        "--redis-url",
        help="Redis URL (default: the primary ADAPTIVE_REDIS_SENTINELS name, else "
        "ADAPTIVE_REDIS_URL; unset: embedded); given, it is used instead of the sentinels",
    ),
]
Prefix = Annotated[
    str | None, typer.Option("--prefix", help="key prefix (default: ADAPTIVE_KEY_PREFIX)")
]
AsJson = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
AgentArg = Annotated[str, typer.Argument(help="agent id")]


def fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    """Print `message` as one `error:` line on stderr; raise what this returns."""
    from worker.cli.render import error

    error(message)
    return typer.Exit(code)


def _explain(exc: Exception) -> tuple[str, int]:
    """The one line and exit code for an exception a command did not handle.

    Modules are looked up only when something went wrong: an exception of a
    library's type can only exist if that library was imported already.
    """
    import redis

    from storage.errors import InvalidRecord
    from worker.settings import SettingsError

    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return f"lost the connection to Redis: {exc}", EXIT_UNAVAILABLE
    if isinstance(exc, redis.RedisError):
        return f"Redis refused a command: {exc}", EXIT_FAILED
    if isinstance(exc, InvalidRecord):
        return f"a stored value cannot be read: {exc}", EXIT_FAILED
    if isinstance(exc, SettingsError):
        return str(exc), EXIT_BAD_INPUT
    if isinstance(exc, UnicodeDecodeError):
        return f"a stored value is not UTF-8 text ({exc.reason} at byte {exc.start})", EXIT_FAILED
    if isinstance(exc, RecursionError):
        return "a value is nested too deeply to process", EXIT_FAILED
    return f"unexpected {type(exc).__name__}: {exc}", EXIT_FAILED


def _is_exit(exc: BaseException) -> bool:
    """Our own exits and typer's usage errors, or the same from Celery's command
    line (`run` starts a worker, whose click is not typer's)."""
    if isinstance(exc, typer.Exit | typer.Abort | typer.TyperException):
        return True
    import sys

    click = sys.modules.get("click")
    return click is not None and isinstance(
        exc, click.exceptions.Exit | click.ClickException | click.Abort
    )


def guard(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn what a user or hostile data can cause (Redis gone mid-command, a
    corrupt or undecodable stored value, a bad setting, a bug hit by odd
    data) into one line and a documented exit code instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # the README promises one line, never a traceback
            if _is_exit(exc):
                raise
            message, code = _explain(exc)
            raise fail(message, code) from None

    return wrapper


def overrides(redis_url: str | None, prefix: str | None) -> dict[str, Any]:
    """Settings the options replace. `--redis-url` names one server: the
    sentinels of the environment would otherwise win over it (they do over
    ADAPTIVE_REDIS_URL), and a command line beats the environment."""
    given: dict[str, Any] = {}
    if redis_url is not None:
        given["redis_url"] = redis_url
        given["redis_sentinels"] = None
    if prefix is not None:
        given["key_prefix"] = prefix
    return given


def settings_from(redis_url: str | None, prefix: str | None, **more: Any) -> Settings:
    """The environment's settings with the command line's options on top.

    A bad value names the option it came from when it came from one.
    """
    from worker.settings import SettingsError, load_settings

    try:
        return load_settings(**overrides(redis_url, prefix), **more)
    except SettingsError as exc:
        message = str(exc)
        given = {"--redis-url": ("REDIS_URL", redis_url), "--prefix": ("KEY_PREFIX", prefix)}
        for option, (name, value) in given.items():
            if value is not None:  # the value came from the option, not the variable
                variable = f"{ENV_PREFIX}{name}"
                message = message.replace(f"{variable}:", f"{option} ({variable}):")
        raise fail(message, EXIT_BAD_INPUT) from None


def masked(url: str | None) -> str:
    """A URL fit for a message: no password (also when the URL does not parse)."""
    if url is None:
        return "the embedded Redis"
    from kombu.utils.url import maybe_sanitize_url

    try:
        return str(maybe_sanitize_url(url))
    except ValueError:
        return re.sub(r"(//[^/@]*?:)[^/@]*@", r"\1**@", url)


def state_location(settings: Settings) -> str:
    """Where the state is read, for messages (no password): with Sentinel the
    service and its sentinels, not `redis_url`, which is then only the
    address NeMo Relay agents are given."""
    if settings.redis_sentinels is not None:
        return (
            f"the primary of {settings.redis_sentinel_service!r}"
            f" (sentinels {settings.redis_sentinels})"
        )
    return masked(settings.redis_url)


def open_store(settings: Settings) -> Store:
    """A store on the settings' Redis, checked to answer: one line and exit 3 if not.

    The workers' state connection (`connect_state`): with Sentinel, the
    current primary, so after a failover a command reads the promoted node
    instead of failing on the dead one (or reading the demoted one).
    """
    import redis

    from storage.connection import connect_state
    from storage.store import Store

    try:
        client = connect_state(settings)
    except ValueError as exc:  # the URL itself: bad port, bad query option...
        raise fail(f"bad Redis URL {masked(settings.redis_url)}: {exc}", EXIT_BAD_INPUT) from None
    try:
        client.ping()
    except redis.RedisError as exc:
        message = f"cannot reach Redis at {state_location(settings)}: {exc}"
        raise fail(message, EXIT_UNAVAILABLE) from None
    return Store(client, settings.key_prefix)


def read_input(file: str) -> bytes:
    """The bytes of FILE, or of stdin for `-`; one line and exit 2 if unreadable."""
    import sys
    from pathlib import Path

    if file == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(file).read_bytes()
    except OSError as exc:
        raise fail(f"cannot read {file}: {exc.strerror}", EXIT_BAD_INPUT) from None
