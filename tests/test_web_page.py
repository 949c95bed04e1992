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


THINK = "<think>\nFirst I weigh the question.\n</think>\n\nForty-two."
LONG = " ".join(f"word{i}" for i in range(300))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def test_conversation_settings_reasoning_stop_and_phone_width(tmp_path, call_log):
    from rkedge.runtime import LLM
    from rkedge.runtime.server.app import create_app
    from rkedge.runtime.server.settings import ServerSettings
    from rkedge.runtime.simmodel import simulated_manifest

    qwen3 = (Path(__file__).parent / "data" / "chat_templates" / "qwen3-0.6b.jinja").read_text()
    model = tmp_path / "thinker.rkllm"
    write_simulated_model(model, simulated_manifest(
        name="thinker", toolkit_version="1.2.3", pace={"prefill_tokens_per_s": 2000, "decode_tokens_per_s": 60},
        responses=[{"match": "long", "text": LONG}, {"text": THINK}],
        extra={"jinja_chat_template": qwen3, "special_tokens": {"eos_token": "<|im_end|>"}}))
    llm = LLM(model, library="mock", abi="1.3.0", max_new_tokens=400)
    app = create_app(ServerSettings(model_path=model), llm)
    server = LiveServer(app)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 390, "height": 780}, device_scale_factor=1)
            page = context.new_page()
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(server.url + "/")
            page.click("#toggle-settings")
            page.fill("#system", "You answer briefly.")
            page.dispatch_event("#system", "change")
            page.fill("#temperature", "0.4")
            page.dispatch_event("#temperature", "change")
            page.select_option("#thinking", "on")
            page.dispatch_event("#thinking", "change")
            assert page.eval_on_selector("#model-select", "s => s.value") == "thinker"
            page.fill("#input", "What is the answer?")
            page.click("#send")
            page.wait_for_selector(".assistant[data-state=done]", timeout=30000)
            assert page.text_content(".assistant .content") == "Forty-two."
            assert page.eval_on_selector(".assistant details.reasoning", "d => d.open") is False, "folded"
            assert "First I weigh" in (page.text_content(".assistant .reasoning-text") or "")
            page.screenshot(path=str(ARTIFACTS / "web-chat-phone.png"), full_page=True)
            prompt = bytes.fromhex(call_log.runs()[-1]["prompt_hex"]).decode()
            assert "You answer briefly." in prompt, "the system prompt setting was sent"
            assert abs(call_log.runs()[-1]["sampling"]["temperature"] - 0.4) < 1e-6

            page.reload()
            page.wait_for_selector(".assistant")
            assert page.text_content(".user") == "What is the answer?", "the conversation survived the reload"
            assert page.text_content(".assistant .content") == "Forty-two."
            assert page.input_value("#system") == "You answer briefly."
            assert page.input_value("#thinking") == "on"

            page.fill("#input", "Now something long")
            page.click("#send")
            wait_until(lambda: len(page.query_selector_all(".assistant")[-1].text_content() or "") > 20)
            page.click("#stop")
            wait_until(lambda: page.query_selector_all(".assistant")[-1].get_attribute("data-state") == "done")
            stopped = page.query_selector_all(".assistant")[-1].text_content() or ""
            assert "[stopped]" in stopped and len(stopped) < len(LONG)
            wait_until(lambda: app.state.engine.running == 0)
            page.screenshot(path=str(ARTIFACTS / "web-chat-stopped.png"), full_page=True)

            page.click("#reset")
            page.reload()
            assert page.query_selector_all(".msg") == [], "New chat forgets the stored conversation"
            browser.close()
    finally:
        server.stop()
        llm.close()
    assert all(url.startswith(server.url) for url in requests), "no request leaves the server's origin"
    assert call_log.entries("rkllm_abort"), "Stop aborted the run on the NPU"
