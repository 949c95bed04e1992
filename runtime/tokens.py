"""Counting prompt tokens for the server's context check and usage figures (never by words).

Sources, best first: the model's own tokenizer (``tokenizer.json`` beside the ``.rkllm``, read with the
``tokenizers`` package when installed); the simulated NPU's documented rule for simulated models (one token
per 4 bytes); otherwise nothing, and the runtime's perf stats (ABI >= 1.2.1) report the counts after a run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


class TokenCounter:
    def __init__(self, count: Callable[[str], int], source: str) -> None:
        self._count = count
        self.source = source

    def __call__(self, text: str) -> int:
        return self._count(text)


def counter_for(model_path: Path, metadata: Mapping[str, Any],
                encode: Callable[[str], list[int]] | None = None) -> TokenCounter | None:
    """How to count a prompt's tokens: ``encode`` (the loaded model's own tokenizer, when its backend has one on
    the host), the simulated NPU's rule, or a tokenizer.json beside the model."""
    if encode is not None:
        return TokenCounter(lambda text: len(encode(text)), "the model's tokenizer")
    if metadata.get("simulated") or metadata.get("format") == "rkedge-simulated-model":
        return TokenCounter(lambda text: (len(text.encode("utf-8")) + 3) // 4, "simulated NPU rule (4 bytes/token)")
    for candidate in (model_path.with_name("tokenizer.json"), model_path.parent / "tokenizer" / "tokenizer.json"):
        if candidate.is_file():
            return _file_counter(candidate)
    return None


def _file_counter(path: Path) -> TokenCounter | None:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    tokenizer = Tokenizer.from_file(str(path))

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    return TokenCounter(count, f"tokenizer {path.name}")
