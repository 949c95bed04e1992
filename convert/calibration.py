"""Calibration data for quantization: ``[{"input": ..., "target": ...}]``.

The SDK manual requires ``input`` to carry the prompt template ("input 为问题，需要加上提示词") and Rockchip's
own generator renders the chat template and takes greedy replies of the float model as targets
(``generate_data_quant.py``; F-15). rkedge does the same, from a small built-in multilingual set or the
user's prompts, and lints the result (non-empty, template markers present, languages).
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rkedge.convert.findings import Finding
from rkedge.errors import InputError, RkedgeError

SOURCE = "F-15; SDK manual (calibration input carries the prompt template); generate_data_quant.py"

#: Built-in prompts: several languages and kinds (chat, reasoning, code), in the spirit of Rockchip's 21 fixed
#: prompts; short so that generating targets stays cheap.
BUILTIN_PROMPTS: tuple[str, ...] = (
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about a small computer board.",
    "What is the capital of Australia? Answer briefly.",
    "List three uses of a neural processing unit.",
    "Write a Python function that returns the square of a number.",
    "If a train travels 120 km in 1.5 hours, what is its average speed?",
    "Summarize the plot of Romeo and Juliet in one sentence.",
    "Give me a short tip for learning a new language.",
    "请用一句话介绍一下你自己。",
    "什么是人工智能？请简单回答。",
    "Erkläre kurz, was ein Mikrocontroller ist.",
    "Écris une phrase sur la mer.",
    "¿Cuál es la diferencia entre un virus y una bacteria?",
    "日本の首都はどこですか？",
    "한국어로 인사말을 한 문장 써 주세요.",
    "Как приготовить чай? Ответь коротко.",
    "Translate 'good morning' into Italian.",
    "What is 17 times 23?",
    "Describe a sunset using three adjectives.",
    "Why do computers use binary numbers?",
)


def load_prompts(source: str | Path | None) -> list[dict[str, Any]]:
    """``auto``/None -> the built-in prompts; a file -> its items.

    Accepted files: a JSON list of strings (prompts), a JSON list of ``{"input", "target"}`` (used as is when
    every input is already templated), or JSON lines of either.
    """
    if source in (None, "auto"):
        return [{"prompt": p} for p in BUILTIN_PROMPTS]
    path = Path(source)
    if not path.is_file():
        raise InputError(f"calibration file not found: {path}", fix="pass a JSON file, or --calibration auto")
    shape = 'use [{"input": "...", "target": "..."}], [{"prompt": "..."}] or a list of prompt strings'
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path} as UTF-8 text ({exc}).", fix="save the calibration file as UTF-8") \
            from exc
    try:
        items = json.loads(text)
    except ValueError:
        try:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as exc:
            raise InputError(f"{path} is neither JSON nor JSON lines ({exc}).", fix=shape) from exc
    if not isinstance(items, list) or not items:
        raise InputError(f"{path} must hold a non-empty JSON list.", fix=shape)
    out: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        text_fields = {k: v for k, v in item.items() if k in ("input", "prompt", "target")} \
            if isinstance(item, dict) else {}
        if any(v is not None and not isinstance(v, str) for v in text_fields.values()):
            raise InputError(f"{path}: item {index} has a non-text input, prompt or target.", fix=shape)
        if isinstance(item, str):
            out.append({"prompt": item})
        elif isinstance(item, dict) and isinstance(item.get("input"), str):
            out.append({"input": item["input"], "target": item.get("target")})
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
            out.append({"prompt": item["prompt"], **({"target": item["target"]} if item.get("target") else {})})
        else:
            raise InputError(f"{path}: item {index} is not a prompt string or an {{input, target}} object.",
                             fix=shape)
    return out


def build_calibration(
    items: Sequence[dict[str, Any]],
    render: Callable[[str], str],
    generate: Callable[[list[str]], list[str]] | None,
) -> list[dict[str, str]]:
    """Renders prompts with the chat template and fills missing targets with the float model's replies."""
    rendered = [dict(item) for item in items]
    for item in rendered:
        if "input" not in item:
            item["input"] = render(item.pop("prompt"))
    missing = [i for i, item in enumerate(rendered) if not item.get("target")]
    if missing and generate is not None:
        replies = generate([rendered[i]["input"] for i in missing])
        for i, reply in zip(missing, replies, strict=True):
            rendered[i]["target"] = reply
    return [{"input": item["input"], "target": item.get("target") or ""} for item in rendered]


def preview(items: Sequence[dict[str, Any]], render: Callable[[str], str]) -> list[dict[str, str | None]]:
    """The set as it will be, before the float model has run: rendered inputs; targets still to be generated are
    None. The float model runs when an item has no ``target`` key, and then fills every empty target."""
    rendered = build_calibration(items, render, None)
    generated = needs_generation(items)
    return [{"input": r["input"], "target": None if generated and not r["target"] else r["target"]} for r in rendered]


