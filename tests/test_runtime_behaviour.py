"""The behavioural suite of the runtime: every test runs against each simulated-NPU build (one per ABI).

These tests need only the standard library, pytest and rkedge (they also run on aarch64 under qemu).
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from rkedge.errors import BusyError, GenerationError, InputError, ModelFileError, RuntimeInitError
from rkedge.runtime import LLM
from rkedge.runtime.abi import SUPPORTED_ABIS, for_version

SCRIPTED = "Hello from the NPU: Größe 日本語 🚀 naïve café → done."
LONG = " ".join(f"word{i}" for i in range(400))
AT_LEAST_121 = SUPPORTED_ABIS[SUPPORTED_ABIS.index("1.2.1"):]  # the registry lists ABIs oldest first


def scripted(text: str = SCRIPTED, match: str | None = None) -> list[dict[str, str]]:
    return [{"text": text} if match is None else {"match": match, "text": text}]


def count_tokens(text: bytes) -> int:
    return (len(text) + 3) // 4


def test_stream_yields_the_whole_reply_in_order(abi, make_model, call_log):
    with LLM(make_model(abi, responses=scripted()), library="mock", abi=abi) as llm:
        stream = llm.generate("Say hello")
        chunks = list(stream)
    assert len(chunks) > 5, "a streamed reply arrives in many pieces"
    assert "".join(chunks) == SCRIPTED  # multi-byte characters split across tokens are reassembled
    assert stream.result is not None and stream.result.text == SCRIPTED
    assert stream.result.finish_reason == "stop"
    run = call_log.last("rkllm_run")
    assert bytes.fromhex(run["prompt_hex"]) == b"Say hello"  # generate() sends the prompt untouched
    assert run["userdata"] != 0, "runs are routed through userdata"


def test_non_stream_returns_a_result(abi, make_model):
    with LLM(make_model(abi, responses=scripted()), library="mock", abi=abi) as llm:
        result = llm.generate("Say hello", stream=False)
    assert result.text == SCRIPTED
    assert result.stats.completion_tokens > 5


def test_generated_text_is_deterministic_and_multibyte(abi, make_model):
    with LLM(make_model(abi), library="mock", abi=abi) as llm:
        first = llm.generate("a prompt", stream=False).text
        second = llm.generate("a prompt", stream=False).text
        other = llm.generate("another prompt", stream=False).text
    assert first == second and first != other
    assert "\ufffd" not in first + other


def test_perf_stats(abi, make_model):
    prompt = "count these prompt bytes please"
    with LLM(make_model(abi, responses=scripted()), library="mock", abi=abi) as llm:
        result = llm.generate(prompt, stream=False)
    stats = result.stats
    assert stats.ttft_ms is not None and stats.ttft_ms >= 0
    if abi in AT_LEAST_121:
        assert stats.source == "runtime"
        assert stats.prompt_tokens == count_tokens(prompt.encode())
        assert stats.completion_tokens == result.stats.completion_tokens > 0
        assert stats.memory_mb is not None and stats.memory_mb > 0
    else:
        assert stats.source == "measured"
        assert stats.prompt_tokens is None
        assert stats.completion_tokens > 0


def test_abort_from_another_thread_stops_within_one_token(abi, make_model, call_log):
    model = make_model(abi, responses=scripted(LONG), pace={"decode_tokens_per_s": 400})
    with LLM(model, library="mock", abi=abi, max_new_tokens=1000) as llm:
        delivered = []
        stream = llm.generate("go", on_token=delivered.append)
        next(stream)
        seen_at_abort: list[int] = []

        def abort_soon() -> None:
            time.sleep(0.05)
            llm.abort()
            seen_at_abort.append(len(delivered))

        aborter = threading.Thread(target=abort_soon)
        aborter.start()
        text = "".join(stream)
        aborter.join()
    assert stream.result.finish_reason == "abort"
    end = call_log.last("run_end")
    assert end["aborted"] is True
    assert end["generated_tokens"] < 400
    assert end["generated_tokens"] - seen_at_abort[0] <= 1, "the runtime stops within one token of rkllm_abort"
    assert len(text) < len(LONG)


def test_closing_the_stream_aborts_its_run(abi, make_model, call_log):
    model = make_model(abi, responses=scripted(LONG), pace={"decode_tokens_per_s": 200})
    with LLM(model, library="mock", abi=abi, max_new_tokens=1000) as llm:
        stream = llm.generate("go")
        next(stream)
        stream.close()
        assert stream.result.finish_reason == "abort"
        assert call_log.last("run_end")["aborted"] is True
        assert llm.generate("again", stream=False).text, "the model serves the next request"


def test_closing_the_llm_during_a_run_is_safe(abi, make_model, call_log):
    model = make_model(abi, responses=scripted(LONG), pace={"decode_tokens_per_s": 200})
    llm = LLM(model, library="mock", abi=abi, max_new_tokens=1000)
    stream = llm.generate("go")
    next(stream)
    llm.close()
    llm.close()  # idempotent
    rest = list(stream)  # the stream drains and ends
    assert stream.result.finish_reason == "abort"
    assert len("".join(rest)) < len(LONG)
    assert call_log.entries("rkllm_destroy")
    with pytest.raises(Exception, match="closed"):
        llm.generate("after close")


def test_one_generation_at_a_time(abi, make_model):
    model = make_model(abi, responses=scripted(LONG), pace={"decode_tokens_per_s": 200})
    with LLM(model, library="mock", abi=abi, max_new_tokens=1000) as llm:
        stream = llm.generate("first")
        next(stream)
        assert llm.is_running()
        with pytest.raises(BusyError):
            llm.generate("second")
        stream.close()
        assert not llm.is_running()


def test_context_overflow_ends_in_error_and_the_next_request_works(abi, make_model, call_log):
    with LLM(make_model(abi, responses=scripted()), library="mock", abi=abi, max_context_len=64) as llm:
        stream = llm.generate("x" * 400)  # 100 simulated tokens > 64
        with pytest.raises(GenerationError):
            list(stream)
        assert stream.result.finish_reason == "error"
        assert call_log.last("run_end")["error"] is True
        assert llm.generate("short", stream=False).text == SCRIPTED


def test_generation_stops_when_the_context_is_full(abi, make_model, call_log):
    with LLM(make_model(abi, responses=scripted(LONG)), library="mock", abi=abi, max_context_len=64,
             max_new_tokens=1000) as llm:
        result = llm.generate("p" * 40, stream=False)  # 10 prompt tokens
    assert call_log.last("run_end")["generated_tokens"] == 64 - 10
    if abi in AT_LEAST_121:
        assert result.finish_reason == "length"


def test_max_new_tokens_gives_finish_reason_length(abi, make_model, call_log):
    with LLM(make_model(abi, responses=scripted(LONG)), library="mock", abi=abi, max_new_tokens=7) as llm:
        result = llm.generate("go", stream=False)
    assert call_log.last("run_end")["generated_tokens"] == 7
    assert result.finish_reason == "length"


def test_keep_history_multi_turn_reuses_the_kv_cache(abi, make_model, call_log):
    with LLM(make_model(abi, chat_family="gemma"), library="mock", abi=abi) as llm:
        session = llm.chat_session()
        first = session.send("Hi there", stream=False)
        second = session.send("And then?", stream=False)
        runs = call_log.runs()
        assert first.text and second.text
        assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
        turn1, turn2 = (bytes.fromhex(r["prompt_hex"]).decode() for r in runs[-2:])
        assert turn1 == "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
        if abi == "1.1":  # no keep_history: the whole conversation again, on an empty cache
            assert runs[-1]["kv_tokens_before"] == 0
            assert turn2.startswith(turn1 + first.text.strip())
        else:  # only what the cache does not hold yet
            assert runs[-1]["keep_history"] == 1
            assert runs[-1]["kv_tokens_before"] == count_tokens(turn1.encode()) + first.stats.completion_tokens
            assert turn2 == "<end_of_turn>\n<start_of_turn>user\nAnd then?<end_of_turn>\n<start_of_turn>model\n"


def test_runtime_template_is_switched_off_when_we_render(abi, make_model, call_log):
    from rkedge.runtime.simmodel import build_cli_manifest

    manifest = build_cli_manifest(chat_family="gemma", toolkit_version={"1.1": "1.1.4"}.get(abi, "1.2.0"))
    model = make_model(abi, chat_family="gemma", chat_template=manifest["chat_template"])
    with LLM(model, library="mock", abi=abi) as llm:
        llm.chat_session().send("Hi", stream=False)
    prompt = bytes.fromhex(call_log.last("rkllm_run")["prompt_hex"]).decode()
    assert prompt.count("<start_of_turn>user") == 1, "the chat template is applied exactly once"
    if abi != "1.1":
        assert call_log.last("rkllm_set_chat_template")["prompt_prefix"] == ""


def test_kv_cache_clear(abi, make_model, call_log):
    with LLM(make_model(abi, chat_family="gemma"), library="mock", abi=abi) as llm:
        session = llm.chat_session()
        session.send("Hi", stream=False)
        if abi in AT_LEAST_121:
            assert llm.kv_cache_size() > 0
        session.reset()
        if abi in AT_LEAST_121:
            assert llm.kv_cache_size() == 0
        if abi != "1.1":
            assert call_log.last("rkllm_clear_kv_cache")["rc"] == 0
        session.send("Hi again", stream=False)
        assert call_log.runs()[-1]["kv_tokens_before"] == 0
        assert session.messages[0]["content"] == "Hi again"


def test_a_plain_generate_does_not_run_on_a_sessions_cache(abi, make_model, call_log):
    with LLM(make_model(abi, chat_family="gemma"), library="mock", abi=abi) as llm:
        session = llm.chat_session()
        session.send("Hi", stream=False)
        llm.generate("unrelated", stream=False)
        assert call_log.runs()[-1]["kv_tokens_before"] == 0
        session.send("Back to the chat", stream=False)
        resent = bytes.fromhex(call_log.runs()[-1]["prompt_hex"]).decode()
        assert resent.startswith("<start_of_turn>user\nHi<end_of_turn>"), "the session re-sends its history"


def test_pause_keeps_the_cache_for_a_resume(abi, make_model, call_log):
    model = make_model(abi, responses=scripted(LONG), pace={"decode_tokens_per_s": 300})
    with LLM(model, library="mock", abi=abi, max_new_tokens=1000) as llm:
        stream = llm.generate("go")
        if abi not in AT_LEAST_121:
            with pytest.raises(InputError):
                stream.pause()
            stream.close()
            return
        next(stream)
        stream.pause()
        rest = list(stream)
        assert call_log.entries("callback_return")[-1]["event"] == "pause"
        end = call_log.last("run_end")
        assert end["paused"] is True and end["generated_tokens"] < 400
        assert len(rest) < 400
        kept = llm.kv_cache_size()
        assert kept > 0, "a paused run keeps its KV cache even with keep_history == 0"
        llm.generate("resume", stream=False)
        assert call_log.runs()[-1]["kv_tokens_before"] == kept


def test_error_after_n_tokens(abi, make_model, monkeypatch, capfd):
    model = make_model(abi, responses=scripted())
    with LLM(model, library="mock", abi=abi) as llm:
        monkeypatch.setenv("RKEDGE_MOCK_FAULT", json.dumps({"error_after_tokens": 3}))
        stream = llm.generate("go")
        chunks = []
        with pytest.raises(GenerationError) as caught:
            for chunk in stream:
                chunks.append(chunk)
        assert stream.result.finish_reason == "error"
        assert 0 < len(chunks) <= 3
        assert caught.value.result is stream.result
        assert "E rkllm: matmul(w8a8) run failed" in capfd.readouterr().err
    monkeypatch.delenv("RKEDGE_MOCK_FAULT")
    with LLM(model, library="mock", abi=abi) as llm:
        assert llm.generate("go", stream=False).text == SCRIPTED


def test_init_npu_malloc_failure_is_diagnosed(abi, make_model, capfd):
    model = make_model(abi, faults={"init": "npu_malloc", "npu_malloc_size": 232128512, "fixed_by_base_domain_id": 1})
    with pytest.raises(RuntimeInitError) as caught:
        LLM(model, library="mock", abi=abi)
    error = caught.value
    assert error.failure == "F-1"
    assert "232128512" in str(error) and "base_domain_id" in error.fix
    err = capfd.readouterr().err
    assert "E RKNN:" in err and "failed to malloc npu memory, size: 232128512, flags: 0x2" in err
    if abi == "1.1":
        assert "rknn_init fail! ret=-1" in err  # 1.1.x returns 0 here: only stderr tells
    else:
        assert "E rkllm: rkllm_init failed" in err
    with LLM(model, library="mock", abi=abi, base_domain_id=1) as llm:  # the maintainers' fix
        assert llm.generate("ok", stream=False).text


def test_a_token_hook_that_raises_never_reaches_c(abi, make_model, call_log):
    class Boom(Exception):
        pass

    seen = []

    def hook(text: str) -> None:
        seen.append(text)
        if len(seen) == 3:
            raise Boom("user callback failed")

    medium = " ".join(f"w{i}" for i in range(60))
    model = make_model(abi, responses=scripted(medium), pace={"decode_tokens_per_s": 300})
    with LLM(model, library="mock", abi=abi, max_new_tokens=1000) as llm:
        with pytest.raises(Boom):
            list(llm.generate("go", on_token=hook))
        assert not [r for r in call_log.entries("callback_return") if r["event"] == "pause"], \
            "an exception in the callback must not turn into 'pause' (an undefined return value)"
        end = call_log.last("run_end")
        assert end["aborted"] is True and end["paused"] is False
        assert len(seen) == 3, "the hook is not called again after it failed"
        again = llm.generate("again", stream=False)
        assert (again.text, again.finish_reason) == (medium, "stop")


def test_a_token_hook_can_stop_the_generation(abi, make_model):
    with LLM(make_model(abi, responses=scripted(LONG)), library="mock", abi=abi, max_new_tokens=1000) as llm:
        result = llm.generate("go", on_token=lambda text: "word5" in text, stream=False)
    assert result.finish_reason == "stop"
    assert result.text.endswith("word5")


def test_stop_sequences(abi, make_model):
    with LLM(make_model(abi, responses=scripted("alpha beta STOP gamma delta")), library="mock", abi=abi) as llm:
        result = llm.generate("go", stop=["STOP"], stream=False)
    assert result.text == "alpha beta "
    assert result.finish_reason == "stop"


def test_logits_and_hidden_layer_modes(abi, make_model):
    model = make_model(abi, vocab_size=50, hidden_size=8)
    prompt = "sixteen bytes!!!"
    with LLM(model, library="mock", abi=abi) as llm:
        hidden = llm.generate(prompt, mode="hidden", stream=False)
        assert (hidden.num_tokens, hidden.width) == (count_tokens(prompt.encode()), 8)
        assert len(hidden.values) == hidden.num_tokens * 8
        if abi == "1.1":
            with pytest.raises(InputError, match="logits"):
                llm.generate(prompt, mode="logits")
            return
        logits = llm.generate(prompt, mode="logits", stream=False)
    assert (logits.num_tokens, logits.width) == (4, 50)
    assert len(logits.values) == 4 * 50


def test_per_run_sampling_and_max_new_tokens(abi, make_model, call_log):
    with LLM(make_model(abi, responses=scripted(LONG)), library="mock", abi=abi, max_new_tokens=1000,
             temperature=0.8) as llm:
        if not for_version(abi).FEATURES.has_sampling_params:
            with pytest.raises(InputError, match="at init"):
                llm.generate("go", temperature=0.2)
            with pytest.raises(InputError, match="at init"):
                llm.generate("go", max_new_tokens=5)
            assert llm.generate("go", temperature=0.8, stream=False).text  # same as init: fine
            return
        result = llm.generate("go", temperature=0.2, top_k=5, max_new_tokens=5, stream=False)
    run = call_log.last("rkllm_run")
    assert run["sampling"]["temperature"] == pytest.approx(0.2)
    assert run["sampling"]["top_k"] == 5
    assert run["sampling"]["top_p"] == pytest.approx(0.9)  # unset fields keep the init values
    assert run["max_new_tokens"] == 5
    assert call_log.last("run_end")["generated_tokens"] == 5
    assert result.finish_reason == "length"


def test_role_and_thinking_are_passed(abi, make_model, call_log):
    with LLM(make_model(abi), library="mock", abi=abi) as llm:
        if abi not in AT_LEAST_121:
            with pytest.raises(InputError, match="enable_thinking"):
                llm.generate("go", enable_thinking=True)
            return
        llm.generate("tool output", role="tool", enable_thinking=True, stream=False)
    run = call_log.last("rkllm_run")
    assert run["role"] == "tool" and run["enable_thinking"] is True


def test_init_parameters_reach_the_runtime(abi, make_model, call_log):
    with LLM(make_model(abi), library="mock", abi=abi, max_context_len=2048, max_new_tokens=77, top_k=3,
             temperature=0.5, base_domain_id=1):
        pass
    init = call_log.last("rkllm_init")
    assert (init["max_context_len"], init["max_new_tokens"], init["top_k"]) == (2048, 77, 3)
    assert init["temperature"] == pytest.approx(0.5)
    assert init["base_domain_id"] == 1


def test_lora_adapters_are_validated_and_selected(abi, make_model, call_log, tmp_path):
    from rkedge.runtime.simmodel import read_simulated_model, write_simulated_lora

    model = make_model(abi, responses=[{"lora": "style", "text": "adapted reply"}, {"text": "base reply"}])
    model_id = read_simulated_model(model)["model_id"]
    good = write_simulated_lora(tmp_path / "good_lora.rkllm", model_id=model_id, name="style")
    wrong = write_simulated_lora(tmp_path / "wrong_lora.rkllm", model_id="another-model", name="x")
    with LLM(model, library="mock", abi=abi) as llm:
        assert llm.load_lora(good, name="style") == "style"
        assert llm.generate("go", lora="style", stream=False).text == "adapted reply"
        assert llm.generate("go", stream=False).text == "base reply"
        with pytest.raises(InputError, match="refused"):
            llm.load_lora(wrong)
        with pytest.raises(InputError, match="not found"):
            llm.load_lora(tmp_path / "missing.rkllm")
    assert call_log.runs()[0]["lora"] == "style"


def test_prompt_cache_save_and_load(abi, make_model, tmp_path):
    cache = tmp_path / "prompt.cache"
    with LLM(make_model(abi), library="mock", abi=abi) as llm:
        llm.generate("a long system prompt", prompt_cache=str(cache), save_prompt_cache=True, stream=False)
        assert cache.is_file() and cache.read_bytes().startswith(b"RKEDGE-SIMULATED-PROMPT-CACHE/1")
        llm.load_prompt_cache(cache)
        if abi in AT_LEAST_121:
            assert llm.kv_cache_size() == count_tokens(b"a long system prompt")
        llm.release_prompt_cache()
        with pytest.raises(InputError):
            llm.load_prompt_cache(tmp_path / "missing.cache")


def test_a_foreign_file_is_refused_with_the_runtime_text(abi, tmp_path, capfd):
    model = tmp_path / "fake.rkllm"
    model.write_bytes(b"RKLL" + bytes(200))  # a fabricated "rkllm" like rkllama's converter writes
    with pytest.raises(RuntimeInitError) as caught:
        LLM(model, library="mock", abi=abi)
    err = capfd.readouterr().err
    if abi == "1.1":
        assert "E RKNN:" in err and "invalid rknn llm model magic" in err
    else:
        assert "E rkllm: invalid rkllm model!" in err
        assert caught.value.failure == "F-13"


@pytest.mark.parametrize("toolkit", ["1.0.2", "newer"])
def test_model_runtime_version_skew(abi, make_model, toolkit, capfd):
    version = toolkit if toolkit != "newer" else {"1.1": "1.2.0", "1.3.0": "1.4.0", "1.3.1": "1.4.0"}.get(abi, "1.3.0")
    with pytest.raises(RuntimeInitError) as caught:
        LLM(make_model(abi, toolkit_version=version), library="mock", abi=abi)
    assert caught.value.failure == "F-3"
    err = capfd.readouterr().err
    if toolkit == "1.0.2":
        assert "invalid rknn llm model magic" in err
    else:
        assert "invalid magic characters" in err


def test_max_context_above_the_model_limit(abi, make_model, capfd):
    model = make_model(abi, max_context_limit=4096)
    if abi == "1.1":
        LLM(model, library="mock", abi=abi, max_context_len=8192).close()  # 1.1 runtimes have no such check
        return
    with pytest.raises(RuntimeInitError) as caught:
        LLM(model, library="mock", abi=abi, max_context_len=8192)
    assert caught.value.failure == "F-7"
    assert "max_context[8192] must be less than the model's max_context_limit[4096]" in capfd.readouterr().err
    assert "4096" in caught.value.fix


def test_old_driver_warning(abi, make_model, monkeypatch):
    monkeypatch.setenv("RKEDGE_MOCK_DRIVER_VERSION", "0.9.6")
    with LLM(make_model(abi), library="mock", abi=abi) as llm:
        assert any(w.startswith("F-5") for w in llm.warnings)


def test_a_stall_is_ended_by_abort(abi, make_model, monkeypatch):
    monkeypatch.setenv("RKEDGE_MOCK_FAULT", json.dumps({"stall_after_tokens": 2, "stall_ms": 120000}))
    with LLM(make_model(abi, responses=scripted(LONG)), library="mock", abi=abi, max_new_tokens=1000) as llm:
        stream = llm.generate("go")
        received = [next(stream), next(stream)]
        finished = threading.Event()

        def drain() -> None:
            received.extend(stream)
            finished.set()

        threading.Thread(target=drain, daemon=True).start()
        assert not finished.wait(0.2), "the run is stalled"
        llm.abort()
        assert finished.wait(60), "abort ends a stalled run"
    assert stream.result.finish_reason == "abort"


def test_a_simulated_model_is_refused_by_a_real_runtime(make_model, tmp_path):
    from rkedge.runtime.mock import build_mock_library

    real = tmp_path / "librkllmrt.so"
    data = build_mock_library("1.3.0").read_bytes().replace(b"RKEDGE-SIMULATED-RKLLM-MODEL/1",
                                                            b"XXXXXXXXXXXXXXXXXXXXXXXXXXXXXX")
    real.write_bytes(data)  # stands in for a vendor library: no simulated-NPU marker
    with pytest.raises(ModelFileError, match="simulated model"):
        LLM(make_model("1.3.0"), library=real, abi="1.3.0")


def test_run_async_and_is_running_per_abi(abi, make_model):
    from rkedge.runtime.abi._native import NativeLibrary, NativeModel
    from rkedge.runtime.library import resolve_library
    from rkedge.runtime.types import InitParams, RunRequest

    events: list[int] = []
    done = threading.Event()

    def on_event(run_id: int, event) -> int:
        events.append(event.state)
        if event.state in (2, 3):
            done.set()
        return 0

    runtime = resolve_library("mock", abi)
    model = make_model(abi, responses=scripted(LONG), pace={"decode_tokens_per_s": 500})
    native = NativeModel(NativeLibrary.load(runtime.path, abi), str(model), InitParams(max_new_tokens=20), on_event)
    try:
        assert native.init_rc == 0 and native.alive
        assert native.is_running() is False
        assert native.run(7, RunRequest(prompt=b"go"), asynchronous=True) == 0  # returns at once
        assert native.is_running() is True
        assert done.wait(30)
        time.sleep(0.05)
        assert native.is_running() is False
        assert events[-1] == 2 and events.count(0) + events.count(1) == 20
    finally:
        native.destroy()


def test_a_callback_that_raises_returns_an_explicit_int_to_c(abi, make_model, call_log):
    """The ABI-level hazard: a ctypes callback that raises returns an undefined value to C (0 on x86_64, 1 on
    aarch64, where 1 means "pause" on ABI >= 1.2.1). The trampoline must catch and return 0 itself."""
    from rkedge.runtime.abi._native import NativeLibrary, NativeModel
    from rkedge.runtime.library import resolve_library
    from rkedge.runtime.types import InitParams, RunRequest

    calls = []

    def raising_handler(run_id: int, event) -> int:
        calls.append(event.state)
        raise RuntimeError("a handler bug")

    runtime = resolve_library("mock", abi)
    model = make_model(abi, responses=scripted(LONG))
    native = NativeModel(NativeLibrary.load(runtime.path, abi), str(model), InitParams(max_new_tokens=50),
                         raising_handler)
    try:
        assert native.run(3, RunRequest(prompt=b"go")) == 0
    finally:
        native.destroy()
    end = call_log.last("run_end")
    assert end["paused"] is False and end["generated_tokens"] == 50, "the run went on: every return was 0"
    assert not call_log.entries("callback_return")
    assert calls.count(2) == 1 and len(calls) == 51


def test_embed_flash_is_set_explicitly_where_the_abi_has_it(abi, make_model, call_log):
    """embed_flash = 1 (the embedding read from storage, as Rockchip's demo and server set it and rkedge plan
    assumes) is passed explicitly, not left to the runtime's unpublished default; the caller's value wins."""
    with LLM(make_model(abi), library="mock", abi=abi) as llm:
        values = dict(llm.backend.init_values)
    init = call_log.last("rkllm_init")
    if "embed_flash" not in {name for name, *_ in for_version(abi).RKLLMExtendParam._fields_}:
        assert "embed_flash" not in values and "embed_flash" not in init, "ABI 1.1 has no such field"
        with pytest.raises(InputError, match="embed_flash does not exist"):
            LLM(make_model(abi), library="mock", abi=abi, embed_flash=1)
        return
    assert values["embed_flash"] == 1 and init["embed_flash"] == 1
    with LLM(make_model(abi), library="mock", abi=abi, embed_flash=0) as llm:
        assert llm.backend.init_values["embed_flash"] == 0
    assert call_log.last("rkllm_init")["embed_flash"] == 0
