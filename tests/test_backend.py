"""The Backend seam under LLM: any implementation runs behind it, return codes stop at the backend, and chat
sessions reach the model through its public methods only."""

from __future__ import annotations

import ast
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

import rkedge.runtime.llm as llm_module
from rkedge.errors import BusyError, GenerationError, InputError
from rkedge.runtime import LLM
from rkedge.runtime.abi.v1_3_0 import FEATURES as FEATURES_1_3_0
from rkedge.runtime.backend import RuntimeInfo
from rkedge.runtime.types import CallState, InitParams, PerfStats, RunEvent, RunRequest

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"


class ScriptedBackend:
    """A Backend in plain Python: replies with fixed tokens, records what LLM asked of it."""

    def __init__(self, on_event: Callable[[int, RunEvent], int], tokens: list[str]) -> None:
        self._on_event = on_event
        self.tokens = tokens
        self.runtime = RuntimeInfo(Path("/scripted"), "scripted", None, "test", True)
        self.features = FEATURES_1_3_0
        self.init_values: Mapping[str, Any] = {"max_context_len": 64, "max_new_tokens": 16}
        self.init_log = ""
        self.warnings: list[str] = []
        self.metadata: Mapping[str, Any] = {"chat_family": "gemma", "name": "scripted"}
        self.encode = None
        self.calls: list[str] = []
        self.requests: list[RunRequest] = []
        self.release = threading.Event()
        self.release.set()

    def run(self, run_id: int, request: RunRequest) -> int:
        self.requests.append(request)
        self.release.wait(10)
        for token in self.tokens:
            self._on_event(run_id, RunEvent(CallState.NORMAL, token.encode(), 1))
        self._on_event(run_id, RunEvent(CallState.FINISH, None, -1, PerfStats(1.0, 3, 2.0, len(self.tokens), 1.0)))
        return 0

    def forget_run(self, run_id: int) -> None:
        self.calls.append("forget_run")

    def abort(self) -> None:
        self.calls.append("abort")

    def is_running(self) -> bool:
        return not self.release.is_set()

    def clear_kv_cache(self, keep_system_prompt: bool = False) -> None:
        self.calls.append("clear_kv_cache")

    def kv_cache_sizes(self, batches: int = 1) -> list[int] | None:
        return [7] * batches

    def load_lora(self, path: str, name: str, scale: float) -> None:
        self.calls.append(f"load_lora {name}")

    def load_prompt_cache(self, path: str) -> None:
        self.calls.append("load_prompt_cache")

    def release_prompt_cache(self) -> None:
        self.calls.append("release_prompt_cache")

    def set_chat_template(self, system_prompt: str, prefix: str, postfix: str) -> None:
        self.calls.append("set_chat_template")

    def set_function_tools(self, system_prompt: str, tools_json: str, tool_response_str: str) -> None:
        self.calls.append(f"set_function_tools {tools_json}")

    def close(self) -> None:
        self.calls.append("close")


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[list[str]], tuple[LLM, ScriptedBackend]]:
    made: list[ScriptedBackend] = []

    def fake_open(model_path: Path, library: object, abi: object, params: InitParams,
                  on_event: Callable[[int, RunEvent], int], *, verbose: bool = False) -> ScriptedBackend:
        made.append(ScriptedBackend(on_event, tokens))
        return made[-1]

    tokens: list[str] = []
    monkeypatch.setattr(llm_module, "open_backend", fake_open)

    def open_llm(reply: list[str]) -> tuple[LLM, ScriptedBackend]:
        tokens[:] = reply
        llm = LLM(tmp_path / "any.rkllm")
        return llm, made[-1]

    return open_llm


