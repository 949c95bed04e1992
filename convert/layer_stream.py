"""A transformers model that holds one decoder layer's weights at a time (issue 12 item 1).

The model is built with its parameters on the meta device (nothing allocated; buffers such as rotary tables
stay real). Each decoder layer's weights are read just before the layer runs and dropped right after, by forward
hooks. The embedding table and the LM head are not held either: at 256k vocabularies they are the largest
tensors (gemma-2-2b's table is 1.2 GB in bf16, 2.4 GB in float32), so the embedding reads only the rows of the
tokens it looks up, and the head reads its rows chunk by chunk at each call (from the page cache after the first
step). A forward pass over a batch therefore holds the activations, the KV cache and one layer, never the model:
the same arithmetic on the same weights (upcast exactly, bf16 -> float32) as the model loaded whole, so the
outputs are identical.

torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rkedge.convert.safetensors_index import TensorInfo, read_checkpoint
from rkedge.errors import RkedgeError

if TYPE_CHECKING:
    import torch

_LAYER_LIST = re.compile(r"^(?:.*\.)?(?:layers|h|blocks)$")


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter created in the block is moved to the meta device as it is registered (so a Linear's
    initialisation then works on a meta tensor and costs nothing); buffers are left real."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            kind = type(param)
            module._parameters[name] = kind(param.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = on_meta  # undone below: the one hook on parameter creation
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def load_layer_streamed(model_dir: str | Path, dtype: torch.dtype, *, config: Any | None = None) -> Any:
    """The checkpoint's causal LM, its decoder layers, embedding rows and head streamed from disk (see the module
    docstring). ``config``: the model's config when not the checkpoint's own (the smoke check cuts it to its first
    layers)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rkedge.lora._tensors import TensorReader

    model_dir = Path(model_dir)
    tensors = read_checkpoint(model_dir)
    config = config if config is not None else AutoConfig.from_pretrained(str(model_dir))
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    layer_lists = [(name, module) for name, module in model.named_modules()
                   if isinstance(module, torch.nn.ModuleList) and _LAYER_LIST.match(name) and len(module)]
    if not layer_lists:
        raise RkedgeError(f"cannot find the decoder layers of {model_dir}'s model to stream them.",
                          fix="pass calibration targets in the calibration file ({input, target}) to skip "
                              "generating them")
    prefix, layers = max(layer_lists, key=lambda item: len(item[1]))
    reader = TensorReader()
    model._rkedge_reader = reader  # closed with the model (the reader holds one file handle per shard)

    def read(name: str, like: torch.Tensor) -> torch.nn.Parameter:
        info: TensorInfo | None = tensors.get(name)
        if info is None or info.shape != tuple(like.shape):
            raise RkedgeError(f"{model_dir} has no tensor {name} of shape {list(like.shape)}.",
                              fix="check the checkpoint with `rkedge inspect`")
        return torch.nn.Parameter(reader.read(info).to(dtype if like.is_floating_point() else like.dtype),
                                  requires_grad=False)

    layer_prefix = f"{prefix}."
    streamed = _streamable_ends(model, tensors)
    for name, param in list(model.named_parameters()):
        if not name.startswith(layer_prefix) and param.is_meta and name in tensors and name not in streamed:
            owner, leaf = _owner(model, name)
            owner._parameters[leaf] = read(name, param)
    model.tie_weights()
    for module_name, (weight_name, kind) in _by_module(streamed).items():
        owner, leaf = _owner(model, module_name)
        old = getattr(owner, leaf)
        info = tensors[weight_name]
        if kind == "embedding":
            setattr(owner, leaf, _streamed_classes().Embedding(reader, info, dtype, getattr(old, "embed_scale", None),
                                                            old.padding_idx))
        else:
            setattr(owner, leaf, _streamed_classes().Head(reader, info, dtype))
    left = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(layer_prefix)]
    if left:
        raise RkedgeError(f"{model_dir} lacks {', '.join(left[:4])}.", fix="check the checkpoint with `rkedge inspect`")

    for index, layer in enumerate(layers):
        names = [(f"{prefix}.{index}.{local}", local) for local, _ in layer.named_parameters()]

        def load(module: torch.nn.Module, _args: object, names: list[tuple[str, str]] = names) -> None:
            for full, local in names:
                owner, leaf = _owner(module, local)
                owner._parameters[leaf] = read(full, owner._parameters[leaf])

        def drop(module: torch.nn.Module, _args: object, _out: object) -> None:
            for local, param in list(module.named_parameters()):
                owner, leaf = _owner(module, local)
                owner._parameters[leaf] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

        layer.register_forward_pre_hook(load)
        layer.register_forward_hook(drop)
    return model


