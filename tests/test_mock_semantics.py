"""The simulated NPU against the runtime's documented behaviour, at the NativeModel / ctypes level.

Each test runs on the six simulated builds where the behaviour exists. Where SEMANTICS.md leaves a behaviour
open, the simulated NPU offers each candidate as an option (``RKEDGE_MOCK_FAULT``), and the tests cover all.
"""

from __future__ import annotations

import json
import threading
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from rkedge.errors import InputError
from rkedge.runtime.abi import SUPPORTED_ABIS, for_version
from rkedge.runtime.abi._native import MediaEmbeddings, MultimodalInput, NativeLibrary, NativeModel
from rkedge.runtime.library import resolve_library
from rkedge.runtime.types import CallState, InferMode, InitParams, RunEvent, RunRequest

# Two- three- and four-byte characters, and a combining sequence (e + U+0301).
TEXT = "Größe 日本語 🚀 naïve e\u0301 → 模型 done."
LONG = " ".join(f"word{i}" for i in range(400))
AT_LEAST_121 = SUPPORTED_ABIS[SUPPORTED_ABIS.index("1.2.1"):]
AT_LEAST_130 = SUPPORTED_ABIS[SUPPORTED_ABIS.index("1.3.0"):]
BUFFER_STATE = {"1.1": CallState.HIDDEN_LAYER}  # ABI 1.1 reports hidden states with a state of its own


def count_tokens(text: bytes) -> int:
    return (len(text) + 3) // 4


class Recorder:
    """The events of a NativeModel, with a chosen return value per state (1 = pause on ABI >= 1.2.1)."""

    def __init__(self, returns: dict[int, int] | None = None) -> None:
        self.events: list[RunEvent] = []
        self.returns = returns or {}
        self.ended = threading.Event()

    def __call__(self, run_id: int, event: RunEvent) -> int:
        self.events.append(event)
        if event.state in (CallState.FINISH, CallState.ERROR):
            self.ended.set()
        return self.returns.get(event.state, 0)

    def states(self) -> list[int]:
        return [event.state for event in self.events]

    def texts(self, *states: int) -> list[bytes]:
        return [event.text or b"" for event in self.events if event.state in states]


@contextmanager
def native_model(abi: str, model: Path, recorder: Recorder, **kwargs: Any) -> Iterator[NativeModel]:
    init = {"max_new_tokens": 1000, **kwargs.pop("init", {})}
    library = NativeLibrary.load(resolve_library("mock", abi).path, abi)
    native = NativeModel(library, str(model), InitParams(**init), recorder, **kwargs)
    try:
        assert native.init_rc == 0 and native.alive
        yield native
    finally:
        native.destroy()


def set_options(monkeypatch: pytest.MonkeyPatch, **options: Any) -> None:
    monkeypatch.setenv("RKEDGE_MOCK_FAULT", json.dumps(options))


# --- 1. multi-byte characters split over two tokens -----------------------------------------------------------

@pytest.mark.parametrize("split", ["overlap", "pieces", "whole"])
def test_each_documented_utf8_split(abi, make_model, monkeypatch, split):
    set_options(monkeypatch, utf8_split=split)
    recorder = Recorder()
    with native_model(abi, make_model(abi, responses=[{"text": TEXT}]), recorder) as native:
        assert native.run(1, RunRequest(prompt=b"go")) == 0
    expected = TEXT.encode()
    pieces = [(e.state, e.text or b"") for e in recorder.events if e.state <= CallState.WAITING]
    waiting = [i for i, (state, _) in enumerate(pieces) if state == CallState.WAITING]
    assert len(waiting) == sum(len(ch.encode()) >= 3 for ch in TEXT), "one WAITING per 3- or 4-byte character"
    normal_only = b"".join(text for state, text in pieces if state == CallState.NORMAL)
    everything = b"".join(text for _, text in pieces)
    for i in waiting:
        partial, following = pieces[i][1], pieces[i + 1]
        assert following[0] == CallState.NORMAL
        if split == "whole":
            assert partial == b""
        else:
            assert len(partial) == 1 and partial[0] >= 0xE0, "a lead byte that does not complete its character"
            joined = following[1] if split == "overlap" else partial + following[1]
            assert len(joined.decode("utf-8")) == 1
    if split == "pieces":
        assert everything == expected, "joining WAITING and NORMAL gives every byte once"
        assert normal_only != expected
    else:
        assert normal_only == expected, "NORMAL alone carries every character"
        assert (everything == expected) is (split == "whole")


