"""Images through the converted encoder (rknn-toolkit2 simulator) into the simulated NPU as
RKLLM_INPUT_MULTIMODAL, on every ABI: tags where each ABI takes them, several images per input from 1.2.1, the
call log's embedding length = images x image tokens x hidden size, and the image kept in the KV cache for a
following text-only turn."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_vlms import png_bytes, varied_images
from vlm_helpers import converted

from rkedge.errors import InputError
from rkedge.runtime.abi import SUPPORTED_ABIS
from rkedge.runtime.abi._native import NativeLibrary, NativeModel
from rkedge.runtime.library import resolve_library
from rkedge.runtime.types import CallState, InitParams, RunEvent, RunRequest
from rkedge.runtime.vision import VisionEncoder, image_prompt, init_image_tags
from rkedge.runtime.vision.multimodal import images_per_input, tags_at_init

pytest.importorskip("rknn.api")
TAGS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    _, result = converted(tmp_path_factory.getbasetemp(), "qwen2_vl")
    with VisionEncoder.open(result.manifest_file.parent, backend="simulator") as opened:
        yield opened


class Events:
    def __init__(self) -> None:
        self.events: list[RunEvent] = []

    def __call__(self, run_id: int, event: RunEvent) -> int:
        self.events.append(event)
        return 0

    def text(self) -> bytes:
        return b"".join(e.text or b"" for e in self.events if e.state == CallState.NORMAL)


def open_native(abi: str, model, encoder: VisionEncoder, events: Events) -> NativeModel:
    library = NativeLibrary.load(resolve_library("mock", abi).path, abi)
    native = NativeModel(library, str(model), InitParams(max_new_tokens=64), events,
                         image_tags=init_image_tags(encoder.manifest, abi))
    assert native.init_rc == 0 and native.alive
    return native


def simulated_vlm(make_model, abi: str, encoder: VisionEncoder):
    """A simulated .rkllm of the converted VLM's shape: its hidden size, and the encoder's image rows declared."""
    return make_model(abi, hidden_size=encoder.manifest.hidden_size, responses=[{"text": "two pictures"}],
                      extra={"multimodal": {"image_tokens": encoder.manifest.image_tokens}})


def test_images_reach_the_simulated_npu_as_multimodal_input(abi, make_model, call_log, encoder):
    count = 2 if images_per_input(abi) is None else 1
    images = encoder.encode([png_bytes(image) for image in varied_images(count, seed=11)])
    events = Events()
    native = open_native(abi, simulated_vlm(make_model, abi, encoder), encoder, events)
    try:
        prompt = images.prompt("What is in the pictures?")
        assert prompt.count("<image>") == count
        assert native.run(1, RunRequest(prompt=prompt.encode()), media=images.media(abi)) == 0
    finally:
        native.destroy()
    seen = call_log.last("multimodal_input")
    assert seen["accepted"] is True and seen["hidden_size"] == 128
    image = seen["image"]
    assert image["items"] == count and image["rows_per_item"] == encoder.manifest.image_tokens == 16
    assert image["embed_floats"] == count * encoder.manifest.embedding_floats == count * 16 * 128
    assert image["embed_sum"] == pytest.approx(float(images.rows.astype(np.float64).sum()), rel=1e-4, abs=1e-3)
    assert image["embed_last"] == pytest.approx(float(images.rows.ravel()[-1]), rel=1e-5)
    assert (image["start"], image["end"], image["content"]) == TAGS
    if tags_at_init(abi):
        init = call_log.last("rkllm_init")
        assert (init["img_start"], init["img_end"], init["img_content"]) == TAGS
    if images_per_input(abi) is None:
        assert (seen["image_width"], seen["image_height"]) == (112, 112)
    assert events.text() == b"two pictures"


def test_two_images_in_one_input_are_refused_before_abi_1_2_1(encoder):
    images = encoder.encode(varied_images(2, seed=3))
    for abi in SUPPORTED_ABIS:
        if images_per_input(abi) == 1:
            with pytest.raises(InputError, match="one image per message|1 image per input"):
                images.media(abi)
        else:
            assert images.media(abi).image is not None and images.media(abi).image.count == 2


@pytest.mark.parametrize("abi", [a for a in SUPPORTED_ABIS if a != "1.1"])  # 1.1 has no keep_history
def test_an_image_then_a_text_only_turn_keeps_the_image_in_the_kv_cache(abi, make_model, call_log, encoder):
    images = encoder.encode([varied_images(1, seed=21)[0]])
    events = Events()
    native = open_native(abi, simulated_vlm(make_model, abi, encoder), encoder, events)
    try:
        first = RunRequest(prompt=images.prompt("Describe it.").encode(), keep_history=True)
        assert native.run(1, first, media=images.media(abi)) == 0
        assert native.run(2, RunRequest(prompt=b"And its colour?", keep_history=True)) == 0
    finally:
        native.destroy()
    runs, ends = call_log.runs(), call_log.entries("run_end")
    assert [r["input_type"] for r in runs] == [3, 0]  # multimodal, then prompt
    assert runs[0]["prompt_tokens"] >= 16  # the image's rows took positions
    assert runs[1]["kv_tokens_before"] == ends[0]["kv_tokens_at_end"] >= 16


def test_the_converted_rkllm_answers_an_image_on_the_simulated_npu(call_log, encoder):
    abi = "1.3.0"  # the simulated toolkit's default version writes a 1.3.0 model
    model = encoder.folder / encoder.manifest.llm_file
    images = encoder.encode([png_bytes(varied_images(1, seed=4)[0])])
    events = Events()
    native = open_native(abi, model, encoder, events)
    try:
        assert native.run(1, RunRequest(prompt=images.prompt("What is it?").encode()), media=images.media(abi)) == 0
    finally:
        native.destroy()
    seen = call_log.last("multimodal_input")
    assert seen["accepted"] is True and seen["image"]["embed_floats"] == 16 * 128
    assert [e.state for e in events.events][-1] == CallState.FINISH


def test_placeholders_one_per_image():
    assert image_prompt("hi", 2) == "<image><image>hi"
    assert image_prompt("a <image> and <image>", 2) == "a <image> and <image>"
    with pytest.raises(InputError, match="2 <image> placeholders for 1 images"):
        image_prompt("<image><image>", 1)


def test_the_encoder_refuses_an_input_of_the_wrong_shape(encoder):
    with pytest.raises(InputError, match=r"takes \(64, 1176\)"):
        encoder.run_pixels(np.zeros((1, 3, 112, 112), np.float32))
    with pytest.raises(InputError, match="no image"):
        encoder.encode([])
