"""``rkedge serve`` options for limits and browser exposure (click only), named like ServerSettings fields."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from rkedge.runtime.server.settings import ServerSettings

F = Callable[..., Any]
_DEFAULTS = ServerSettings(model_path=Path())  # only its defaults are read


def server_limit_options(func: F) -> F:
    """Adds the options; the command receives them as keyword arguments to pass on to ServerSettings."""
    options: list[tuple[tuple[str, str], dict[str, Any]]] = [
        (("--cors-origin", "cors_origins"), {
            "multiple": True, "metavar": "ORIGIN",
            "help": "Let web pages from ORIGIN (e.g. http://192.168.1.5:3000) call the API (repeatable). Off by "
                    "default: only the server's own page may."}),
        (("--allowed-host", "allowed_hosts"), {
            "multiple": True, "metavar": "NAME",
            "help": "Host names the server answers to (repeatable). Default: loopback names, plus --host when it is "
                    "a specific address; any name when --host is 0.0.0.0 or :: (then --api-key guards it)."}),
        (("--max-body-bytes", "max_body_bytes"), {
            "type": click.IntRange(1024), "default": _DEFAULTS.max_body_bytes, "show_default": True,
            "help": "Largest request body."}),
        (("--max-connections", "max_connections"), {
            "type": click.IntRange(1), "default": _DEFAULTS.max_connections, "show_default": True,
            "help": "Open connections; more are closed at once."}),
        (("--shutdown-grace", "shutdown_grace_s"), {
            "type": click.FloatRange(0), "default": _DEFAULTS.shutdown_grace_s, "show_default": True,
            "metavar": "SECONDS", "help": "On SIGTERM, generations may finish for this long; then they are aborted."}),
    ]
    for decls, kwargs in reversed(options):
        func = click.option(*decls, **kwargs)(func)
    return func
