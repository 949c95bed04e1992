"""rkedge's own steps never hold a whole model nor a whole shard (issue 12 item 1): the export converts tensor by
tensor, the smoke check streams, and neither calls a whole-file or whole-model loader."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_checkpoint, train_lora

from rkedge.convert.export import export_checkpoint
from rkedge.convert.inspect import inspect_checkpoint
from rkedge.lora.merge import merge_lora, smoke_forward


@pytest.fixture()
def no_whole_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A guard: any whole-file or whole-model load fails the test."""
    _guard(monkeypatch)


def _guard(monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors
    import safetensors.torch
    import transformers

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("a whole shard or model was loaded")

    for module, name in ((safetensors.torch, "load_file"), (safetensors.torch, "load"), (safetensors, "safe_open"),
                         (transformers.AutoModelForCausalLM, "from_pretrained"),
                         (transformers.PreTrainedModel, "from_pretrained")):
        monkeypatch.setattr(module, name, refuse)


def test_export_to_another_dtype_streams_and_equals_the_whole_shard_conversion(tmp_path: Path,
                                                                              no_whole_loads: None) -> None:
    model = make_checkpoint(tmp_path / "llama", "llama")
    info = inspect_checkpoint(model)
    out = export_checkpoint(info, tmp_path / "out", dtype="bfloat16", meta={})
    shards = sorted(model.glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == [p.name for p in shards]
    inspect_checkpoint(out)  # every header valid
    for shard in shards:
        # the reference: the whole shard loaded and converted at once (read here through the raw bytes)
        ours = _read_all(out / shard.name)
        reference = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in _read_all(shard).items()}
        assert ours.keys() == reference.keys()
        for name, tensor in reference.items():
            assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


def _read_all(file: Path) -> dict[str, torch.Tensor]:
    """A test-side reader of a whole safetensors file (the guard blocks the library's loaders)."""
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    header.pop("__metadata__", None)
    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64}
    data = raw[8 + length:]
    return {name: torch.frombuffer(bytearray(data[e["data_offsets"][0]:e["data_offsets"][1]]),
                                   dtype=dtypes[e["dtype"]]).reshape(e["shape"]) for name, e in header.items()}


def test_the_smoke_check_streams_and_still_catches_a_bad_tensor(tmp_path: Path) -> None:
    model = make_checkpoint(tmp_path / "qwen", "qwen2")
    adapter = train_lora(model, tmp_path / "adapter", steps=1)
    merge_lora(model, adapter, tmp_path / "merged")
    with pytest.MonkeyPatch.context() as guard:
        import transformers

        def refuse(*_: object, **__: object) -> None:
            raise AssertionError("a whole model was loaded")

        guard.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
        guard.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)
        result = smoke_forward(tmp_path / "merged", layers=1)
    assert result["ok"] and result["layers_run"] == 1 and result["tensors_checked"] > 10
    # a NaN in the last shard (layer 1 or the head), outside what the 1-layer forward pass reads, is still caught
    last = sorted((tmp_path / "merged").glob("*.safetensors"))[-1]
    tensors = load_file(str(last))
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(last), metadata={"format": "pt"})
    from rkedge.errors import RkedgeError

    with pytest.raises(RkedgeError, match="non-finite"):
        smoke_forward(tmp_path / "merged", layers=1)


