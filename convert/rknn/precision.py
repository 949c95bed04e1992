"""Quality-targeted mixed precision for the RKNN backend's w8a8 build: which parts of the model stay in fp16.

A part is one op group of one layer (the RG-LRU gate chain, the conv1d, the recurrent block's projections, the
MLP, the attention block, the layer's state I/O) or the LM head. The search (:func:`choose`) starts from plain
w8a8, measures each part's effect when it alone is kept in fp16 (KL to transformers, teacher-forced on held-out
text in the simulator), then keeps parts in the order of KL removed per predicted board millisecond until the
quality target holds, and finally drops any kept part the target does not need. A part's cost is what keeping it
in fp16 adds to a decode step on the board: one more byte per weight (and per state element, read and written)
at the perf model's fitted bandwidth (the bandwidth-bound model of ``rkedge plan``, convert/rknn_plan.py).

Why KL ranks the parts and top-1/NLL judge the target: over a few hundred steps top-1 moves by 1/steps per
flipped near-tie and NLL deltas of single parts are within noise, while KL falls steadily with each part that
matters (recurrentgemma-rknn-feasibility.md section 5). A variant costs no build: the simulator rebuilds each
graph from the hybrid-quantization files with a cfg naming the fp16 tensors (hybrid_quantization_step2), so
every variant is one simulator run of the search text; the number of runs is capped (:func:`search_plan`).

No torch or numpy at import (the chooser is pure; the pipeline supplies the measurements).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rkedge.convert.findings import Finding
from rkedge.errors import InputError

SOURCE = "recurrentgemma-rknn-feasibility.md section 5; convert/rknn/precision.py"
#: One more byte per weight in fp16 than in w8a8 (w8a8 carries ~0.15% of per-channel scales; rknn_plan).
FP16_EXTRA_BYTES_PER_WEIGHT = 2.0 - 1.0015
#: Op groups, in the order the table lists them.
GROUPS = ("rg_lru", "conv1d", "linear", "attention", "mlp", "state", "head")
GROUP_WHAT = {"rg_lru": "RG-LRU gate chain", "conv1d": "conv1d", "linear": "recurrent block projections",
              "attention": "attention block", "mlp": "MLP", "state": "state I/O", "head": "LM head"}
#: Simulator runs the search may make (plain w8a8, one per part, the greedy additions and the pruning). The
#: tiny test models have 14-26 parts; at 2b width (26 layers, ~100 parts) the search falls back to op groups
#: over all layers (:func:`search_plan`).
MAX_EVALUATIONS = 64
#: ... and the time they may take, from the simulator's predicted time per run (a run at 2b width rebuilds ~4
#: graphs of ~1 GB, ~2-3 minutes each, then teacher-forces the steps at about a minute each).
SEARCH_BUDGET_S = 3600.0


@dataclass(frozen=True)
class QualityTarget:
    """What a w8a8 build must reach against the float model: top-1 agreement >= ``top1`` and |NLL delta| <=
    ``nll_pct`` percent."""

    top1: float = 0.95
    nll_pct: float = 1.0

    @classmethod
    def parse(cls, text: str | QualityTarget | None) -> QualityTarget:
        """``top1=0.95,nll=1.0`` (either key may be left out; top-1 as a fraction or a percentage)."""
        if isinstance(text, QualityTarget):
            return text
        if text is None or not text.strip() or text.strip() == "default":
            return cls()
        values: dict[str, float] = {}
        for item in text.split(","):
            key, sep, value = item.partition("=")
            key = key.strip().lower().replace("-", "").replace("_", "")
            try:
                number = float(value)
            except ValueError:
                number = float("nan")
            if not sep or key not in ("top1", "nll") or number != number or number < 0:
                raise InputError(f"--quality-target {text!r}: {item.strip()!r} is not top1=<fraction> or "
                                 "nll=<percent>.", fix="write e.g. --quality-target top1=0.95,nll=1.0")
            values[key] = number
        top1 = values.get("top1", cls.top1)
        top1 = top1 / 100 if top1 > 1 else top1
        return cls(top1=top1, nll_pct=values.get("nll", cls.nll_pct))

    def met(self, quality: Mapping[str, Any]) -> bool:
        return not self.shortfalls(quality)

    def shortfalls(self, quality: Mapping[str, Any]) -> list[str]:
        out = []
        if quality["top1_agreement"] < self.top1:
            out.append(f"top-1 agreement {quality['top1_agreement'] * 100:.1f}% < {self.top1 * 100:g}%")
        if abs(quality["nll_delta_pct"]) > self.nll_pct:
            out.append(f"|NLL delta| {abs(quality['nll_delta_pct']):.2f}% > {self.nll_pct:g}%")
        return out

    def distance(self, quality: Mapping[str, Any]) -> float:
        """How far ``quality`` is from the target, in percentage points (0 when met): picks the closest variant
        when none meets it."""
        return max(0.0, self.top1 - quality["top1_agreement"]) * 100 \
            + max(0.0, abs(quality["nll_delta_pct"]) - self.nll_pct)

    def to_dict(self) -> dict[str, float]:
        return {"top1": self.top1, "nll_delta_pct": self.nll_pct}

    def describe(self) -> str:
        return f"top-1 >= {self.top1 * 100:g}% and |NLL delta| <= {self.nll_pct:g}%"


@dataclass(frozen=True)
class Part:
    """One part that can be kept in fp16: ``patterns`` (regexes over the tensor names of the step-1 quantization
    cfg) apply to the graphs named in ``graphs`` only (the chunk graphs' tensor names repeat: /blocks.0/ is the
    first layer of every chunk)."""

    name: str
    group: str
    layers: tuple[int, ...]
    graphs: tuple[str, ...]
    patterns: tuple[str, ...]
    weights: int  # parameters read per token that become fp16
    state_elements: int = 0  # state values read and written per token that become fp16
    members: tuple[Part, ...] = ()  # a merged part's per-layer parts (their patterns apply to their own graphs)

    @property
    def extra_bytes(self) -> float:
        """What keeping the part in fp16 adds to one decode step's DRAM traffic on the board."""
        return self.weights * FP16_EXTRA_BYTES_PER_WEIGHT + 2 * self.state_elements


