"""rkedge: take a Hugging Face LLM (optionally with a LoRA) to a Rockchip RK3588 board and chat with it on the NPU.

The package is split by where it runs: ``rkedge.convert`` and ``rkedge.lora`` on the host (x86_64, torch),
``rkedge.runtime`` on the board (aarch64, no torch). This root holds only what both sides share: the
version, the error family, the manifest schema and the ``rkedge`` command group.
"""

__version__ = "0.1.0"
