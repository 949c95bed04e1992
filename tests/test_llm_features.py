"""LLM and ChatSession on every simulated ABI: bytes exact, the model's own template with tools and thinking,
parsed replies, embedding input, every logits/hidden position, pause and resume, ranged KV clears, close()
races and the context policy (issue 13 items 3-6, issue 11 item 10)."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

from rkedge.errors import ContextLengthExceeded, InputError, RkedgeError
from rkedge.runtime import LLM
from rkedge.runtime._stream import ByteJoiner
from rkedge.runtime.abi import SUPPORTED_ABIS, for_version
from rkedge.runtime.types import CallState

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
QWEN3 = (TEMPLATES / "qwen3-0.6b.jinja").read_text()
QWEN25 = (TEMPLATES / "qwen2.5-1.5b-instruct.jinja").read_text()
QWEN_TOKENS = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
AT_LEAST_121 = SUPPORTED_ABIS[SUPPORTED_ABIS.index("1.2.1"):]
#: CJK, emoji (4 bytes, ZWJ sequences, flags), combining sequences, Hangul, Latin-1 and 2-byte characters.
MULTIBYTE = "日本語の文章 🚀🎉 e\u0301 n\u0303 👩\u200d👩\u200d👧 🇯🇵 한국어 Größe → ∑ 𝄞 ok"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_REPLY = ('<think>\nThe user wants the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", '
              '"arguments": {"city": "Zürich"}}\n</tool_call>')


def qwen_model(make_model, abi: str, template: str = QWEN3, **fields):
    extra = {"jinja_chat_template": template, "special_tokens": QWEN_TOKENS, **fields.pop("extra", {})}
    return make_model(abi, extra=extra, **fields)


def prompt_of(run: dict) -> str:
    return bytes.fromhex(run["prompt_hex"]).decode()


# -- bytes exact -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["overlap", "pieces", "whole"])
def test_no_byte_lost_or_repeated_whichever_way_the_runtime_splits(abi, make_model, split):
    model = make_model(abi, responses=[{"text": MULTIBYTE}], faults={"utf8_split": split})
    with LLM(model, library="mock", abi=abi) as llm:
        hooked: list[str] = []
        stream = llm.generate("hi", on_token=hooked.append)
        chunks = list(stream)
    assert "".join(chunks) == MULTIBYTE
    assert stream.result is not None and stream.result.text == MULTIBYTE
    assert "".join(hooked) == MULTIBYTE, "the token hook sees every character once too"
    assert "\ufffd" not in "".join(chunks)


def test_the_split_option_is_really_exercised(abi, make_model, call_log):
    """The simulated NPU sends WAITING for 3- and 4-byte characters (else the test above proves nothing)."""
    model = make_model(abi, responses=[{"text": "日本"}], faults={"utf8_split": "pieces"})
    seen: list[tuple[int, bytes | None]] = []
    with LLM(model, library="mock", abi=abi) as llm:
        original = llm._on_event

        def spy(run_id, event):
            seen.append((event.state, event.text))
            return original(run_id, event)

        llm.backend._native._on_event = spy  # observe what C delivered
        assert llm.generate("x", stream=False).text == "日本"
    waiting = [text for state, text in seen if state == CallState.WAITING]
    assert waiting and all(text and len(text) == 1 for text in waiting)


@pytest.mark.parametrize("behaviour", ["overlap", "pieces", "whole", "three-waits-pieces", "three-waits-overlap"])
def test_byte_joiner_on_every_documented_split(behaviour):
    text = MULTIBYTE.encode()
    events: list[tuple[int, bytes]] = []
    index = 0
    while index < len(text):
        lead = text[index]
        size = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        char = text[index:index + size]
        index += size
        if size < 3:
            events.append((CallState.NORMAL, char))
        elif behaviour == "overlap":
            events += [(CallState.WAITING, char[:1]), (CallState.NORMAL, char)]
        elif behaviour == "pieces":
            events += [(CallState.WAITING, char[:1]), (CallState.NORMAL, char[1:])]
        elif behaviour == "whole":
            events += [(CallState.WAITING, b""), (CallState.NORMAL, char)]
        elif behaviour == "three-waits-pieces":
            events += [(CallState.WAITING, char[:1]), (CallState.WAITING, char[1:2]), (CallState.NORMAL, char[2:])]
        else:
            events += [(CallState.WAITING, char[:1]), (CallState.WAITING, char[:2]), (CallState.NORMAL, char)]
    joiner = ByteJoiner()
    out = "".join(joiner.feed(state, piece) for state, piece in events) + joiner.finish()
    assert out == MULTIBYTE


def test_an_unfinished_character_is_decoded_not_dropped():
    joiner = ByteJoiner()
    assert joiner.feed(CallState.WAITING, b"\xe6") == ""
    assert joiner.feed(CallState.NORMAL, b"ab") == "\ufffdab"  # the runtime never finished it: shown, not lost
    assert joiner.feed(CallState.WAITING, b"\xf0\x9f") == ""
    assert joiner.finish() == "\ufffd"


@pytest.mark.parametrize("text", ["a\x00b", "\x00", "lone \ud800 surrogate"])
def test_text_a_c_string_cannot_carry_is_refused(abi, make_model, text):
    with LLM(make_model(abi, chat_family="gemma"), library="mock", abi=abi) as llm:
        with pytest.raises(InputError) as caught:
            llm.generate(text)
        assert caught.value.fix
        with pytest.raises(InputError):
            llm.chat_session().send(text)
        assert not llm.is_running()
        assert llm.generate("still works", stream=False).finish_reason in ("stop", "length")


# -- the model's own template, tools and thinking ----------------------------------------------------------------

def test_qwen3_thinking_switch_and_tools_reach_the_prompt(abi, make_model, call_log):
    with LLM(qwen_model(make_model, abi, responses=[{"text": "Sunny."}]), library="mock", abi=abi) as llm:
        assert llm.renders_prompts and llm.info()["chat_template"] == "jinja"
        llm.chat_session().send("Weather in Zürich?", tools=[WEATHER_TOOL], enable_thinking=False, stream=False)
    prompt = prompt_of(call_log.runs()[-1])
    assert "<tools>\n" + json.dumps(WEATHER_TOOL, ensure_ascii=False) + "\n</tools>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert prompt.count("<|im_start|>user") == 1
    if abi != "1.1":  # rkedge renders: the runtime's own template is off, so nothing is templated twice
        assert call_log.last("rkllm_set_chat_template")["prompt_prefix"] == ""


def test_thinking_on_through_the_template_works_on_every_abi(abi, make_model, call_log):
    """rkedge renders: thinking is the template's, so even ABIs without the runtime's flag can think."""
    with LLM(qwen_model(make_model, abi, responses=[{"text": "<think>\nok\n</think>\n\nYes."}]), library="mock",
             abi=abi) as llm:
        result = llm.chat_session().send("Think?", enable_thinking=True, stream=False)
    assert (result.reasoning, result.content) == ("\nok\n", "Yes.")
    assert prompt_of(call_log.runs()[-1]).endswith("<|im_start|>assistant\n")


def test_tool_calls_and_reasoning_are_parsed_and_a_tool_result_is_answered(abi, make_model, call_log):
    responses = [{"match": "<tool_response>", "text": "It is 21 C in Zürich."}, {"text": TOOL_REPLY}]
    with LLM(qwen_model(make_model, abi, responses=responses), library="mock", abi=abi) as llm:
        session = llm.chat_session()
        stream = session.send("Weather in Zürich?", tools=[WEATHER_TOOL])
        deltas = list(stream.deltas())
        result = stream.result
        assert result is not None
        assert result.finish_reason == "tool_calls" and result.content == ""
        assert result.reasoning == "\nThe user wants the weather.\n"
        [call] = result.tool_calls
        assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Zürich"})
        assert [d.kind for d in deltas if d.kind != "reasoning"] == ["tool_call"]
        assert "".join(d.text for d in deltas if d.kind == "reasoning") == result.reasoning
        assert session.messages[-1]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                                      "arguments": {"city": "Zürich"}}
        answer = session.send_tool_result('{"temperature": 21}', tool_call_id=call.id, tools=[WEATHER_TOOL],
                                          stream=False)
    assert answer.text == "It is 21 C in Zürich." and answer.finish_reason == "stop" and not answer.tool_calls
    sent = prompt_of(call_log.runs()[-1])
    assert "<tool_response>\n{\"temperature\": 21}\n</tool_response>" in sent


def test_malformed_tool_output_stays_content(abi, make_model):
    broken = "<tool_call>\n{\"name\": get_weather}\n</tool_call>"
    with LLM(qwen_model(make_model, abi, responses=[{"text": broken}]), library="mock", abi=abi) as llm:
        result = llm.chat_session().send("hi", tools=[WEATHER_TOOL], stream=False)
    assert result.finish_reason == "stop" and result.tool_calls == [] and result.content == broken


def test_a_hand_written_family_refuses_tools_instead_of_losing_them(abi, make_model):
    with LLM(make_model(abi, chat_family="gemma"), library="mock", abi=abi) as llm:
        with pytest.raises(InputError, match="no tool calling"):
            llm.chat_session().send("hi", tools=[WEATHER_TOOL])


def test_the_runtime_template_stays_on_when_the_runtime_renders(abi, make_model, call_log):
    """No template known: the runtime renders, so rkedge must never switch its template off; tools and
    thinking go through the runtime's own API."""
    with LLM(make_model(abi, responses=[{"text": TOOL_REPLY}]), library="mock", abi=abi) as llm:
        assert not llm.renders_prompts
        session = llm.chat_session()
        if abi not in AT_LEAST_121:
            with pytest.raises(InputError, match="function calling"):
                session.send("Weather?", tools=[WEATHER_TOOL])
            session.send("Weather?", stream=False)
        else:
            result = session.send("Weather?", tools=[WEATHER_TOOL], enable_thinking=True, stream=False)
            assert [c.name for c in result.tool_calls] == ["get_weather"]
            tools = call_log.last("rkllm_set_function_tools")
            assert json.loads(tools["tools"]) == [WEATHER_TOOL]
            run = call_log.runs()[-1]
            assert run["enable_thinking"] is True and prompt_of(run) == "Weather?"
            session.send_tool_result("21 C", stream=False)
            assert call_log.runs()[-1]["role"] == "tool"
            assert len(call_log.entries("rkllm_set_function_tools")) == 1, "the same tools are set once"
    assert call_log.entries("rkllm_set_chat_template") == [], "the runtime template was switched off"