@dataclass(frozen=True)
class GraphLayers:
    """Which model layers a chunk graph holds (the search needs no more of the graph)."""

    name: str
    layers: tuple[int, ...]


def layer_parts(dims: Any, graphs: Sequence[GraphLayers], heads: Sequence[str]) -> list[Part]:
    """Every part of a RecurrentGemma of shape ``dims`` (a GriffinShape) built as ``graphs`` + ``heads``."""
    parts: list[Part] = []
    width, hidden, mlp = dims.lru_width, dims.hidden, dims.mlp_width
    for graph in graphs:
        for local, layer in enumerate(graph.layers):
            block = rf"^/blocks\.{local}/"
            mlp_part = Part(f"L{layer}.mlp", "mlp", (layer,), (graph.name,), (block + "mlp/",), 3 * hidden * mlp)
            if dims.kinds[layer] == "recurrent":
                gates = 2 * dims.heads * (width // dims.heads) ** 2 + 2 * width
                states = (f"h{layer}", f"conv{layer}")
                parts += [
                    Part(f"L{layer}.rg_lru", "rg_lru", (layer,), (graph.name,), (block + "rg_lru/",), gates),
                    Part(f"L{layer}.conv1d", "conv1d", (layer,), (graph.name,), (block + "conv1d/",),
                         width * dims.conv_width + width),
                    Part(f"L{layer}.linear", "linear", (layer,), (graph.name,),
                         (block + "linear_(x|y|out)/", block + r"Mul_\d+_output"), 3 * hidden * width),
                    mlp_part,
                    Part(f"L{layer}.state", "state", (layer,), (graph.name,), _state_patterns(states), 0,
                         width + (dims.conv_width - 1) * width)]
            else:
                kv = dims.kv_heads * dims.head_dim
                states = (f"k{layer}", f"v{layer}")
                parts += [
                    # everything of the attention block but its MLP: q/k/v/o, RoPE, scores, softmax
                    Part(f"L{layer}.attention", "attention", (layer,), (graph.name,), (block + "(?!mlp/)",),
                         2 * hidden * dims.heads * dims.head_dim + 2 * hidden * kv),
                    mlp_part,
                    Part(f"L{layer}.state", "state", (layer,), (graph.name,), _state_patterns(states), 0,
                         2 * (dims.window - 1) * kv)]
    if heads:
        # the head graph's layer outputs (named /...) and its input's transpose: not the initializers (onnx::...)
        # nor the I/O quantize tensors (*_int8), which custom_quantize_layers refuses as operands
        parts.append(Part("head", "head", (), tuple(heads), (r"^/", r"^x_tp_rs$"), dims.vocab * hidden))
    return parts


def _state_patterns(names: Sequence[str]) -> tuple[str, ...]:
    joined = "|".join(re.escape(n) for n in names)
    return (rf"^({joined})_rs$", rf"^new_({joined})-rs$")


def group_parts(parts: Sequence[Part]) -> list[Part]:
    """The parts merged by op group over all layers: the coarse search for models whose per-layer search would
    take too many simulator runs."""
    out = []
    for group in GROUPS:
        members = [p for p in parts if p.group == group]
        if not members:
            continue
        if len(members) == 1:
            out.append(members[0])
            continue
        graphs = tuple(dict.fromkeys(g for p in members for g in p.graphs))
        patterns = tuple(dict.fromkeys(q for p in members for q in p.patterns))  # for the record only
        out.append(Part(f"all.{group}", group, tuple(layer for p in members for layer in p.layers), graphs,
                        patterns, sum(p.weights for p in members), sum(p.state_elements for p in members),
                        tuple(members)))
    return out


def patterns_by_graph(parts: Sequence[Part], graph_names: Sequence[str]) -> dict[str, list[str]]:
    """The fp16 patterns each graph gets when ``parts`` are kept in fp16."""
    out: dict[str, list[str]] = {name: [] for name in graph_names}
    for part in parts:
        # a merged part applies each member's patterns to that member's graphs only: /blocks.0/ is another layer
        # in every chunk graph
        for member in part.members or (part,):
            for graph in member.graphs:
                out.setdefault(graph, [])
                out[graph] += [p for p in member.patterns if p not in out[graph]]
    return out


@dataclass(frozen=True)
class CostModel:
    """Predicted board time of one decode step: plain w8a8 traffic plus what the fp16 parts add, at the fitted
    bandwidth (the same physical model as ``rkedge plan``)."""

    base_bytes: float  # a plain-w8a8 decode step's DRAM traffic
    bandwidth_gbs: float
    total_weights: int  # weights on the NPU (layers + LM head), for the fp16 share

    def ms(self, part: Part) -> float:
        return part.extra_bytes / (self.bandwidth_gbs * 1e9) * 1000

    def tokens_per_s(self, parts: Sequence[Part]) -> float:
        total = self.base_bytes + sum(p.extra_bytes for p in parts)
        return self.bandwidth_gbs * 1e9 / total

    def fp16_share(self, parts: Sequence[Part]) -> float:
        return sum(p.weights for p in parts) / max(1, self.total_weights)


def cost_model(dims: Any) -> CostModel:
    """From the model's shape: :func:`rkedge.convert.rknn_plan.predict_griffin`'s traffic without its fixed
    hybrid set."""
    from rkedge.convert.perf_model import load_perf_model
    from rkedge.convert.rknn_plan import predict_griffin

    prediction = predict_griffin(dims, "w8a8")
    total = dims.layer_params + dims.vocab * dims.hidden
    return CostModel(prediction.bytes_per_token - prediction.hybrid_extra_bytes, load_perf_model().bandwidth_gbs,
                     total)


Quality = Mapping[str, Any]
Evaluate = Callable[[Sequence[Part]], Quality]


def worst(qualities: Sequence[Quality]) -> dict[str, Any]:
    """One verdict over several texts: the lowest top-1, the NLL delta farthest from 0, the mean KL (which ranks
    the parts)."""
    if len(qualities) == 1:
        return dict(qualities[0])
    return {**qualities[0], "top1_agreement": min(q["top1_agreement"] for q in qualities),
            "nll_delta_pct": max((q["nll_delta_pct"] for q in qualities), key=abs),
            "kl_divergence": round(sum(q["kl_divergence"] for q in qualities) / len(qualities), 5),
            "steps": sum(q["steps"] for q in qualities), "texts": len(qualities)}


@dataclass
class Choice:
    """The search's outcome: the parts kept in fp16, their quality on the search text, and every variant run."""

    target: QualityTarget
    chosen: list[Part]
    quality: Quality
    met: bool
    table: list[dict[str, Any]] = field(default_factory=list)
    granularity: str = "layer"

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target.to_dict(), "chosen": [p.name for p in self.chosen], "search_met": self.met,
                "granularity": self.granularity, "evaluations": len(self.table), "table": self.table}


