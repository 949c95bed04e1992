"""Click options shared by the board-side commands (defined once, as pip-tools does)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

F = Callable[..., Any]


def library_options(func: F) -> F:
    """``--mock``, ``--lib`` and ``--abi``: which runtime library and which ABI to call it with."""
    func = click.option("--abi", metavar="VERSION",
                        help="ABI or runtime release of the library (1.1, 1.2.0, 1.2.1/1.2.2, 1.2.3, 1.3.0, 1.3.1). "
                             "Needed when the library does not say; env RKEDGE_RKLLM_ABI.")(func)
    func = click.option("--lib", "library", metavar="PATH", help="librkllmrt.so to use (env RKEDGE_RKLLM_LIB).")(func)
    func = click.option("--mock", is_flag=True, help="Run on the simulated NPU (built from C source on first use); an RKNN "
                        "bundle runs in the rknn-toolkit2 simulator.")(func)
    return func


def runtime_param_options(func: F) -> F:
    """RKLLMParam fields set at init."""
    options: list[tuple[str, dict[str, Any]]] = [
        ("--max-context", dict(type=int, default=None, help="max_context_len (default 4096, or the model's limit).")),
        ("--max-new-tokens", dict(type=int, default=1024, show_default=True, help="max_new_tokens per reply.")),
        ("--temperature", dict(type=float, default=None, help="Sampling temperature.")),
        ("--top-k", dict(type=int, default=None, help="Top-k sampling.")),
        ("--top-p", dict(type=float, default=None, help="Top-p sampling.")),
        ("--base-domain-id", dict(type=int, default=None,
                                  help="First NPU IOMMU domain for the weights (1 is the fix for F-1 malloc errors).")),
        ("--template", dict(metavar="FAMILY", default=None,
                            help="Chat template family when the model has no manifest: gemma, llama3, qwen2, "
                                 "qwen2.5, chatml, phi3.")),
        ("--verbose", dict(is_flag=True, help="Show the runtime's init log.")),
    ]
    for decl, kwargs in reversed(options):
        func = click.option(decl, **kwargs)(func)
    return func


def resolve_library_choice(mock: bool, library: str | None) -> str | None:
    if mock and library:
        raise click.BadParameter("use --mock or --lib, not both", param_hint="--mock/--lib")
    return "mock" if mock else library


def llm_kwargs(max_context: int | None, max_new_tokens: int, temperature: float | None, top_k: int | None,
               top_p: float | None, base_domain_id: int | None) -> dict[str, Any]:
    values = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
              "base_domain_id": base_domain_id}
    if max_context is not None:
        values["max_context_len"] = max_context
    return {k: v for k, v in values.items() if v is not None}
