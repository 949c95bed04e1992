"""Server settings (plain data; no FastAPI import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Host names a loopback server answers to (the Host header), against DNS rebinding.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
LOOPBACK_ADDRESSES = ("127.0.0.1", "localhost", "::1")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")


@dataclass
class ServerSettings:
    model_path: Path  # the first (default) model
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
    # -- several models -------------------------------------------------------------------------------------
    model_paths: tuple[Path, ...] = ()  # every model file or folder served; default: model_path alone
    max_loaded: int | None = None  # models loaded at once; more unload the least recently used
    memory_budget_bytes: int | None = None  # RAM the loaded models may take; default: the board's (meminfo)
    lora: tuple[tuple[str | None, str | None, Path], ...] = ()  # (model or None, adapter name or None, file)
    prompt_cache: Path | None = None  # loaded into the first model at each load
    embeddings_any_model: bool = False  # embeddings from models whose manifest does not say they are for it
    # -- limits (enforced while reading; see README "Serving: limits and exposure") ------------------------
    max_body_bytes: int = 4 * 2**20  # a chat history of a 32k-token context is well under 1 MB
    max_connections: int = 64  # uvicorn's limit_concurrency: more get 503 at once
    header_timeout_s: float = 10.0  # a connection that has not sent its request headers by then is closed
    body_timeout_s: float = 30.0  # reading one request body
    send_timeout_s: float = 30.0  # a client that does not take a piece of its answer for this long is let go
    shutdown_grace_s: float = 10.0  # in-flight generations may finish this long after SIGTERM, then are aborted
    allow_remote_images: bool = False  # fetch http(s) image URLs (boards are often offline: data: URLs only)
    max_image_bytes: int = 20 * 2**20  # one encoded image (sources.MAX_IMAGE_BYTES); within max_body_bytes too
    # -- browser exposure ------------------------------------------------------------------------------------
    allowed_hosts: tuple[str, ...] = ()  # Host header values; default: see hosts()
    cors_origins: tuple[str, ...] = ()  # origins whose pages may call the API (opt-in)

    def models(self) -> list[Path]:
        """The model files served, the first one the default (folders expanded)."""
        from rkedge.runtime.server.models import model_files

        return model_files(self.model_paths or (self.model_path,))

    def hosts(self) -> tuple[str, ...] | None:
        """The Host allow-list: as given; else loopback names, plus the address bound when it is a specific
        one. None (any Host) when bound to all interfaces without a list: the API key guards that case."""
        if self.allowed_hosts:
            return tuple(h.lower() for h in self.allowed_hosts)
        if self.host in WILDCARD_ADDRESSES:
            return None
        names = LOOPBACK_NAMES if self.host in LOOPBACK_ADDRESSES else (*LOOPBACK_NAMES, self.host.lower())
        return tuple(names)
