"""Server settings (plain data; no FastAPI import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ServerSettings:
    model_path: Path
    library: str | None = None
    abi: str | None = None
    model_name: str | None = None  # the id clients use; default: the manifest's name or the file's stem
    api_key: str | None = None
    max_queue: int = 8  # requests waiting behind the running one; more get 429
    queue_timeout_s: float = 600.0  # a request that waited this long gets 503
    host: str = "127.0.0.1"
    port: int = 8080
    template: str | None = None
    llm_params: dict[str, Any] = field(default_factory=dict)