def _streamable_ends(model: Any, tensors: dict[str, TensorInfo]) -> dict[str, tuple[str, str]]:
    """{weight name the module's parameter has: (checkpoint tensor it reads, "embedding" | "head")} for the input
    embedding and the LM head when they are the plain modules whose arithmetic the streamed ones repeat exactly
    (nn.Embedding, Gemma's scaled embeddings, a bias-free nn.Linear); others are read whole, as before."""
    import torch

    names = {id(module): name for name, module in model.named_modules()}
    found: dict[str, tuple[str, str]] = {}
    embedding = model.get_input_embeddings()
    # Gemma 2 and 3 (transformers 5) use *TextScaledWordEmbedding: nn.Embedding's lookup times embed_scale
    plain = type(embedding) is torch.nn.Embedding or (isinstance(embedding, torch.nn.Embedding)
                                                     and type(embedding).__name__.endswith("ScaledWordEmbedding")
                                                     and hasattr(embedding, "embed_scale"))
    embedding_weight = f"{names.get(id(embedding))}.weight"
    if plain and id(embedding) in names and embedding.max_norm is None and embedding_weight in tensors:
        found[embedding_weight] = (embedding_weight, "embedding")
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear and head.bias is None and id(head) in names:
        head_weight = f"{names[id(head)]}.weight"
        source = head_weight if head_weight in tensors else embedding_weight  # tied: the head reads the table
        if source in tensors and tuple(head.weight.shape) == tensors[source].shape:
            found[head_weight] = (source, "head")
    return found


def _by_module(streamed: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    return {name.rsplit(".", 1)[0]: value for name, value in streamed.items()}


#: Rows of the head read and upcast at once: ~64 MB of float32 at gemma-2-9b's width.
_HEAD_CHUNK_BYTES = 64 << 20


@functools.cache
def _streamed_classes() -> Any:
    """The streamed embedding and head modules (defined on first use: torch is imported lazily)."""
    import torch
    import torch.nn.functional as F

    from rkedge.lora._tensors import TensorReader

    class Embedding(torch.nn.Module):
        """nn.Embedding's lookup, reading only the looked-up rows from the checkpoint and upcasting them (exact)."""

        def __init__(self, reader: TensorReader, info: TensorInfo, dtype: torch.dtype, scale: Any,
                     padding_idx: int | None) -> None:
            super().__init__()
            self.reader, self.info, self.compute_dtype = reader, info, dtype
            self.num_embeddings, self.embedding_dim = info.shape
            self.padding_idx = padding_idx
            # A real (empty) parameter keeps ``model.device`` and ``model.dtype`` right: the layers are on meta.
            self.anchor = torch.nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
            if scale is not None:  # Gemma 3 multiplies by its scale in the weight's dtype (here: the compute dtype)
                self.register_buffer("embed_scale", scale.detach().clone(), persistent=False)
            else:
                self.embed_scale = None

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            unique, inverse = torch.unique(input_ids, return_inverse=True)
            rows = torch.stack([self.reader.read_rows(self.info, int(i), int(i) + 1)[0] for i in unique.tolist()])
            out = rows.to(self.compute_dtype)[inverse]
            if self.embed_scale is not None:
                out = out * self.embed_scale.to(self.compute_dtype)
            return out

    class Head(torch.nn.Module):
        """A bias-free nn.Linear whose weight rows are read chunk by chunk at each call and upcast (exact)."""

        def __init__(self, reader: TensorReader, info: TensorInfo, dtype: torch.dtype) -> None:
            super().__init__()
            self.reader, self.info, self.compute_dtype = reader, info, dtype
            self.out_features, self.in_features = info.shape
            self.rows = max(1, _HEAD_CHUNK_BYTES // (self.in_features * torch.empty(0, dtype=dtype).element_size()))

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            parts = []
            for start in range(0, self.out_features, self.rows):
                weight = self.reader.read_rows(self.info, start, min(start + self.rows, self.out_features))
                parts.append(F.linear(hidden, weight.to(self.compute_dtype)))
            return torch.cat(parts, dim=-1)

    return type("StreamedModules", (), {"Embedding": Embedding, "Head": Head})


def _owner(root: Any, dotted: str) -> tuple[Any, str]:
    *path, leaf = dotted.split(".")
    module = root
    for part in path:
        module = getattr(module, part)
    return module, leaf
