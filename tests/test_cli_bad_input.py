"""Fuzz-style: `rkedge convert` (and `rkedge inspect`) over generated bad checkpoints, adapters, templates and
calibration files (issue 11 item 9). Every case must end in one RkedgeError: exit 2, a message with a fix, no
traceback, and nothing in --out that looks finished."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
from click.testing import CliRunner
from tiny_models import make_checkpoint, train_lora

from rkedge.cli import main

Header = dict[str, Any]


# --- helpers that damage a copy of a good checkpoint ---------------------------------------------------

def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _read(file: Path) -> tuple[Any, bytes]:
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _write(file: Path, header: Any, data: bytes, *, raw_header: bytes | None = None) -> None:
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(body)) + body + data)


def _header(change: Callable[[Header], Any], *, which: int = 0) -> Callable[[Path], None]:
    """Rewrites one shard's header with ``change`` (which returns the new header, or edits in place)."""
    def damage(folder: Path) -> None:
        file = _shards(folder)[which]
        header, data = _read(file)
        changed = change(header)
        _write(file, header if changed is None else changed, data)
    return damage


def _first_tensor(header: Header) -> dict[str, Any]:
    return header[next(k for k in header if k != "__metadata__")]


def _every_tensor(edit: Callable[[dict[str, Any]], None]) -> Callable[[Header], None]:
    def change(header: Header) -> None:
        for name, entry in header.items():
            if name != "__metadata__":
                edit(entry)
    return change


def _raw_shard(content: bytes) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        _shards(folder)[0].write_bytes(content)
    return damage


def _raw_header(body: bytes) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        file = _shards(folder)[0]
        _, data = _read(file)
        _write(file, None, data, raw_header=body)
    return damage


def _file(name: str, content: bytes | str | None) -> Callable[[Path], None]:
    """Replaces (or, with None, deletes) one file of the folder."""
    def damage(folder: Path) -> None:
        target = folder / name
        if content is None:
            target.unlink()
        elif isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content, encoding="utf-8")
    return damage


