"""The simulated-model file format: what the simulated NPU loads instead of a vendor ``.rkllm``.

A simulated model is one line of our own magic (``rkedge.modelfile.SIMULATED_MODEL_MAGIC``), then a JSON manifest
(platform, dtype, toolkit version, architecture, context limit, chat template, BOS/EOS, optional scripted
responses, pace and faults). It can never be mistaken for a vendor file: it holds no weights, and the
real-runtime path of :class:`rkedge.runtime.LLM` refuses it before ``rkllm_init`` with a clear message.
Simulated LoRA adapters and prompt caches use the same scheme with their own magic.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from rkedge._fs import atomic_write_bytes
from rkedge.errors import ModelFileError
from rkedge.modelfile import SIMULATED_CACHE_MAGIC as CACHE_MAGIC
from rkedge.modelfile import SIMULATED_LORA_MAGIC as LORA_MAGIC
from rkedge.modelfile import SIMULATED_MODEL_MAGIC as MODEL_MAGIC
from rkedge.modelfile import is_simulated_model

__all__ = ["BOARD_PACE", "CACHE_MAGIC", "FORMAT_VERSION", "LORA_MAGIC", "MODEL_MAGIC", "build_cli_manifest",
           "is_simulated_model", "model_id_for", "read_magic", "read_simulated_model", "simulated_manifest",
           "write_simulated_lora", "write_simulated_model"]
FORMAT_VERSION = 1

#: Board pace from Rockchip's RK3588 benchmark (Qwen2.5-1.5B w8a8, runtime 1.3.0: TTFT 378.31 ms for 128
#: tokens, 16.69 tokens/s; shared/knowledge/benchmarks.md).
BOARD_PACE = {"prefill_tokens_per_s": round(128 / 0.37831, 1), "decode_tokens_per_s": 16.69}


def model_id_for(manifest: dict[str, Any]) -> str:
    """A stable identity for adapters and caches to check against: hash of the model's defining fields."""
    core = {k: manifest.get(k) for k in ("name", "architecture", "toolkit_version", "platform", "dtype", "source_sha256")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


def simulated_manifest(
    *,
    name: str = "sim-model",
    architecture: str = "LlamaForCausalLM",
    toolkit_version: str = "1.2.3",
    platform: str = "rk3588",
    dtype: str = "w8a8",
    max_context_limit: int = 4096,
    npu_cores: int = 3,
    vocab_size: int = 32000,
    hidden_size: int = 64,
    chat_family: str | None = None,
    chat_template: dict[str, str] | None = None,
    bos_token_id: int | None = 1,
    eos_token_id: int | None = 2,
    responses: list[dict[str, str]] | None = None,
    pace: dict[str, float] | None = None,
    faults: dict[str, Any] | None = None,
    memory_mb: float = 512.0,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A complete simulated-model manifest with defaults for every field the simulated NPU reads."""
    manifest: dict[str, Any] = {
        "format": "rkedge-simulated-model",
        "format_version": FORMAT_VERSION,
        "simulated": True,
        "name": name,
        "architecture": architecture,
        "toolkit_version": toolkit_version,
        "platform": platform,
        "dtype": dtype,
        "max_context_limit": max_context_limit,
        "npu_cores": npu_cores,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "chat_family": chat_family,
        "chat_template": chat_template or {"system_prompt": "", "prompt_prefix": "", "prompt_postfix": ""},
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "responses": responses or [],
        "pace": pace or {},
        "faults": faults or {},
        "memory_mb": memory_mb,
    }
    if extra:
        manifest.update(extra)
    manifest.setdefault("model_id", model_id_for(manifest))
    return manifest


def write_simulated_model(path: str | Path, manifest: dict[str, Any]) -> Path:
    manifest = dict(manifest)
    manifest.setdefault("model_id", model_id_for(manifest))
    return atomic_write_bytes(path, MODEL_MAGIC + json.dumps(manifest, indent=1, ensure_ascii=False).encode() + b"\n")


def write_simulated_lora(path: str | Path, *, model_id: str, name: str, extra: dict[str, Any] | None = None) -> Path:
    body = {"format": "rkedge-simulated-lora", "base_model_id": model_id, "name": name, **(extra or {})}
    return atomic_write_bytes(path, LORA_MAGIC + json.dumps(body, ensure_ascii=False).encode() + b"\n")


def read_magic(path: str | Path, length: int = 64) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(length)


def read_simulated_model(path: str | Path) -> dict[str, Any]:
    """The manifest of a simulated model file.

    Raises:
        ModelFileError: when the file is not a simulated model or its manifest is unreadable.
    """
    data = Path(path).read_bytes()
    if not data.startswith(MODEL_MAGIC):
        raise ModelFileError(f"{path} is not an rkedge simulated model.")
    try:
        manifest = json.loads(data[len(MODEL_MAGIC):])
    except ValueError as exc:
        raise ModelFileError(f"{path}: the simulated model's manifest is not valid JSON ({exc}).",
                             fix="recreate it with `rkedge mock-model`") from exc
    if not isinstance(manifest, dict):
        raise ModelFileError(f"{path}: the simulated model's manifest is not a JSON object.")
    return manifest


def build_cli_manifest(*, responses: tuple[str, ...] = (), pace: str = "unlimited", faults: tuple[str, ...] = (),
                       chat_family: str | None = None, **fields: Any) -> dict[str, Any]:
    """A manifest from ``rkedge mock-model`` options (``MATCH=>TEXT`` replies, ``KEY=VALUE`` faults)."""
    from rkedge.errors import InputError

    rules = []
    for response in responses:
        if "=>" in response:
            match, text = response.split("=>", 1)
            rules.append({"match": match, "text": text})
        else:
            rules.append({"text": response})
    fault_map: dict[str, Any] = {}
    for fault in faults:
        if "=" not in fault:
            raise InputError(f"--fault {fault!r} is not KEY=VALUE.", fix="e.g. --fault error_after_tokens=5")
        key, value = fault.split("=", 1)
        fault_map[key] = int(value) if value.lstrip("-").isdigit() else value
    if pace == "unlimited":
        pace_map: dict[str, float] = {}
    elif pace == "board":
        pace_map = dict(BOARD_PACE)
    else:
        try:
            prefill, decode = (float(x) for x in pace.split(","))
        except ValueError:
            raise InputError(f"--pace {pace!r} is not unlimited, board or PREFILL_TPS,DECODE_TPS.") from None
        pace_map = {"prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode}
    if chat_family is not None:
        from rkedge.runtime.templates import get_template

        fields["chat_template"] = dict(zip(("system_prompt", "prompt_prefix", "prompt_postfix"),
                                           get_template(chat_family).runtime_parts(), strict=True))
    return simulated_manifest(responses=rules, pace=pace_map, faults=fault_map, chat_family=chat_family, **fields)
