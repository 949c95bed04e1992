"""Images through LLM and chat sessions (issue 15 item 3, runtime side): ``LLM.generate(images=...)`` and
``ChatSession`` messages with images reach the simulated NPU as one multimodal input per run, with the tags where
each ABI takes them; several images per message; an image kept in the KV cache for text-only follow-ups; video
and audio refused with the reason; the chat CLI's ``/image``. The encoder is the converted tiny Qwen2-VL's
(rknn-toolkit2 simulator); the language model a simulated one of its shape, one per ABI."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("rknn.api")
from tiny_vlms import png_bytes, varied_images
from vlm_helpers import converted

from rkedge.errors import InputError
from rkedge.runtime import LLM
from rkedge.runtime.chat import ChatSession
from rkedge.runtime.chat_cli import ChatRepl
from rkedge.runtime.images import flatten_images
from rkedge.runtime.vision import VisionEncoder
from rkedge.runtime.vision.multimodal import images_per_input, tags_at_init

TAGS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
IMAGE_TOKENS, HIDDEN = 16, 128  # the tiny Qwen2-VL's merged patches and hidden size


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, result = converted(tmp_path_factory.getbasetemp(), "qwen2_vl")
    return result.manifest_file.parent


@pytest.fixture(scope="module")
def encoder(vlm_folder: Path):
    with VisionEncoder.open(vlm_folder, backend="simulator") as opened:
        yield opened


def vlm_model(make_model, abi: str, *, family: str | None = "qwen2", replies: dict[str, str] | None = None) -> Path:
    """A simulated language model of the tiny VLM's shape (hidden size, image rows declared); ``replies``: the
    text answered to a prompt holding each key (else "reply 0")."""
    rules = [{"match": match, "text": text} for match, text in (replies or {}).items()]
    return make_model(abi, hidden_size=HIDDEN, chat_family=family, responses=[*rules, {"text": "reply 0"}],
                      extra={"multimodal": {"image_tokens": IMAGE_TOKENS}})


def data_url(image: Any) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def test_generate_sends_the_images_as_one_multimodal_input_on_every_abi(abi, make_model, call_log, encoder,
                                                                        tmp_path):
    count = 2 if images_per_input(abi) is None else 1
    arrays = varied_images(count, seed=5)
    path = tmp_path / "first.png"
    path.write_bytes(png_bytes(arrays[0]))
    sources: list[Any] = [path, *arrays[1:]]  # a path, and an HxWx3 array
    with LLM(vlm_model(make_model, abi), library="mock", abi=abi, vision=encoder) as llm:
        result = llm.generate("What differs?", images=sources, stream=False)
    assert result.text == "reply 0" and result.finish_reason == "stop"
    seen = call_log.last("multimodal_input")
    assert seen["accepted"] is True, seen["reason"]
    image = seen["image"]
    assert (image["items"], image["rows_per_item"]) == (count, IMAGE_TOKENS)
    assert image["embed_floats"] == count * IMAGE_TOKENS * HIDDEN
    assert image["tags_in_prompt"] == count
    expected = encoder.encode([png_bytes(a) for a in arrays[:count]]).rows
    assert image["embed_sum"] == pytest.approx(float(expected.astype(np.float64).sum()), rel=1e-4, abs=1e-3), \
        "a path, an array and PNG bytes of the same picture give the same embedding"
    run = call_log.runs()[-1]
    assert run["input_type"] == 3 and run["prompt"] == "<image>" * count + "What differs?"
    init = call_log.last("rkllm_init")
    if tags_at_init(abi):
        assert (init["img_start"], init["img_end"], init["img_content"]) == TAGS
    else:
        assert (image["start"], image["end"], image["content"]) == TAGS


def test_the_vlm_folder_is_a_model_and_its_rkllm_finds_its_encoder(vlm_folder, call_log):
    manifest = encoder_manifest(vlm_folder)
    llm_file = vlm_folder / manifest["llm_file"]
    for given in (vlm_folder, llm_file):
        with LLM(given, library="mock") as llm:
            assert llm.model_path == llm_file and llm.vision is not None
            assert llm.vision.image_tokens == IMAGE_TOKENS
            assert llm.info()["vision"]["image_tokens"] == IMAGE_TOKENS
            text = llm.generate("<image> What is it?", images=[png_bytes(varied_images(1, seed=4)[0])],
                                stream=False)
        assert text.finish_reason == "stop" and text.text
        seen = call_log.last("multimodal_input")
        assert seen["accepted"] is True and seen["image"]["embed_floats"] == IMAGE_TOKENS * HIDDEN
        assert call_log.runs()[-1]["prompt"] == "<image> What is it?", "the user's placeholder is kept in place"


def encoder_manifest(folder: Path) -> dict[str, Any]:
    import json

    data: dict[str, Any] = json.loads((folder / "vlm.json").read_text(encoding="utf-8"))
    return data


@pytest.mark.parametrize("abi", ["1.2.0", "1.2.1", "1.3.0", "1.3.1"])  # 1.1 keeps no history
def test_an_image_stays_in_the_kv_cache_and_a_text_only_turn_sends_its_suffix(abi, make_model, call_log, encoder):
    picture = png_bytes(varied_images(1, seed=21)[0])
    replies = {"colour": "red"}
    with LLM(vlm_model(make_model, abi, replies=replies), library="mock", abi=abi, vision=encoder) as llm:
        session = llm.chat_session()
        first = session.send("Describe it.", images=[picture], stream=False)
        second = session.send("And its colour?", stream=False)
        assert (first.text, second.text) == ("reply 0", "red")
        assert session.full_prefills == 0
        assert session.messages[0]["content"] == "<image>Describe it." and session.messages[0]["images"] == [picture]
    runs, ends = call_log.runs(), call_log.entries("run_end")
    assert [r["input_type"] for r in runs] == [3, 0], "multimodal first, then a text-only prompt"
    assert len(call_log.entries("multimodal_input")) == 1, "the image is encoded and sent once"
    assert "<image>" in runs[0]["prompt"] and "<image>" not in runs[1]["prompt"]
    assert "Describe it." not in runs[1]["prompt"] and "And its colour?" in runs[1]["prompt"]
    assert runs[0]["prompt_tokens"] >= IMAGE_TOKENS, "the image's rows took positions"
    assert runs[1]["kv_tokens_before"] == ends[0]["kv_tokens_at_end"] >= IMAGE_TOKENS


def test_a_server_style_history_resent_with_its_image_continues_and_another_image_starts_over(make_model, call_log,
                                                                                              encoder):
    abi = "1.3.0"
    red, blue = varied_images(2, seed=8)
    parts = [{"type": "text", "text": "What is "}, {"type": "image_url", "image_url": {"url": data_url(red)}},
             {"type": "text", "text": " showing?"}]
    with LLM(vlm_model(make_model, abi, ), library="mock", abi=abi, vision=encoder) as llm:
        session = llm.chat_session()
        history = [{"role": "user", "content": parts}]
        reply = session.respond(history, stream=False)
        history += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "Sure?"}]
        session.respond(history, stream=False)  # the same picture resent: only the new turn is prefilled
        changed = [{"role": "user", "content": [parts[0], {"type": "image", "image": png_bytes(blue)}, parts[2]]},
                   *history[1:]]
        session.respond(changed, stream=False)  # another picture at the same place: the cache cannot continue
        assert session.full_prefills == 1
    runs = call_log.runs()
    assert [r["input_type"] for r in runs] == [3, 0, 3]
    assert runs[0]["prompt"].count("What is <image> showing?") == 1, "the part keeps its place in the text"
    images = call_log.entries("multimodal_input")
    assert len(images) == 2 and images[0]["image"]["embed_sum"] != images[1]["image"]["embed_sum"]
    assert runs[2]["kv_tokens_before"] == 0


def test_two_images_in_one_message_on_abis_that_take_them(make_model, call_log, encoder):
    with LLM(vlm_model(make_model, "1.2.1"), library="mock", abi="1.2.1", vision=encoder) as llm:
        result = llm.chat_session().send("Compare them.", images=varied_images(2, seed=30), stream=False)
    assert result.finish_reason == "stop"
    image = call_log.last("multimodal_input")["image"]
    assert image["items"] == 2 and image["embed_floats"] == 2 * IMAGE_TOKENS * HIDDEN
    with LLM(vlm_model(make_model, "1.2.0"), library="mock", abi="1.2.0", vision=encoder) as llm:
        with pytest.raises(InputError, match="1 image per input"):
            llm.chat_session().send("Compare them.", images=varied_images(2, seed=30))


def test_video_audio_and_images_without_eyes_are_refused_with_the_reason(make_model, encoder):
    with LLM(vlm_model(make_model, "1.2.3"), library="mock", abi="1.2.3", vision=encoder) as llm:
        with pytest.raises(InputError, match="video input needs runtime ABI 1.3.0"):
            llm.generate("What happens?", videos=[[np.zeros((4, 4, 3), np.uint8)]])
        with pytest.raises(InputError, match="audio input needs runtime ABI 1.3.1"):
            llm.chat_session().respond([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}])
    with LLM(vlm_model(make_model, "1.3.1"), library="mock", abi="1.3.1", vision=encoder) as llm:
        with pytest.raises(InputError, match="image encoder only") as refused:
            llm.generate("Listen.", audio=b"RIFF")
        assert refused.value.fix
    with LLM(make_model("1.3.0", chat_family="qwen2"), library="mock", abi="1.3.0") as text_only:
        assert text_only.vision is None and text_only.info()["vision"] is None
        with pytest.raises(InputError, match="has no vision encoder"):
            text_only.generate("What is it?", images=[png_bytes(varied_images(1)[0])])
        with pytest.raises(InputError, match="has no vision encoder"):
            text_only.chat_session().send("What is it?", images=[b"\x89PNG"])
        # A text model takes "<image>" as the text it is: nothing changes for it.
        assert text_only.chat_session().send("print('<image>')", stream=False).finish_reason == "stop"


def test_placeholders_follow_the_parts_and_must_match_the_images():
    flat, images = flatten_images({"role": "user", "content": "two", "images": [b"a", b"b"]}, "<image>")
    assert flat == {"role": "user", "content": "<image><image>two"} and images == [b"a", b"b"]
    flat, _ = flatten_images({"role": "user", "content": "<image> left, <image> right", "images": [b"a", b"b"]},
                             "<image>")
    assert flat["content"] == "<image> left, <image> right"
    with pytest.raises(InputError, match="carries no image"):
        flatten_images({"role": "user", "content": "see <image>"}, "<image>")
    with pytest.raises(InputError, match="data: URL"):
        flatten_images({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///x.png"}}]},
                       "<image>")
    with pytest.raises(InputError, match="remote image URLs are off"):
        flatten_images({"role": "user", "content": [{"type": "image_url", "image_url": "https://x/y.png"}]},
                       "<image>")


def test_the_chat_cli_attaches_an_image_to_the_next_message(make_model, call_log, encoder, tmp_path):
    picture = tmp_path / "cat.png"
    picture.write_bytes(png_bytes(varied_images(1, seed=2)[0]))
    out, err = io.StringIO(), io.StringIO()
    with LLM(vlm_model(make_model, "1.3.0", replies={"now": "reply 1"}), library="mock", abi="1.3.0",
             vision=encoder) as llm:
        repl = ChatRepl(llm, llm.chat_session(), out=out, err=err)
        repl.loop(io.StringIO(f"/image {tmp_path / 'missing.png'}\n/image {picture}\n/image\nWhat is it?\n"
                              "And now?\n/exit\n"))
    assert "missing.png is not a file" in err.getvalue()
    assert f"images for the next message: {picture}" in out.getvalue()
    assert "reply 0" in out.getvalue() and "reply 1" in out.getvalue()
    runs = call_log.runs()
    assert [r["input_type"] for r in runs] == [3, 0], "the image went with the first message only"
    assert call_log.last("multimodal_input")["accepted"] is True


def test_the_chat_cli_says_a_text_model_takes_no_image(make_model, tmp_path):
    picture = tmp_path / "cat.png"
    picture.write_bytes(png_bytes(varied_images(1, seed=2)[0]))
    out, err = io.StringIO(), io.StringIO()
    with LLM(make_model("1.3.0"), library="mock", abi="1.3.0") as llm:
        ChatRepl(llm, llm.chat_session(), out=out, err=err).loop(io.StringIO(f"/image {picture}\n/exit\n"))
    assert "has no vision encoder" in err.getvalue() and "fix:" in err.getvalue()


def test_a_copied_vlm_folder_with_a_stale_language_model_is_refused(vlm_folder, tmp_path):
    """Issue 11 item 8 through the VLM path: the .rkllm beside its manifest must be the one it describes."""
    from rkedge.errors import ModelFileError

    copy = tmp_path / "vlm"
    shutil.copytree(vlm_folder, copy)
    llm_file = copy / encoder_manifest(copy)["llm_file"]
    with open(llm_file, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelFileError, match="different conversions"):
        LLM(copy, library="mock")


def test_each_image_counts_its_rows_against_the_context(make_model, encoder):
    from rkedge.errors import ContextLengthExceeded

    def words(text: str) -> int:
        return len(text.split())

    picture = png_bytes(varied_images(1, seed=9)[0])
    with LLM(vlm_model(make_model, "1.3.0"), library="mock", abi="1.3.0", vision=encoder, max_context_len=400) as llm:
        session = ChatSession(llm, count_tokens=words)
        text = " ".join(["a"] * 390)
        assert session.send(text, stream=False).finish_reason == "stop", "the text alone fits"
        session.reset()
        with pytest.raises(ContextLengthExceeded, match="context holds 400"):
            session.send(text, images=[picture])  # + 16 image rows no longer fit


def test_a_caller_that_renders_passes_the_rendering_of_with_placeholders(make_model, call_log, encoder):
    """What the server does: render (and count) the conversation itself, then hand the rendering over."""
    messages = [{"role": "user", "content": [{"type": "image", "image": png_bytes(varied_images(1, seed=3)[0])},
                                             {"type": "text", "text": "What is it?"}]}]
    with LLM(vlm_model(make_model, "1.3.0"), library="mock", abi="1.3.0", vision=encoder) as llm:
        session = llm.chat_session()
        assert llm.template is not None
        flat = session.with_placeholders(messages)
        assert flat[0]["content"] == "<image>What is it?" and len(flat[0]["images"]) == 1
        rendered = llm.template.render(flat, True)
        assert session.respond(messages, rendered=rendered, stream=False).finish_reason == "stop"
        with pytest.raises(InputError, match="0 image placeholders for 1 images"):
            session.respond(messages, rendered=llm.template.render([{"role": "user", "content": "x"}], True))
    assert call_log.runs()[0]["prompt"] == rendered and call_log.last("multimodal_input")["accepted"] is True


def test_rkedge_chat_takes_an_image_command_on_the_vlm_folder(vlm_folder, tmp_path, call_log):
    import os
    import subprocess
    import sys

    picture = tmp_path / "cat.png"
    picture.write_bytes(png_bytes(varied_images(1, seed=6)[0]))
    result = subprocess.run([sys.executable, "-m", "rkedge", "chat", str(vlm_folder), "--mock"],
                            input=f"/image {picture}\nWhat is it?\n/exit\n", capture_output=True, text=True,
                            timeout=300, env={**os.environ, "RKEDGE_MOCK_CALL_LOG": str(call_log.path)})
    assert result.returncode == 0, result.stderr
    assert f"image {picture} attached" in result.stdout
    seen = call_log.last("multimodal_input")
    assert seen["accepted"] is True and seen["image"]["embed_floats"] == IMAGE_TOKENS * HIDDEN


def test_every_image_source_gives_the_same_embedding(make_model, call_log, encoder, tmp_path):
    """PNG bytes, a path, a PIL image and an HxWx3 array of one picture: one embedding (ImageEmbeddings too)."""
    from PIL import Image

    array = varied_images(1, seed=13)[0]
    path = tmp_path / "p.png"
    path.write_bytes(png_bytes(array))
    sums = []
    with LLM(vlm_model(make_model, "1.3.0"), library="mock", abi="1.3.0", vision=encoder) as llm:
        for source in (png_bytes(array), path, Image.fromarray(array), array, llm.encode_images([array])):
            images = source if not isinstance(source, (bytes, Path, Image.Image, np.ndarray)) else [source]
            assert llm.generate("What is it?", images=images, stream=False).finish_reason == "stop"
            sums.append(call_log.last("multimodal_input")["image"]["embed_sum"])
        with pytest.raises(InputError, match="a list of images"):
            llm.generate("What is it?", images=png_bytes(array))  # one image, not in a list
    assert len(sums) == 5 and all(s == pytest.approx(sums[0], rel=1e-5, abs=1e-4) for s in sums)


def test_media_on_an_abi_with_tags_at_init_needs_the_model_loaded_with_its_encoder(make_model, encoder):
    from rkedge.runtime.types import RunRequest

    images = encoder.encode(varied_images(1, seed=1))
    with LLM(vlm_model(make_model, "1.2.3"), library="mock", abi="1.2.3") as llm:  # no vision= given
        with pytest.raises(InputError, match="takes the image tags at init"):
            llm.run(RunRequest(prompt=images.prompt("What?").encode(), media=images.media("1.2.3")))
        with pytest.raises(InputError, match="needs its text prompt"):
            llm.run(RunRequest(token_ids=[1, 2], media=images.media("1.2.3")))
