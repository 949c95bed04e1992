"""OpenAI- and Ollama-compatible HTTP server over one model (``rkedge serve``).

``create_app(settings)`` builds the FastAPI app; tests pass an already-open :class:`~rkedge.runtime.LLM`.
FastAPI is imported only here and below (the ``serve`` extra).
"""

from rkedge.runtime.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]


def create_app(settings: ServerSettings, llm: object | None = None) -> object:
    from rkedge.runtime.server.app import create_app as _create

    return _create(settings, llm)  # type: ignore[arg-type]