def choose(parts: Sequence[Part], evaluate: Evaluate, target: QualityTarget, costs: CostModel, *,
           max_evaluations: int = MAX_EVALUATIONS, granularity: str = "layer") -> Choice:
    """The fewest parts (cheapest first when it is a tie) whose fp16 keeps ``evaluate``'s quality on target.

    1. plain w8a8 (no part): done if it meets the target;
    2. each part alone in fp16: its KL reduction per predicted millisecond ranks it (parts that do not reduce KL
       go last, cheapest first);
    3. parts added in that order, each set evaluated, until one meets the target;
    4. each kept part, least useful first, dropped if the rest still meet the target;
    5. a single part that met the target alone replaces the set when it costs fewer predicted milliseconds.
    When no set meets it, the closest evaluated variant is chosen and ``met`` is False. ``max_evaluations`` caps
    the runs of ``evaluate`` (a cut search keeps what it found)."""
    table: list[dict[str, Any]] = []
    seen: dict[frozenset[str], Quality] = {}

    def run(kept: Sequence[Part], label: str) -> Quality | None:
        key = frozenset(p.name for p in kept)
        if key in seen:
            return seen[key]
        if len(table) >= max_evaluations:
            return None
        quality = evaluate(kept)
        seen[key] = quality
        table.append(row(label, kept, quality, costs, target))
        return quality

    base = run([], "plain w8a8")
    assert base is not None  # the first run is always within the cap
    best: tuple[list[Part], Quality] = ([], base)

    def consider(kept: list[Part], quality: Quality) -> None:
        nonlocal best
        if target.distance(quality) < target.distance(best[1]) or (
                target.distance(quality) == target.distance(best[1]) == 0 and len(kept) < len(best[0])):
            best = (list(kept), quality)

    if target.met(base):
        return Choice(target, [], base, True, table, granularity)
    gains: dict[str, float] = {}
    for part in parts:
        single = run([part], f"+ {part.name}")
        if single is None:
            break
        gains[part.name] = base["kl_divergence"] - single["kl_divergence"]
        consider([part], single)
    singles = [p for p in parts if p.name in gains and target.met(seen[frozenset([p.name])])]

    def rank(part: Part) -> tuple[int, float]:
        gain = gains.get(part.name, 0.0)
        if gain <= 0:
            return (1, costs.ms(part))
        return (0, -gain / max(costs.ms(part), 1e-9))

    order = sorted(parts, key=rank)
    kept: list[Part] = []
    reached: Quality | None = None
    for part in order:
        kept.append(part)
        quality = run(kept, f"+ {part.name}" if len(kept) == 1 else f"{kept[0].name} .. + {part.name}")
        if quality is None:
            kept.pop()
            break
        consider(kept, quality)
        if target.met(quality):
            reached = quality
            break
    if reached is None:
        if singles:  # the cut search found no set; a part that meets it alone does
            cheapest = min(singles, key=costs.ms)
            return Choice(target, [cheapest], seen[frozenset([cheapest.name])], True, table, granularity)
        return Choice(target, best[0], best[1], False, table, granularity)
    for part in sorted(kept[:-1], key=rank, reverse=True):  # the last part added was needed to reach it
        trial = [p for p in kept if p is not part]
        quality = run(trial, f"chosen - {part.name}")
        if quality is None:
            break
        if target.met(quality):
            kept, reached = trial, quality
    cheapest_single = min(singles, key=costs.ms, default=None)
    if cheapest_single is not None and costs.ms(cheapest_single) < sum(costs.ms(p) for p in kept):
        return Choice(target, [cheapest_single], seen[frozenset([cheapest_single.name])], True, table, granularity)
    return Choice(target, kept, reached, True, table, granularity)


