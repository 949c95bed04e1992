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

from rkedge.runtime.server.deps import Served, get_engine, get_served, require_key
from rkedge.runtime.server.engine import Engine
from rkedge.runtime.server.metrics import CONTENT_TYPE

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


@public.get("/", response_class=HTMLResponse, include_in_schema=False)
def web_page(request: Request) -> HTMLResponse:
    page, headers = request.app.state.page
    return HTMLResponse(page, headers=headers)


@public.get("/health")
def health(engine: Annotated[Engine, Depends(get_engine)], served: Annotated[Served, Depends(get_served)]
           ) -> dict[str, Any]:
    llm = engine.llm
    info = llm.info()
    return {"status": "ok" if not llm.closed else "closed", "model": served.name, "abi": info["abi"],
            "runtime_version": info["runtime_version"], "simulated": info["simulated"],
            "queue_depth": engine.waiting, "running": engine.running, "max_queue": engine.max_queue}


@router.get("/metrics", include_in_schema=False)
def metrics(engine: Annotated[Engine, Depends(get_engine)]) -> Response:
    return Response(engine.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/openapi.json", include_in_schema=False)
def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False)
def docs(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title=request.app.title)
