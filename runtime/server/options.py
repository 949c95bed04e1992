"""``rkedge serve`` options for limits, browser exposure and several models (click only), named like
ServerSettings fields."""

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
        (("--allow-remote-images", "allow_remote_images"), {
            "is_flag": True, "default": False,
            "help": "Fetch http(s) image URLs in OpenAI image_url parts. Off by default (boards are often offline): "
                    "images come inline as data: URLs or base64."}),
        (("--max-image-bytes", "max_image_bytes"), {
            "type": click.IntRange(1024), "default": _DEFAULTS.max_image_bytes, "show_default": True,
            "help": "Largest encoded image (a request's body is also limited by --max-body-bytes)."}),
        (("--shutdown-grace", "shutdown_grace_s"), {
            "type": click.FloatRange(0), "default": _DEFAULTS.shutdown_grace_s, "show_default": True,
            "metavar": "SECONDS", "help": "On SIGTERM, generations may finish for this long; then they are aborted."}),
    ]
    for decls, kwargs in reversed(options):
        func = click.option(*decls, **kwargs)(func)
    return func


def server_model_options(func: F) -> F:
    """--max-loaded, --memory-budget, --lora, --prompt-cache and --allow-embeddings; the command passes them to ServerSettings
    through :func:`model_settings`."""
    options: list[tuple[tuple[str, ...], dict[str, Any]]] = [
        (("--max-loaded", "max_loaded"), {
            "type": click.IntRange(1), "default": None,
            "help": "Models loaded at once (several MODELs); the least recently used is unloaded first. Default: "
                    "as many as the memory budget holds."}),
        (("--memory-budget", "memory_budget_gb"), {
            "type": click.FloatRange(0.1), "default": None, "metavar": "GB",
            "help": "RAM the loaded models may take, against each manifest's memory estimate. Default: the "
                    "board's RAM (/proc/meminfo, with rkedge.fit's margin)."}),
        (("--lora", "lora"), {
            "multiple": True, "metavar": "[MODEL=]PATH[:NAME]",
            "help": "Load a LoRA adapter (repeatable); requests select it with the model name MODEL+NAME (NAME: "
                    "the file's stem without _lora). MODEL= is needed when serving several models."}),
        (("--prompt-cache", "prompt_cache"), {
            "type": click.Path(exists=True, dir_okay=False, path_type=Path), "default": None,
            "help": "A prompt cache (saved with save_prompt_cache) loaded into the first model at each load."}),
        (("--allow-embeddings", "embeddings_any_model"), {
            "is_flag": True,
            "help": "Serve embeddings from any model (default: only models whose manifest says embedding_model, "
                    "or named *Embed*)."}),
    ]
    for decls, kwargs in reversed(options):
        func = click.option(*decls, **kwargs)(func)
    return func


def model_settings(max_loaded: int | None, memory_budget_gb: float | None, lora: tuple[str, ...],
                   prompt_cache: Path | None, embeddings_any_model: bool = False) -> dict[str, Any]:
    """ServerSettings fields from :func:`server_model_options`."""
    adapters: list[tuple[str | None, str | None, Path]] = []
    for spec in lora:
        target, _, rest = spec.rpartition("=")
        path_text, name = rest, None
        if ":" in rest and not Path(rest).exists():
            path_text, _, name = rest.rpartition(":")
        path = Path(path_text)
        if not path.is_file():
            raise click.BadParameter(f"{path} is not a file", param_hint="--lora")
        adapters.append((target or None, name or None, path))
    return {"max_loaded": max_loaded, "lora": tuple(adapters), "prompt_cache": prompt_cache,
            "embeddings_any_model": embeddings_any_model,
            "memory_budget_bytes": int(memory_budget_gb * 2**30) if memory_budget_gb else None}
