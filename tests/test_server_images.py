"""Images through the server (issue 15, item 4): OpenAI ``image_url`` parts (``data:`` URLs; remote URLs only
with --allow-remote-images) and Ollama ``images`` reach a converted tiny Qwen2-VL's encoder (rknn-toolkit2
simulator) and the simulated NPU as one multimodal input; limits and models without vision are 400s naming the
field."""

from __future__ import annotations

import base64
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("rknn.api")

from server_helpers import LOOPBACK, LiveServer, make_app, wait_for, write_model
from tiny_vlms import png_bytes, varied_images
from vlm_helpers import converted

IMAGE_TOKENS, HIDDEN = 16, 128  # the tiny Qwen2-VL's merged patches and hidden size


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, result = converted(tmp_path_factory.getbasetemp(), "qwen2_vl")
    return result.manifest_file.parent


@pytest.fixture
def served(vlm_folder: Path) -> Iterator[tuple[Any, Any]]:
    from fastapi.testclient import TestClient

    app, llm = make_app(vlm_folder, max_image_bytes=64 * 1024)
    with TestClient(app, base_url=LOOPBACK) as client:
        yield client, llm
    llm.close()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def picture(seed: int) -> bytes:
    return png_bytes(varied_images(1, seed=seed)[0])


def image_message(*urls: str, text: str = "What is in the picture?") -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {"role": "user", "content": parts}


def test_an_openai_request_with_a_data_png_is_answered_and_reaches_the_npu_as_multimodal_input(served, call_log):
    client, llm = served
    assert llm.vision is not None and llm.vision.image_tokens == IMAGE_TOKENS
    response = client.post("/v1/chat/completions", json={"messages": [image_message(data_url(picture(3)))]})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    seen = call_log.last("multimodal_input")
    assert seen["accepted"] is True and seen["hidden_size"] == HIDDEN == llm.vision.hidden_size
    assert seen["image"]["items"] == 1
    assert seen["image"]["embed_floats"] == llm.vision.image_tokens * llm.vision.hidden_size == IMAGE_TOKENS * HIDDEN
    run = call_log.runs()[-1]
    assert run["input_type"] == 3 and "What is in the picture?<image>" in run["prompt"], "the part keeps its place"
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] >= IMAGE_TOKENS, "the image's rows are counted"


def test_two_images_in_one_message(served, call_log):
    client, _ = served
    response = client.post("/v1/chat/completions",
                           json={"messages": [image_message(data_url(picture(4)), data_url(picture(5)))]})
    assert response.status_code == 200, response.text
    seen = call_log.last("multimodal_input")
    assert seen["image"]["items"] == 2 and seen["image"]["embed_floats"] == 2 * IMAGE_TOKENS * HIDDEN
    assert call_log.runs()[-1]["prompt"].count("<image>") == 2


