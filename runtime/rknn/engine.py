"""The RKNN backend's engine: the decode loop over RKNNLite (board) or the rknn-toolkit2 simulator (x86).

:class:`RknnModel` implements :class:`rkedge.runtime.backend.Backend`, so :class:`rkedge.runtime.LLM`, chat
sessions, the chat CLI and the server run on it unchanged. Generation runs on the caller's thread (LLM calls
``run`` from its worker thread, as it does ``rkllm_run``) and reports each token through the same ``RunEvent``
callback; states stay in the engine between tokens and, with ``keep_history``, between runs.
"""

from __future__ import annotations

import sys
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rkedge.errors import GenerationError, InputError, LibraryNotFoundError, RuntimeInitError
from rkedge.manifest import RknnGraph
from rkedge.runtime._proc import process_rss_mb
from rkedge.runtime._stderr import capture_native_output
from rkedge.runtime.abi._common import AbiFeatures
from rkedge.runtime.backend import EventHandler, RuntimeInfo
from rkedge.runtime.rknn.bundle import read_bundle
from rkedge.runtime.rknn.loop import DecodeLoop, Floats, bundle_graphs
from rkedge.runtime.types import CallState, InferMode, InitParams, PerfStats, RunEvent, RunRequest

FEATURES = AbiFeatures(
    callback_returns_int=True, init_takes_callback_struct=False, is_running_value_when_running=1,
    clear_kv_cache_arity=4, has_keep_history=True, has_logits_mode=True, has_perf_stats=True, has_role=True,
    has_sampling_params=True, has_chat_template=False, has_function_tools=False, has_kv_cache_size=True,
    supports_release=False, hidden_layer_state=None,
)
NO_CONTEXT_LIMIT = 1 << 20  # the state is fixed-size; attention sees the last attention_window_size tokens
PENALTY_WINDOW = 64  # tokens the repeat/frequency/presence penalties look back over (llama.cpp's default)
UNSUPPORTED_PARAMS = {
    "base_domain_id": "librknnrt has no IOMMU domain selector", "embed_flash": "the embedding is a host table",
    "enabled_cpus_num": "RKNNLite picks its own threads", "enabled_cpus_mask": "RKNNLite picks its own threads",
    "n_batch": "one sequence at a time", "n_keep": "the state is fixed-size; nothing is evicted",
    "mirostat": "not implemented", "mirostat_tau": "not implemented", "mirostat_eta": "not implemented",
}


class _GraphSet:
    """The bundle's graphs, one runtime context each (RKNN and RKNNLite share ``inference`` and ``release``)."""

    kind = ""
    version: str | None = None  # of the rknn package that runs the graphs
    graphs: list[Any]  # RKNN / RKNNLite objects (untyped packages), None once released

    def run(self, index: int, inputs: list[Floats]) -> list[Floats]:
        # Our inputs are at most 3-D, so the layout flag changes nothing; setting it silences a warning per call.
        outputs: list[Floats] = self._graph(index).inference(inputs=inputs, data_format=["nchw"] * len(inputs))
        return outputs

    def _graph(self, index: int) -> Any:
        return self.graphs[index]

    def release_graph(self, index: int) -> None:
        if self.graphs[index] is not None:
            self.graphs[index].release()
            self.graphs[index] = None

    def release(self) -> None:
        for index in range(len(self.graphs)):
            self.release_graph(index)
        self.graphs = []


