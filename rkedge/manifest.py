"""The manifest: what the host wrote about a converted model, read by host and board alike.

Two files carry one, both described by :class:`Manifest`:

- ``<file>.rkllm.json`` beside every ``.rkllm`` (schema ``rkedge-manifest``, backend ``rkllm``): the chat
  template (Hugging Face's Jinja text, its special tokens, and the family), BOS/EOS ids, context limit and recommended runtime settings the board reads, and every
  argument that reached the toolkit, with the inputs' hashes and every version involved, so a file can be
  traced back to its source. ``doctor`` checks the model's toolkit version against the runtime (F-3/F-4).
- ``bundle.json`` inside an RKNN bundle folder (schema ``rkedge-rknn-bundle``, backend ``rknn``): the graphs
  in the order a decode step runs them, their shapes, the host-side tables and the verification figures.

:func:`read_manifest` is the one reader. A :class:`Manifest` is also a read-only mapping of its JSON form
(``manifest["dtype"]``, ``manifest.get("toolkit")``), so code written against the old dict keeps working.
"""

from __future__ import annotations

import copy
import functools
import json
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, TypedDict, Union

from rkedge.errors import ModelFileError

Backend = Literal["rkllm", "rknn"]

SCHEMA = "rkedge-manifest"
SCHEMA_VERSION = 1
BUNDLE_SCHEMA = "rkedge-rknn-bundle"
BUNDLE_SCHEMA_VERSION = 1
BUNDLE_FILE = "bundle.json"
SCHEMAS: dict[Backend, str] = {"rkllm": SCHEMA, "rknn": BUNDLE_SCHEMA}
_SUPPORTED_VERSION: dict[Backend, int] = {"rkllm": SCHEMA_VERSION, "rknn": BUNDLE_SCHEMA_VERSION}

#: Keys a file of each backend must have (an rkllm manifest without them cannot be traced or checked; a
#: bundle without its graph lists cannot run).
REQUIRED = ("schema", "schema_version", "model_file", "sha256", "size", "platform", "dtype", "toolkit",
            "max_context_limit", "toolkit_calls")
BUNDLE_REQUIRED = ("schema", "schema_version", "platform", "dtype", "graphs", "heads")
_REQUIRED: dict[Backend, tuple[str, ...]] = {"rkllm": REQUIRED, "rknn": BUNDLE_REQUIRED}
_FIX = "reconvert the model (rkedge convert), or restore its manifest from the conversion's output"

#: The keys each writer produces, in the order it writes them (convert/pipeline.py, convert/rknn/pipeline.py:
#: the bundle gets ``precision``, ``quality`` and ``wall_time_s`` after the quality report). ``schema`` follows from the
#: backend; the rkllm manifest has no ``backend`` key (it predates the RKNN backend).
KEYS: dict[Backend, tuple[str, ...]] = {
    "rkllm": ("schema", "schema_version", "simulated", "name", "model_file", "sha256", "size", "lora_file",
              "architecture", "model_type", "platform", "dtype", "max_context_limit", "npu_cores", "chat_family",
              "chat_template", "chat_template_parts", "bos_token_id", "eos_token_id", "special_tokens", "toolkit",
              "rkedge_version",
              "inputs", "toolkit_calls", "request", "findings", "estimate", "runtime", "host", "created_at",
              "wall_time_s"),
    "rknn": ("schema", "schema_version", "backend", "name", "architecture", "platform", "dtype", "hybrid", "graphs",
             "heads", "prefill", "dims", "parameters", "embedding", "lm_head", "tokenizer", "chat_family",
             "verification", "versions", "inputs", "created_at", "precision", "quality", "wall_time_s"),
}


class ToolkitInfo(TypedDict, total=False):
    """The toolkit that converted the model (``version`` is what doctor compares with the runtime)."""

    kind: str  # "mock" (simulated) | "venv" | "python"...
    version: str
    label: str
    python: str | None
    reported_version: str | None  # what the toolkit itself printed, when it did


class LoraFile(TypedDict):
    file: str
    sha256: str
    size: int


class ChatTemplateParts(TypedDict):
    """The runtime's three-part chat template (``rkllm_set_chat_template``)."""

    system_prompt: str
    prompt_prefix: str
    prompt_postfix: str


class RuntimeSection(TypedDict, total=False):
    recommended: dict[str, Any]  # RKLLMParam values the converter recommends (max_context_len, base_domain_id...)
    prompt_renderer: str  # family (hand-written) | model (chat_template, with Jinja: no family matches) | toolkit


