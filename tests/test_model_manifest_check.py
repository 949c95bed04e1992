"""The runtime refuses a model file its manifest does not describe (issue 11 item 8): an old ``.rkllm`` left
beside the manifest of a newer conversion would otherwise run with the new one's context limit and template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_helpers import run_cli

pytest.importorskip("transformers")
from tiny_models import make_checkpoint

from rkedge.convert.pipeline import convert
from rkedge.convert.planner import ConversionRequest
from rkedge.errors import ModelFileError
from rkedge.manifest import read_manifest
from rkedge.runtime import LLM


@pytest.fixture(scope="module")
def conversions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One checkpoint converted twice (another max_context): the old model file and the new one."""
    root = tmp_path_factory.mktemp("reconvert")
    model = make_checkpoint(root / "llama", "llama")
    prompts = root / "calibration.json"
    prompts.write_text(json.dumps([{"prompt": p, "target": "ok"} for p in ("Hello!", "2+2?", "Bonjour")]))
    files = []
    for out, context in ((root / "old", 512), (root / "new", 4096)):
        result = convert(ConversionRequest(model=model, out=out, toolkit="mock", calibration=str(prompts),
                                           max_context=context))
        assert result.model_file is not None
        files.append(result.model_file)
    return files[0], files[1]


def test_an_old_rkllm_beside_a_new_manifest_is_refused(conversions: tuple[Path, Path], tmp_path: Path) -> None:
    old, new = conversions
    with LLM(new, library="mock") as llm:  # the pair as convert wrote it loads
        assert llm.metadata
    folder = tmp_path / "copy"
    shutil.copytree(new.parent, folder)
    stale = folder / new.name
    shutil.copyfile(old, stale)  # the old conversion's model, under the name the new manifest describes
    manifest = read_manifest(stale)
    assert manifest is not None and manifest.size != stale.stat().st_size, "the two conversions differ in size"
    with pytest.raises(ModelFileError, match="different conversions") as refused:
        LLM(stale, library="mock")
    assert refused.value.fix and "manifest" in refused.value.fix
    result = run_cli("chat", str(stale), "--mock", "--prompt", "Hello")
    assert result.returncode == 2, result.stderr
    assert "different conversions" in result.stderr and "fix:" in result.stderr and "Traceback" not in result.stderr


def test_a_model_without_a_manifest_still_runs(conversions: tuple[Path, Path], tmp_path: Path) -> None:
    """A vendor .rkllm has no rkedge manifest: nothing to compare, so it loads (the manifest is optional)."""
    alone = tmp_path / "alone.rkllm"
    shutil.copyfile(conversions[1], alone)
    with LLM(alone, library="mock") as llm:
        assert llm.generate("Hello", stream=False).finish_reason in ("stop", "length")