class SimulatorGraphs(_GraphSet):
    """rknn-toolkit2's simulator, with each graph rebuilt from the bundle's ONNX (fp16) or hybrid-quantization
    artifacts (w8a8): a .rknn cannot run in the simulator (recurrentgemma-rknn-feasibility.md).

    ``lazy``: build each graph on first use (with ``release_graph`` the host then holds one at a time: building
    takes 20-28 bytes of host RAM per parameter)."""

    kind = "simulator"

    def __init__(self, folder: Path, graphs: Sequence[Mapping[str, Any]], *, lazy: bool = False) -> None:
        try:
            from rknn.api import RKNN  # noqa: F401 - fail here, with the fix, rather than at the first token
        except ImportError as exc:
            raise LibraryNotFoundError(f"the rknn-toolkit2 simulator is not installed ({exc}).",
                                       fix="install it with scripts/install-rknn-toolkit2.sh (x86_64 hosts)") from None
        self.version = _package_version("rknn-toolkit2")
        self.folder = folder
        self.specs = graphs
        self.graphs = [None] * len(graphs)
        if not lazy:
            for index in range(len(graphs)):
                self._graph(index)

    def _graph(self, index: int) -> Any:
        if self.graphs[index] is None:
            self.graphs[index] = self._build(self.specs[index])
        return self.graphs[index]

    def _build(self, graph: Mapping[str, Any]) -> Any:
        from rknn.api import RKNN

        folder = self.folder
        rknn = RKNN(verbose=False)
        sim = graph["simulator"]
        steps: list[tuple[str, Callable[[Any], Any]]]
        if sim["build"] == "float":
            # a multi-shape graph (a prefill graph that also serves as the decode step) is rebuilt with its shapes
            shapes = {"dynamic_input": sim["dynamic_input"]} if sim.get("dynamic_input") else {}
            steps = [("config", lambda r: r.config(target_platform="rk3588", **shapes)),
                     ("load_onnx", lambda r: r.load_onnx(model=str(folder / sim["onnx"]))),
                     ("build", lambda r: r.build(do_quantization=False))]
        else:
            # step 2 reads its config from step 1's files; calling config again can clash with them
            steps = [("hybrid_quantization_step2", lambda r: r.hybrid_quantization_step2(
                model_input=str(folder / sim["model"]), data_input=str(folder / sim["data"]),
                model_quantization_cfg=str(folder / sim["cfg"])))]
        steps.append(("init_runtime", lambda r: r.init_runtime()))
        for step, call in steps:
            if _returns_nonzero(call, rknn):
                rknn.release()
                raise RuntimeInitError(f"rknn-toolkit2 {step} failed for graph {graph['name']}.",
                                       fix="rebuild the bundle with the same rknn-toolkit2 version")
        return rknn


class LiteGraphs(_GraphSet):
    """RKNNLite (rknn-toolkit-lite2) on the board, one context per graph on all three NPU cores.

    A multi-shape prefill graph (fp16 bundles) gets inputs of either of its shapes; that RKNNLite's ``inference``
    switches between the shapes of a ``dynamic_input`` model by itself (rknn_set_input_shapes underneath) is what
    rknn-toolkit2's documentation describes, NOT verified on a board here."""

    kind = "rknnlite"

    def __init__(self, folder: Path, graphs: Sequence[Mapping[str, Any]]) -> None:
        from rknnlite.api import RKNNLite

        self.version = _package_version("rknn-toolkit-lite2")
        self.graphs = []
        try:
            for graph in graphs:
                rknn = RKNNLite(verbose=False)
                self.graphs.append(rknn)
                # RKNNLite both returns -1 and raises on failure; both end here with the same message.
                if _returns_nonzero(rknn.load_rknn, str(folder / graph["rknn"])):
                    raise RuntimeInitError(f"RKNNLite could not load {graph['rknn']}.",
                                           fix="check the librknnrt version on the board (rkedge doctor)")
                if _returns_nonzero(rknn.init_runtime, core_mask=RKNNLite.NPU_CORE_0_1_2):
                    raise RuntimeInitError(f"RKNNLite could not initialise {graph['rknn']} on the NPU.",
                                           fix="run rkedge doctor; check free memory and the rknpu driver")
        except BaseException:
            self.release()  # free the NPU memory of the graphs already loaded
            raise