class RknnGraph(TypedDict, total=False):
    """One graph of an RKNN bundle: a chunk of layers or a slice of the LM head."""

    name: str
    layers: list[int]
    inputs: list[str]
    outputs: list[str]
    shapes: dict[str, list[int]]
    rknn: str  # file name inside the bundle
    dtype: str
    rknn_bytes: int
    simulator: Any  # what the rknn-toolkit2 simulator rebuilds the graph from (its shape is the build worker's)
    fp16_tensors: list[str]
    build_seconds: float
    rknn_layers: dict[str, Any] | None  # the toolkit's layer table counted (rkedge.convert.rknn.layers)


class EmbeddingTable(TypedDict, total=False):
    file: str
    dtype: str
    scaled_by_normalizer: bool
    where: str


@dataclass(frozen=True, eq=False, kw_only=True)
class Manifest(Mapping[str, Any]):
    """One manifest, typed. Fields of the other backend stay at their defaults and are not written.

    ``omitted``: keys of this backend the source file did not have (older or hand-written files), so
    :meth:`to_dict` gives back exactly what :meth:`from_dict` read. ``extra``: keys this rkedge does not know,
    kept and written back after the known ones.
    """

    backend: Backend = "rkllm"
    schema_version: int = SCHEMA_VERSION
    name: str | None = None
    architecture: str | None = None
    platform: str
    dtype: str
    chat_family: str | None = None
    inputs: dict[str, Any] | None = None
    created_at: str | None = None
    wall_time_s: float | None = None
    # -- rkllm -------------------------------------------------------------------------------------------
    simulated: bool = False
    model_file: str | None = None
    sha256: str | None = None
    size: int | None = None
    lora_file: LoraFile | None = None
    model_type: str | None = None
    max_context_limit: int | None = None
    npu_cores: int | None = None
    chat_template: str | None = None  # the checkpoint's Jinja template, as found
    chat_template_parts: ChatTemplateParts | None = None
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None  # a list where the checkpoint ends turns with several tokens
    #: The tokenizer's special-token texts the chat template reads (``bos_token``, ``eos_token``, ``unk_token``,
    #: ``pad_token``...: transformers' ``special_tokens_map``), so the board renders ``chat_template`` exactly.
    special_tokens: dict[str, str] | None = None
    toolkit: ToolkitInfo | None = None
    rkedge_version: str | None = None
    toolkit_calls: dict[str, dict[str, Any]] | None = None
    request: dict[str, Any] | None = None
    findings: list[dict[str, Any]] | None = None
    estimate: dict[str, Any] | None = None
    runtime: RuntimeSection | None = None
    host: dict[str, Any] | None = None
    # -- rknn --------------------------------------------------------------------------------------------
    hybrid: dict[str, Any] | None = None
    graphs: list[RknnGraph] | None = None
    heads: list[RknnGraph] | None = None
    #: The chunked-prefill graphs (rkedge.runtime.rknn.prefill); absent from older bundles and --prefill-chunk 0
    prefill: dict[str, Any] | None = None
    dims: dict[str, Any] | None = None
    parameters: dict[str, Any] | None = None
    embedding: EmbeddingTable | None = None
    lm_head: str | None = None
    tokenizer: dict[str, Any] | None = None
    verification: dict[str, Any] | None = None
    versions: dict[str, str] | None = None
    #: What the w8a8 build keeps in fp16 and why: the quality target, the parts chosen, the trade-off table and the
    #: verdict (rkedge.convert.rknn.precision); absent from older bundles
    precision: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None
    # -- bookkeeping -------------------------------------------------------------------------------------
    omitted: frozenset[str] = field(default=frozenset(), repr=False)
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        missing = [key for key in _REQUIRED[self.backend]
                   if key not in ("schema", "schema_version") and (key in self.omitted or getattr(self, key) is None)]
        if missing:
            raise ModelFileError(f"the {self.backend} manifest lacks {', '.join(missing)}.",
                                 fix=_FIX)

    @property
    def schema(self) -> str:
        return SCHEMAS[self.backend]

    @property
    def recommended(self) -> dict[str, Any]:
        """Runtime settings the converter recommends (empty when it recommended none)."""
        return dict((self.runtime or {}).get("recommended") or {})

    # -- JSON ---------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in the writer's order (a deep copy: changing it leaves the manifest alone)."""
        return copy.deepcopy(self._json)

    def to_json(self) -> str:
        """The file's text, formatted as each writer has always formatted it (the bundle's JSON is ASCII)."""
        return json.dumps(self._json, indent=1, ensure_ascii=self.backend == "rknn") + "\n"

    @classmethod
    def from_dict(cls, data: object, where: str = "manifest", *, backend: Backend | None = None) -> Manifest:
        """Validates ``data`` (a parsed manifest); ``backend``: the kind of file expected there, if known.

        Raises:
            ModelFileError: not a manifest, a newer schema, missing keys or a key of the wrong type.
        """
        if not isinstance(data, dict):
            raise ModelFileError(f"{where} is not a JSON object, so not an rkedge manifest.",
                                 fix=_FIX)
        schema = data.get("schema")
        found = next((name for name, value in SCHEMAS.items() if value == schema), None)
        if found is None or (backend is not None and found != backend):
            kind = "an RKNN bundle manifest" if backend == "rknn" else "an rkedge manifest"
            raise ModelFileError(f"{where} is not {kind} (schema {schema!r}).", fix=_FIX)
        try:
            version = int(data.get("schema_version", 0))
        except (TypeError, ValueError):
            raise ModelFileError(f"{where} has a schema_version that is not a number "
                                 f"({data.get('schema_version')!r}).", fix=_FIX) from None
        if version > _SUPPORTED_VERSION[found]:
            raise ModelFileError(f"{where} uses {found} manifest schema {version}, newer than this rkedge "
                                 f"understands ({_SUPPORTED_VERSION[found]}).", fix="upgrade rkedge on this machine")
        missing = [key for key in _REQUIRED[found] if key not in data]
        if missing:
            raise ModelFileError(f"{where} lacks {', '.join(missing)}.", fix=_FIX)
        keys = KEYS[found]
        hints = _field_types()
        values: dict[str, Any] = {}
        for key in keys:
            if key in ("schema", "backend") or key not in data:
                continue
            if not _has_type(data[key], hints[key]):
                raise ModelFileError(f"{where}: {key} is {type(data[key]).__name__} {data[key]!r:.60}, not what an "
                                     "rkedge manifest holds there; the file is corrupt.",
                                     fix=_FIX)
            values[key] = copy.deepcopy(data[key])
        if found == "rknn" and data.get("backend", "rknn") != "rknn":
            raise ModelFileError(f"{where} is a bundle manifest for backend {data['backend']!r}, not rknn.", fix=_FIX)
        values["schema_version"] = version if "schema_version" in data else SCHEMA_VERSION
        omitted = frozenset(key for key in keys if key not in data)
        extra = {key: copy.deepcopy(value) for key, value in data.items() if key not in keys}
        return cls(backend=found, omitted=omitted, extra=extra, **values)

    @cached_property
    def _json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in KEYS[self.backend]:
            if key in self.omitted:
                continue
            out[key] = self.schema if key == "schema" else getattr(self, key)
        out.update(self.extra)
        return out

    # -- read-only mapping of the JSON form -----------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        return self._json[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._json)

    def __len__(self) -> int:
        return len(self._json)


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(Manifest)


