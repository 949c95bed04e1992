"""rkedge.lora.merge against peft's merge_and_unload, tensor by tensor, on tiny seeded models.

Each variant builds a peft adapter with random (non-zero) LoRA weights on a tiny sharded base, merges it with
rkedge (streaming) and with peft, and compares every tensor within the tolerance the merge report states.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from click.testing import CliRunner  # noqa: E402
from lora_helpers import (  # noqa: E402
    load_base,
    logits,
    make_adapter,
    q_proj_pair,
    read_checkpoint_tensors,
    reference_merge,
    save_tiny,
    worst,
    write_adapter,
)

import rkedge.lora.merge as merge_module  # noqa: E402
from rkedge.cli import main  # noqa: E402
from rkedge.errors import CheckFailed, RkedgeError  # noqa: E402
from rkedge.lora.merge import merge_lora, merged_config, smoke_forward  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {"llama": save_tiny("llama", root / "llama"), "qwen2": save_tiny("qwen2", root / "qwen2"),
            "gpt2": save_tiny("gpt2", root / "gpt2"), "tied": save_tiny("llama", root / "llama-tied", tie=True),
            "bf16": save_tiny("llama", root / "llama-bf16", dtype=torch.bfloat16)}


def partials(out: Path) -> list[Path]:
    return list(out.parent.glob(f"{out.name}.partial-*"))


def check_against_peft(out: Path, ref: dict[str, Any], report: Any, base: Path) -> None:
    ours = read_checkpoint_tensors(out)
    if "lm_head.weight" in ref and "lm_head.weight" not in ours:  # a tied head: the embedding holds it
        embed = next(k for k in ref if k.endswith(("embed_tokens.weight", "wte.weight")))
        assert torch.equal(ref["lm_head.weight"], ref[embed])
        ref = {k: v for k, v in ref.items() if k != "lm_head.weight"}
    assert set(ours) == set(ref)
    excess, where = worst(ours, ref, atol=report.tolerance["atol"], rtol=report.tolerance["rtol"])
    assert excess <= 0, f"{where} is off by {excess} beyond the stated tolerance"
    # and the adapter really changed what it says it merged
    base_tensors = read_checkpoint_tensors(base)
    for entry in report.modules_merged:
        assert not torch.equal(ours[entry["tensor"]], base_tensors[entry["tensor"]].to(ours[entry["tensor"]].dtype))


VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "plain": ("llama", {"r": 4, "lora_alpha": 8, "target_modules": ALL_LINEAR}),
    "rslora": ("llama", {"r": 8, "lora_alpha": 16, "use_rslora": True, "target_modules": ["q_proj", "v_proj"]}),
    "rank-alpha-pattern": ("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
                                     "rank_pattern": {"layers.0.self_attn.q_proj": 8, "down_proj": 2},
                                     "alpha_pattern": {"v_proj": 32, r"model\.layers\.1\..*q_proj": 3}}),
    "modules-to-save": ("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                                  "modules_to_save": ["lm_head", "norm"]}),
    "embedding": ("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]}),
    "bias-all": ("qwen2", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "bias": "all"}),
    "bias-lora-only": ("qwen2", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "lora_only"}),
    "lora-bias": ("qwen2", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj"], "lora_bias": True}),
    "fan-in-fan-out-conv1d": ("gpt2", {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"],
                                       "fan_in_fan_out": True}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_equals_peft(variant: str, bases: dict[str, Path], tmp_path: Path) -> None:
    kind, lora = VARIANTS[variant]
    peft_model = make_adapter(bases[kind], tmp_path / "adapter", **lora)
    ref = reference_merge(peft_model)

    report = merge_lora(bases[kind], tmp_path / "adapter", tmp_path / "out")
    assert report.tolerance["atol"] == 1e-5 and report.tolerance["rtol"] == 2.0**-23
    check_against_peft(tmp_path / "out", ref, report, bases[kind])
    saved = json.loads((tmp_path / "out" / "rkedge_merge.json").read_text())
    assert saved["adapter_weights_sha256"] == report.adapter_weights_sha256
    assert saved["peak_rss_bytes"] > 0 and saved["modules_merged"]

    report16 = merge_lora(bases[kind], tmp_path / "adapter", tmp_path / "out16", dtype="float16")
    assert report16.tolerance["rtol"] == 2.0**-10
    ours16 = read_checkpoint_tensors(tmp_path / "out16")
    assert {t.dtype for t in ours16.values()} == {torch.float16}
    excess, where = worst(ours16, {k: v.half() for k, v in ref.items()}, atol=1e-5, rtol=2.0**-10)
    assert excess <= 0, where
    config = json.loads((tmp_path / "out16" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float16"


def test_variant_details_reach_the_report(bases: dict[str, Path], tmp_path: Path) -> None:
    _, lora = VARIANTS["rank-alpha-pattern"]
    make_adapter(bases["llama"], tmp_path / "adapter", **lora)
    report = merge_lora(bases["llama"], tmp_path / "adapter", tmp_path / "out")
    scaling = {e["module"]: (e["rank"], e["scaling"]) for e in report.modules_merged}
    assert scaling["model.layers.0.self_attn.q_proj"] == (8, 1.0)
    assert scaling["model.layers.1.self_attn.q_proj"] == (4, 0.75)
    assert scaling["model.layers.1.self_attn.v_proj"] == (4, 8.0)
    assert scaling["model.layers.0.mlp.down_proj"] == (2, 4.0)


def test_progress_and_stale_partials(bases: dict[str, Path], tmp_path: Path) -> None:
    import os

    folder = write_adapter(tmp_path / "ad", q_proj_pair(0))
    dead = subprocess_pid_that_exited()
    stale, alive = tmp_path / f"out.partial-{dead}", tmp_path / f"out.partial-{os.getppid()}"
    stale.mkdir()
    alive.mkdir()
    calls: list[tuple[int, int, str]] = []
    merge_lora(bases["llama"], folder, tmp_path / "out", progress=lambda *a: calls.append(a))
    assert calls[-1][0] == calls[-1][1] == sum(p.stat().st_size for p in bases["llama"].glob("*.safetensors")) - sum(
        8 + int.from_bytes(p.read_bytes()[:8], "little") for p in bases["llama"].glob("*.safetensors"))
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert not stale.exists() and alive.exists()  # a dead merge's leftovers go, a running one's stay


def subprocess_pid_that_exited() -> int:
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_fan_in_fan_out_on_linear_follows_peft(bases: dict[str, Path], tmp_path: Path) -> None:
    try:
        peft_model = make_adapter(bases["llama"], tmp_path / "adapter", r=4, lora_alpha=8,
                                  target_modules=["q_proj"], fan_in_fan_out=True)
    except ValueError as exc:  # a peft that refuses the combination outright
        pytest.skip(f"peft refuses fan_in_fan_out on nn.Linear: {exc}")
    # peft resets it to False for nn.Linear (dispatch_default); the merge decides by module type too
    ref = reference_merge(peft_model)
    report = merge_lora(bases["llama"], tmp_path / "adapter", tmp_path / "out")
    assert report.adapter["fan_in_fan_out_effective"] is False
    check_against_peft(tmp_path / "out", ref, report, bases["llama"])


def test_bf16_base_with_fp32_adapter(bases: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel

    make_adapter(bases["llama"], tmp_path / "adapter", r=4, lora_alpha=8, target_modules=ALL_LINEAR)
    peft_model = PeftModel.from_pretrained(load_base(bases["bf16"], torch.bfloat16), tmp_path / "adapter")
    ref = reference_merge(peft_model)
    # trained on the float32 copy, merged into the bfloat16 one: another folder name for the same model
    report = merge_lora(bases["bf16"], tmp_path / "adapter", tmp_path / "out", allow_base_mismatch=True)
    assert report.tolerance["rtol"] == 2.0**-7
    ours = read_checkpoint_tensors(tmp_path / "out")
    assert {t.dtype for t in ours.values()} == {torch.bfloat16}
    check_against_peft(tmp_path / "out", ref, report, bases["bf16"])


TIED: dict[str, dict[str, Any]] = {
    "lm-head-lora": {"target_modules": ["q_proj", "lm_head"]},
    "lm-head-saved": {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    "embedding-lora": {"target_modules": ["embed_tokens"]},
    "both-tied-lora": {"target_modules": ["embed_tokens", "lm_head"], "ensure_weight_tying": True},
    "embedding-saved-tied": {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"],
                             "ensure_weight_tying": True},
    "neither": {"target_modules": ["q_proj"]},
}
UNTIED = {"lm-head-lora", "lm-head-saved", "embedding-lora"}


@pytest.mark.parametrize("case", list(TIED))
def test_tied_embeddings(case: str, bases: dict[str, Path], tmp_path: Path) -> None:
    """The merged model computes what the unmerged adapter computed; one-sided changes untie the pair."""
    base = bases["tied"]
    peft_model = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, **TIED[case])
    expected = logits(peft_model)
    report = merge_lora(base, tmp_path / "adapter", tmp_path / "out")
    assert report.tied_embeddings["untied"] is (case in UNTIED)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    ours = read_checkpoint_tensors(tmp_path / "out")
    assert ("lm_head.weight" in ours) is (case in UNTIED)
    assert config["tie_word_embeddings"] is (case not in UNTIED)
    got = logits(load_base(tmp_path / "out"))
    assert float((got - expected).abs().max()) < 1e-4

    ref = reference_merge(peft_model)
    base_embed = read_checkpoint_tensors(base)["model.embed_tokens.weight"]
    if case == "lm-head-lora":  # peft merges into the shared tensor; its lm_head is right, its embedding is not
        assert worst({"lm_head.weight": ours["lm_head.weight"]}, ref, atol=1e-5, rtol=2.0**-23)[0] <= 0
        assert torch.equal(ours["model.embed_tokens.weight"], base_embed)
    elif case == "embedding-lora":
        assert worst({"model.embed_tokens.weight": ours["model.embed_tokens.weight"]}, ref, atol=1e-5,
                     rtol=2.0**-23)[0] <= 0
        assert torch.equal(ours["lm_head.weight"], base_embed)
    elif case != "both-tied-lora":  # peft is right here: compare every tensor
        assert worst(ours, ref, atol=1e-5, rtol=2.0**-23)[0] <= 0


def test_dora_is_refused_and_nothing_is_written(bases: dict[str, Path], tmp_path: Path) -> None:
    make_adapter(bases["llama"], tmp_path / "dora", r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(CheckFailed, match="lora.dora"):
        merge_lora(bases["llama"], tmp_path / "dora", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not partials(tmp_path / "out")


def test_other_peft_type_is_refused(bases: dict[str, Path], tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "ia3", {"base_model.model.model.layers.0.mlp.down_proj.ia3_l":
                                              torch.ones(1, 128)}, peft_type="IA3")
    with pytest.raises(CheckFailed, match="lora.peft-type"):
        merge_lora(bases["llama"], folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_interrupted_merge_leaves_no_output(bases: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    make_adapter(bases["llama"], tmp_path / "adapter", r=4, lora_alpha=8, target_modules=ALL_LINEAR)
    real = merge_module.write_shard
    calls: list[Path] = []

    def failing(target: Path, *args: Any, **kwargs: Any) -> int:
        calls.append(target)
        if len(calls) > 1:
            raise OSError(28, "No space left on device (simulated)")
        return real(target, *args, **kwargs)

    monkeypatch.setattr(merge_module, "write_shard", failing)
    with pytest.raises(RkedgeError, match="No space left"):
        merge_lora(bases["llama"], tmp_path / "adapter", tmp_path / "out")
    assert len(calls) == 2
    assert not (tmp_path / "out").exists() and not partials(tmp_path / "out")


def test_existing_output_is_not_overwritten(bases: dict[str, Path], tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "ad", q_proj_pair(0))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(RkedgeError, match="already exists"):
        merge_lora(bases["llama"], folder, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_merged_config_and_side_files(bases: dict[str, Path], tmp_path: Path) -> None:
    assert merged_config({"quantization_config": {"quant_method": "bitsandbytes"}, "torch_dtype": "float32"},
                         dtype="bfloat16", untie=False) == {"torch_dtype": "bfloat16"}
    base = tmp_path / "base"
    shutil.copytree(bases["llama"], base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = None  # a stale, empty entry left after de-quantising
    (base / "config.json").write_text(json.dumps(config))
    folder = write_adapter(tmp_path / "ad", q_proj_pair(0), base_model_name_or_path=str(base))
    (folder / "chat_template.jinja").write_text("{{ adapter template }}")
    merge_lora(base, folder, tmp_path / "out", dtype="bfloat16")
    out = tmp_path / "out"
    merged = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in merged and merged["dtype"] == "bfloat16"
    assert (out / "generation_config.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert (out / "chat_template.jinja").read_text() == "{{ adapter template }}"  # the fine-tune's template wins
    index = json.loads((out / "model.safetensors.index.json").read_text())
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]  # same shard layout
    assert index["metadata"]["total_size"] == sum(p.stat().st_size for p in out.glob("*.safetensors")) - sum(
        8 + int.from_bytes(p.read_bytes()[:8], "little") for p in out.glob("*.safetensors"))
    report = json.loads((out / "rkedge_merge.json").read_text())
    assert report["copied_files"]["chat_template.jinja"] == "adapter"


def test_smoke_forward(bases: dict[str, Path], tmp_path: Path) -> None:
    make_adapter(bases["qwen2"], tmp_path / "adapter", r=4, lora_alpha=8, target_modules=ALL_LINEAR, bias="all")
    merge_lora(bases["qwen2"], tmp_path / "adapter", tmp_path / "out", dtype="bfloat16")
    result = smoke_forward(tmp_path / "out")
    assert result["ok"] and result["logits_finite"] and result["loss"] > 0 and result["dtype"] == "bfloat16"

    from safetensors.torch import load_file, save_file

    shard = sorted((tmp_path / "out").glob("model-*.safetensors"))[-1]
    tensors = load_file(str(shard))
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(RkedgeError, match="non-finite"):
        smoke_forward(tmp_path / "out")


def test_cli_inspect_and_merge(bases: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    make_adapter(bases["llama"], tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    result = runner.invoke(main, ["lora", "inspect", str(tmp_path / "adapter"), "--base", str(bases["llama"]),
                                  "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert len(payload["adapter"]["modules"]) == 4 and not [f for f in payload["findings"] if f["severity"] == "error"]

    result = runner.invoke(main, ["lora", "inspect", str(tmp_path / "adapter")])
    assert result.exit_code == 0 and "model.layers.0.self_attn.q_proj" in result.stdout

    bad = write_adapter(tmp_path / "bad", q_proj_pair(0, in_features=96))
    result = runner.invoke(main, ["lora", "inspect", str(bad), "--base", str(bases["llama"])])
    assert result.exit_code == 2 and "lora.shape" in result.stdout

    result = runner.invoke(main, ["lora", "merge", "--base", str(bases["llama"]), "--adapter",
                                  str(tmp_path / "adapter"), "--out", str(tmp_path / "out"), "--dtype", "float16",
                                  "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["smoke"]["ok"] and payload["report"]["dtype"] == "float16"
    assert (tmp_path / "out" / "rkedge_merge.json").is_file()

    result = runner.invoke(main, ["lora", "merge", "--base", str(bases["llama"]), "--adapter", str(bad),
                                  "--out", str(tmp_path / "out2"), "--no-smoke"])
    assert result.exit_code == 2 and "lora.shape" in result.stderr
    assert not (tmp_path / "out2").exists()
