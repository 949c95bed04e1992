"""The web chat page, ``/health``, ``/metrics`` and the API docs.

Open without the key: ``/`` (a static page; it asks for the key itself), ``/health`` (liveness for systemd and
load balancers) and Ollama's ``/api/version``. Everything else, ``/metrics`` and the docs included, needs the
key when one is set.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.responses import HTMLResponse, JSONResponse, Response

from rkedge.runtime.server.deps import get_pool, require_key
from rkedge.runtime.server.metrics import CONTENT_TYPE
from rkedge.runtime.server.models import ModelPool

public = APIRouter(tags=["operations"])
router = APIRouter(dependencies=[Depends(require_key)], tags=["operations"])


def render_page(model_name: str) -> tuple[str, dict[str, str]]:
    """The page with the model's name, and its security headers: a CSP that allows exactly its own inline
    script and style (by hash), calls to this origin only, and no framing."""
    page = resources.files("rkedge.runtime.server").joinpath("static/index.html").read_text(encoding="utf-8")
    page = page.replace("{{MODEL}}", _html_escape(model_name))

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
           "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return page, {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                  "Referrer-Policy": "no-referrer", "Cross-Origin-Opener-Policy": "same-origin",
                  "Cross-Origin-Resource-Policy": "same-origin", "Cache-Control": "no-store"}


def _html_escape(text: str) -> str:
    import html

    return html.escape(text, quote=True)


@public.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
def web_page(request: Request) -> HTMLResponse:
    """The page; HEAD answers 200 too (Ollama clients probe ``HEAD /`` to see that the server is up)."""
    page, headers = request.app.state.page
    return HTMLResponse(page, headers=headers)


@public.get("/health")
def health(pool: Annotated[ModelPool, Depends(get_pool)]) -> dict[str, Any]:
    first = pool.default
    loaded = pool.loaded()
    llm = (first.engine or (loaded[0].engine if loaded else None))
    info = llm.llm.info() if llm is not None else {}
    return {"status": "ok" if llm is not None and not llm.llm.closed else "idle", "model": first.name,
            "models": [e.name for e in pool.entries], "loaded": [e.name for e in loaded],
            "abi": info.get("abi"), "runtime_version": info.get("runtime_version"),
            "simulated": info.get("simulated"), "queue_depth": pool.waiting, "running": pool.running,
            "max_queue": pool.queue.max_queue}


@router.get("/metrics", include_in_schema=False)
def metrics(pool: Annotated[ModelPool, Depends(get_pool)]) -> Response:
    return Response(pool.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/openapi.json", include_in_schema=False)
def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False)
def docs(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title=request.app.title)