def test_kv_reuse_sends_only_the_suffix_when_the_rendering_extends(abi, make_model, call_log):
    model = qwen_model(make_model, abi, QWEN25, responses=[{"text": "Fine."}])
    with LLM(model, library="mock", abi=abi) as llm:
        session = llm.chat_session()
        session.send("Hi", stream=False)
        first = prompt_of(call_log.runs()[-1])
        session.send("And then?", stream=False)
        second = prompt_of(call_log.runs()[-1])
        assert session.full_prefills == 0
    assert first.startswith("<|im_start|>system\nYou are Qwen")
    if abi == "1.1":  # no keep_history: the whole conversation each turn
        assert second.startswith(first)
    else:
        assert second == "<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n"


def test_a_rendering_that_rewrites_history_is_prefilled_whole_with_a_warning(make_model, call_log, caplog):
    """Qwen3 drops the reasoning of earlier turns: the second rendering does not extend the cached text."""
    abi = "1.3.0"
    model = qwen_model(make_model, abi, responses=[{"text": "<think>\nhmm\n</think>\n\nFour."}])
    with LLM(model, library="mock", abi=abi) as llm, caplog.at_level(logging.WARNING, "rkedge.runtime"):
        session = llm.chat_session()
        assert session.send("2+2?", stream=False).content == "Four."
        session.send("3+3?", stream=False)
        assert session.full_prefills == 1
    assert "does not extend" in caplog.text
    assert call_log.runs()[-1]["kv_tokens_before"] == 0
    assert prompt_of(call_log.runs()[-1]).startswith("<|im_start|>user\n2+2?")