def _json_edit(name: str, edit: Callable[[Any], Any]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = json.loads((folder / name).read_text(encoding="utf-8"))
        changed = edit(data)
        (folder / name).write_text(json.dumps(data if changed is None else changed), encoding="utf-8")
    return damage


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        data[key] = value
    return edit


def _int_weights(code: str) -> Callable[[Header], None]:
    """Float weights relabelled as integers of the same width: a valid file of garbage numbers."""
    def edit(entry: dict[str, Any]) -> None:
        if entry["dtype"] == "F32":
            entry["dtype"] = code
    return _every_tensor(edit)


def _shift_offsets(header: Header) -> None:
    entry = _first_tensor(header)
    begin, end = entry["data_offsets"]
    entry["data_offsets"] = [begin + 1 << 30, end + 1 << 30]


def _index_missing_shard(index: Any) -> None:
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "model-99999-of-99999.safetensors"


def _index_without_a_tensor(folder: Path) -> None:
    """A shard whose tensors the index does not list: the index and the files disagree."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = _shards(folder)[0].name
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _shard_is_a_folder(folder: Path) -> None:
    file = _shards(folder)[0]
    file.unlink()
    file.mkdir()


def _all_safetensors_as_pickles(folder: Path) -> None:
    for file in _shards(folder):
        file.rename(file.with_suffix(".bin"))
    (folder / "model.safetensors.index.json").unlink()


def _duplicate_tensor(folder: Path) -> None:
    """The same tensor name in two shards (one would silently win)."""
    first, second = _shards(folder)[:2]
    header, _ = _read(first)
    name = next(k for k in header if k != "__metadata__")
    other, data = _read(second)
    entry = dict(header[name])
    size = entry["data_offsets"][1] - entry["data_offsets"][0]
    entry["data_offsets"] = [len(data), len(data) + size]
    other[name] = entry
    _write(second, other, data + b"\0" * size)


def _wrong_embedding_shape(folder: Path) -> None:
    for file in _shards(folder):
        header, data = _read(file)
        for name, entry in header.items():
            if name.endswith("embed_tokens.weight"):
                rows, cols = entry["shape"]
                entry["shape"] = [rows // 2, cols * 2 + 2]
                _write(file, header, data)
                return


# --- the cases ------------------------------------------------------------------------------------------

CHECKPOINT_CASES: dict[str, Callable[[Path], None]] = {
    "header-is-a-json-list": _header(lambda h: [h]),
    "header-is-a-string": _header(lambda h: "weights"),
    "header-is-a-number": _header(lambda h: 42),
    "header-is-null": _raw_header(b"null"),
    "header-lacks-data-offsets": _header(lambda h: _first_tensor(h).pop("data_offsets") and None),
    "header-lacks-dtype": _header(lambda h: _first_tensor(h).pop("dtype") and None),
    "header-lacks-shape": _header(lambda h: _first_tensor(h).pop("shape") and None),
    "tensor-entry-is-a-list": _header(lambda h: {k: (list(v.values()) if k != "__metadata__" else v)
                                                 for k, v in h.items()}),
    "shape-is-a-string": _header(lambda h: _first_tensor(h).update(shape="abc")),
    "shape-has-a-negative-dim": _header(lambda h: _first_tensor(h).update(shape=[-4, 16])),
    "shape-has-a-float-dim": _header(lambda h: _first_tensor(h).update(shape=[4.5, 16])),
    "offsets-are-strings": _header(lambda h: _first_tensor(h).update(data_offsets=["0", "4"])),
    "offsets-have-three-numbers": _header(lambda h: _first_tensor(h).update(data_offsets=[0, 4, 8])),
    "offsets-reversed": _header(lambda h: _first_tensor(h).update(data_offsets=_first_tensor(h)["data_offsets"][::-1])),
    "offsets-past-the-end": _header(_shift_offsets),
    "offsets-disagree-with-shape": _header(lambda h: _first_tensor(h).update(shape=[1, 3])),
    "unknown-dtype": _header(lambda h: _first_tensor(h).update(dtype="X99")),
    "dtype-is-a-number": _header(lambda h: _first_tensor(h).update(dtype=4)),
    "metadata-is-a-list": _header(lambda h: h.update(__metadata__=["format", "pt"])),
    "weights-stored-as-i32": _header(_int_weights("I32")),
    "weights-stored-as-u32": _header(_int_weights("U32")),
    "weights-stored-as-i8-pairs": _header(lambda h: _every_tensor(
        lambda e: e.update(dtype="I16", shape=[*e["shape"][:-1], e["shape"][-1] * 2]) if e["dtype"] == "F32" else None)(h)),
    "header-not-json": _raw_header(b"{not json"),
    "header-not-utf8": _raw_header(b'{"a\xff": 1}'),
    "header-length-too-big": _raw_shard(struct.pack("<Q", 1 << 40) + b"{}"),
    "header-longer-than-file": _raw_shard(struct.pack("<Q", 4096) + b"{}"),
    "shard-three-bytes": _raw_shard(b"abc"),
    "shard-empty": _raw_shard(b""),
    "shard-is-a-folder": _shard_is_a_folder,
    "duplicate-tensor-in-two-shards": _duplicate_tensor,
    "embedding-shape-wrong": _wrong_embedding_shape,
    "index-not-json": _file("model.safetensors.index.json", "{weight_map: nope"),
    "index-not-utf8": _file("model.safetensors.index.json", b'{"weight_map": {"\xff": 1}}'),
    "index-is-a-list": _file("model.safetensors.index.json", "[1, 2]"),
    "index-weight-map-is-a-list": _json_edit("model.safetensors.index.json", _set("weight_map", ["a"])),
    "index-weight-map-values-not-strings": _json_edit("model.safetensors.index.json",
                                                      lambda i: i.update(weight_map={"x": 5})),
    "index-names-a-missing-shard": _json_edit("model.safetensors.index.json", _index_missing_shard),
    "index-names-a-path-outside": _json_edit("model.safetensors.index.json", lambda i: i.update(
        weight_map={k: "../../etc/passwd" for k in i["weight_map"]})),
    "index-omits-a-shard": _index_without_a_tensor,
    "index-weight-map-empty": _json_edit("model.safetensors.index.json", _set("weight_map", {})),
    "only-pickle-weights": _all_safetensors_as_pickles,
    "config-not-json": _file("config.json", "{'hidden_size': 64"),
    "config-not-utf8": _file("config.json", b'{"model_type": "ll\xffama"}'),
    "config-is-a-list": _file("config.json", "[]"),
    "config-missing": _file("config.json", None),
    "config-hidden-size-a-string": _json_edit("config.json", _set("hidden_size", "abc")),
    "config-layers-negative": _json_edit("config.json", _set("num_hidden_layers", -2)),
    "config-layers-a-float": _json_edit("config.json", _set("num_hidden_layers", 2.5)),
    "config-heads-zero": _json_edit("config.json", _set("num_attention_heads", 0)),
    "config-vocab-null": _json_edit("config.json", _set("vocab_size", None)),
    "config-architectures-a-string": _json_edit("config.json", _set("architectures", "LlamaForCausalLM")),
    "config-architectures-a-number-list": _json_edit("config.json", _set("architectures", [5])),
    "config-model-type-a-dict": _json_edit("config.json", _set("model_type", {"x": 1})),
    "config-text-config-a-string": _json_edit("config.json", _set("text_config", "llama")),
    "config-quantization-config-a-string": _json_edit("config.json", _set("quantization_config", "gptq")),
    "config-max-positions-a-string": _json_edit("config.json", _set("max_position_embeddings", "4k")),
    "config-bos-a-string": _json_edit("config.json", _set("bos_token_id", "<s>")),
    "config-tie-a-string": _json_edit("config.json", _set("tie_word_embeddings", "yes")),
    "tokenizer-json-garbage": _file("tokenizer.json", "\x00\x01 this is not a tokenizer"),
    "tokenizer-json-not-utf8": _file("tokenizer.json", b"\xff\xfe\x00{"),
    "tokenizer-json-a-list": _file("tokenizer.json", "[1, 2, 3]"),
    "tokenizer-json-wrong-model": _file("tokenizer.json", json.dumps({"model": {"type": "Nope"}, "version": "1.0"})),
    "tokenizer-config-not-json": _file("tokenizer_config.json", "{chat_template: x"),
    "tokenizer-config-a-list": _file("tokenizer_config.json", "[]"),
    "tokenizer-config-not-utf8": _file("tokenizer_config.json", b'{"x": "\xff"}'),
    "tokenizer-config-template-a-number": _json_edit("tokenizer_config.json", _set("chat_template", 5)),
    "tokenizer-config-bos-a-list": _json_edit("tokenizer_config.json", _set("bos_token", [1, 2])),
    "chat-template-not-utf8": _file("chat_template.jinja", b"{{ messages \xff\xfe }}"),
    "chat-template-invalid-jinja": _file("chat_template.jinja", "{% for m in messages %}{{ m.content }"),
    "chat-template-unclosed-block": _file("chat_template.jinja", "{% if messages %}hello"),
    "chat-template-unknown-tag": _file("chat_template.jinja", "{% frobnicate %}"),
    "chat-template-json-not-json": _file("chat_template.json", "{chat_template"),
    "generation-config-not-json": _file("generation_config.json", "{eos_token_id: 2"),
}


def _adapter_config_edit(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    return _json_edit("adapter_config.json", edit)


def _adapter_header(change: Callable[[Header], Any]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        file = folder / "adapter_model.safetensors"
        header, data = _read(file)
        changed = change(header)
        _write(file, header if changed is None else changed, data)
    return damage


def _adapter_b_wrong_shape(header: Header) -> None:
    for name, entry in header.items():
        if name.endswith("lora_B.weight"):
            entry["shape"] = [entry["shape"][0] // 2, entry["shape"][1] * 2]
            return


ADAPTER_CASES: dict[str, Callable[[Path], None]] = {
    "adapter-r-a-string": _adapter_config_edit(_set("r", "abc")),
    "adapter-r-zero": _adapter_config_edit(_set("r", 0)),
    "adapter-r-negative": _adapter_config_edit(_set("r", -4)),
    "adapter-r-disagrees-with-weights": _adapter_config_edit(_set("r", 7)),
    "adapter-alpha-a-string": _adapter_config_edit(_set("lora_alpha", "x")),
    "adapter-targets-a-number": _adapter_config_edit(_set("target_modules", 5)),
    "adapter-targets-none-match": _adapter_config_edit(_set("target_modules", ["no_such_proj"])),
    "adapter-peft-type-prefix": _adapter_config_edit(_set("peft_type", "PREFIX_TUNING")),
    "adapter-rank-pattern-a-list": _adapter_config_edit(_set("rank_pattern", [1])),
    "adapter-config-not-json": _file("adapter_config.json", "{r: 4"),
    "adapter-config-a-list": _file("adapter_config.json", "[4]"),
    "adapter-config-not-utf8": _file("adapter_config.json", b'{"r": "\xff"}'),
    "adapter-config-missing": _file("adapter_config.json", None),
    "adapter-weights-missing": _file("adapter_model.safetensors", None),
    "adapter-header-a-list": _adapter_header(lambda h: [h]),
    "adapter-header-lacks-offsets": _adapter_header(lambda h: _first_tensor(h).pop("data_offsets") and None),
    "adapter-weights-as-i32": _adapter_header(_int_weights("I32")),
    "adapter-b-wrong-shape": _adapter_header(_adapter_b_wrong_shape),
    "adapter-weights-garbage": _file("adapter_model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!"),
    "adapter-for-another-base-same-shape": _adapter_config_edit(_set("base_model_name_or_path", "someone/other-7b")),
}

CALIBRATION_CASES: dict[str, bytes] = {
    "calibration-not-json": b"[{prompt: 1}",
    "calibration-not-utf8": b'["\xff\xfe"]',
    "calibration-a-number": b"5",
    "calibration-empty-list": b"[]",
    "calibration-numbers": b"[1, 2, 3]",
    "calibration-items-without-prompt": b'[{"target": "x"}]',
    "calibration-prompt-a-list": b'[{"prompt": ["a"]}]',
}

OPTION_CASES: dict[str, list[str]] = {
    "max-context-not-a-multiple": ["--max-context", "1000"],
    "max-context-huge": ["--max-context", "1048576"],
    "max-context-negative": ["--max-context", "-32"],
    "npu-cores-zero": ["--npu-cores", "0"],
    "hybrid-rate-one": ["--hybrid-rate", "1.5"],
    "unknown-dtype-option": ["--dtype", "w3a5"],
    "unknown-platform": ["--platform", "rk9999"],
    "unknown-board": ["--board", "no-such-board"],
    "name-with-a-slash": ["--name", "../../escape"],
}


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    model = make_checkpoint(root / "llama", "llama")
    adapter = train_lora(model, root / "adapter", steps=1)
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": "Hello", "target": "ok"}]))
    return {"model": model, "adapter": adapter, "prompts": prompts}


def _assert_refused(args: list[str], out: Path) -> None:
    result = CliRunner().invoke(main, args)
    shown = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"uncaught {type(result.exception).__name__}: {result.exception}\n{shown}"
    assert result.exit_code == 2, shown
    assert "Traceback" not in shown
    assert "error:" in shown and ("fix:" in shown or "Usage:" in shown), shown
    finished = sorted(p.name for p in out.glob("*.rkllm")) if out.is_dir() else []
    assert not finished, f"a finished-looking model in --out: {finished}"


def _convert_args(model: Path, out: Path, prompts: Path, *extra: str) -> list[str]:
    return ["convert", str(model), "--out", str(out), "--toolkit", "mock", "--calibration", str(prompts), *extra]


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_a_bad_checkpoint_is_refused(case: str, good: dict[str, Path], tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(good["model"], model)
    CHECKPOINT_CASES[case](model)
    _assert_refused(_convert_args(model, tmp_path / "out", good["prompts"]), tmp_path / "out")


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES)[::6])
def test_inspect_of_a_bad_checkpoint_is_refused(case: str, good: dict[str, Path], tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(good["model"], model)
    CHECKPOINT_CASES[case](model)
    result = CliRunner().invoke(main, ["inspect", str(model)])
    if result.exit_code == 0:  # inspect shows what it can read; what it shows must then hold
        assert "Traceback" not in result.output
        return
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, result.output


@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_a_bad_adapter_is_refused(case: str, good: dict[str, Path], tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(good["adapter"], adapter)
    ADAPTER_CASES[case](adapter)
    _assert_refused(_convert_args(good["model"], tmp_path / "out", good["prompts"], "--lora", str(adapter)),
                    tmp_path / "out")


@pytest.mark.parametrize("case", sorted(CALIBRATION_CASES))
def test_a_bad_calibration_file_is_refused(case: str, good: dict[str, Path], tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.json"
    prompts.write_bytes(CALIBRATION_CASES[case])
    _assert_refused(_convert_args(good["model"], tmp_path / "out", prompts), tmp_path / "out")


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_a_bad_option_is_refused(case: str, good: dict[str, Path], tmp_path: Path) -> None:
    _assert_refused(_convert_args(good["model"], tmp_path / "out", good["prompts"], *OPTION_CASES[case]),
                    tmp_path / "out")


def test_there_are_at_least_sixty_cases() -> None:
    assert len(CHECKPOINT_CASES) + len(ADAPTER_CASES) + len(CALIBRATION_CASES) + len(OPTION_CASES) >= 60


def test_the_good_inputs_convert(good: dict[str, Path], tmp_path: Path) -> None:
    """The cases above are refused for their damage, not because the undamaged inputs fail."""
    out = tmp_path / "out"
    result = CliRunner().invoke(main, _convert_args(good["model"], out, good["prompts"], "--lora", str(good["adapter"])))
    assert result.exit_code == 0, result.output
    assert list(out.glob("*.rkllm"))


@pytest.mark.parametrize(("code", "words"), [(errno.ENOSPC, "the disk filled up"), (errno.EROFS, "read-only"),
                                             (errno.EACCES, "permission denied"), (errno.EDQUOT, "the disk filled up")])
def test_os_errors_while_writing_are_one_message_with_the_path(code: int, words: str, good: dict[str, Path],
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rkedge.convert.export as export

    out = tmp_path / "out"

    def refuse(source: Path, target: Path) -> None:
        raise OSError(code, os.strerror(code), str(target))

    monkeypatch.setattr(export, "_link_or_copy", refuse)
    result = CliRunner().invoke(main, _convert_args(good["model"], out, good["prompts"]))
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, result.output
    assert words in result.output and str(out) in result.output and "fix:" in result.output
    assert "Traceback" not in result.output and not list(out.glob("*.rkllm"))
    if code == errno.ENOSPC:
        assert "needs about" in result.output and "free" in result.output


def test_too_little_space_is_refused_before_any_work_with_the_amounts(good: dict[str, Path], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import rkedge._fs as fs

    real = shutil.disk_usage
    monkeypatch.setattr(fs.shutil, "disk_usage", lambda path: real(path)._replace(free=70_000))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, _convert_args(good["model"], out, good["prompts"]))
    assert result.exit_code == 2, result.output
    assert "this conversion needs about" in result.output and "which has 70 KB free" in result.output
    assert "free at least" in result.output and "0.00 GB" not in result.output
    assert not (out / ".rkedge-work" / "export").exists()
