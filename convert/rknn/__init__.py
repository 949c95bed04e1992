"""The RKNN backend on the host: RecurrentGemma -> decode-step graphs -> ONNX -> rknn-toolkit2 -> a bundle.

``rkedge convert MODEL --backend rknn`` (see :mod:`.pipeline`). Everything that needs torch, onnx or
rknn-toolkit2 imports it inside the function that uses it.
"""
