"""A transformers model that holds one decoder layer's weights at a time (issue 12 item 1).

The model is built with its parameters on the meta device (nothing allocated; buffers such as rotary tables
stay real). The embedding, final norm and head are read from the checkpoint once; each decoder layer's weights
are read just before the layer runs and dropped right after, by forward hooks. A forward pass over a batch
therefore reads the checkpoint once and holds the activations, the KV cache and one layer, never the model:
the same arithmetic on the same weights as the model loaded whole, so the outputs are identical.

torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
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


def load_layer_streamed(model_dir: str | Path, dtype: torch.dtype) -> Any:
    """The checkpoint's causal LM, its decoder layers streamed from disk (see the module docstring)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rkedge.lora._tensors import TensorReader

    model_dir = Path(model_dir)
    tensors = read_checkpoint(model_dir)
    config = AutoConfig.from_pretrained(str(model_dir))
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
    for name, param in list(model.named_parameters()):
        if not name.startswith(layer_prefix) and param.is_meta and name in tensors:
            owner, leaf = _owner(model, name)
            owner._parameters[leaf] = read(name, param)
    model.tie_weights()
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


def _owner(root: Any, dotted: str) -> tuple[Any, str]:
    *path, leaf = dotted.split(".")
    module = root
    for part in path:
        module = getattr(module, part)
    return module, leaf
