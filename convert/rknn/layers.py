"""Where rknn-toolkit2 placed each op of a built graph: its "Network Layer Information Table", parsed.

The source of every count here is the toolkit itself. librknnc prints that table on stdout while it builds
(``rknn.build`` for fp16, ``hybrid_quantization_step2`` for w8a8) when its log level is raised: the environment
variable ``RKNN_LOG_LEVEL=3`` does it for ``build`` (without ``RKNN(verbose=True)``, which would also dump four
model-sized ``check*.onnx`` files into the working folder, ~4 GB for one 2b-width chunk); step 2 honours only
``RKNN(verbose=True)`` (it loads no ONNX, so it dumps nothing). Measured with rknn-toolkit2 2.5.0. One row per
RKNN layer, i.e. per op left after the compiler's fusions (RMSNorm -> ``exNorm``, Linear -> ``Conv``/``ConvAdd``,
attention -> ``exSDPAttention``...), with its target:

    ID   OpType   DataType Target InputShape  OutputShape  Cycles(DDR/NPU/Total)  RW(KB)  FullName
    30   Exp      FLOAT16  CPU    (1,1,1,128) (1,1,1,128)  0/0/0                  2       Exp:/blocks.0/rg_lru/Exp

The graph's inputs and outputs are rows too (``InputOperator``/``OutputOperator``, target CPU): they are the I/O
copies, counted apart from the ops that fall back to the CPU.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

#: How the toolkit is asked for the table (see the module docstring).
LOG_LEVEL_ENV = {"RKNN_LOG_LEVEL": "3"}
TABLE_TITLE = "Network Layer Information Table"
SOURCE = ("rknn-toolkit2's Network Layer Information Table (librknnc, printed at RKNN_LOG_LEVEL=3 or "
          "verbose): one row per RKNN layer after the compiler's fusions, with its target")
IO_OPS = ("InputOperator", "OutputOperator")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PREFIX = re.compile(r"^D RKNN: \[[^\]]*\]\s?")
_ROW = re.compile(r"^(\d+)\s+(\S+)\s+(\S+)\s+(NPU|CPU)\s+.*\s(\S+)\s*$")


def strip_log_prefix(line: str) -> str:
    """A toolkit line without its colour codes and the ``D RKNN: [time]`` prefix."""
    return _PREFIX.sub("", _ANSI.sub("", line)).rstrip("\n")


_RAISED_LEVEL_LINE = re.compile(r"^(D |W RKNN: \[)")


def is_raised_level_line(line: str) -> bool:
    """A line the toolkit prints only because the log level was raised for the table: debug lines (``D ...``)
    and librknnc's timestamped warnings (``W RKNN: [time] ...``; at the default level it prints none)."""
    return bool(_RAISED_LEVEL_LINE.match(_ANSI.sub("", line)))


Row = tuple[str, str, str]  # (op type, target, full name)


@dataclass
class LayerCount:
    npu: int
    cpu: int  # ops (not graph I/O) that fall back to the CPU
    cpu_ops: list[str]  # their full names, e.g. "Exp:/blocks.0/rg_lru/Exp"
    io: int  # InputOperator/OutputOperator rows
    op_types: dict[str, int] = field(default_factory=dict)  # every non-I/O row by op type

    @property
    def total(self) -> int:
        return self.npu + self.cpu

    def to_dict(self) -> dict[str, Any]:
        return {"npu": self.npu, "cpu": self.cpu, "cpu_ops": list(self.cpu_ops), "io": self.io,
                "op_types": dict(sorted(self.op_types.items())), "source": SOURCE}


class LayerTableReader:
    """Fed the toolkit's output line by line; keeps the last complete table it saw (a build may print more)."""

    def __init__(self) -> None:
        self._rows: list[Row] | None = None  # the table being read
        self._dashes = 0
        self.tables: list[list[Row]] = []

    def feed(self, line: str) -> None:
        text = strip_log_prefix(line).strip()
        if TABLE_TITLE in text:
            self._rows, self._dashes = [], 0
            return
        if self._rows is None:
            return
        if text.startswith("----"):
            self._dashes += 1
            if self._dashes == 3:  # below the title, below the header, then the end of the table
                self.tables.append(self._rows)
                self._rows = None
            return
        match = _ROW.match(text)
        if match:
            self._rows.append((match.group(2), match.group(4), match.group(5)))

    def count(self) -> LayerCount | None:
        """The last table's count, or None when the toolkit printed none."""
        return count_rows(self.tables[-1]) if self.tables else None


