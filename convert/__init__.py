"""Host-side conversion: inspect a Hugging Face checkpoint, check the request against everything known to
fail, export it, and have rkllm-toolkit (real or simulated) quantize it into a ``.rkllm``."""