def row(label: str, kept: Sequence[Part], quality: Quality, costs: CostModel, target: QualityTarget
        ) -> dict[str, Any]:
    return {"variant": label, "parts": [p.name for p in kept], "fp16_share": round(costs.fp16_share(kept), 4),
            "top1_agreement": quality["top1_agreement"], "nll_delta_pct": quality["nll_delta_pct"],
            "kl_divergence": quality["kl_divergence"], "tokens_per_s": round(costs.tokens_per_s(kept), 2),
            "meets_target": target.met(quality)}


def render_table(table: Sequence[Mapping[str, Any]], chosen: Sequence[str] | None = None) -> list[str]:
    """The trade-off table as text lines (CLI output, benchmark)."""
    width = max([len("variant"), *(len(r["variant"]) for r in table)])
    lines = [f"{'variant':<{width}}  {'fp16 share':>10}  {'top-1':>6}  {'NLL delta':>9}  {'KL':>8}  "
             f"{'tokens/s':>8}"]
    for r in table:
        mark = " *" if chosen is not None and sorted(r["parts"]) == sorted(chosen) else ""
        lines.append(f"{r['variant']:<{width}}  {r['fp16_share'] * 100:>9.2f}%  {r['top1_agreement'] * 100:>5.1f}%  "
                     f"{r['nll_delta_pct']:>+8.2f}%  {r['kl_divergence']:>8.5f}  {r['tokens_per_s']:>8.2f}{mark}")
    return lines


