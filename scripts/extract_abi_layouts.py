#!/usr/bin/env python3
"""Extracts struct sizes and field offsets from shared/rkllm-abi/ABI.md into tests/data/abi_layouts.json.

The layout tests compare every ctypes declaration against this file; the file is committed so the test
suite runs on a clean clone, and a test re-extracts it when ABI.md is present to catch drift.

Usage: python scripts/extract_abi_layouts.py [ABI.md] [out.json]
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

HEADING = re.compile(r"^## ABI (\S+)")
#: A section that documents only its changes against an older ABI ("Identical to ABI 1.3.0 except ...").
DELTA = re.compile(r"^Identical to ABI (\S+) except")
STRUCT = re.compile(r"^### `(\w+)` — sizeof (\d+)")
#: A member row; "(union) name" rows name a member of the anonymous union (ABI 1.3.1's RKLLMInput table).
ROW = re.compile(r"^\|(?P<indent>\s*)(?:\(union\) )?(?P<name>[\w\[\]]+) \| (?P<ctype>[^|]+) \| (?P<offset>\d+) \| "
                 r"(?P<size>\d+) \|")


def extract(text: str) -> dict[str, dict[str, dict[str, object]]]:
    """Returns {abi: {struct: {"sizeof": n, "fields": {name: [offset, size]}, "nested": {...}}}}.

    A delta section ("Identical to ABI X except ...") starts from a copy of ABI X's structs; each struct table
    it gives replaces that struct's size and adds or moves the members it lists (ABI 1.3.1 appends ``audio``
    to ``RKLLMMultiModalInput`` and grows ``RKLLMInput``'s union: nothing is removed).
    """
    layouts: dict[str, dict[str, dict[str, object]]] = {}
    abi = struct = None
    for line in text.splitlines():
        if m := HEADING.match(line):
            abi, struct = m.group(1), None
            layouts[abi] = {}
        elif abi and struct is None and (m := DELTA.match(line)):
            layouts[abi] = copy.deepcopy(layouts[m.group(1)])
        elif abi and (m := STRUCT.match(line)):
            struct = m.group(1)
            base = layouts[abi].get(struct, {"fields": {}, "nested": {}})
            layouts[abi][struct] = {"sizeof": int(m.group(2)), "fields": base["fields"], "nested": base["nested"]}
        elif abi and struct and (m := ROW.match(line)):
            name = m.group("name").split("[")[0]
            entry = [int(m.group("offset")), int(m.group("size"))]
            # Rows indented by extra spaces are members of an anonymous union or a nested struct.
            key = "nested" if len(m.group("indent")) > 1 else "fields"
            layouts[abi][struct][key][name] = entry  # type: ignore[index]
    return layouts


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent
    source = Path(argv[1]) if len(argv) > 1 else root.parent / "shared" / "rkllm-abi" / "ABI.md"
    out = Path(argv[2]) if len(argv) > 2 else root / "tests" / "data" / "abi_layouts.json"
    layouts = extract(source.read_text(encoding="utf-8"))
    out.write_text(json.dumps(layouts, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"{out}: {sum(len(v) for v in layouts.values())} structs in {len(layouts)} ABIs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
