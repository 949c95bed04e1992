"""A fake ``rkllm.api``: records every call (``$FAKE_RKLLM_RECORD``) and writes a placeholder at export."""

import json
import os


def _record(method, kwargs):
    path = os.environ.get("FAKE_RKLLM_RECORD")
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"method": method, "kwargs": kwargs}) + "\n")


class RKLLM(object):
    def load_huggingface(self, model, model_lora=None, device="cpu", dtype="float32", custom_config=None,
                         load_weight=True):
        _record("load_huggingface", {"model": model, "model_lora": model_lora, "device": device, "dtype": dtype})
        print("fake toolkit: loaded %s" % model)
        return 0

    def build(self, **kwargs):
        _record("build", kwargs)
        return 0

    def export_rkllm(self, export_path):
        _record("export_rkllm", {"export_path": export_path})
        with open(export_path, "wb") as handle:
            handle.write(b"fake rkllm file\n")
        return 0