@dataclass(frozen=True)
class SearchPlan:
    parts: list[Part]
    granularity: str  # "layer" | "group" | "none"
    max_evaluations: int
    seconds_per_evaluation: float


def search_plan(parts: Sequence[Part], seconds_per_evaluation: float, *, budget_s: float = SEARCH_BUDGET_S,
                max_evaluations: int = MAX_EVALUATIONS, granularity: str | None = None) -> SearchPlan:
    """Per-layer parts when their search fits (plain + one run per part + a few greedy steps), else op groups
    over all layers, else no search (``granularity`` "none": the caller keeps its fixed set). ``granularity``
    "layer" or "group" asks for one (still within the budget's run count)."""
    affordable = min(max_evaluations, int(budget_s // max(seconds_per_evaluation, 1e-9)))
    fine = list(parts)
    if granularity not in (None, "auto", "layer", "group"):
        raise InputError(f"precision granularity {granularity!r} is not layer or group.", fix="use layer or group")
    if granularity == "group" and affordable >= 2:
        return SearchPlan(group_parts(fine), "group", affordable, seconds_per_evaluation)
    if granularity == "layer" and affordable >= 2:
        return SearchPlan(fine, "layer", affordable, seconds_per_evaluation)
    if affordable >= len(fine) + 4:
        return SearchPlan(fine, "layer", affordable, seconds_per_evaluation)
    coarse = group_parts(fine)
    if affordable >= len(coarse) + 2:
        return SearchPlan(coarse, "group", affordable, seconds_per_evaluation)
    return SearchPlan([], "none", affordable, seconds_per_evaluation)


# --- calibration text and the honest defaults --------------------------------------------------------------

#: Plain-text calibration: paragraphs (split at blank lines) merged or cut to about this many characters each.
TEXT_PROMPT_CHARS = 400
#: The share of a calibration set held out for the search and the quality report (at least one prompt).
HELD_OUT_SHARE = 0.2


def text_prompts(text: str, size: int = TEXT_PROMPT_CHARS) -> list[str]:
    """A plain-text calibration file as prompts: paragraphs split at blank lines, short ones merged up to
    ``size`` characters and long ones cut at line ends (or at ``size`` when a line is longer)."""
    paragraphs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")) if p.strip()]
    prompts: list[str] = []
    current = ""
    for paragraph in paragraphs:
        for piece in _cut(paragraph, 2 * size):
            if current and len(current) + len(piece) + 1 > size:
                prompts.append(current)
                current = ""
            current = f"{current}\n{piece}" if current else piece
    if current:
        prompts.append(current)
    return prompts


def _cut(paragraph: str, limit: int) -> list[str]:
    if len(paragraph) <= limit:
        return [paragraph]
    pieces, current = [], ""
    for line in paragraph.splitlines(keepends=True):
        while len(line) > limit:
            pieces.append(line[:limit])
            line = line[limit:]
        if len(current) + len(line) > limit and current:
            pieces.append(current.rstrip("\n"))
            current = ""
        current += line
    if current.strip():
        pieces.append(current.rstrip("\n"))
    return pieces


def hold_out(prompts: Sequence[str], share: float = HELD_OUT_SHARE) -> tuple[list[str], list[str]]:
    """(calibration, held out): every k-th prompt held out (spread over the set, not its end), at least one, and
    none when the set has a single prompt."""
    if len(prompts) < 2:
        return list(prompts), []
    count = max(1, round(len(prompts) * share))
    stride = len(prompts) / count
    held = {min(len(prompts) - 1, int(stride * (i + 0.5))) for i in range(count)}
    return ([p for i, p in enumerate(prompts) if i not in held], [p for i, p in enumerate(prompts) if i in held])


def domain_findings(*, has_chat_template: bool, dtype: str, calibration: str | None, eval_text: object) -> \
        list[Finding]:
    """Warnings for a model without a chat template (a base or code model) measured or calibrated on the
    built-in chat prompts and English paragraph, which may be out of its domain."""
    if has_chat_template:
        return []
    builtin_calibration = dtype == "w8a8" and calibration in (None, "auto")
    if not builtin_calibration and eval_text is not None:
        return []
    uses = []
    if builtin_calibration:
        uses.append("w8a8 calibrates on the built-in chat prompts")
    if eval_text is None and calibration in (None, "auto"):
        uses.append("the quality report reads a built-in English paragraph")
    if not uses:
        return []  # the quality report reads text held out from the user's calibration set
    return [Finding("rknn.domain", "warning",
                    f"this model has no chat template (a base or code model?): {' and '.join(uses)}, which may be "
                    "out of its domain; figures and the fp16 choice can then mislead (issue 16: a code model "
                    "measured top-1 90.2%, NLL -4.2% this way).",
                    "pass --calibration FILE.txt with text like the model's own (code, prose...; the quality "
                    "report then uses a held-out part of it) and/or --eval-text HELD_OUT.txt", SOURCE)]


def below_target_finding(quality: Quality, target: QualityTarget, *, dtype: str, searched: bool,
                         calibration_given: bool) -> Finding | None:
    """The warning of a build whose quality report misses ``target``, with what to try."""
    shortfalls = target.shortfalls(quality)
    if not shortfalls:
        return None
    tries = []
    if not calibration_given and dtype == "w8a8":
        tries.append("calibrate on in-domain text (--calibration FILE.txt)")
    if dtype == "w8a8":
        tries.append("let the search keep more in fp16 (drop manual patterns; a larger search budget)" if not searched
                     else "a larger or more representative calibration set")
        tries.append("--dtype fp16 (about twice the weight bytes per token)")
    tries.append(f"or accept a lower --quality-target than {target.describe()}")
    return Finding("rknn.quality_target", "warning",
                   f"this build is below its quality target ({target.describe()}): {'; '.join(shortfalls)}.",
                   "try: " + "; ".join(tries), SOURCE)