def test_an_unknown_option_value_warns_and_keeps_the_default(make_model, monkeypatch, capfd):
    set_options(monkeypatch, utf8_split="sideways", context_full="wrap", buffer_rows=0)
    recorder = Recorder()
    with native_model("1.3.0", make_model("1.3.0", responses=[{"text": TEXT}]), recorder) as native:
        native.run(1, RunRequest(prompt=b"go"))
        native.run(2, RunRequest(prompt=b"go", mode=InferMode.GET_LOGITS))
    err = capfd.readouterr().err
    for option in ("utf8_split", "context_full", "buffer_rows"):
        assert f"W rkllm: [rkedge simulator] {option} must be" in err
    assert b"".join(recorder.texts(CallState.NORMAL)) == TEXT.encode()


# --- 2. ERROR carries no token ----------------------------------------------------------------------------------

def raw_results(native: NativeModel, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bytes | None, int]]:
    """Wraps the model's reader to see each callback's raw RKLLMResult text and token id."""
    seen: list[tuple[int, bytes | None, int]] = []
    read = native._read_event

    def reader(result_ptr: Any, state: int) -> RunEvent:
        if result_ptr:
            seen.append((state, result_ptr[0].text, result_ptr[0].token_id))
        return read(result_ptr, state)

    monkeypatch.setattr(native, "_read_event", reader)
    return seen


@pytest.mark.parametrize("cause", ["mid-run", "context"])
def test_the_error_callback_carries_no_token_text(abi, make_model, monkeypatch, cause):
    if cause == "mid-run":
        set_options(monkeypatch, error_after_tokens=3)
    recorder = Recorder()
    with native_model(abi, make_model(abi, responses=[{"text": LONG}]), recorder,
                      init={"max_context_len": 64}) as native:
        seen = raw_results(native, monkeypatch)
        prompt = b"go" if cause == "mid-run" else b"x" * 400
        assert native.run(1, RunRequest(prompt=prompt)) == -1
    errors = [(text, token_id) for state, text, token_id in seen if state == CallState.ERROR]
    assert errors == [(None, -1)], "no text and no token id: only NORMAL and WAITING carry a token"
    assert recorder.states()[-1] == CallState.ERROR
    assert recorder.states().count(CallState.NORMAL) == (3 if cause == "mid-run" else 0)


# --- 3 and 6. logits and hidden-state modes: every position, and pause ----------------------------------------

def buffer_modes(abi: str) -> list[InferMode]:
    modes = [InferMode.GET_LAST_HIDDEN_LAYER]
    return modes + ([InferMode.GET_LOGITS] if for_version(abi).FEATURES.has_logits_mode else [])


def buffer_events(recorder: Recorder, abi: str) -> list[RunEvent]:
    state = BUFFER_STATE.get(abi, CallState.NORMAL)
    return [event for event in recorder.events if event.state == state and event.values is not None]