def count_rows(rows: list[Row]) -> LayerCount:
    ops = [r for r in rows if r[0] not in IO_OPS]
    types: dict[str, int] = {}
    for op_type, _, _ in ops:
        types[op_type] = types.get(op_type, 0) + 1
    cpu = [name for _, target, name in ops if target == "CPU"]
    return LayerCount(npu=sum(1 for r in ops if r[1] == "NPU"), cpu=len(cpu), cpu_ops=cpu,
                      io=len(rows) - len(ops), op_types=types)


_BLOCK = re.compile(r"/blocks\.(\d+)/")
_STATE = re.compile(r"[:/](?:new_)?(?:conv|h|k|v)(\d+)(?:[-_]rs)")


def rows_by_layer(rows: list[Row]) -> dict[int | None, list[Row]]:
    """A chunk graph's rows by the model layer they belong to, for a chunk that starts at layer 0 (its blocks.N
    scopes and its state names then number layers alike); None: the graph's own rows (the x input and output)."""
    layers: dict[int | None, list[Row]] = {}
    for row in rows:
        found = _BLOCK.search(row[2]) or _STATE.search(row[2])
        layers.setdefault(int(found.group(1)) if found else None, []).append(row)
    return layers


def count_layers(text: str) -> LayerCount | None:
    """The count of the last layer table in a toolkit log."""
    reader = LayerTableReader()
    for line in text.splitlines():
        reader.feed(line)
    return reader.count()


_SYNC = b"\x00rkedge-layers-sync "


class ToolkitStdout:
    """Points this process's fd 1 (where librknnc and the toolkit's Python code print) at a pipe read by a
    thread, which feeds a :class:`LayerTableReader` and forwards every line to ``forward_fd`` (stderr, where the
    build worker's log goes) except those printed only because the log level was raised: the log stays what it
    was at the default level, and it still streams while a build runs."""

    def __init__(self, forward_fd: int = 2) -> None:
        sys.stdout.flush()
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 1)
        os.close(write_fd)
        self.reader = LayerTableReader()
        self._forward = forward_fd
        self._stream = os.fdopen(read_fd, "rb")
        self._seen = threading.Condition()  # guards _last_sync and the reader's tables
        self._last_sync = 0
        self._sent = 0
        self._thread = threading.Thread(target=self._pump, name="toolkit-stdout", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for raw in iter(self._stream.readline, b""):
            try:
                self._line(raw)
            except Exception:  # never stop reading: a full pipe would block the toolkit on its next print
                os.write(self._forward, raw)

    def _line(self, raw: bytes) -> None:
        at = raw.find(_SYNC)
        if at >= 0:  # possibly after a line the toolkit left open (progress bars end in \r)
            number = int(raw[at + len(_SYNC):].strip() or 0)
            with self._seen:
                self._last_sync = max(self._last_sync, number)
                self._seen.notify_all()
            raw = raw[:at]
            if not raw:
                return
            raw += b"\n"
        # a progress bar ends its updates in \r, so what follows it shares its line: each part on its own
        parts = raw.decode("utf-8", "replace").rstrip("\n").split("\r")
        with self._seen:
            for part in parts:
                self.reader.feed(part)
        kept = [part for part in parts if not is_raised_level_line(part)]
        if kept == parts:
            os.write(self._forward, raw)
        elif any(part.strip() for part in kept):
            os.write(self._forward, ("\r".join(kept) + "\n").encode("utf-8"))

    def sync(self, timeout: float = 10.0) -> None:
        """Returns once everything printed on fd 1 so far has been read and forwarded (or after ``timeout``)."""
        sys.stdout.flush()
        self._sent += 1
        number = self._sent
        os.write(1, _SYNC + str(number).encode() + b"\n")
        with self._seen:
            self._seen.wait_for(lambda: self._last_sync >= number, timeout)

    def count(self) -> LayerCount | None:
        self.sync()
        with self._seen:
            return self.reader.count()