def test_an_image_turn_then_a_text_only_turn_sends_only_the_suffix(served, call_log):
    client, _ = served
    history: list[dict[str, Any]] = [image_message(data_url(picture(6)), text="Describe it.")]
    first = client.post("/v1/chat/completions", json={"messages": history})
    assert first.status_code == 200, first.text
    history += [{"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]},
                {"role": "user", "content": "And its colour?"}]
    second = client.post("/v1/chat/completions", json={"messages": history})
    assert second.status_code == 200, second.text
    runs, ends = call_log.runs(), call_log.entries("run_end")
    assert [r["input_type"] for r in runs] == [3, 0], "multimodal first, then a text-only prompt"
    assert len(call_log.entries("multimodal_input")) == 1, "the image is encoded and sent once"
    assert "Describe it." not in runs[1]["prompt"] and "And its colour?" in runs[1]["prompt"]
    assert runs[1]["kv_tokens_before"] == ends[0]["kv_tokens_at_end"] >= IMAGE_TOKENS


def test_ollama_images_on_chat_and_generate(served, call_log):
    client, _ = served
    encoded = base64.b64encode(picture(7)).decode()
    chat = client.post("/api/chat", json={"stream": False, "messages": [
        {"role": "user", "content": "What is it?", "images": [encoded]}]})
    assert chat.status_code == 200, chat.text and chat.json()["message"]["content"]
    assert call_log.last("multimodal_input")["image"]["embed_floats"] == IMAGE_TOKENS * HIDDEN
    generate = client.post("/api/generate", json={"stream": False, "prompt": "Name it.", "images": [encoded]})
    assert generate.status_code == 200, generate.text
    assert len(call_log.entries("multimodal_input")) == 2
    raw = client.post("/api/generate", json={"stream": False, "raw": True, "prompt": "<image> raw", "images": [encoded]})
    assert raw.status_code == 200, raw.text
    assert call_log.runs()[-1]["prompt"] == "<image> raw"


REFUSED = [
    ("/v1/chat/completions", {"messages": [image_message("https://example.com/cat.png")]},
     "messages.0.content.1.image_url.url", "remote image URLs are off"),
    ("/v1/chat/completions", {"messages": [image_message("data:image/tiff;base64,AAAA")]},
     "messages.0.content.1.image_url.url", "image/tiff is not accepted"),
    ("/v1/chat/completions", {"messages": [image_message(data_url(b"GIF89a" + bytes(70 * 1024), "image/gif"))]},
     "messages.0.content.1.image_url.url", "larger than the 65536 bytes"),
    ("/v1/chat/completions", {"messages": [image_message(data_url(b"not an image at all"))]},
     "messages.0.content.1.image_url.url", "is not a PNG, JPEG"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
     "messages.0.content.0", "not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x", "images": ["aGk="]},
                                           {"role": "user", "content": "hi"}]},
     "messages.0", "only user messages"),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi", "images": ["%%%"]}]}, "messages.0.images.0",
     "not valid base64"),
    ("/api/generate", {"prompt": "hi", "images": [base64.b64encode(b"plain text").decode()]}, "images.0",
     "is not a PNG"),
]


@pytest.mark.parametrize(("path", "body", "field", "says"), REFUSED, ids=[f"{p}:{f}" for p, _, f, _ in REFUSED])
def test_image_limits_are_400s_naming_the_field(served, call_log, path, body, field, says):
    client, _ = served
    response = client.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    message = error if isinstance(error, str) else error["message"]
    assert f"({field})" in message and says in message, message
    assert call_log.runs() == [], "nothing reached the NPU"


def test_a_model_without_vision_refuses_images(tmp_path: Path, call_log):
    from fastapi.testclient import TestClient

    app, llm = make_app(write_model(tmp_path / "served.rkllm"))
    try:
        with TestClient(app, base_url=LOOPBACK) as client:
            openai = client.post("/v1/chat/completions", json={"messages": [image_message(data_url(picture(1)))]})
            ollama = client.post("/api/generate", json={"prompt": "hi", "stream": False,
                                                        "images": [base64.b64encode(picture(1)).decode()]})
            text = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    finally:
        llm.close()
    for response in (openai, ollama):
        assert response.status_code == 400, response.text
        assert "has no vision encoder" in response.text
    assert text.status_code == 200
    assert len(call_log.runs()) == 1, "only the text request ran"


@pytest.fixture
def image_host() -> Iterator[str]:
    """A loopback HTTP server with one PNG, for the remote-URL path."""
    body = picture(9)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/cat.png"
    server.shutdown()


def test_remote_image_urls_are_fetched_only_with_the_flag(vlm_folder, image_host, call_log):
    from fastapi.testclient import TestClient

    app, llm = make_app(vlm_folder, allow_remote_images=True)
    try:
        with TestClient(app, base_url=LOOPBACK) as client:
            response = client.post("/v1/chat/completions", json={"messages": [image_message(image_host)]})
    finally:
        llm.close()
    assert response.status_code == 200, response.text
    assert call_log.last("multimodal_input")["image"]["embed_floats"] == IMAGE_TOKENS * HIDDEN


def test_the_ollama_client_sends_an_image(vlm_folder, call_log):
    ollama = pytest.importorskip("ollama")
    app, llm = make_app(vlm_folder)
    server = LiveServer(app)
    try:
        client = ollama.Client(host=server.url, timeout=120)
        reply = client.chat(model=app.state.model_name,
                            messages=[{"role": "user", "content": "What is it?", "images": [picture(10)]}])
        assert reply.message.content
    finally:
        server.stop()
        llm.close()
    seen = call_log.last("multimodal_input")
    assert seen["accepted"] is True and seen["image"]["embed_floats"] == IMAGE_TOKENS * HIDDEN