@pytest.mark.parametrize("rows", ["all", "last", 3])
def test_buffer_modes_give_the_positions_each_option_selects(abi, make_model, monkeypatch, call_log, rows):
    prompt = b"x" * 40  # 10 simulated positions
    model = make_model(abi, vocab_size=12, hidden_size=5)
    for mode in buffer_modes(abi):
        width = 5 if mode == InferMode.GET_LAST_HIDDEN_LAYER else 12
        set_options(monkeypatch, buffer_rows="all")
        reference = Recorder()
        with native_model(abi, model, reference) as native:
            native.run(1, RunRequest(prompt=prompt, mode=mode))
        (whole,) = buffer_events(reference, abi)
        assert (whole.num_tokens, whole.width) == (10, width), "every prompt position, in one callback"

        set_options(monkeypatch, buffer_rows=rows)
        recorder = Recorder()
        with native_model(abi, model, recorder) as native:
            native.run(2, RunRequest(prompt=prompt, mode=mode))
        chunks = buffer_events(recorder, abi)
        assert recorder.states()[-1] == CallState.FINISH
        joined = array("f", b"".join(chunk.values.tobytes() for chunk in chunks if chunk.values is not None))
        if rows == "last":
            assert [c.num_tokens for c in chunks] == [1]
            assert joined == whole.values[-width:]
        else:
            assert [c.num_tokens for c in chunks] == ([10] if rows == "all" else [3, 3, 3, 1])
            assert joined == whole.values, "the chunks join into the single callback's buffer"
        logged = [row for row in call_log.entries("buffer") if row["mode"] == int(mode)][-len(chunks):]
        assert [row["num_tokens"] for row in logged] == [c.num_tokens for c in chunks]
        assert [row["first_position"] for row in logged] == ([9] if rows == "last" else
                                                             list(range(0, 10, 10 if rows == "all" else 3)))
        end = call_log.last("run_end")
        assert end["buffer_callbacks"] == len(chunks)
        assert end["buffer_positions"] == sum(c.num_tokens for c in chunks)


def test_pause_is_honoured_in_buffer_modes(abi, make_model, monkeypatch, call_log):
    set_options(monkeypatch, buffer_rows=2)
    prompt = b"y" * 40
    for mode in buffer_modes(abi):
        recorder = Recorder(returns={BUFFER_STATE.get(abi, CallState.NORMAL): 1})
        with native_model(abi, make_model(abi, hidden_size=4, vocab_size=6), recorder) as native:
            assert native.run(1, RunRequest(prompt=prompt, mode=mode)) == 0
            kept = native.kv_cache_sizes()
        end = call_log.last("run_end")
        if abi in AT_LEAST_121:
            assert call_log.entries("callback_return")[-1]["event"] == "pause"
            assert end["paused"] is True and end["buffer_callbacks"] == 1
            assert CallState.FINISH not in recorder.states(), "a paused run does not finish"
            assert kept == [10], "a paused run keeps its cache for the resume"
        else:  # a void callback: there is no return value to honour
            assert end["paused"] is False and end["buffer_callbacks"] == 5
            assert recorder.states()[-1] == CallState.FINISH


# --- 4. context shift ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_keep", [4, -1])
def test_the_context_shifts_keeping_n_keep_entries(abi, make_model, monkeypatch, call_log, n_keep):
    set_options(monkeypatch, context_full="shift")
    init: dict[str, Any] = {"max_context_len": 64, "max_new_tokens": 100}
    if for_version(abi).FEATURES.has_keep_history:  # n_keep exists from 1.2.0; 1.1 behaves as -1
        init["n_keep"] = n_keep
    elif n_keep != -1:
        pytest.skip("ABI 1.1 has no n_keep")
    recorder = Recorder()
    with native_model(abi, make_model(abi, responses=[{"text": LONG}]), recorder, init=init) as native:
        assert native.run(1, RunRequest(prompt=b"p" * 40)) == 0  # 10 prompt positions
    end = call_log.last("run_end")
    assert end["generated_tokens"] == 100, "generation goes on past the full context"
    shifts = call_log.entries("context_shift")
    assert shifts and end["context_shifts"] == len(shifts)
    kept = n_keep if n_keep >= 0 else 10  # -1 keeps the whole input (stand-in choice, as llama.cpp)
    for shift in shifts:
        assert shift["kv_tokens_before"] == 64 and shift["kept"] == kept
        assert shift["discarded"] == (64 - kept) // 2
        assert shift["kv_tokens_after"] == 64 - shift["discarded"]
    assert recorder.states().count(CallState.NORMAL) + recorder.states().count(CallState.WAITING) == 100


