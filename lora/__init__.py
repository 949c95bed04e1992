"""LoRA adapters: inspection, validation against a base checkpoint, and streaming merges.

- ``rkedge.lora.adapter``: ``inspect_adapter`` / ``validate_adapter`` (headers only, no torch);
- ``rkedge.lora.merge``: ``merge_lora`` (streaming, equal to peft's ``merge_and_unload``) and ``smoke_forward``;
- ``rkedge.lora.cli``: ``rkedge lora inspect`` / ``rkedge lora merge``.
"""
