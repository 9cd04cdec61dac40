"""Flower, secure by default: `celery -A worker flower` needs a login and binds loopback.

Why: Flower 2.2 itself starts without any login and listens on every
interface, and its pages show every task's arguments (our runs carry
prompts) and offer buttons that shut workers down or revoke tasks. The one
documented way to start it (the command above, which compose runs too) must
not depend on the operator remembering `--basic_auth` and `--address`.

How: Flower reads its options (the `FLOWER_*` variables, `flowerconfig.py`,
the command line) into tornado's global `options` after `celery -A worker`
has imported this app, then runs tornado's parse callbacks. `install()`,
called when `worker.celery` is imported, registers one that

- binds 127.0.0.1 when no `--address` / `FLOWER_ADDRESS` (nor a unix socket)
  was given (a container sets `FLOWER_ADDRESS=0.0.0.0` and publishes the port
  on the host's loopback);
- reads credentials from `FLOWER_BASIC_AUTH_FILE` (a Docker or Kubernetes
  secret: not in `docker inspect`) when set, besides Flower's own
  `FLOWER_BASIC_AUTH`;
- refuses `--basic_auth` on the command line: every local user reads it with
  `ps` or in `/proc/<pid>/cmdline`, and `docker inspect` shows a container's;
- refuses to start without a login (basic auth or Flower's OAuth `--auth`)
  unless the operator opted out with `ADAPTIVE_FLOWER_INSECURE_NO_AUTH=true`.

A refusal is one line on stderr and exit status 2, before anything listens.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from worker.settings import ENV_PREFIX, Settings

AUTH_ENV = "FLOWER_BASIC_AUTH"
AUTH_FILE_ENV = "FLOWER_BASIC_AUTH_FILE"
OPT_OUT_ENV = f"{ENV_PREFIX}FLOWER_INSECURE_NO_AUTH"
LOOPBACK = "127.0.0.1"
EXIT_REFUSED = 2

_installed = False


class FlowerRefused(Exception):
    """Flower must not start with these options; the message says why and what to set."""


def _credentials(text: str, source: str) -> list[str]:
    """`user:password` entries, separated by commas or newlines (Flower's own format)."""
    entries = [e.strip() for line in text.splitlines() for e in line.split(",") if e.strip()]
    if not entries:
        raise FlowerRefused(f"{source} holds no credentials (expected user:password)")
    for entry in entries:
        user, sep, password = entry.partition(":")
        if not (user and sep and password):
            raise FlowerRefused(f"{source} must hold user:password entries (one is not)")
    return entries


def _argv_has_credentials(argv: Sequence[str]) -> bool:
    return any(
        arg.lstrip("-").replace("-", "_").partition("=")[0] == "basic_auth"
        for arg in argv
        if arg.startswith("-")
    )


def harden(
    options: Any,
    *,
    allow_no_auth: bool,
    environ: Mapping[str, str],
    argv: Sequence[str],
) -> list[str]:
    """Make Flower's parsed `options` safe, or raise `FlowerRefused`; returns warnings to print.

    `options` is tornado's global option set as Flower filled it (any object
    with `address`, `unix_socket`, `basic_auth` and `auth` attributes).
    """
    warnings: list[str] = []
    if _argv_has_credentials(argv):
        raise FlowerRefused(
            "--basic_auth on the command line shows the password to every local user "
            f"(ps, /proc/<pid>/cmdline, docker inspect): set {AUTH_ENV} or {AUTH_FILE_ENV} "
            "in the environment instead"
        )
    auth_file = environ.get(AUTH_FILE_ENV, "").strip()
    if auth_file:
        if options.basic_auth:
            raise FlowerRefused(f"set {AUTH_ENV} or {AUTH_FILE_ENV}, not both")
        try:
            text = Path(auth_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise FlowerRefused(f"cannot read {AUTH_FILE_ENV} ({auth_file}): {reason}") from None
        options.basic_auth = _credentials(text, f"{AUTH_FILE_ENV} ({auth_file})")
    elif options.basic_auth:
        options.basic_auth = _credentials(",".join(options.basic_auth), AUTH_ENV)
    if not options.address and not options.unix_socket:
        options.address = LOOPBACK
    if not (options.basic_auth or options.auth):
        if not allow_no_auth:
            raise FlowerRefused(
                f"refusing to start Flower without a login: set {AUTH_ENV}=user:password "
                f"(or {AUTH_FILE_ENV}=/path/to/file) in the environment, "
                f"or {OPT_OUT_ENV}=true to run it open"
            )
        where = options.unix_socket or options.address
        warnings.append(f"Flower runs WITHOUT a login ({OPT_OUT_ENV}=true), on {where}")
    return warnings


def _callback(
    settings: Settings, options: Any, conf_exists: Callable[[], bool]
) -> Callable[[], None]:
    calls = 0

    def on_parse() -> None:
        nonlocal calls
        calls += 1
        # Flower parses the command line once, and once more after reading
        # flowerconfig.py when that file exists: judge the final options only.
        if calls == 1 and conf_exists():
            return
        try:
            warnings = harden(
                options,
                allow_no_auth=settings.flower_insecure_no_auth,
                environ=os.environ,
                argv=sys.argv[1:],
            )
        except FlowerRefused as exc:
            print(f"flower: {exc}", file=sys.stderr)
            raise SystemExit(EXIT_REFUSED) from None
        for warning in warnings:
            print(f"flower: warning: {warning}", file=sys.stderr)

    return on_parse


def install(settings: Settings) -> None:
    """Register the check with Flower's option parser, in a `celery ... flower` process only.

    The celery command line imports its plugins (Flower among them) before
    it loads the app, so a process that never imported Flower is not about
    to run it, and pays nothing here.
    """
    global _installed
    if _installed or "flower.command" not in sys.modules:
        return
    from tornado.options import options

    def conf_exists() -> bool:
        return os.path.exists(os.path.abspath(options.conf))

    options.add_parse_callback(_callback(settings, options, conf_exists))
    _installed = True
