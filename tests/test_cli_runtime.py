"""The board-side CLI: mock-model, chat, help without heavy packages, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from rkedge.cli import main

BLOCK_HEAVY = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'transformers', 'peft', 'numpy', 'safetensors', 'fastapi', 'uvicorn', 'onnx'}:
            raise ImportError('blocked heavy import: ' + name)
        return None
sys.meta_path.insert(0, Block())
"""


def run_cli(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    code = BLOCK_HEAVY + "from rkedge.cli import main\nmain()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, input=input,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_help_of_every_command_works_without_heavy_packages():
    top = run_cli("--help")
    assert top.returncode == 0, top.stderr
    commands = [line.split()[0] for line in top.stdout.split("Commands:")[1].splitlines() if line.strip()]
    assert {"chat", "mock-model"} <= set(commands)
    for command in commands:
        result = run_cli(command, "--help")
        assert result.returncode == 0, f"{command}: {result.stderr}"
        assert "Usage:" in result.stdout


def test_mock_model_then_chat_one_turn(tmp_path):
    model = tmp_path / "demo.rkllm"
    made = run_cli("mock-model", "--out", str(model), "--template", "gemma", "--response", "hello=>Hi! 日本語 ok.")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["written"] == str(model)
    chat = run_cli("chat", str(model), "--mock", "--prompt", "hello there")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == "Hi! 日本語 ok.\n"


def test_chat_reads_turns_from_a_pipe(tmp_path):
    model = tmp_path / "m.rkllm"
    CliRunner().invoke(main, ["mock-model", "--out", str(model), "--template", "qwen2", "--response", "fine"])
    chat = run_cli("chat", str(model), "--mock", input="first\n/stats\nsecond\n/exit\nnever sent\n")
    assert chat.returncode == 0, chat.stderr
    lines = chat.stdout.splitlines()
    assert lines[0] == "fine" and lines[2] == "fine"
    assert "tokens/s" in lines[1] and "KV cache" in lines[1]
    assert "never sent" not in chat.stdout


def test_chat_errors_go_to_stderr_and_replies_to_stdout(tmp_path):
    """stdout stays the replies alone (pipeable); what went wrong, and the fix, is on stderr."""
    model = tmp_path / "m.rkllm"
    CliRunner().invoke(main, ["mock-model", "--out", str(model), "--template", "qwen2", "--response",
                              "one two three four five six", "--fault", "error_after_tokens=2"])
    chat = run_cli("chat", str(model), "--mock", input="first\n/lora /nonexistent_lora.rkllm\n")
    assert chat.returncode == 0, chat.stderr
    assert "error" not in chat.stdout, "no error text among the replies"
    errors = [line for line in chat.stderr.splitlines() if line.startswith("error: ")]
    assert any("generation failed" in line for line in errors), chat.stderr
    assert any("LoRA adapter not found" in line for line in errors), chat.stderr
    assert chat.stdout.strip(), "the text produced before the failure is still shown"


@pytest.mark.parametrize(("args", "needle"), [
    (["chat", "/nonexistent.rkllm", "--mock"], "model file not found"),
    (["chat", "MODEL", "--mock", "--abi", "9.9"], "unknown rkllm ABI"),
    (["chat", "MODEL", "--mock", "--lib", "/x.so"], "--mock or --lib"),
    (["mock-model", "--out", "OUT", "--pace", "fast"], "--pace"),
    (["mock-model", "--out", "OUT", "--fault", "oops"], "KEY=VALUE"),
])
def test_bad_input_exits_2_with_a_clear_message(tmp_path, args, needle):
    model = tmp_path / "m.rkllm"
    CliRunner().invoke(main, ["mock-model", "--out", str(model)])
    args = [str(model) if a == "MODEL" else str(tmp_path / "o.rkllm") if a == "OUT" else a for a in args]
    result = run_cli(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert needle in result.stderr
    assert not (tmp_path / "o.rkllm").exists(), "no half-written output"


def test_init_failure_explains_the_fix(tmp_path):
    model = tmp_path / "big.rkllm"
    CliRunner().invoke(main, ["mock-model", "--out", str(model), "--toolkit-version", "1.1.1",
                              "--fault", "init=npu_malloc", "--fault", "fixed_by_base_domain_id=1"])
    result = run_cli("chat", str(model), "--mock", "--abi", "1.1", "--prompt", "hi")
    assert result.returncode == 1
    assert "failed to malloc npu memory, size: 232128512" in result.stderr
    assert "F-1" in result.stderr and "base_domain_id" in result.stderr
    ok = run_cli("chat", str(model), "--mock", "--abi", "1.1", "--base-domain-id", "1", "--prompt", "hi")
    assert ok.returncode == 0 and ok.stdout.strip()
