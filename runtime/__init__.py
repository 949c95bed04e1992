"""The board runtime: ``librkllmrt.so`` through ctypes, with one struct set per ABI version.

Imports nothing heavy and loads no native library at import time::

    from rkedge.runtime import LLM
    with LLM("model.rkllm", library="mock") as llm:
        print(llm.generate("Hello", stream=False).text)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rkedge.runtime.backend import Backend
    from rkedge.runtime.chat import ChatSession
    from rkedge.runtime.llm import LLM, GenerationResult, GenerationStats, GenerationStream

_LAZY = {
    "LLM": "rkedge.runtime.llm",
    "GenerationResult": "rkedge.runtime._stream",
    "GenerationStats": "rkedge.runtime._stream",
    "GenerationStream": "rkedge.runtime._stream",
    "ChatSession": "rkedge.runtime.chat",
    "Backend": "rkedge.runtime.backend",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = ["LLM", "ChatSession", "GenerationResult", "GenerationStats", "GenerationStream", "Backend"]
