"""Several models on one NPU: which model a request names, loading on demand, unloading the least recently used.

Every model's :class:`~rkedge.runtime.server.engine.Engine` shares one :class:`NpuQueue`, so a request for any
model waits behind the run in progress, whichever model it is on. Loads and unloads take that same NPU slot:
a model is never loaded or freed while a run is on the NPU, and an unloaded model's ``rkllm_destroy`` has run
before anything else starts (an unload never leaks NPU memory).

A request leases its model's engine (:meth:`ModelPool.lease`) from routing until its response has ended; a
leased model is never unloaded. When loading one more model would go over the budget (``--max-loaded`` models,
or the board's RAM against each manifest's memory estimate), the least recently used idle models are unloaded
first; when all others are leased, the load waits until one is released.

No FastAPI import here (plain asyncio).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rkedge.errors import InputError
from rkedge.runtime.server.engine import Engine, NpuQueue
from rkedge.runtime.server.metrics import Metrics

if TYPE_CHECKING:
    from rkedge.runtime.llm import LLM

log = logging.getLogger("rkedge.serve")

#: Ollama's default tag: clients send ``name:latest`` for ``name``.
LATEST = ":latest"
#: How long a load waits before trying again when every other loaded model is in use.
RETRY_S = 0.05
#: Separates a model from one of its LoRA adapters in a request's model name (``name+adapter``).
ADAPTER_SEPARATOR = "+"


class ModelNotFound(InputError):
    def __init__(self, requested: str, served: Iterable[str]) -> None:
        names = ", ".join(repr(n) for n in served)
        super().__init__(f"model {requested!r} is not served here; this server serves {names}.",
                         fix="pick one of GET /v1/models (or /api/tags)", code="model_not_found")


@dataclass
class ModelEntry:
    """One model file the server can serve, loaded or not."""

    name: str
    path: Path
    metadata: dict[str, Any]
    memory_bytes: int  # what loading it is expected to take (manifest estimate; see memory_estimate)
    adapters: dict[str, Path] = field(default_factory=dict)  # LoRA adapters: name -> file (--lora)
    prompt_cache: Path | None = None  # loaded into the model at each load (--prompt-cache)
    engine: Engine | None = None
    leases: int = 0
    last_used: float = 0.0  # monotonic
    loaded_at: float | None = None  # wall clock, for /api/ps
    expires_at: float | None = None  # monotonic; None: kept until the budget needs the room
    started: int = field(default_factory=lambda: int(time.time()))
    _digest: str | None = None

    @property
    def loaded(self) -> bool:
        return self.engine is not None

    def aliases(self) -> set[str]:
        names = {self.name, self.path.name, self.path.stem}
        return names | {n + LATEST for n in names}

    def digest(self) -> str:
        """The file's sha256 (Ollama's digest), read once (the manifest's when it records one)."""
        if self._digest is None:
            recorded = self.metadata.get("sha256")
            if isinstance(recorded, str) and re.fullmatch(r"[0-9a-f]{64}", recorded):
                self._digest = recorded
            else:
                sha = hashlib.sha256()
                with open(self.path, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        sha.update(block)
                self._digest = sha.hexdigest()
        return self._digest


def memory_estimate(metadata: dict[str, Any], path: Path) -> int:
    """Bytes a model takes once loaded: the convert-time plan estimate (as ``rkedge doctor`` reads it), else the
    simulated model's ``memory_mb``, else the file's size plus the runtime's allowance (rkedge.fit)."""
    from rkedge.fit import RUNTIME_OVERHEAD_BYTES

    estimate = metadata.get("estimate") or {}
    total = int(estimate.get("total_bytes") or 0) if isinstance(estimate, dict) else 0
    if total:
        return total
    if isinstance(estimate, dict):
        parts = sum(int(estimate.get(k) or 0) for k in ("weight_bytes", "embedding_bytes", "kv_cache_bytes"))
        if parts:
            return parts + RUNTIME_OVERHEAD_BYTES
    if metadata.get("simulated") and metadata.get("memory_mb"):
        return int(float(metadata["memory_mb"]) * (1 << 20))
    size = path.stat().st_size if path.is_file() else 0
    return size + RUNTIME_OVERHEAD_BYTES


def board_memory_budget(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The RAM models may take: MemTotal (what the kernel left after its own reservations, as ``rkedge doctor``
    reads it) times rkedge.fit's comfort share. None where /proc/meminfo cannot be read."""
    from rkedge.fit import COMFORT_SHARE

    try:
        text = meminfo.read_text()
    except OSError:
        return None
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, flags=re.M)
    return int(int(match.group(1)) * 1024 * COMFORT_SHARE) if match else None


def model_files(paths: Iterable[Path]) -> list[Path]:
    """The model files among ``paths``: files as given; in a folder its ``*.rkllm`` and simulated models (LoRA
    adapters, prompt caches and manifests skipped), by name."""
    from rkedge.manifest import BUNDLE_FILE
    from rkedge.modelfile import is_simulated_model

    found: list[Path] = []
    for path in paths:
        if not path.is_dir() or (path / BUNDLE_FILE).is_file():  # a file, or an RKNN bundle (itself one model)
            found.append(path)
            continue
        for child in sorted(path.iterdir()):
            if not child.is_file() or child.name.endswith((".json", "_lora.rkllm")):
                continue
            if child.suffix == ".rkllm" or is_simulated_model(child):
                found.append(child)
    if not found:
        raise InputError("no model files to serve.", fix="pass .rkllm files, or a folder holding them")
    return found


def parse_keep_alive(value: Any) -> float | None:
    """Ollama's ``keep_alive`` in seconds: a number (seconds) or a duration ("5m", "1h30m", "10s", "0");
    negative: forever (None)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InputError("keep_alive must be a duration (\"5m\"), a number of seconds, or -1")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = re.findall(r"(-?\d+(?:\.\d+)?)(ms|h|m|s)", text)
            if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
                raise InputError(f"keep_alive {value!r} is not a duration.",
                                 fix="use e.g. \"5m\", \"30s\", 0 (unload now) or -1 (keep loaded)") from None
            scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
            seconds = sum(float(n) * scale[u] for n, u in parts)
    return None if seconds < 0 else seconds


Opener = Callable[[ModelEntry], "LLM"]


class ModelPool:
    """The served models, the loaded ones and the NPU slot they share."""

    def __init__(self, entries: list[ModelEntry], opener: Opener, *, max_queue: int, queue_timeout_s: float,
                 max_loaded: int | None = None, memory_budget: int | None = None,
                 metrics: Metrics | None = None) -> None:
        if not entries:
            raise InputError("no models to serve.")
        self.entries = entries
        self.opener = opener
        self.max_loaded = max_loaded
        self.memory_budget = memory_budget
        self.queue = NpuQueue(max_queue, queue_timeout_s)
        self.metrics = metrics or Metrics()
        self.metrics.watch_queue(lambda: self.queue.waiting, lambda: int(self.queue.busy))
        self._detached: dict[int, ModelEntry] = {}  # engines taken off their entries, not yet freed
        self.loads = 0
        self.unloads = 0

    @property
    def default(self) -> ModelEntry:
        return self.entries[0]

    def loaded(self) -> list[ModelEntry]:
        return [e for e in self.entries if e.loaded]

    # -- naming ---------------------------------------------------------------------------------------------

    def resolve(self, requested: str | None) -> tuple[ModelEntry, str | None]:
        """The entry and LoRA adapter a request's ``model`` names (``name``, ``name:latest``, the file's name,
        ``name+adapter``); no name: the only model, or the first one given."""
        if not requested:
            return self.default, None
        for candidate, adapter in _readings(requested):
            for entry in self.entries:
                if candidate in entry.aliases() and (adapter is None or adapter in entry.adapters):
                    return entry, adapter
        raise ModelNotFound(requested, self.ids())

    def ids(self) -> list[str]:
        """Every id a client can ask for, adapters included (``name+adapter``)."""
        out: list[str] = []
        for entry in self.entries:
            out.append(entry.name)
            out += [entry.name + ADAPTER_SEPARATOR + a for a in entry.adapters]
        return out

    # -- leases -------------------------------------------------------------------------------------------------

    async def lease(self, entry: ModelEntry) -> Engine:
        """The entry's engine, loaded if needed; the caller must :meth:`release` it when its response ends."""
        entry.leases += 1
        try:
            while entry.engine is None:
                await self._load(entry)
        except BaseException:
            self.release(entry)
            raise
        entry.last_used = time.monotonic()
        return entry.engine

    def release(self, entry: ModelEntry, keep_alive: float | None = None, *, set_keep_alive: bool = False) -> None:
        """Ends a lease; with ``set_keep_alive``, ``keep_alive`` (seconds; None: for ever) sets when the idle
        model is unloaded."""
        entry.leases = max(0, entry.leases - 1)
        entry.last_used = time.monotonic()
        if set_keep_alive:
            entry.expires_at = None if keep_alive is None else time.monotonic() + keep_alive

    # -- loading and unloading (under the NPU slot) -------------------------------------------------------------

    async def _load(self, entry: ModelEntry) -> None:
        await self._acquire()
        handed = False  # once the worker holds the slot, it releases it when the native calls have ended
        try:
            if entry.engine is not None:
                return
            # Chosen and detached on the event loop, so no request can lease a model being freed; the slow
            # native calls (rkllm_destroy, rkllm_init) run on a worker thread.
            victims = self._make_room(entry)
            if victims is not None:
                handed = True
                await self.queue.hold(functools.partial(self._replace, victims, entry))
                return
        finally:
            if not handed:
                self.queue.release()
        # Every other loaded model is in use: try again once one of them may have been released.
        await asyncio.sleep(RETRY_S)

    async def _acquire(self) -> None:
        from rkedge.runtime.server.engine import QueueTimeout

        try:
            waited = await self.queue.acquire(asyncio.Event())  # never set: a load has no client to lose
        except asyncio.TimeoutError:
            raise QueueTimeout(self.queue.timeout_s, 1) from None
        assert waited is not None

    def _replace(self, victims: list[Engine], entry: ModelEntry) -> None:
        for engine in victims:
            self._free(engine)
        self.adopt(entry, self.opener(entry))

    def adopt(self, entry: ModelEntry, llm: LLM) -> Engine:
        """Serves ``entry`` with an already open ``llm`` (its adapters and prompt cache loaded into it)."""
        try:
            engine = Engine(llm, max_queue=self.queue.max_queue, queue_timeout_s=self.queue.timeout_s,
                            counter=_counter(entry, llm), metrics=self.metrics, queue=self.queue)
            for name, path in entry.adapters.items():
                llm.load_lora(path, name)
                engine.adapters.add(name)
            if entry.prompt_cache is not None:
                llm.load_prompt_cache(entry.prompt_cache)
        except BaseException:
            llm.close()
            raise
        log.info("loaded %s (%s)", entry.name, entry.path)
        entry.engine = engine
        entry.loaded_at = time.time()
        entry.last_used = time.monotonic()
        self.loads += 1
        return engine

    def _fits(self, entry: ModelEntry, loaded: list[ModelEntry]) -> bool:
        if self.max_loaded is not None and len(loaded) + 1 > self.max_loaded:
            return False
        if self.memory_budget is not None:
            return sum(e.memory_bytes for e in loaded) + entry.memory_bytes <= self.memory_budget
        return True

    def _make_room(self, entry: ModelEntry) -> list[Engine] | None:
        """Detaches idle models, least recently used first, until ``entry`` fits (called holding the NPU slot);
        returns their engines to free. None when it cannot fit because the others are in use. A model larger
        than the whole budget still loads once nothing else is loaded (it is the one asked for)."""
        victims: list[Engine] = []
        while True:
            loaded = self.loaded()
            if not loaded or self._fits(entry, loaded):
                if not loaded and not self._fits(entry, []):
                    log.warning("%s needs more than the memory budget; loading it alone", entry.name)
                return victims
            idle = sorted((e for e in loaded if e.leases == 0), key=lambda e: e.last_used)
            if not idle:
                for engine in victims:  # nothing freed yet: put them back
                    self._reattach(engine)
                return None
            victims.append(self._detach(idle[0]))

    def _detach(self, entry: ModelEntry) -> Engine:
        engine, entry.engine = entry.engine, None
        assert engine is not None
        entry.loaded_at = None
        entry.expires_at = None
        self._detached[id(engine)] = entry
        return engine

    def _reattach(self, engine: Engine) -> None:
        entry = self._detached.pop(id(engine))
        entry.engine = engine
        entry.loaded_at = time.time()

    def _free(self, engine: Engine) -> None:
        """rkllm_destroy for a detached model (no run can be on it: the caller holds the NPU slot, or shuts down)."""
        entry = self._detached.pop(id(engine), None)
        engine.abort_all()
        engine.llm.close()
        self.unloads += 1
        log.info("unloaded %s", entry.name if entry else engine.llm.model_path)

    async def unload(self, entry: ModelEntry) -> None:
        """Unloads ``entry`` once the NPU is free (Ollama's ``keep_alive: 0``); kept when leased again."""
        if entry.engine is None:
            return
        await self._acquire()
        if entry.engine is None or entry.leases != 0:
            self.queue.release()
            return
        detached = self._detach(entry)
        await self.queue.hold(functools.partial(self._free, detached))  # released when rkllm_destroy has returned

    async def expire(self) -> None:
        """Unloads the idle models whose keep_alive has passed."""
        now = time.monotonic()
        for entry in self.loaded():
            if entry.leases == 0 and entry.expires_at is not None and entry.expires_at <= now:
                await self.unload(entry)

    async def watch_expiry(self, every_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.expire()
            except Exception as exc:  # broad: the watcher must outlive any one failed unload; it retries next tick
                log.warning("keep_alive expiry postponed: %s", exc)

    def close_all(self) -> None:
        """Shutdown: aborts what runs and frees every model."""
        for entry in self.entries:
            if entry.engine is not None:
                entry.engine.abort_all()
        for entry in self.entries:
            if entry.engine is not None:
                self._free(self._detach(entry))

    # -- totals ---------------------------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return self.queue.waiting

    @property
    def running(self) -> int:
        return int(self.queue.busy)

    def admit(self) -> None:
        from rkedge.runtime.server.engine import QueueFull

        if self.queue.full():
            raise QueueFull(1)


def _readings(requested: str) -> list[tuple[str, str | None]]:
    """The ways to read a requested name: as a whole; then ``model+adapter`` (its ``:latest`` tag may follow
    either part)."""
    out: list[tuple[str, str | None]] = [(requested, None)]
    if ADAPTER_SEPARATOR in requested:
        model, adapter = requested.rsplit(ADAPTER_SEPARATOR, 1)
        adapter = adapter.removesuffix(LATEST)
        out.append((model, adapter))
    return out


def _counter(entry: ModelEntry, llm: LLM) -> Any:
    from rkedge.runtime.tokens import counter_for

    return counter_for(entry.path, dict(llm.metadata), llm.encode)


def entry_names(paths: list[Path], metadata: list[dict[str, Any]], given: str | None) -> list[str]:
    """Client-facing names: ``--name`` for a single model; else each manifest's name, the file's stem where two
    would clash."""
    if given and len(paths) == 1:
        return [given]
    names = [str(m.get("name") or p.stem) for p, m in zip(paths, metadata, strict=True)]
    return [p.stem if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]
