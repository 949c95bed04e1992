"""``python -m rkedge.runtime.trial_init MODEL --lib LIB [--abi V]``: one rkllm_init with a tiny context.

Run by ``rkedge doctor --trial-init`` in a child process, so a runtime that crashes (1.3.0 segfaults on NPU
out-of-memory, rknn-llm#522) cannot take doctor down. The runtime's init log goes to stderr, where the parent
scans it for known failure texts; stdout carries one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys

from rkedge.errors import RkedgeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rkedge.runtime.trial_init")
    parser.add_argument("model")
    parser.add_argument("--lib", default=None)
    parser.add_argument("--abi", default=None)
    parser.add_argument("--max-context", type=int, default=128)
    parser.add_argument("--base-domain-id", type=int, default=None)
    args = parser.parse_args(argv)
    from rkedge.runtime.llm import LLM

    params = {"max_context_len": args.max_context, "max_new_tokens": 1}
    if args.base_domain_id is not None:
        params["base_domain_id"] = args.base_domain_id
    try:
        with LLM(args.model, library=args.lib, abi=args.abi, verbose=True, **params) as llm:
            detail = (f"RKNN bundle on {llm.runtime.selected_by}" if llm.abi == "rknn" else
                      f"rkllm_init, ABI {llm.abi}, max_context_len {llm.max_context_len}")
    except RkedgeError as exc:
        print(json.dumps({"ok": False, "error": str(exc), "failure": getattr(exc, "failure", None)}))
        return 1
    print(json.dumps({"ok": True, "detail": detail}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
