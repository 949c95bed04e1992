"""ASGI middleware (plain ASGI, so ``receive`` reaches the routes unwrapped by Starlette's request machinery).

:class:`Observe` (outermost) writes one access-log line and one metrics count per request, labelled by route
template. :class:`Exposure` refuses, before any body byte is read, a Host not on the allow-list (DNS
rebinding), a foreign Origin (a web page posting to a loopback server) and a POST body that is not JSON-typed.
:class:`BodyLimit` refuses a declared Content-Length over the limit, then enforces the limit and a read
timeout while the body is read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rkedge.runtime.server.errors import ApiError, error_response
from rkedge.runtime.server.metrics import UNMATCHED, Metrics
from rkedge.runtime.server.responses import STATUS_KEY
from rkedge.runtime.server.settings import ServerSettings

access_log = logging.getLogger("rkedge.serve.access")


class Observe:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, routes: Sequence[BaseRoute]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    def endpoint(self, scope: Scope) -> str:
        """The route template (``/v1/chat/completions``), never the raw path: the label set stays bounded."""
        for route in self.routes:
            match, _ = route.matches(scope)
            if match != Match.NONE:
                return str(getattr(route, "path", UNMATCHED))
        return UNMATCHED

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status, sent = 500, 0  # 500 unless a response starts: an exception escaped

        async def observed_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            final = scope.get("state", {}).get(STATUS_KEY, status)
            self.metrics.request(self.endpoint(scope), final)
            client = scope.get("client")
            access_log.info('%s "%s %s" %d %dB %.3fs', f"{client[0]}:{client[1]}" if client else "-",
                            scope["method"], scope["path"], final, sent, time.perf_counter() - started)


class Exposure:
    """Browser exposure: the Host allow-list, the Origin check and JSON-only POST bodies."""

    def __init__(self, app: ASGIApp, *, settings: ServerSettings) -> None:
        self.app = app
        self.hosts = settings.hosts()
        self.origins = {o.rstrip("/").lower() for o in settings.cors_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self.check(scope, Headers(scope=scope))
        except ApiError as refused:
            await error_response(scope["path"], refused)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def check(self, scope: Scope, headers: Headers) -> None:
        host = headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.lower()
        if self.hosts is not None and name not in self.hosts:
            raise ApiError(421, f"this server does not answer to the host name {name!r}.", code="host_not_allowed",
                           param="Host")
        origin = headers.get("origin")
        if origin is not None and origin.rstrip("/").lower() not in self.origins and \
                urlsplit(origin).netloc.lower() != host.lower():
            raise ApiError(403, f"requests from web pages of {origin} are not allowed.", code="origin_not_allowed",
                           param="Origin")
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if kind and kind != "application/json" and not kind.endswith("+json"):
                raise ApiError(415, f"the body must be JSON (Content-Type application/json), not {kind!r}.",
                               code="unsupported_media_type", param="Content-Type")
            if not kind and origin is not None:  # a browser's "simple request" trick: no preflight without a type
                raise ApiError(415, "a request from a web page must say Content-Type: application/json.",
                               code="unsupported_media_type", param="Content-Type")


class BodyLimit:
    """The body size limit, before reading (a declared Content-Length) and while reading (any body), and a
    time limit on reading the body. Routes read bodies only after the key check (deps.json_body)."""

    def __init__(self, app: ASGIApp, *, settings: ServerSettings) -> None:
        self.app = app
        self.max_body = settings.max_body_bytes
        self.body_timeout_s = settings.body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await error_response(scope["path"], self.too_large())(scope, receive, send)
            return
        await self.app(scope, self.limited(receive), send)

    def too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than the server's limit of {self.max_body} bytes.",
                        code="body_too_large")

    def limited(self, receive: Receive) -> Receive:
        """``receive`` that counts body bytes (413 past the limit) and bounds the time to read the body (408);
        once the body is complete it passes through (later reads wait for the client to leave)."""
        read = 0
        deadline: float | None = None
        complete = False

        async def limited_receive() -> Message:
            nonlocal read, deadline, complete
            if complete:
                return await receive()
            loop = asyncio.get_running_loop()
            deadline = deadline or loop.time() + self.body_timeout_s
            try:
                message: dict[str, Any] = dict(await asyncio.wait_for(receive(), max(0.0, deadline - loop.time())))
            except asyncio.TimeoutError:
                raise ApiError(408, f"the request body was not received within {self.body_timeout_s:.0f} s.",
                               code="body_timeout") from None
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_body:
                    raise self.too_large()
                complete = not message.get("more_body", False)
            return message

        return limited_receive