def _returns_nonzero(call: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
    """``call(*args, **kwargs)`` failed: returned non-zero or raised (the error is printed like a runtime's E line)."""
    try:
        return bool(call(*args, **kwargs) != 0)
    except Exception as exc:  # the toolkit raises bare Exceptions
        print(f"E rkedge-rknn: {type(exc).__name__}: {exc}", file=sys.stderr)
        return True


def _package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # informational only
        return None


class Tokenizer(Protocol):
    """The host-side tokenizer of a bundle."""

    bos: int | None

    def encode(self, text: str) -> list[int]: ...

    def piece(self, token: int) -> bytes:
        """The bytes ``token`` adds to the text decoded so far (empty while a character is incomplete)."""
        ...

    def start(self) -> None:
        """Forget the text decoded so far (a new reply begins)."""
        ...


class ByteTokenizer:
    """id = byte + offset (the byte-level test models)."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.offset = int(spec.get("offset", 3))
        self.bos = spec.get("bos_token_id")

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def piece(self, token: int) -> bytes:
        return bytes([token - self.offset]) if self.offset <= token < self.offset + 256 else b""

    def start(self) -> None:
        """Nothing to reset: a byte needs no context."""


class HfTokenizer:
    """A Hugging Face tokenizer.json through the ``tokenizers`` package (no transformers on the board)."""

    def __init__(self, folder: Path, spec: Mapping[str, Any]) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise LibraryNotFoundError("this model's tokenizer needs the 'tokenizers' package.",
                                       fix="pip install tokenizers") from None
        self.tokenizer = Tokenizer.from_file(str(folder / spec["file"]))
        self.bos = spec.get("bos_token_id")
        self._ids: list[int] = []
        self._text = ""

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ids

    def piece(self, token: int) -> bytes:
        # Decode the running sequence and emit what is new: SentencePiece pieces only read right in context.
        self._ids.append(token)
        text: str = self.tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return b""
        new, self._text = text[len(self._text):], text
        return new.encode("utf-8")

    def start(self) -> None:
        self._ids, self._text = [], ""


def make_tokenizer(folder: Path, spec: Mapping[str, Any]) -> Tokenizer:
    if spec.get("type") == "bytes":
        return ByteTokenizer(spec)
    if spec.get("type") == "tokenizers":
        return HfTokenizer(folder, spec)
    raise InputError(f"unknown tokenizer type {spec.get('type')!r} in the bundle.")


class RknnModel:
    """A model from an RKNN bundle: a :class:`~rkedge.runtime.backend.Backend` (see module docstring)."""

    def __init__(self, bundle_path: str | Path, library: str | None, params: InitParams, on_event: EventHandler,
                 *, verbose: bool = False) -> None:
        self.folder, self.bundle = read_bundle(bundle_path)
        self.features = FEATURES
        self.warnings: list[str] = []
        self._on_event = on_event
        self.init_rc = -1
        graphs = bundle_graphs(self.bundle, prefill=True)
        tokenizer_spec = self.bundle.tokenizer or {}
        with capture_native_output(echo=verbose) as captured:  # rknn-toolkit2 logs to stdout and stderr
            self.graphs: _GraphSet | None = self._open_graphs(library, graphs)
            self.loop = DecodeLoop.from_bundle(self.folder, self.bundle, self.graphs, prefill=True)
            warm_up = tokenizer_spec.get("bos_token_id") or 0
            self.loop.step(warm_up)  # warm-up: first runs print
            if self.loop.prefill_set is not None:  # and the prefill graphs at their chunk length
                self.loop.prefill([warm_up] * self.loop.prefill_set.chunk, logits=False)
            self.loop.reset()
        self.init_log = captured.text
        self._kind = self.graphs.kind
        self.runtime = RuntimeInfo(self.folder, "rknn", self.graphs.version, f"RKNN bundle ({self.graphs.kind})",
                                   self.graphs.kind == "simulator")
        self.tokenizer = make_tokenizer(self.folder, tokenizer_spec)
        eos = tokenizer_spec.get("eos_token_id")
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        _refuse_unsupported(params)
        self.max_new_tokens = params.max_new_tokens or 1024
        self.ignore_eos = bool(params.ignore_eos_token)
        self._rng = np.random.default_rng()
        # Greedy unless asked otherwise, like RKLLM's top_k=1 default.
        self.sampling: dict[str, float] = {"top_k": 1, "top_p": 1.0, "temperature": 1.0, "repeat_penalty": 1.0,
                                           "frequency_penalty": 0.0, "presence_penalty": 0.0}
        self.sampling.update({k: v for k, v in params.items() if k in self.sampling})
        self.init_values: dict[str, Any] = {"max_context_len": NO_CONTEXT_LIMIT,
                                            "max_new_tokens": self.max_new_tokens, **self.sampling}
        self._running = False
        self._abort = False
        self.init_rc = 0

    @property
    def backend(self) -> str:
        """Which engine runs the graphs: ``rknnlite`` (board) or ``simulator``."""
        return self._kind

    @property
    def metadata(self) -> Mapping[str, Any]:
        return self.bundle

    @property
    def encode(self) -> Callable[[str], list[int]]:
        encode: Callable[[str], list[int]] = self.tokenizer.encode
        return encode

    @property
    def alive(self) -> bool:
        return self.graphs is not None and self.init_rc == 0

    def _open_graphs(self, library: str | None, graphs: Sequence[RknnGraph]) -> _GraphSet:
        if library in ("mock", "simulator"):
            return SimulatorGraphs(self.folder, graphs)
        try:
            return LiteGraphs(self.folder, graphs)
        except ImportError:
            pass
        try:
            return SimulatorGraphs(self.folder, graphs)
        except LibraryNotFoundError:
            raise LibraryNotFoundError(
                "neither RKNNLite (rknn-toolkit-lite2, on the board) nor the rknn-toolkit2 simulator is installed.",
                fix="on the board: pip install rknn-toolkit-lite2; on an x86_64 host: scripts/install-rknn-toolkit2.sh"
            ) from None

    # -- runs -----------------------------------------------------------------------------------------------

    def run(self, run_id: int, request: RunRequest) -> int:
        if request.lora_name or request.prompt_cache_path:
            raise InputError("LoRA adapters and prompt caches are not supported by the RKNN backend.")
        self._running, self._abort = True, False
        try:
            return self._generate(run_id, request)
        except Exception as exc:  # the runtime reports ERROR, like librkllmrt
            print(f"E rkedge-rknn: {type(exc).__name__}: {exc}", file=sys.stderr)
            self._on_event(run_id, RunEvent(CallState.ERROR, None, -1))
            return -1
        finally:
            self._running = False

    def _generate(self, run_id: int, request: RunRequest) -> int:
        started = time.perf_counter()
        if request.token_ids is not None:
            tokens = list(request.token_ids)
        else:
            tokens = self.tokenizer.encode((request.prompt or b"").decode("utf-8"))
        if self.loop.position == 0 and self.tokenizer.bos is not None:
            tokens = [int(self.tokenizer.bos), *tokens]
        if not tokens:
            raise InputError("empty prompt")
        # full chunks through the prefill graphs when the bundle has them (a chat turn: only its new tokens, from
        # the kept state), the rest through the decode step
        logits = self.loop.prefill(tokens, stop=lambda: self._abort)
        prefill_done = time.perf_counter()
        generated = 0
        paused = False
        if request.mode != InferMode.GENERATE and logits is not None:
            values = np.asarray(logits, dtype=np.float32)
            self._on_event(run_id, RunEvent(CallState.NORMAL, None, -1, None, _as_array(values), 1, values.size))
        elif logits is not None:
            limit = request.max_new_tokens or self.max_new_tokens
            sampling = dict(self.sampling)
            if request.sampling is not None:
                _refuse_unsupported(request.sampling)
                sampling.update({k: getattr(request.sampling, k) for k in self.sampling
                                 if getattr(request.sampling, k) is not None})
            history = list(tokens[-PENALTY_WINDOW:])
            self.tokenizer.start()
            while not self._abort and logits is not None:
                token = _sample(logits, self._rng, history, top_k=int(sampling["top_k"]), top_p=sampling["top_p"],
                                temperature=sampling["temperature"], repeat_penalty=sampling["repeat_penalty"],
                                frequency_penalty=sampling["frequency_penalty"],
                                presence_penalty=sampling["presence_penalty"])
                if token in self.eos and not self.ignore_eos:
                    break
                history = [*history[1 - PENALTY_WINDOW:], token]
                ret = self._on_event(run_id, RunEvent(CallState.NORMAL, self.tokenizer.piece(token), token))
                generated += 1
                paused = ret == 1
                last = generated >= limit or paused or self._abort
                logits = self.loop.step(token, logits=not last)
                if last:
                    break
        finished = time.perf_counter()
        if not paused:
            perf = PerfStats((prefill_done - started) * 1000, len(tokens), (finished - prefill_done) * 1000, generated,
                             process_rss_mb() or 0.0)
            self._on_event(run_id, RunEvent(CallState.FINISH, None, -1, perf))
        if not paused and not request.keep_history:
            self.loop.reset()
        return 0

    def forget_run(self, run_id: int) -> None:
        """Nothing is kept per run (librkllmrt's async runs keep their buffers until here)."""

    def abort(self) -> None:
        self._abort = True

    def is_running(self) -> bool:
        return self._running

    # -- cache and the rest of the librkllmrt surface --------------------------------------------------------

    def clear_kv_cache(self, keep_system_prompt: bool = False, start: list[int] | None = None,
                       end: list[int] | None = None) -> None:
        if start is not None or end is not None:
            raise InputError("a recurrent state has no positions to clear a range of.",
                             fix="clear the whole state (clear_kv_cache() without start/end)")
        if self._running:
            raise GenerationError("the RKNN state cannot be cleared while a generation is running.",
                                  fix="wait for the generation to end, or abort it")
        self.loop.reset()  # a recurrent state has no system-prompt part to keep

    def kv_cache_sizes(self, batches: int = 1) -> list[int]:
        return [self.loop.position] * max(batches, 1)

    def set_chat_template(self, system_prompt: str, prefix: str, postfix: str) -> None:
        raise InputError("the RKNN backend has no embedded chat template (rkedge renders it).")

    def set_function_tools(self, system_prompt: str, tools_json: str, tool_response_str: str) -> None:
        raise InputError("function tools are not supported by the RKNN backend.")

    def load_lora(self, path: str, name: str, scale: float) -> None:
        raise InputError(f"the RKNN backend cannot load LoRA adapters ({path}).",
                         fix="merge the adapter before converting: rkedge convert --backend rknn --lora ADAPTER")

    def load_prompt_cache(self, path: str) -> None:
        raise InputError(f"the RKNN backend has no prompt caches ({path}).",
                         fix="send the whole prompt instead")

    def release_prompt_cache(self) -> None:
        """Nothing to release: this backend never loads a prompt cache."""

    def close(self) -> None:
        if self.graphs is not None:
            self._abort = True
            self.graphs.release()
            self.graphs = None
        self.init_rc = -1


def _refuse_unsupported(values: Any) -> None:
    """A value must never be silently dropped: refuse the librkllmrt parameters this backend cannot honour."""
    for name, why in UNSUPPORTED_PARAMS.items():
        value = getattr(values, name, None)
        if value not in (None, 0):
            raise InputError(f"{name}={value} is not supported by the RKNN backend ({why}).", fix=f"leave {name} unset")


def _sample(logits: Floats, rng: np.random.Generator, history: list[int], *, top_k: int, top_p: float,
            temperature: float, repeat_penalty: float, frequency_penalty: float, presence_penalty: float) -> int:
    scores = logits.astype(np.float64)
    if history and (repeat_penalty != 1.0 or frequency_penalty or presence_penalty):
        seen, counts = np.unique(np.asarray(history), return_counts=True)
        picked = scores[seen]
        if repeat_penalty != 1.0:  # llama.cpp's rule: shrink positive logits, push negative ones further down
            picked = np.where(picked > 0, picked / repeat_penalty, picked * repeat_penalty)
        scores[seen] = picked - counts * frequency_penalty - presence_penalty
    if top_k == 1 or temperature <= 0:
        return int(np.argmax(scores))
    scaled = scores / max(temperature, 1e-5)
    if top_k and 0 < top_k < scaled.size:
        cut = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled >= cut, scaled, -np.inf)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < top_p  # the smallest prefix reaching top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0)
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))


def _as_array(values: Floats) -> array[float]:
    return array("f", values.astype(np.float32).tobytes())
