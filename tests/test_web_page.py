"""The web chat page in headless Chromium against a live server on the simulated NPU (saves a screenshot)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt install chromium)")
playwright_api = pytest.importorskip("playwright.sync_api")

from server_helpers import LiveServer, make_app  # noqa: E402

from rkedge.runtime.simmodel import build_cli_manifest, write_simulated_model  # noqa: E402

ANSWER = "The page streams this answer token by token: Größe 日本語."
T = TypeVar("T")
ARTIFACTS = Path(os.environ.get("RKEDGE_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))


def wait_until(probe: Callable[[], T], timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return value


def test_the_page_shows_a_streamed_answer(tmp_path, monkeypatch):
    model = tmp_path / "page.rkllm"
    write_simulated_model(model, build_cli_manifest(chat_family="gemma", name="page", toolkit_version="1.2.1",
                                                    responses=(ANSWER,), pace="400,40"))
    app, llm = make_app(model)
    server = LiveServer(app)
    try:
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 900, "height": 600})
            page.goto(server.url + "/")
            assert page.text_content("#model") == "page"
            page.fill("#input", "Hello page")
            page.click("#send")
            # streaming: part of the answer is visible before all of it (40 tokens/s)
            # Polled from here: wait_for_function evaluates a string, which the page's CSP rightly forbids.
            partial = wait_until(lambda: len(page.text_content(".assistant") or "") > 3 and
                                 page.text_content(".assistant"))
            page.wait_for_selector(".assistant[data-state=done]", timeout=30000)
            text = page.text_content(".assistant")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "web-chat.png"
            page.screenshot(path=str(shot))
            stats = page.text_content("#stats")
            page.fill("#input", "Second turn")
            page.click("#send")
            wait_until(lambda: len(page.query_selector_all(".assistant[data-state=done]")) == 2)
            browser.close()
    finally:
        server.stop()
        llm.close()
    assert text.startswith(ANSWER) and len(partial) < len(ANSWER)
    assert "TTFT" in stats and "tokens/s" in stats and "ms" in stats
    assert shot.stat().st_size > 5000
