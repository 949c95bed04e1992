"""Server test helpers: a real HTTP server on a free loopback port in a thread (for clients that disconnect,
curl, the OpenAI SDK), the app over a simulated model, and raw-socket clients that leave on purpose."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

LONG = " ".join(f"tok{i}" for i in range(200))
REPLY = "Hello! Größe 日本語 🚀."
#: Base URL for TestClient: its default host name "testserver" is not on the server's Host allow-list.
LOOPBACK = "http://127.0.0.1:8080"


def write_model(path: Path, pace: str = "unlimited") -> Path:
    from rkedge.runtime.simmodel import build_cli_manifest, write_simulated_model

    manifest = build_cli_manifest(chat_family="gemma", name="served", toolkit_version="1.2.1", pace=pace,
                                  responses=("long=>" + LONG, "stop=>alpha beta STOP gamma", REPLY))
    write_simulated_model(path, manifest)
    return path


def make_app(model: Path, abi: str = "1.3.0", **settings: Any) -> tuple[Any, Any]:
    from rkedge.runtime import LLM
    from rkedge.runtime.server.app import create_app
    from rkedge.runtime.server.settings import ServerSettings

    llm = LLM(model, library="mock", abi=abi, max_new_tokens=512)
    app = create_app(ServerSettings(model_path=model, **settings), llm)
    return app, llm


def chat_body(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "served", "messages": [{"role": "user", "content": content}], **extra}


class LiveServer:
    """The app under uvicorn with the configuration `rkedge serve` uses (limits, protocol), on a free port."""

    def __init__(self, app: Any, **config: Any) -> None:
        import uvicorn

        from rkedge.runtime.server.run import uvicorn_config

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(app, app.state.settings, host="127.0.0.1", port=self.port,
                                                    log_level="error", **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


def raw_request(url: str, path: str, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None
                ) -> socket.socket:
    """Sends one POST over a plain socket and returns the socket (the caller reads or closes it: leaves)."""
    parts = urlsplit(url)
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = {"Host": parts.netloc, "Content-Type": "application/json", "Content-Length": str(len(payload)),
            **(headers or {})}
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\n".encode() + "".join(f"{k}: {v}\r\n" for k, v in head.items()).encode()
                 + b"\r\n" + payload)
    return sock


def wait_for(probe: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)
    return value