def test_by_default_a_full_context_ends_generation(abi, make_model, call_log):
    recorder = Recorder()
    with native_model(abi, make_model(abi, responses=[{"text": LONG}]), recorder,
                      init={"max_context_len": 64}) as native:
        native.run(1, RunRequest(prompt=b"p" * 40))
    assert call_log.last("run_end")["generated_tokens"] == 64 - 10
    assert call_log.entries("context_shift") == []


# --- 5. the 1.3.0 tokenizer and embedding callbacks -----------------------------------------------------------

def byte_tokenizer(text: bytes) -> list[int]:
    return [100 + b for b in text]


def constant_rows(hidden: int) -> Callable[[Sequence[int]], list[float]]:
    return lambda ids: [float(i) for i in ids for _ in range(hidden)]


def test_the_runtime_calls_the_tokenizer_and_embedding_callbacks(abi, make_model, call_log):
    model = make_model(abi, hidden_size=3, responses=[{"text": "one two three"}])
    if abi not in AT_LEAST_130:
        with pytest.raises(InputError, match="1.3.0"):
            with native_model(abi, model, Recorder(), tokenizer=byte_tokenizer):
                pass
        return
    seen_texts: list[bytes] = []

    def tokenizer(text: bytes) -> list[int]:
        seen_texts.append(text)
        return byte_tokenizer(text)

    recorder = Recorder()
    with native_model(abi, model, recorder, tokenizer=tokenizer, embedder=constant_rows(3)) as native:
        assert native.run(1, RunRequest(prompt=b"hello")) == 0
    assert seen_texts == [b"hello"]
    tokenized = call_log.last("tokenizer_callback")
    assert tokenized["text"] == "hello" and tokenized["tokens"] == byte_tokenizer(b"hello")
    assert tokenized["returned"] == 5 and tokenized["n_tokens_max"] == 4096
    embedded = call_log.last("embed_callback")
    assert embedded["tokens"] == byte_tokenizer(b"hello") and embedded["returned"] == 0
    assert embedded["len"] == 5 * 3 * 4 and embedded["sum"] == pytest.approx(3 * sum(byte_tokenizer(b"hello")))
    end = call_log.last("run_end")
    generated = end["generated_tokens"]
    assert end["prompt_tokens"] == 5, "the client's tokenizer decides the prompt's length"
    assert end["embed_callback_calls"] == 1 + generated, "the prompt's ids, then each generated token"
    assert recorder.states()[-1] == CallState.FINISH


def test_token_input_is_embedded_through_the_callback(make_model, call_log):
    for abi in AT_LEAST_130:
        with native_model(abi, make_model(abi, hidden_size=2), Recorder(), embedder=constant_rows(2)) as native:
            assert native.run(1, RunRequest(token_ids=[7, 8, 9])) == 0
        assert call_log.last("embed_callback")["tokens"] == [7, 8, 9]
        assert call_log.entries("tokenizer_callback") == []


@pytest.mark.parametrize("failure", ["tokenizer raises", "too many ids", "wrong row size"])
def test_a_failing_client_callback_fails_the_run(make_model, call_log, capfd, failure):
    def bad_tokenizer(text: bytes) -> list[int]:
        if failure == "tokenizer raises":
            raise ValueError("tokenizer bug")
        return list(range(5000))  # more than max_context_len

    for abi in AT_LEAST_130:
        recorder = Recorder()
        kwargs: dict[str, Any] = ({"embedder": lambda ids: [1.0] * 7} if failure == "wrong row size"
                                  else {"tokenizer": bad_tokenizer})
        with native_model(abi, make_model(abi, hidden_size=2), recorder, **kwargs) as native:
            assert native.run(1, RunRequest(prompt=b"hello")) == -1
        assert recorder.states() == [CallState.ERROR]
        assert call_log.last("run_end")["error"] is True
        err = capfd.readouterr().err
        assert "[rkedge simulator] the " + ("embedding" if failure == "wrong row size" else "tokenizer") in err