def needs_generation(items: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the float model must generate targets (an item without a ``target`` key)."""
    return any("target" not in item for item in items)


def check_targets(data: Sequence[Mapping[str, str | None]]) -> list[Finding]:
    """Empty targets (None: generated later, not empty)."""
    empty = sum(1 for d in data if d.get("target") is not None and not str(d.get("target")).strip())
    if not empty:
        return []
    return [Finding("calibration.empty-target", "warning", f"{empty} of {len(data)} calibration items have an empty "
                    "target.", "use --calibration auto to generate targets with the float model", SOURCE)]


def lint(data: Sequence[Mapping[str, str | None]], turn_marker: str | None) -> list[Finding]:
    """Checks the calibration set the way the toolkit cannot: it raises no error for a bad set (F-15).

    ``data``: the set, or its :func:`preview` (whose generated targets are checked after generation).
    """
    findings: list[Finding] = []
    empty_inputs = sum(1 for d in data if not (d.get("input") or "").strip())
    if empty_inputs:
        findings.append(Finding("calibration.empty-input", "error", f"{empty_inputs} calibration items have no input.",
                                "remove them or fill them in", SOURCE))
    findings += check_targets(data)
    if turn_marker:
        untemplated = sum(1 for d in data if turn_marker not in (d.get("input") or ""))
        if untemplated:
            findings.append(Finding("calibration.no-template", "warning",
                                    f"{untemplated} of {len(data)} inputs lack the chat template ({turn_marker!r}); the "
                                    "manual requires templated inputs and quality suffers without them.",
                                    "give plain prompts (rkedge renders them) or templated inputs", SOURCE))
    if len(data) < 8:
        findings.append(Finding("calibration.small", "warning",
                                f"only {len(data)} calibration items; 20 samples already broke MoE routing in one "
                                "report (F-15).", "use 20 or more varied prompts", SOURCE))
    scripts = language_mix(data)
    if len(scripts) == 1:
        findings.append(Finding("calibration.one-language", "info",
                                f"every input is in {next(iter(scripts))} script; languages missing from calibration "
                                "degrade after quantization (F-15).", None, SOURCE))
    return findings


def language_mix(data: Sequence[Mapping[str, str | None]]) -> Counter[str]:
    """Counts items by script: the non-Latin script of an input when it has one (templates and code are Latin
    text around the prompt), else Latin. A cheap signal of language coverage."""
    counts: Counter[str] = Counter()
    for item in data:
        letters: Counter[str] = Counter()
        for char in item.get("input") or "":
            if char.isalpha():
                name = unicodedata.name(char, "UNKNOWN").split()[0]
                letters[_SCRIPT_NAMES.get(name, name.title())] += 1
        if letters:
            other = [script for script, _ in letters.most_common() if script != "Latin"]
            counts[other[0] if other else "Latin"] += 1
    return counts


_SCRIPT_NAMES = {"CJK": "Han", "HIRAGANA": "Kana", "KATAKANA": "Kana", "HANGUL": "Hangul"}


def digest(data: Sequence[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(list(data), ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def greedy_generator(model_dir: Path, max_new_tokens: int = 32, *, work_dir: Path | None = None
                     ) -> Callable[[list[str]], list[str]]:
    """Greedy replies of the float model (the official generator's method), on the host CPU, computed in a child
    process with the decoder layers streamed from disk (:mod:`rkedge.convert.layer_stream`): this process never
    holds the model, and what the child held is gone before the toolkit starts. ``work_dir``: where the child's
    input and output files go (default: beside ``model_dir``)."""

    def generate(inputs: list[str]) -> list[str]:
        import subprocess
        import sys

        folder = work_dir or model_dir.parent
        job, result = folder / ".calibration-inputs.json", folder / ".calibration-replies.json"
        job.write_text(json.dumps({"model": str(model_dir), "inputs": inputs, "max_new_tokens": max_new_tokens}),
                       encoding="utf-8")
        try:
            done = subprocess.run([sys.executable, "-m", "rkedge.convert.calibration", str(job), str(result)],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                tail = " | ".join(done.stderr.strip().splitlines()[-3:])
                raise RkedgeError(f"generating calibration targets with the float model failed ({tail}).",
                                  fix="give the targets in the calibration file ({input, target} items), or check "
                                      "that transformers loads this checkpoint")
            replies: list[str] = json.loads(result.read_text(encoding="utf-8"))
            return replies
        finally:
            job.unlink(missing_ok=True)
            result.unlink(missing_ok=True)

    return generate


def greedy_replies(model: Any, tokenizer: Any, inputs: Sequence[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy replies of ``model`` to every input at once (a left-padded batch: each layer runs once per step
    for all prompts, which is what makes the layer-streamed model affordable)."""
    import torch

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    encoded = tokenizer(list(inputs), return_tensors="pt", padding=True, add_special_tokens=True)
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    start = encoded["input_ids"].shape[1]
    return [str(tokenizer.decode(row[start:], skip_special_tokens=True)) for row in output]


def streamed_replies(model_dir: Path, inputs: Sequence[str], max_new_tokens: int = 32) -> list[str]:
    """:func:`greedy_replies` of the float32 model with its layers streamed from ``model_dir``."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    from rkedge.convert.layer_stream import load_layer_streamed

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_layer_streamed(model_dir, torch.float32)
    if (model_dir / "generation_config.json").is_file():  # as from_pretrained does: its EOS ids end replies
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return greedy_replies(model, tokenizer, inputs, max_new_tokens)


def _child(job_file: str, result_file: str) -> int:
    job = json.loads(Path(job_file).read_text(encoding="utf-8"))
    replies = streamed_replies(Path(job["model"]), job["inputs"], int(job["max_new_tokens"]))
    Path(result_file).write_text(json.dumps(replies, ensure_ascii=False), encoding="utf-8")
    return 0


if __name__ == "__main__":  # the child process of greedy_generator
    import sys

    sys.exit(_child(sys.argv[1], sys.argv[2]))
