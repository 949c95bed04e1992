"""Images as the APIs send them (data: URLs, Ollama base64, paths) with their limits; the doctor's and the plan's
view of a VLM folder."""

from __future__ import annotations

import base64

import pytest
from tiny_vlms import png_bytes, varied_images
from vlm_helpers import converted

from rkedge.errors import InputError
from rkedge.runtime.vision import check_vlm, encoder_footprint, multimodal_run, read_vlm
from rkedge.runtime.vision.sources import from_base64, from_data_url, from_image_url, from_path

PNG = png_bytes(varied_images(1, size=(20, 10))[0])
B64 = base64.b64encode(PNG).decode()


def test_data_urls_and_ollama_base64_give_the_image_bytes():
    assert from_data_url(f"data:image/png;base64,{B64}") == PNG
    assert from_image_url(f"data:image/png;base64,{B64}") == PNG
    assert from_base64(B64) == PNG and from_base64(f"data:image/png;base64,{B64}") == PNG


@pytest.mark.parametrize(("value", "message"), [
    ("data:image/png,abc", "must look like data:image/png;base64"),
    ("data:image/svg+xml;base64,PHN2Zz4=", "image type image/svg\\+xml is not accepted"),
    ("data:image/png;base64,@@@", "not valid base64"),
    (f"data:image/png;base64,{base64.b64encode(b'hello world').decode()}", "not a PNG, JPEG"),
])
def test_bad_data_urls_are_refused_with_what_to_do(value, message):
    with pytest.raises(InputError, match=message) as caught:
        from_data_url(value)
    assert caught.value.fix


def test_size_limits_hold_before_decoding():
    with pytest.raises(InputError, match="larger than the 100 bytes"):
        from_data_url(f"data:image/png;base64,{B64}", max_bytes=100)
    with pytest.raises(InputError, match="more than the 100 allowed|larger than the 100"):
        from_base64(B64, max_bytes=100)


def test_remote_urls_only_with_the_explicit_flag(tmp_path):
    with pytest.raises(InputError, match="remote image URLs are off"):
        from_image_url("https://example.invalid/cat.png")
    with pytest.raises(InputError, match="must be a data: URL"):
        from_image_url("file:///etc/passwd", allow_remote=True)
    image = tmp_path / "cat.png"
    image.write_bytes(PNG)
    assert from_path(image) == PNG
    with pytest.raises(InputError, match="is not a file"):
        from_path(tmp_path / "nope.png")


def test_doctor_checks_and_plan_footprint_of_a_converted_vlm(tmp_path_factory, tmp_path):
    import shutil

    pytest.importorskip("rknn.api")
    _, result = converted(tmp_path_factory.getbasetemp(), "qwen2_vl")
    checks = check_vlm(result.manifest_file.parent, on_board=False)
    assert all(c.ok for c in checks) and len(checks) == 3
    copy = tmp_path / "copy"
    shutil.copytree(result.manifest_file.parent, copy)
    rknn = copy / result.manifest.encoders["fp16"].rknn
    rknn.write_bytes(rknn.read_bytes()[:-1] + b"\0")
    bad = [c for c in check_vlm(copy, on_board=False) if not c.ok]
    assert len(bad) == 1 and "changed since conversion" in bad[0].what and bad[0].fix
    board = check_vlm(result.manifest_file.parent, on_board=True)[-1]
    assert "librknnrt.so" in board.what and (board.ok or board.fix)
    footprint = encoder_footprint(read_vlm(result.manifest_file.parent)[1])
    assert footprint.embedding_bytes_per_image == 16 * 128 * 4
    assert footprint.total(2) == result.manifest.encoders["fp16"].size + 2 * 16 * 128 * 4


def test_multimodal_run_gives_the_prompt_and_media_for_the_abi(tmp_path_factory):
    pytest.importorskip("rknn.api")
    from rkedge.runtime.vision import VisionEncoder

    _, result = converted(tmp_path_factory.getbasetemp(), "qwen2_vl")
    with VisionEncoder.open(result.manifest_file.parent, backend="simulator") as encoder:
        images = encoder.encode([PNG, PNG])
    prompt, media = multimodal_run(images, "Same?", "1.3.0")
    assert prompt == b"<image><image>Same?"
    assert media.image is not None and media.image.count == 2 and media.image.content == "<|image_pad|>"
    assert len(media.image.embeddings) == 2 * 16 * 128
    _, old = multimodal_run(images.__class__(images.rows[:1], images.tags, 112, 112), "x", "1.2.0")
    assert old.image is not None and old.image.content is None  # tags at init up to 1.2.3


def test_video_and_audio_are_refused_with_the_reason(tmp_path_factory):
    pytest.importorskip("rknn.api")
    from rkedge.runtime.vision.multimodal import refuse_media

    _, result = converted(tmp_path_factory.getbasetemp(), "qwen2_vl")
    manifest = result.manifest
    assert "needs runtime ABI 1.3.0" in refuse_media("video", manifest, "1.2.3").message
    assert "needs runtime ABI 1.3.1" in refuse_media("audio", manifest, "1.3.0").message
    assert "image encoder only" in refuse_media("video", manifest, "1.3.1").message
    assert refuse_media("video", manifest, "1.3.1").fix == "send the frames as images"
    assert refuse_media("audio", manifest, "1.3.1").fix == "send a transcript as text"
