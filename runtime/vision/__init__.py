"""Images for vision-language models (issue 15), board side: the VLM manifest (``vlm.json``), preprocessing equal
to the Hugging Face image processor (numpy + Pillow, no torch), the vision encoder through RKNNLite (board) or
the rknn-toolkit2 simulator (x86), and the embeddings as ``RKLLM_INPUT_MULTIMODAL`` input per ABI.

Nothing heavy is imported until an image is encoded.
"""

from rkedge.runtime.vision.bundle import (
           IMAGE_PLACEHOLDER,
           VLM_FILE,
           EncoderFile,
           ImageTags,
           Preprocessing,
           VlmManifest,
           is_vlm,
           read_vlm,
)
from rkedge.runtime.vision.checks import check_vlm, encoder_footprint, find_librknnrt
from rkedge.runtime.vision.encoder import VisionEncoder, encode_images
from rkedge.runtime.vision.multimodal import (
           ImageEmbeddings,
           image_prompt,
           init_image_tags,
           multimodal_run,
           tags_at_init,
)

__all__ = ["IMAGE_PLACEHOLDER", "VLM_FILE", "EncoderFile", "ImageEmbeddings", "ImageTags", "Preprocessing",
           "VisionEncoder", "VlmManifest", "check_vlm", "encode_images", "encoder_footprint", "find_librknnrt",
           "image_prompt", "init_image_tags", "is_vlm", "multimodal_run", "read_vlm", "tags_at_init"]
