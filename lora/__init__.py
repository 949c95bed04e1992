"""LoRA adapters: inspection, validation against a base checkpoint, and streaming merges."""
