"""The RKNN backend: RecurrentGemma (and models like it) as chained fixed-shape decode-step graphs.

No RKLLM version implements RecurrentGemma's RG-LRU blocks; rkedge compiles its decode step with rknn-toolkit2
and runs it here, behind the same :class:`rkedge.runtime.LLM` interface: ``RKNNLite`` on the board, the
rknn-toolkit2 simulator on x86 (tests). Needs numpy (and the RKNN package of the machine); nothing is imported
until a bundle is opened.
"""
