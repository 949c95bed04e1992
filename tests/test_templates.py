"""Our pure-Python chat templates against Hugging Face's rendering of the real Jinja templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from rkedge.errors import InputError
from rkedge.runtime.templates import TEMPLATES, get_template

TEMPLATE_DIR = Path(__file__).parent / "data" / "chat_templates"

# (our family, template file, bos, eos, whether HF accepts a system message)
CASES = [
    ("gemma", "gemma-2b-it.jinja", "<bos>", "<eos>", False),
    ("gemma", "gemma-2-2b-it.jinja", "<bos>", "<eos>", False),
    ("gemma", "gemma-3-1b-it.jinja", "<bos>", "<eos>", True),
    ("llama3", "llama-3-8b-instruct.jinja", "<|begin_of_text|>", "<|eot_id|>", True),
    ("llama3.2", "llama-3.2-1b-instruct.jinja", "<|begin_of_text|>", "<|eot_id|>", True),
    ("qwen2", "qwen2-0.5b-instruct.jinja", None, "<|im_end|>", True),
    ("qwen2.5", "qwen2.5-1.5b-instruct.jinja", None, "<|im_end|>", True),
    ("phi3", "phi-3-mini-4k-instruct.jinja", "<s>", "<|endoftext|>", True),
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "  What is the RK3588?  "}, {"role": "assistant", "content": "A SoC with an NPU.\n"},
     {"role": "user", "content": "How fast is it? Größe, 日本語 🚀"}],
]
SYSTEM = {"role": "system", "content": "You are terse."}


def hf_tokenizer(bos: str | None, eos: str):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    specials = [t for t in (bos, eos, "<unk>") if t]
    model = tokenizers.models.WordLevel({t: i for i, t in enumerate(specials)}, unk_token="<unk>")
    backend = tokenizers.Tokenizer(model)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos,
                                                unk_token="<unk>")


def hf_render(case, messages, generate: bool) -> str:
    family, filename, bos, eos, _ = case
    tokenizer = hf_tokenizer(bos, eos)
    extra = {"date_string": "22 Nov 2026"} if family == "llama3.2" else {}
    return tokenizer.apply_chat_template(messages, chat_template=(TEMPLATE_DIR / filename).read_text(),
                                         tokenize=False, add_generation_prompt=generate, **extra)


def ours(family: str):
    template = get_template(family)
    return template.with_date("22 Nov 2026") if family == "llama3.2" else template


@pytest.mark.parametrize("case", CASES, ids=[c[1] for c in CASES])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("generate", [True, False])
@pytest.mark.parametrize("with_system", [False, True])
def test_rendering_equals_hugging_face(case, conversation, generate, with_system):
    messages = CONVERSATIONS[conversation]
    if with_system:
        if not case[4]:
            pytest.skip("this Hugging Face template raises on a system message")
        messages = [SYSTEM, *messages]
    expected = hf_render(case, messages, generate)
    assert ours(case[0]).render(messages, generate, include_bos=True) == expected


def test_the_runtime_is_sent_the_rendering_without_bos():
    messages = CONVERSATIONS[0]
    assert get_template("gemma").render(messages) == "<start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\n"
    assert not get_template("llama3").render(messages).startswith("<|begin_of_text|>")


def test_gemma_folds_a_system_prompt_into_the_first_user_turn():
    text = get_template("gemma").render([SYSTEM, *CONVERSATIONS[0]])
    assert text == "<start_of_turn>user\nYou are terse.\n\nHello!<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_runtime_parts_wrap_one_user_turn(family):
    template = ours(family)
    system, prefix, postfix = template.runtime_parts()
    assert system + prefix + "hi" + postfix == template.render([{"role": "user", "content": "hi"}])
    assert prefix and postfix


def test_unknown_family_and_role():
    with pytest.raises(InputError, match="unknown chat template"):
        get_template("nope")
    with pytest.raises(InputError, match="role"):
        get_template("gemma").render([{"role": "tool", "content": "x"}])


def test_families_ignore_keywords_they_do_not_read_and_refuse_tools():
    messages = CONVERSATIONS[0]
    template = get_template("qwen2.5")
    assert template.render(messages, True, enable_thinking=False, documents=[]) == template.render(messages, True)
    with pytest.raises(InputError, match="no tool calling"):
        template.render(messages, True, tools=[{"type": "function", "function": {"name": "f"}}])