PEAK = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    import torch
    from rkedge.convert.export import export_checkpoint
    from rkedge.convert.inspect import inspect_checkpoint
    info = inspect_checkpoint(Path(sys.argv[1]))
    torch.zeros(1).to(torch.bfloat16)  # torch's own one-off allocations happen before the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    export_checkpoint(info, Path(sys.argv[2]), dtype="bfloat16", meta={})
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"growth": after - before}))
""")


def test_export_peak_memory_is_near_the_largest_tensor_not_the_shard(tmp_path: Path) -> None:
    """A tiny-but-wide checkpoint: one 192 MB shard of twelve 16 MB tensors. Holding the shard would add
    >= 192 MB (plus its converted copy); tensor by tensor adds about one tensor and its bf16 copy."""
    model = tmp_path / "wide"
    model.mkdir()
    torch.manual_seed(0)
    wide = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(2048, 2048) for i in range(12)}
    save_file(wide, str(model / "model.safetensors"), metadata={"format": "pt"})
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    del wide
    shard = (model / "model.safetensors").stat().st_size
    done = subprocess.run([sys.executable, "-c", PEAK, str(model), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    growth = json.loads(done.stdout.splitlines()[-1])["growth"]
    largest = 2048 * 2048 * 4
    assert growth < 4 * largest < shard / 2, f"export grew RSS by {growth / 1e6:.0f} MB for a {shard / 1e6:.0f} MB shard"


PROMPTS = ["Hello there, how are you?", "What is an NPU?", "你好", "Bonjour tout le monde, comment ça va"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream")
    return {kind: make_checkpoint(root / kind, kind) for kind in ("llama", "gemma2", "gemma3", "recurrent_gemma")}


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gemma3", "recurrent_gemma"])
def test_layer_streamed_calibration_targets_equal_the_in_memory_ones(kind: str, tiny: dict[str, Path],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rkedge.convert import calibration as calib

    model = AutoModelForCausalLM.from_pretrained(tiny[kind], dtype=torch.float32)
    model.eval()
    in_memory = calib.greedy_replies(model, AutoTokenizer.from_pretrained(tiny[kind]), PROMPTS, 12)

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)
    assert calib.streamed_replies(tiny[kind], PROMPTS, 12) == in_memory


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gemma3", "recurrent_gemma"])
def test_the_streamed_model_holds_no_layer_between_forward_passes(kind: str, tiny: dict[str, Path]) -> None:
    from rkedge.convert.layer_stream import load_layer_streamed

    model = load_layer_streamed(tiny[kind], torch.float32)
    layer_params = [p for n, p in model.named_parameters() if ".layers." in n]
    assert layer_params and all(p.is_meta for p in layer_params)
    table = model.config.vocab_size * model.config.hidden_size * 4
    held = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    assert held < table, "neither the embedding table nor the head is held: their rows are read as needed"
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 33]])).logits
    assert bool(torch.isfinite(logits).all())
    assert all(p.is_meta for n, p in model.named_parameters() if ".layers." in n), "each layer dropped after use"


def test_calibration_targets_are_generated_in_a_child_process(tiny: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rkedge.convert import calibration as calib

    model = AutoModelForCausalLM.from_pretrained(tiny["gemma2"], dtype=torch.float32)
    model.eval()
    in_memory = calib.greedy_replies(model, AutoTokenizer.from_pretrained(tiny["gemma2"]), PROMPTS, 32)
    generate = calib.greedy_generator(tiny["gemma2"], work_dir=tmp_path)
    assert generate(PROMPTS) == in_memory
    assert not list(tmp_path.iterdir()), "the child's input and output files are removed"


def _plan_with_memory(model: Path, available: int, **request: object) -> object:
    from rkedge.convert.inspect import inspect_checkpoint
    from rkedge.convert.planner import ConversionRequest, plan

    info = inspect_checkpoint(model)
    version = str(request.pop("version", "1.2.3"))
    return plan(ConversionRequest(model=model, out=Path("o"), **request), info, version,  # type: ignore[arg-type]
                host_memory=(available, 0))


def test_the_toolkits_memory_is_predicted_per_version_and_load_dtype(tiny: dict[str, Path]) -> None:
    from rkedge.convert.inspect import inspect_checkpoint
    from rkedge.convert.planner import toolkit_host_bytes

    params = inspect_checkpoint(tiny["llama"]).param_count
    full, half = toolkit_host_bytes(params, "1.2.3", None), toolkit_host_bytes(params, "1.2.3", "float16")
    assert half * 2 == pytest.approx(full, rel=0.01) and full == pytest.approx(params * 4.4 * 1.1, rel=0.01)
    assert toolkit_host_bytes(params, "1.0.0", None) > 4 * full  # before the 1.0.1 memory fix (rknn-llm#30)


def test_a_float32_load_that_does_not_fit_is_switched_to_16_bit_with_a_finding(tiny: dict[str, Path]) -> None:
    from rkedge.convert.inspect import inspect_checkpoint
    from rkedge.convert.planner import toolkit_host_bytes

    params = inspect_checkpoint(tiny["llama"]).param_count
    between = (toolkit_host_bytes(params, "1.2.3", None) + toolkit_host_bytes(params, "1.2.3", "float16")) // 2
    chosen = _plan_with_memory(tiny["llama"], between)
    assert chosen.request.load_dtype == "float16"  # the tiny llama is stored in float32, not bf16
    assert chosen.job.load_kwargs.get("dtype") == "float16"
    ids = {f.id: f.severity for f in chosen.findings}
    assert ids.get("F-11.load-dtype") == "warning" and "F-11" not in ids
    # a toolkit without the dtype argument (1.1.x) cannot be helped: refused before any work
    old = _plan_with_memory(tiny["llama"], between, version="1.1.4")
    assert old.request.load_dtype is None and {f.id: f.severity for f in old.findings}.get("F-11") == "error"
    # asked for float32 explicitly: kept, and refused
    asked = _plan_with_memory(tiny["llama"], between, load_dtype="float32")
    assert asked.request.load_dtype == "float32" and {f.id: f.severity for f in asked.findings}.get("F-11") == "error"
    # enough memory: nothing changes
    roomy = _plan_with_memory(tiny["llama"], 1 << 40)
    assert roomy.request.load_dtype is None and not {"F-11", "F-11.load-dtype"} & {f.id for f in roomy.findings}


def test_an_unchanged_checkpoint_is_hard_linked_not_copied(tiny: dict[str, Path], tmp_path: Path) -> None:
    from rkedge.convert.inspect import inspect_checkpoint

    info = inspect_checkpoint(tiny["llama"])
    out = export_checkpoint(info, tmp_path / "export", dtype=None, meta={})
    for shard in info.weight_files:
        assert (out / shard.name).stat().st_ino == shard.stat().st_ino, shard.name


def test_the_smoke_check_in_a_child_process_gives_the_same_answers(tmp_path: Path) -> None:
    from rkedge.errors import RkedgeError
    from rkedge.lora.merge import smoke_forward_in_child

    model = make_checkpoint(tmp_path / "llama", "llama")
    adapter = train_lora(model, tmp_path / "adapter", steps=1)
    merge_lora(model, adapter, tmp_path / "merged")
    here, there = smoke_forward(tmp_path / "merged"), smoke_forward_in_child(tmp_path / "merged")
    assert there["ok"] and there["loss"] == pytest.approx(here["loss"]) and there["layers_run"] == here["layers_run"]
    shard = sorted((tmp_path / "merged").glob("*.safetensors"))[0]
    tensors = load_file(str(shard))
    tensors = {k: torch.full_like(v, float("inf")) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(RkedgeError, match="non-finite") as refused:
        smoke_forward_in_child(tmp_path / "merged")
    assert refused.value.fix


def test_a_whole_lora_conversion_never_loads_a_whole_model_or_shard_in_rkedges_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """merge (streaming), smoke (child), export to bfloat16 (tensor by tensor), calibration targets generated
    (child, layer-streamed), toolkit (child), manifest: none of them calls a whole loader in this process."""
    from rkedge.convert.pipeline import convert
    from rkedge.convert.planner import ConversionRequest

    model = make_checkpoint(tmp_path / "llama", "llama")
    adapter = train_lora(model, tmp_path / "adapter", steps=1)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["Hello!", "What is an NPU?"]))  # no targets: the float model generates them
    _guard(monkeypatch)  # from here on
    result = convert(ConversionRequest(model=model, out=tmp_path / "o", toolkit="mock", lora=adapter,
                                       load_dtype="bfloat16", calibration=str(prompts)))
    assert result.model_file is not None and result.model_file.is_file()
    assert [s.name for s in result.steps] == ["merge", "export", "calibration", "quantize"]
    calibration = json.loads((tmp_path / "o" / ".rkedge-work" / "calibration.json").read_text(encoding="utf-8"))
    assert all(item["target"] for item in calibration)


def test_a_bf16_checkpoint_streams_to_the_same_targets_as_its_float32_upcast(tiny: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    """The seeds ship bf16: the streamed table rows and head chunks are upcast exactly as a whole-model float32
    load upcasts them, so the greedy targets agree."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rkedge.convert import calibration as calib

    bf16 = tmp_path / "gemma2-bf16"
    AutoModelForCausalLM.from_pretrained(tiny["gemma2"], dtype=torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(tiny["gemma2"]).save_pretrained(bf16)
    assert "BF16" in inspect_checkpoint(bf16).dtypes
    model = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32).eval()
    in_memory = calib.greedy_replies(model, AutoTokenizer.from_pretrained(bf16), PROMPTS, 12)
    assert calib.streamed_replies(bf16, PROMPTS, 12) == in_memory