def test_api_show_lists_vision_for_a_vlm_only(served, tmp_path):
    client, _ = served
    shown = client.post("/api/show", json={"model": client.app.state.model_name})
    assert shown.status_code == 200 and "vision" in shown.json()["capabilities"]
    from fastapi.testclient import TestClient

    app, llm = make_app(write_model(tmp_path / "served.rkllm"))
    try:
        with TestClient(app, base_url=LOOPBACK) as text_client:
            assert "vision" not in text_client.post("/api/show", json={"model": "served"}).json()["capabilities"]
    finally:
        llm.close()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt install chromium)")
def test_the_page_sends_a_chosen_and_a_pasted_image(vlm_folder, call_log, tmp_path):
    playwright_api = pytest.importorskip("playwright.sync_api")
    chosen = tmp_path / "chosen.png"
    chosen.write_bytes(picture(12))
    pasted = base64.b64encode(picture(13)).decode()
    app, llm = make_app(vlm_folder)
    server = LiveServer(app)
    requested: list[str] = []
    try:
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 900, "height": 600})
            page.on("request", lambda request: requested.append(request.url))
            page.goto(server.url + "/")
            page.set_input_files("#file", str(chosen))
            page.wait_for_selector("#pending img")
            page.fill("#input", "What is in it?")
            page.click("#send")
            page.wait_for_selector(".assistant[data-state=done]", timeout=60000)
            assert page.query_selector(".user img") is not None, "the sent image is shown in its bubble"
            assert page.query_selector("#pending img") is None, "attachments are cleared once sent"
            page.evaluate("""(data) => {
                const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
                const transfer = new DataTransfer();
                transfer.items.add(new File([bytes], "pasted.png", {type: "image/png"}));
                document.getElementById("input").dispatchEvent(
                    new ClipboardEvent("paste", {clipboardData: transfer, bubbles: true, cancelable: true}));
            }""", pasted)
            page.wait_for_selector("#pending img")
            page.fill("#input", "And this one?")
            page.click("#send")
            page.wait_for_selector(".assistant[data-state=done] >> nth=1", timeout=60000)
            errors = page.query_selector_all(".error")
            browser.close()
    finally:
        server.stop()
        llm.close()
    assert errors == []
    images = call_log.entries("multimodal_input")
    assert len(images) == 2 and all(i["image"]["embed_floats"] == IMAGE_TOKENS * HIDDEN for i in images)
    assert images[0]["image"]["embed_sum"] != images[1]["image"]["embed_sum"], "the pasted image is another one"
    assert requested and all(url.startswith(server.url) or url.startswith("data:") for url in requested), requested


def test_rkedge_serve_mock_answers_a_data_png_and_refuses_remote_urls_without_the_flag(vlm_folder, call_log):
    import json
    import os
    import socket
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen([sys.executable, "-m", "rkedge", "serve", str(vlm_folder), "--mock", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RKEDGE_MOCK_CALL_LOG": str(call_log.path)})
    url = f"http://127.0.0.1:{port}"

    def post(message: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(url + "/v1/chat/completions", method="POST",
                                         data=json.dumps({"messages": [message]}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return proc.poll() is not None  # ended: stop waiting, the assertions below say why

    try:
        wait_for(healthy, timeout=90)
        assert proc.poll() is None, proc.communicate()[1]
        status, answer = post(image_message(data_url(picture(14))))
        remote_status, remote = post(image_message("http://127.0.0.1:9/cat.png"))
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert status == 200 and answer["choices"][0]["message"]["content"], answer
    seen = call_log.last("multimodal_input")
    assert seen["accepted"] is True and seen["image"]["embed_floats"] == IMAGE_TOKENS * HIDDEN
    assert remote_status == 400 and remote["error"]["param"] == "messages.0.content.1.image_url.url"
    assert "--allow-remote-images" in remote["error"]["message"]