@pytest.mark.parametrize("exported_without", ["tokenizer", "embedding"])
def test_a_model_without_its_tokenizer_or_embedding_needs_the_callback(make_model, capfd, exported_without):
    for abi in AT_LEAST_130:
        model = make_model(abi, extra={f"export_{exported_without}": False})
        library = NativeLibrary.load(resolve_library("mock", abi).path, abi)
        refused = NativeModel(library, str(model), InitParams(), Recorder())
        assert refused.init_rc != 0 and not refused.alive
        assert f"the model was exported without its {exported_without}" in capfd.readouterr().err
        callback = {"tokenizer": byte_tokenizer} if exported_without == "tokenizer" else {"embedder": constant_rows(64)}
        with native_model(abi, model, Recorder(), **callback) as native:
            assert native.run(1, RunRequest(prompt=b"hi")) == 0


# --- 7. multimodal input ---------------------------------------------------------------------------------------

TAGS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")


def image_rows(count: int, rows: int, hidden: int) -> array[float]:
    values = array("f", (float(i % 7) for i in range(max(count * rows * hidden, 1))))
    values[-1] = 42.5  # the last float: read only if the whole n_image x rows x hidden buffer is read
    return values


def image_input(abi: str, count: int, rows: int, hidden: int, **tags: Any) -> MediaEmbeddings:
    per_input = abi in AT_LEAST_130
    tag_fields = dict(zip(("start", "end", "content"), TAGS, strict=True)) if per_input else {}
    tag_fields.update(tags)
    return MediaEmbeddings(image_rows(count, rows, hidden), count, rows, width=448, height=448, **tag_fields)


def tags_at_init(abi: str) -> dict[str, Any]:
    return {} if abi in AT_LEAST_130 else {"image_tags": TAGS}


def test_a_multimodal_input_is_checked_and_logged(abi, make_model, call_log):
    multi = abi in AT_LEAST_121  # n_image exists from 1.2.1
    count = 2 if multi else 1
    prompt = b"<image>" * count + b" what is shown?"
    recorder = Recorder()
    with native_model(abi, make_model(abi, hidden_size=8, responses=[{"text": "a cat"}]), recorder,
                      **tags_at_init(abi)) as native:
        media = MultimodalInput(image=image_input(abi, count, 4, 8))
        assert native.run(1, RunRequest(prompt=prompt), media=media) == 0
    seen = call_log.last("multimodal_input")
    assert seen["accepted"] is True and seen["reason"] is None and seen["hidden_size"] == 8
    image = seen["image"]
    assert (image["items"], image["rows_per_item"], image["tags_in_prompt"]) == (count, 4, count)
    assert image["embed_floats"] == count * 4 * 8 and image["embed_last"] == 42.5
    assert (image["start"], image["end"], image["content"]) == TAGS
    if multi:
        assert (seen["image_width"], seen["image_height"]) == (448, 448)
    run = call_log.runs()[-1]
    assert run["input_type"] == 3 and run["prompt_tokens"] == count_tokens(prompt) + count * 4
    assert b"".join(recorder.texts(CallState.NORMAL)) == b"a cat"
    if abi not in AT_LEAST_130:
        init = call_log.last("rkllm_init")
        assert (init["img_start"], init["img_end"], init["img_content"]) == TAGS