def test_any_backend_runs_behind_llm(scripted: Callable[[list[str]], tuple[LLM, ScriptedBackend]]) -> None:
    llm, backend = scripted(["Hel", "lo", " the", "re STOP", " never"])
    assert llm.abi == "scripted" and llm.info()["library"] == "/scripted"
    assert backend.calls == ["set_chat_template"], "a known template family switches the runtime's own off"
    result = llm.generate("hi", stream=False, stop=["STOP"])
    assert result.text == "Hello there " and result.finish_reason == "stop"
    assert result.stats.source == "runtime" and result.stats.prompt_tokens == 3
    assert llm.kv_cache_size() == 7
    assert llm.load_lora(Path(__file__), name="style") == "style" and "load_lora style" in backend.calls
    llm.set_function_tools("sys", [{"name": "f"}])
    assert 'set_function_tools [{"name": "f"}]' in backend.calls
    llm.close()
    assert backend.calls[-1] == "close"


def test_runs_are_one_at_a_time_and_sessions_own_the_kv_cache(
        scripted: Callable[[list[str]], tuple[LLM, ScriptedBackend]]) -> None:
    llm, backend = scripted(["ok"])
    backend.release.clear()
    stream = llm.run(RunRequest(prompt=b"first"))
    with pytest.raises(BusyError):
        llm.run(RunRequest(prompt=b"second"))
    backend.release.set()
    assert stream.collect().text == "ok"

    session = llm.chat_session()
    session.send("one", stream=False)
    assert llm.kv_cache_owner is session and backend.requests[-1].keep_history
    backend.calls.clear()
    llm.generate("unrelated", stream=False)
    assert backend.calls.count("clear_kv_cache") == 1, "another caller's run clears the session's cache first"
    assert llm.kv_cache_owner is None
    llm.close()


def test_start_is_an_alias_of_run(scripted: Callable[[list[str]], tuple[LLM, ScriptedBackend]]) -> None:
    llm, _ = scripted(["a", "b"])
    owner = object()
    stream = llm._start(RunRequest(prompt=b"x", keep_history=True), owner=owner, stop=["b"])
    assert stream.collect().text == "a" and llm.kv_cache_owner is owner
    llm.close()


class RefusingNative:
    """Stands in for NativeModel with every call failing the way librkllmrt reports it: a non-zero int."""

    def __getattr__(self, name: str) -> Callable[..., int]:
        return lambda *args, **kwargs: -1


@pytest.mark.parametrize(("call", "error", "needle"), [
    (lambda b: b.clear_kv_cache(), GenerationError, "rkllm_clear_kv_cache failed"),
    (lambda b: b.load_lora("/x_lora.rkllm", "x", 1.0), InputError, "rkllm_load_lora refused /x_lora.rkllm"),
    (lambda b: b.load_prompt_cache("/x.cache"), InputError, "rkllm_load_prompt_cache refused /x.cache"),
    (lambda b: b.set_chat_template("", "", ""), GenerationError, "rkllm_set_chat_template failed"),
    (lambda b: b.set_function_tools("", "[]", "r"), InputError, "rkllm_set_function_tools failed"),
])
def test_the_rkllm_backend_turns_return_codes_into_errors_with_a_fix(
        make_model: Callable[..., Path], call: Callable[[Any], None], error: type[Exception], needle: str) -> None:
    with LLM(make_model(), library="mock") as llm:
        backend = llm.backend
        native = backend._native  # swap the C side for one that fails every call
        backend._native = RefusingNative()
        try:
            with pytest.raises(error, match=needle) as caught:
                call(backend)
            assert caught.value.fix
        finally:
            backend._native = native


def test_chat_sessions_use_only_public_llm_methods() -> None:
    tree = ast.parse((RUNTIME / "chat.py").read_text())
    # `self.llm._x`, and `llm._x` through a local alias (`llm = self.llm`).
    private = sorted({node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                      and node.attr.startswith("_") and not node.attr.startswith("__")
                      and ((isinstance(node.value, ast.Attribute) and node.value.attr == "llm")
                           or (isinstance(node.value, ast.Name) and node.value.id == "llm"))})
    assert private == [], f"ChatSession reaches into LLM privates: {private}"


def test_llm_has_no_type_ignore_and_no_fabricated_library() -> None:
    source = (RUNTIME / "llm.py").read_text()
    assert "type: ignore" not in source and "RuntimeLibrary(" not in source