def test_a_template_that_refuses_names_the_models_rule(abi, make_model):
    gemma = (TEMPLATES / "gemma-2b-it.jinja").read_text()
    model = make_model(abi, name="gemma-2b-it", extra={"jinja_chat_template": gemma,
                                                       "special_tokens": {"bos_token": "<bos>", "eos_token": "<eos>"}})
    with LLM(model, library="mock", abi=abi) as llm:
        with pytest.raises(InputError, match="gemma-2b-it's chat template refuses .*System role not supported"):
            llm.chat_session("Be terse.").send("hi")


def test_a_jinja_file_can_be_given(abi, make_model, call_log):
    with LLM(make_model(abi), library="mock", abi=abi, chat_template=str(TEMPLATES / "qwen3-0.6b.jinja")) as llm:
        llm.chat_session().send("hi", stream=False)
    assert prompt_of(call_log.runs()[-1]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# -- the rest of the runtime's API -------------------------------------------------------------------------------

def test_embedding_input(abi, make_model, call_log):
    with LLM(make_model(abi, hidden_size=8, responses=[{"text": "ok"}]), library="mock", abi=abi) as llm:
        rows = [[0.25 * i] * 8 for i in range(3)]
        result = llm.generate(embeds=rows, stream=False)
        assert result.text == "ok"
        assert call_log.runs()[-1]["input_type"] == 2  # RKLLM_INPUT_EMBED
        with pytest.raises(InputError, match="same length"):
            llm.generate(embeds=[[0.0] * 8, [0.0] * 7])
        with pytest.raises(InputError, match="empty"):
            llm.generate(embeds=[])


@pytest.mark.parametrize("rows", ["all", 2, 1])
def test_every_position_of_the_hidden_and_logits_modes(abi, make_model, rows):
    prompt = "a prompt of several positions"
    positions = (len(prompt.encode()) + 3) // 4
    whole = make_model(abi, vocab_size=50, hidden_size=8)
    chunked = make_model(abi, vocab_size=50, hidden_size=8, faults={"buffer_rows": rows})
    modes = ["hidden"] + (["logits"] if for_version(abi).FEATURES.has_logits_mode else [])
    for mode in modes:
        with LLM(whole, library="mock", abi=abi) as llm:
            reference = llm.generate(prompt, mode=mode, stream=False)
        with LLM(chunked, library="mock", abi=abi) as llm:
            result = llm.generate(prompt, mode=mode, stream=False)
        width = 8 if mode == "hidden" else 50
        assert (result.num_tokens, result.width) == (positions, width)
        assert result.values is not None and reference.values is not None
        assert list(result.values) == list(reference.values), "joined chunks equal the one-callback buffer"


def test_pause_ends_as_pause_and_a_resume_continues_on_the_cache(abi, make_model, call_log):
    model = make_model(abi, responses=[{"text": " ".join(f"w{i}" for i in range(300))}],
                       pace={"decode_tokens_per_s": 300})
    with LLM(model, library="mock", abi=abi, max_new_tokens=1000) as llm:
        if abi not in AT_LEAST_121:
            with pytest.raises(InputError, match="pause"):
                llm.pause()
            return
        stream = llm.generate("go")
        next(stream)
        llm.pause()
        result = stream.collect()
        assert result.finish_reason == "pause"
        kept = llm.kv_cache_size()
        assert kept
        llm.clear_kv_cache(start=[0], end=[1])  # ranges are allowed while paused
        assert call_log.last("rkllm_clear_kv_cache")["range"] is True
        resumed = llm.resume("", max_new_tokens=None).collect()
        assert resumed.finish_reason in ("stop", "length")
        assert call_log.runs()[-1]["kv_tokens_before"] > 0


def test_ranged_clear_needs_the_abi(abi, make_model):
    with LLM(make_model(abi), library="mock", abi=abi) as llm:
        if abi in AT_LEAST_121:
            with pytest.raises(RkedgeError, match="range"):  # not paused: the runtime refuses
                llm.clear_kv_cache(start=[0], end=[1])
        else:
            with pytest.raises(InputError, match="1.2.1"):
                llm.clear_kv_cache(start=[0], end=[1])
        if abi in AT_LEAST_121:
            with pytest.raises(InputError, match="together"):
                llm.clear_kv_cache(start=[0])


# -- close() and the context ---------------------------------------------------------------------------------------

def test_close_racing_generate_never_raises_or_leaks(make_model, call_log):
    abi = "1.3.0"
    model = make_model(abi, responses=[{"text": "some words to generate here"}])
    made = 0
    for attempt in range(40):
        llm = LLM(model, library="mock", abi=abi)
        made += 1
        failures: list[BaseException] = []

        def generate(llm: LLM = llm, failures: list[BaseException] = failures) -> None:
            try:
                for _ in range(3):
                    llm.generate("go", stream=False)
            except RkedgeError:
                pass  # "this LLM is closed" (or the run was aborted): expected
            except BaseException as exc:  # anything else is a bug
                failures.append(exc)

        worker = threading.Thread(target=generate)
        worker.start()
        time.sleep(0.0005 * (attempt % 8))
        llm.close()
        worker.join(10)
        assert not worker.is_alive() and not failures
        assert llm.closed and not llm.backend.is_running()
    assert len(call_log.entries("rkllm_destroy")) == made


def test_close_from_inside_a_token_hook_does_not_stall(abi, make_model, call_log):
    model = make_model(abi, responses=[{"text": " ".join(f"w{i}" for i in range(200))}],
                       pace={"decode_tokens_per_s": 200})
    llm = LLM(model, library="mock", abi=abi, max_new_tokens=1000)
    started = time.monotonic()
    result = llm.generate("go", on_token=lambda _text: llm.close(), stream=False)
    assert time.monotonic() - started < 5
    assert result.finish_reason == "abort" and llm.closed
    deadline = time.monotonic() + 5
    while not call_log.entries("rkllm_destroy") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert call_log.entries("rkllm_destroy")


def test_a_full_context_is_an_error_with_a_fix_by_default(abi, make_model):
    with LLM(make_model(abi, chat_family="qwen2.5", responses=[{"text": "ok"}]), library="mock", abi=abi,
             max_context_len=96) as llm:
        session = llm.chat_session("Be brief.")
        with pytest.raises(ContextLengthExceeded) as caught:
            session.send("x" * 600)
        assert "context" in caught.value.message and "drop_oldest" in (caught.value.fix or "")


@pytest.mark.parametrize("policy", ["drop_oldest", "reset"])
def test_the_context_policy_drops_old_turns_and_keeps_the_system_prompt(abi, make_model, call_log, policy):
    from rkedge.runtime.chat import ChatSession

    with LLM(make_model(abi, chat_family="qwen2.5", responses=[{"text": "ok."}]), library="mock", abi=abi,
             max_context_len=160) as llm:
        session = ChatSession(llm, "Be brief.", context_policy=policy)
        drops = []
        for turn in range(8):
            session.send(f"turn {turn}: " + "words " * 10, stream=False)
            drops.append(session.dropped_messages)
            if session.dropped_messages and policy == "reset":
                assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
        assert any(drops), "the context filled up, so the policy acted"
        assert session.messages[0] == {"role": "system", "content": "Be brief."}
        assert session.messages[-2]["content"].startswith("turn 7")
        assert len(session.messages) < 17
    sent = "".join(prompt_of(run) for run in call_log.runs()[-1:])
    assert "turn 0" not in sent and "Be brief." in session_prompt_after_drop(call_log)


def session_prompt_after_drop(call_log) -> str:
    """The first prompt sent after the policy dropped turns: a whole conversation again, system prompt first."""
    for run in reversed(call_log.runs()):
        text = prompt_of(run)
        if text.startswith("<|im_start|>system"):
            return text
    return ""


def test_the_runtime_calls_a_python_tokenizer_and_embedder(abi, make_model, call_log):
    model = make_model(abi, hidden_size=4, responses=[{"text": "ok"}],
                       extra={"export_tokenizer": False, "export_embedding": False})
    texts: list[str] = []

    def tokenizer(text: str) -> list[int]:
        texts.append(text)
        return [ord(c) % 100 for c in text]

    def embedder(ids):
        return [float(i) for i in ids for _ in range(4)]

    if not for_version(abi).FEATURES.init_takes_callback_struct:
        with pytest.raises(InputError, match="1.3.0"):
            LLM(model, library="mock", abi=abi, tokenizer=tokenizer)
        return
    with pytest.raises(RkedgeError):  # exported without them, and none given: the runtime cannot load it
        LLM(model, library="mock", abi=abi)
    with LLM(model, library="mock", abi=abi, tokenizer=tokenizer, embedder=embedder) as llm:
        result = llm.generate("héllo", stream=False)
    assert result.text == "ok" and texts == ["héllo"]
    [call] = call_log.entries("tokenizer_callback")
    assert call["tokens"] == [ord(c) % 100 for c in "héllo"] and call["returned"] == 5


def test_the_chat_cli_keeps_going_when_the_context_fills(make_model):
    import io

    from rkedge.runtime.chat_cli import ChatRepl

    abi = "1.3.0"
    with LLM(make_model(abi, chat_family="qwen2.5", responses=[{"text": "ok."}]), library="mock", abi=abi,
             max_context_len=160) as llm:
        out, err = io.StringIO(), io.StringIO()
        repl = ChatRepl(llm, llm.chat_session("Be brief.", context_policy="drop_oldest"), out=out, err=err)
        for turn in range(8):
            result = repl.turn(f"turn {turn}: " + "words " * 10)
            assert result is not None and result.text == "ok."
    assert "context full" in err.getvalue() and "error" not in err.getvalue()
    assert out.getvalue().count("ok.") == 8


def test_embeds_from_a_2d_array(make_model, call_log):
    numpy = pytest.importorskip("numpy")
    abi = "1.3.0"
    with LLM(make_model(abi, hidden_size=4, responses=[{"text": "ok"}]), library="mock", abi=abi) as llm:
        assert llm.generate(embeds=numpy.ones((5, 4), dtype=numpy.float32), stream=False).text == "ok"
        with pytest.raises(InputError, match="2-D"):
            llm.generate(embeds=numpy.ones(4))
    assert call_log.runs()[-1]["input_type"] == 2
    assert call_log.last("run_end")["prompt_tokens"] == 5, "one position per embedding row"


def test_a_template_without_tools_refuses_them_and_smollm3_takes_xml_tools(make_model, call_log):
    abi = "1.3.0"
    phi3 = (TEMPLATES / "phi-3-mini-4k-instruct.jinja").read_text()
    model = make_model(abi, name="phi-3", extra={"jinja_chat_template": phi3,
                                                 "special_tokens": {"bos_token": "<s>", "eos_token": "<|endoftext|>"}})
    with LLM(model, library="mock", abi=abi) as llm:
        with pytest.raises(InputError, match="no place for tools"):
            llm.chat_session().send("hi", tools=[WEATHER_TOOL])
    xml = "{% for t in xml_tools %}<tool>{{ t | tojson }}</tool>{% endfor %}{{ messages[-1].content }}"
    with LLM(make_model(abi), library="mock", abi=abi, chat_template=xml) as llm:
        llm.chat_session().send("hi", tools=[WEATHER_TOOL], stream=False)
    assert prompt_of(call_log.runs()[-1]) == "<tool>" + json.dumps(WEATHER_TOOL) + "</tool>hi"
