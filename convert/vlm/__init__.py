"""Vision-language models (issue 15), host side: the family table, the vision tower's export to ONNX and its
compilation with rknn-toolkit2 (fp16, w8a8), verification against transformers, and :func:`convert_vlm`, which
also converts the language model through rkedge's own rkllm pipeline. torch is imported only when converting.
"""

from rkedge.convert.vlm.convert import MIN_COSINE, VlmRequest, VlmResult, convert_vlm, is_vlm_checkpoint
from rkedge.convert.vlm.families import FAMILIES, VlmFamily, family_of, vlm_family

__all__ = ["FAMILIES", "MIN_COSINE", "VlmFamily", "VlmRequest", "VlmResult", "convert_vlm", "family_of",
           "is_vlm_checkpoint", "vlm_family"]