@pytest.mark.parametrize("mismatch", ["placeholders", "content tag", "encoder rows", "empty"])
def test_a_mismatched_multimodal_input_is_refused(abi, make_model, call_log, capfd, mismatch):
    prompt = b"<image><image> two?" if mismatch == "placeholders" else b"<image> one?"
    encoder_rows = 4 if mismatch == "encoder rows" else 3  # what the model's encoder gives (manifest)
    model = make_model(abi, hidden_size=4, extra={"multimodal": {"image_tokens": encoder_rows}})
    tags = tags_at_init(abi)
    if mismatch == "content tag" and abi not in AT_LEAST_130:
        tags = {"image_tags": (*TAGS[:2], "")}
    image = image_input(abi, 1, 0 if mismatch == "empty" else 3, 4)
    if mismatch == "content tag" and abi in AT_LEAST_130:
        image = image_input(abi, 1, 3, 4, content=None)
    recorder = Recorder()
    with native_model(abi, model, recorder, **tags) as native:
        assert native.run(1, RunRequest(prompt=prompt), media=MultimodalInput(image=image)) == -1
    seen = call_log.last("multimodal_input")
    if mismatch == "empty" and abi in ("1.1", "1.2.0"):  # no n_image: no rows means no image
        mismatch = "no image"
    expected_reason = {"no image": "1 <image> placeholders for 0 image", "placeholders": "2 <image> placeholders for 1 image", "content tag": "no image content tag",
                       "encoder rows": "3 image rows per item, the model's encoder gives 4",
                       "empty": "the image embedding is empty"}[mismatch]
    assert seen["accepted"] is False and expected_reason in seen["reason"]
    assert f"E rkllm: [rkedge simulator] multimodal input refused: {seen['reason']}" in capfd.readouterr().err
    assert call_log.runs() == [] and recorder.events == []


def test_video_and_audio_blocks_per_abi(abi, make_model, call_log):
    features = for_version(abi).FEATURES
    hidden = 4
    video = MediaEmbeddings(array("f", [0.5] * (1 * 2 * 3 * hidden)), 1, 3, "<|vs|>", "<|ve|>", "<|video_pad|>",
                            frames_per_item=2)
    audio = MediaEmbeddings(array("f", [0.25] * (2 * 5 * hidden)), 2, 5, "<|as|>", "<|ae|>", "<|audio_pad|>")
    with native_model(abi, make_model(abi, hidden_size=hidden), Recorder()) as native:
        if abi not in AT_LEAST_130:
            with pytest.raises(InputError, match="video input needs ABI 1.3.0"):
                native.run(1, RunRequest(prompt=b"<video>"), media=MultimodalInput(video=video))
            return
        assert native.run(1, RunRequest(prompt=b"<video> and"), media=MultimodalInput(video=video)) == 0
        seen = call_log.last("multimodal_input")
        assert seen["accepted"] is True and seen["video"]["embed_floats"] == 2 * 3 * hidden
        assert seen["video"]["rows_per_item"] == 6 and seen["video"]["content"] == "<|video_pad|>"
        if not features.has_audio_input:
            with pytest.raises(InputError, match="audio input needs ABI 1.3.1"):
                native.run(2, RunRequest(prompt=b"<audio>"), media=MultimodalInput(audio=audio))
            return
        assert native.run(2, RunRequest(prompt=b"<audio><audio>"), media=MultimodalInput(audio=audio)) == 0
        seen = call_log.last("multimodal_input")
        assert seen["accepted"] is True and seen["audio"]["items"] == 2
        assert seen["audio"]["embed_floats"] == 2 * 5 * hidden and seen["audio"]["embed_last"] == 0.25
        assert call_log.runs()[-1]["prompt_tokens"] == count_tokens(b"<audio><audio>") + 10


def test_image_tags_go_where_the_abi_takes_them(abi, make_model):
    model = make_model(abi)
    if abi in AT_LEAST_130:
        with pytest.raises(InputError, match="per input"):
            with native_model(abi, model, Recorder(), image_tags=TAGS):
                pass
        return
    with native_model(abi, model, Recorder(), image_tags=TAGS) as native:
        with pytest.raises(InputError, match="at init"):
            native.run(1, RunRequest(prompt=b"<image>"),
                       media=MultimodalInput(image=MediaEmbeddings(array("f", [0.0] * 64), 1, 1, content="<x>")))