def _has_type(value: object, hint: Any) -> bool:
    """A shallow check of a JSON value against a field's annotation (containers: the container only)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_has_type(value, arg) for arg in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if origin in (dict, Mapping) or typing.is_typeddict(hint):
        return isinstance(value, dict)
    if origin is list:
        return isinstance(value, list)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def manifest_path(model_file: str | Path) -> Path:
    """The sidecar manifest of a ``.rkllm`` (``<file>.json``)."""
    model_file = Path(model_file)
    return model_file.with_name(model_file.name + ".json")


def bundle_file(path: str | Path) -> Path | None:
    """``bundle.json`` of an RKNN bundle folder (or the file itself), or None when ``path`` is not a bundle."""
    path = Path(path)
    candidate = path / BUNDLE_FILE if path.is_dir() else path
    if candidate.name == BUNDLE_FILE and candidate.is_file():
        return candidate
    return None


def read_manifest(model_file: str | Path) -> Manifest | None:
    """The manifest of a model: the sidecar of a ``.rkllm``, or ``bundle.json`` of an RKNN bundle folder.

    Returns None when there is none (a vendor ``.rkllm`` nobody converted with rkedge).

    Raises:
        ModelFileError: the file is not valid JSON, not an rkedge manifest, from a newer rkedge, or corrupt.
    """
    bundle = bundle_file(model_file)
    path = bundle if bundle is not None else manifest_path(model_file)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path} is not valid JSON ({exc}).", fix=_FIX) from exc
    return Manifest.from_dict(data, str(path), backend="rknn" if bundle is not None else "rkllm")


def validate(manifest: dict[str, Any], where: str = "manifest") -> dict[str, Any]:
    """Checks a parsed manifest and returns it unchanged (kept for callers of the dict API)."""
    Manifest.from_dict(manifest, where)
    return manifest


__all__ = ["Manifest", "read_manifest", "manifest_path", "bundle_file", "validate", "ToolkitInfo", "LoraFile",
           "ChatTemplateParts", "RuntimeSection", "RknnGraph", "EmbeddingTable", "SCHEMA", "SCHEMA_VERSION",
           "BUNDLE_SCHEMA", "BUNDLE_SCHEMA_VERSION", "BUNDLE_FILE", "REQUIRED", "BUNDLE_REQUIRED", "KEYS"]
