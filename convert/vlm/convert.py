"""``convert_vlm``: a Hugging Face vision-language checkpoint -> ``.rkllm`` (language model) + vision ``.rknn``
(fp16 and/or w8a8) + ``vlm.json`` naming both.

1. The family (:mod:`.families`) decides: unknown or not-yet-exportable families are refused with the reason;
   the toolkit must list the family's language model (its "LLM part").
2. The language model is saved alone (``OUT/.rkedge-vlm/llm``) and checked against the VLM on text, then
   converted by rkedge's own pipeline (:func:`rkedge.convert.pipeline.convert`): same checks, calibration,
   toolkit job and manifest as any LLM.
3. The vision tower + merger/projector is exported to ONNX at the fixed image size and checked with onnxruntime.
4. rknn-toolkit2 compiles it in a child process (the RKNN backend's build worker): fp16, and w8a8 calibrated on
   preprocessed images (hybrid: the tensors matching ``hybrid_patterns`` stay fp16).
5. Each build is verified in the simulator against transformers' ``get_image_features`` on ``verify_images``
   varied images: cosine (min and mean over images) and max absolute error, stored in the manifest.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rkedge import __version__
from rkedge._fs import sha256_file
from rkedge.convert.vlm.families import VlmFamily, require_exportable, vlm_family
from rkedge.errors import InputError, ToolkitError
from rkedge.runtime.vision.bundle import EncoderFile, ImageTags, Preprocessing, VlmManifest, write_vlm

WORK = ".rkedge-vlm"
VISION_DIR = "vision"
#: The acceptance bars of issue 15: the compiled encoder against transformers' vision tower.
MIN_COSINE = {"fp16": 0.999, "w8a8": 0.99}
VISION_DTYPES = ("fp16", "w8a8")
Log = Callable[[str], None]


@dataclass(frozen=True)
class VlmRequest:
    model: Path
    out: Path
    toolkit: str | None = "mock"
    toolkit_version: str | None = None
    llm_dtype: str = "w8a8"
    calibration: str | None = "auto"  # the language model's calibration (rkedge convert --calibration)
    vision_dtypes: tuple[str, ...] = VISION_DTYPES
    default_dtype: str | None = None  # the encoder the runtime opens; the first of vision_dtypes when None
    image_size: int | None = None  # square side; the checkpoint's processor size, else the family default
    calibration_images: Path | None = None  # a folder of images for w8a8; synthetic images when None
    calibration_count: int = 16
    verify_images: int = 8
    hybrid_patterns: tuple[str, ...] | None = None  # None: the family's (families.py)
    name: str | None = None
    build_timeout_s: float = 1800


@dataclass
class VlmResult:
    manifest: VlmManifest
    manifest_file: Path
    llm_file: Path
    encoder_files: dict[str, Path]
    warnings: list[str] = field(default_factory=list)

    def render(self) -> list[str]:
        lines = [f"wrote {self.llm_file}", *(f"wrote {p}" for p in self.encoder_files.values()),
                 f"wrote {self.manifest_file}"]
        for dtype, figures in self.manifest.verification.get("encoders", {}).items():
            lines.append(f"vision {dtype}: cosine min {figures['cosine_min']:.6f} mean {figures['cosine_mean']:.6f}, "
                         f"max abs error {figures['max_abs_error']:.3g} over {figures['images']} images")
        return lines + [f"warning: {w}" for w in self.warnings]


def read_config(model_dir: Path) -> dict[str, Any]:
    try:
        config: dict[str, Any] = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {model_dir / 'config.json'}: {exc}",
                         fix="pass a Hugging Face checkpoint folder") from None
    return config


def is_vlm_checkpoint(model_dir: Path) -> bool:
    """The folder holds a vision-language checkpoint of a family rkedge knows (exportable or not)."""
    try:
        return vlm_family(read_config(model_dir)) is not None
    except InputError:
        return False


def preprocessing_for(family: VlmFamily, model_dir: Path, image_size: int | None) -> Preprocessing:
    """The family's preprocessing at a fixed square size, with the checkpoint's processor values where it has them."""
    processor: dict[str, Any] = {}
    if (model_dir / "preprocessor_config.json").is_file():
        processor = json.loads((model_dir / "preprocessor_config.json").read_text(encoding="utf-8"))
    config = read_config(model_dir)
    patch = int(processor.get("patch_size") or config.get("vision_config", {}).get("patch_size") or 14)
    merge = int(processor.get("merge_size") or 1) if family.patching == "qwen2_vl" else 1
    size = image_size
    if size is None:
        declared = processor.get("size") or {}
        if "height" in declared:
            size = int(declared["height"])
        elif family.patching == "qwen2_vl" and declared.get("longest_edge") == declared.get("shortest_edge") \
                and declared.get("longest_edge"):
            size = int(int(declared["longest_edge"]) ** 0.5)  # one fixed pixel count: the square of that side
        else:
            size = family.default_size
    factor = patch * merge
    if size % factor:
        raise InputError(f"image size {size} is not a multiple of {factor} (patch {patch} x merge {merge}).",
                         fix=f"pass --image-size {max(factor, size // factor * factor)}")
    resample = {2: "bilinear", 3: "bicubic"}.get(processor.get("resample", -1), family.resample)
    mean, std = processor.get("image_mean", family.mean), processor.get("image_std", family.std)
    return Preprocessing(width=size, height=size, mean=(float(mean[0]), float(mean[1]), float(mean[2])),
                         std=(float(std[0]), float(std[1]), float(std[2])),
                         rescale_factor=float(processor.get("rescale_factor", 1 / 255)), resample=resample,
                         square=family.square, background=(128, 128, 128), patching=family.patching,
                         patch_size=patch, temporal_patch_size=int(processor.get("temporal_patch_size") or 1)
                         if family.patching == "qwen2_vl" else 1, merge_size=merge)


def _log(log: Log | None, text: str) -> None:
    if log is not None:
        log(text)


def _toolkit_version(request: VlmRequest) -> str:
    from rkedge.convert.toolkit import resolve_toolkit

    return resolve_toolkit(request.toolkit, request.toolkit_version).version


def convert_vlm(request: VlmRequest, *, log: Log | None = None) -> VlmResult:
    """Converts ``request.model`` into ``request.out`` (see the module docstring).

    Raises:
        InputError: not a known VLM, a family whose vision tower rkedge cannot export, a toolkit too old for the
            family's language model, or a bad option.
        ToolkitError: rkllm-toolkit or rknn-toolkit2 failed.
    """
    from rkedge.convert.rules import version_key

    started = time.time()
    config = read_config(request.model)
    family = vlm_family(config)
    if family is None:
        raise InputError(f"{request.model} is not a vision-language checkpoint rkedge knows "
                         f"(architectures {config.get('architectures')}).",
                         fix="convert it as a language model with rkedge convert")
    require_exportable(family)
    unknown = [d for d in request.vision_dtypes if d not in VISION_DTYPES]
    if unknown or not request.vision_dtypes:
        raise InputError(f"vision dtypes {list(request.vision_dtypes)}: each must be one of {VISION_DTYPES}.",
                         fix="pass fp16, w8a8 or both")
    version = _toolkit_version(request)
    if version_key(version) < version_key(family.min_toolkit):
        raise InputError(f"rkllm-toolkit {version} does not list {family.architectures[0]}'s language model "
                         f"(first listed in {family.min_toolkit}, {family.sources[0]}).",
                         fix=f"use rkllm-toolkit {family.min_toolkit} or newer (--toolkit-version)")
    spec = preprocessing_for(family, request.model, request.image_size)
    warnings: list[str] = []

    from rkedge.convert.pipeline import convert
    from rkedge.convert.planner import ConversionRequest
    from rkedge.convert.vlm import export

    _log(log, f"loading {request.model} ({family.architectures[0]})")
    model = export.load_vlm(request.model)
    work = request.out / WORK
    # Saved under the source's folder name, so the .rkllm is named after the model, not after a work folder.
    llm_dir = export.save_language_model(model, family, request.model, work / request.model.resolve().name)
    gap = export.language_model_gap(model, llm_dir, list(range(3, 35)))
    _log(log, f"language model saved alone as {family.llm_architecture}: max |logit gap| on text {gap:.2e}")
    converted = convert(ConversionRequest(model=llm_dir, out=request.out, toolkit=request.toolkit,
                                          toolkit_version=version, dtype=request.llm_dtype,
                                          calibration=request.calibration, name=request.name))
    if converted.model_file is None or converted.manifest_file is None:
        raise ToolkitError("the language model's conversion wrote no .rkllm.", fix="rerun with -v")

    vision = request.out / VISION_DIR
    onnx_path = vision / "vision.onnx"
    onnx_info = export.export_onnx(export.vision_module(model, family, spec), spec, onnx_path)
    _log(log, f"vision tower exported: {onnx_info['nodes']} ONNX nodes, output {onnx_info['output_shape']}")
    image_tokens, hidden = onnx_info["output_shape"][-2], onnx_info["output_shape"][-1]
    if hidden != export.text_hidden_size(model):
        raise ToolkitError(f"the vision output width {hidden} is not the language model's hidden size.",
                           fix="this checkpoint's projector does not match its language model")

    verify_pixels, references = _verification_set(model, family, spec, request.verify_images)
    onnx_figures = _onnx_figures(onnx_path, verify_pixels, references)
    dataset = _calibration_dataset(work, spec, request) if "w8a8" in request.vision_dtypes else None
    if dataset is not None and request.calibration_images is None:
        warnings.append("w8a8 was calibrated on synthetic images; pass --calibration-images DIR with photographs "
                        "like the ones the model will see")

    encoders: dict[str, EncoderFile] = {}
    figures: dict[str, Any] = {}
    for dtype in request.vision_dtypes:
        name = f"vision-{dtype}"
        _log(log, f"compiling the vision encoder ({dtype}) with rknn-toolkit2")
        patterns = family.hybrid_patterns if request.hybrid_patterns is None else request.hybrid_patterns
        built = _build(vision, onnx_path, name, dtype, dataset, patterns, request.build_timeout_s, log)
        rknn = vision / built["rknn"]
        simulator = {k: f"{VISION_DIR}/{v}" if k != "build" else v for k, v in built["simulator"].items()}
        encoders[dtype] = EncoderFile(dtype, f"{VISION_DIR}/{built['rknn']}", sha256_file(rknn), rknn.stat().st_size,
                                      simulator, tuple(built.get("fp16_tensors", ())))
        figures[dtype] = {**_simulator_figures(request.out, encoders[dtype], spec, verify_pixels, references),
                          "build_s": built.get("seconds")}
        figures[dtype]["meets_bar"] = figures[dtype]["cosine_min"] >= MIN_COSINE[dtype]
        if not figures[dtype]["meets_bar"]:
            warnings.append(f"the {dtype} encoder's worst cosine {figures[dtype]['cosine_min']:.5f} is below "
                            f"{MIN_COSINE[dtype]}; try fp16 or --hybrid-patterns")
        _log(log, f"vision {dtype}: cosine min {figures[dtype]['cosine_min']:.6f}, "
                  f"max abs error {figures[dtype]['max_abs_error']:.3g}")

    manifest = VlmManifest(
        name=request.name or converted.model_file.stem, family=family.key, architecture=family.architectures[0],
        llm_file=converted.model_file.name, llm_manifest=converted.manifest_file.name, hidden_size=int(hidden),
        image_tokens=int(image_tokens), preprocessing=spec, tags=ImageTags(*family.tags), encoders=encoders,
        default_dtype=request.default_dtype or request.vision_dtypes[0], input_name=export.INPUT_NAME,
        output_name=export.OUTPUT_NAME, min_toolkit=family.min_toolkit,
        verification={"reference": "transformers get_image_features", "images": len(references),
                      "language_model_text_logit_gap": gap, "onnx": {**onnx_info, **onnx_figures},
                      "encoders": figures, "min_cosine": MIN_COSINE, "backend": "rknn-toolkit2 simulator"},
        versions=_versions(version), sources=family.sources, created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                      time.gmtime()))
    path = write_vlm(request.out, manifest)
    import shutil

    shutil.rmtree(work, ignore_errors=True)  # the language model's copy and the calibration inputs: as big as the model
    _log(log, f"done in {time.time() - started:.1f} s")
    return VlmResult(manifest, path, converted.model_file, {d: request.out / e.rknn for d, e in encoders.items()},
                     warnings)


def _verification_set(model: Any, family: VlmFamily, spec: Preprocessing, count: int) -> tuple[list[Any], list[Any]]:
    from rkedge.convert.vlm.export import reference_features
    from rkedge.convert.vlm.images import synthetic_images
    from rkedge.runtime.vision.preprocess import preprocess

    if count < 1:
        raise InputError("verification needs at least one image.", fix="pass verify_images >= 1 (8 by default)")
    pixels = [preprocess(image, spec) for image in synthetic_images(count, seed=1234)]
    return pixels, [reference_features(model, family, p, spec) for p in pixels]


def compare_features(reference: Sequence[Any], candidate: Sequence[Any]) -> dict[str, Any]:
    """Cosine per image (min and mean) and the max absolute error, of ``candidate`` against ``reference``."""
    import numpy as np

    cosines, errors = [], []
    for ref, got in zip(reference, candidate, strict=True):
        a, b = np.asarray(ref, np.float64).ravel(), np.asarray(got, np.float64).ravel()
        if a.shape != b.shape:
            raise ToolkitError(f"the encoder output has {b.size} values, the reference {a.size}.",
                               fix="rebuild: the graph does not match the model")
        cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
        errors.append(float(np.abs(a - b).max()))
    scale = max(float(np.abs(np.asarray(r)).max()) for r in reference)
    return {"images": len(cosines), "cosine_min": min(cosines), "cosine_mean": float(np.mean(cosines)),
            "max_abs_error": max(errors), "reference_max_abs": scale}


def _onnx_figures(onnx_path: Path, pixels: list[Any], references: list[Any]) -> dict[str, Any]:
    import onnxruntime

    from rkedge.convert.vlm.export import INPUT_NAME

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outputs = [session.run(None, {INPUT_NAME: p})[0] for p in pixels]
    figures = compare_features(references, outputs)
    return {"cosine_min": figures["cosine_min"], "max_abs_error": figures["max_abs_error"]}


def _calibration_dataset(work: Path, spec: Preprocessing, request: VlmRequest) -> Path:
    """Preprocessed calibration inputs as .npy files and the dataset list rknn-toolkit2 reads (one line each)."""
    import numpy as np

    from rkedge.convert.vlm.images import image_files, synthetic_images
    from rkedge.runtime.vision.preprocess import ImageSource, preprocess

    sources: list[ImageSource]
    if request.calibration_images is not None:
        sources = list(image_files(request.calibration_images))
        if not sources:
            raise InputError(f"{request.calibration_images} holds no image files.",
                             fix="put PNG or JPEG photographs in it")
    else:
        sources = list(synthetic_images(request.calibration_count, seed=7))
    folder = work / "calibration"
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, source in enumerate(sources):
        path = folder / f"{index:03d}.npy"
        np.save(path, preprocess(source, spec))
        lines.append(str(path.resolve()))
    dataset = work / "calibration.txt"
    dataset.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dataset


def _build(vision: Path, onnx_path: Path, name: str, dtype: str, dataset: Path | None, patterns: Sequence[str],
           timeout: float, log: Log | None) -> dict[str, Any]:
    """One build in the RKNN backend's build worker (a child process: memory and working folder its own)."""
    from rkedge.convert.toolkit.runner import child_environment, run_worker
    from rkedge.convert.toolkit.worker import PROTOCOL

    job = {"protocol": PROTOCOL, "onnx": str(onnx_path.resolve()), "out_dir": str(vision.resolve()), "name": name,
           "dtype": dtype, "dataset": str(dataset.resolve()) if dataset and dtype == "w8a8" else None,
           "hybrid_patterns": list(patterns) if dtype == "w8a8" else []}

    def on_event(event: dict[str, Any]) -> None:
        if event.get("type") == "progress" and event.get("state") == "done":
            _log(log, f"  [{event.get('step')}] done")

    run = run_worker([sys.executable, "-m", "rkedge.convert.rknn.build_worker", "--job"], job, what="rknn-toolkit2",
                     env=child_environment(), on_event=on_event, timeout=timeout, cwd=vision)
    result = run.result_event
    if run.error is not None or result is None or not result.get("ok"):
        said = "".join(f"\n  the toolkit said: {line.strip()}" for line in run.log_lines[-3:] if line.strip())
        raise ToolkitError(f"rknn-toolkit2 could not build the {dtype} vision encoder: {run.error or 'no result'}"
                           f"{said}", fix="rerun with the same rknn-toolkit2 version; see its log (-v)")
    return {k: v for k, v in result.items() if k not in ("type", "ok")}


def _simulator_figures(folder: Path, encoder: EncoderFile, spec: Preprocessing, pixels: list[Any],
                       references: list[Any]) -> dict[str, Any]:
    """The compiled encoder, rebuilt in the simulator, on the verification images; with its latency per image."""
    from rkedge.runtime._stderr import capture_native_output
    from rkedge.runtime.rknn.engine import SimulatorGraphs

    with capture_native_output():
        graphs = SimulatorGraphs(folder, [encoder.graph_spec("vision")])
    try:
        outputs, latencies = [], []
        for p in pixels:
            started = time.perf_counter()
            with capture_native_output():
                outputs.append(graphs.run(0, [p])[0])
            latencies.append((time.perf_counter() - started) * 1000)
    finally:
        graphs.release()
    figures = compare_features(references, [o.reshape(r.shape) for o, r in zip(outputs, references, strict=True)])
    return {**figures, "simulator_ms_median": sorted(latencies)[len(latencies) // 2]}


def _versions(toolkit_version: str) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, Any] = {"rkedge": __version__, "rkllm_toolkit": toolkit_version}
    for package in ("rknn-toolkit2", "torch", "transformers", "onnx"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found
