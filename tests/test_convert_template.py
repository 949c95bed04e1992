"""A checkpoint whose chat template is none of rkedge's families (issue 11 item 12): converted with a warning, the
manifest says the runtime renders the model's own template, and on the board nothing of the conversation is lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
from tiny_models import make_checkpoint

from rkedge.convert.pipeline import WORK, convert
from rkedge.convert.planner import ConversionRequest
from rkedge.manifest import read_manifest
from rkedge.runtime import LLM
from rkedge.runtime.chat_template import JinjaChatTemplate

#: A template no family reproduces (its own turn markers), reading bos_token/eos_token like real ones do.
ODD_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<<{{ m.role | upper }}>> {{ m.content }}{{ eos_token }}\n"
                "{% endfor %}{% if add_generation_prompt %}<<ASSISTANT>> {% endif %}")


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_checkpoint(tmp_path_factory.mktemp("template") / "odd", "llama")
    (folder / "chat_template.jinja").write_text(ODD_TEMPLATE, encoding="utf-8")
    return folder


def test_an_unknown_template_converts_with_a_warning_and_the_runtime_renders_it(odd_model: Path,
                                                                                 tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": "Hello", "target": "ok"}, {"prompt": "Bonjour", "target": "ok"}]))
    result = convert(ConversionRequest(model=odd_model, out=tmp_path / "o", toolkit="mock",
                                       calibration=str(prompts)))
    warned = [f for f in result.findings if f.id == "chat.unknown-template"]
    assert warned and warned[0].severity == "warning" and "renders it with Jinja" in warned[0].message
    assert result.model_file is not None
    manifest = read_manifest(result.model_file)
    assert manifest is not None and manifest.chat_family is None
    assert manifest.chat_template == ODD_TEMPLATE
    assert manifest.runtime is not None and manifest.runtime.get("prompt_renderer") == "model"
    assert manifest.special_tokens and manifest.special_tokens.get("eos_token")
    # calibration prompts were rendered with the model's own template, not passed bare
    calibration = json.loads((tmp_path / "o" / WORK / "calibration.json").read_text(encoding="utf-8"))
    assert all(item["input"].count("<<USER>> ") == 1 and item["input"].endswith("<<ASSISTANT>> ")
               for item in calibration)

    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is an NPU?"}]
    with LLM(result.model_file, library="mock", abi="1.3.0") as llm:
        assert isinstance(llm.template, JinjaChatTemplate)
        prompt = llm.template.render(conversation, True)
    eos = manifest.special_tokens["eos_token"]
    assert prompt.endswith("<<ASSISTANT>> ")
    for message in conversation:  # system prompt and history all reach the model
        assert f"<<{message['role'].upper()}>> {message['content']}{eos}" in prompt


def test_a_known_family_says_the_family_renders(tmp_path: Path) -> None:
    model = make_checkpoint(tmp_path / "qwen", "qwen2")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": "Hello", "target": "ok"}]))
    result = convert(ConversionRequest(model=model, out=tmp_path / "o", toolkit="mock", calibration=str(prompts)))
    assert result.manifest is not None and result.manifest.chat_family
    assert result.manifest.runtime is not None and result.manifest.runtime.get("prompt_renderer") == "family"
    assert "chat.unknown-template" not in {f.id for f in result.findings}
