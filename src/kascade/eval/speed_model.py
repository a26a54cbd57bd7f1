"""What each eval method attends and what its decode step would cost, from the method's own definition.

Two numbers per (method, budget, length) row of an eval summary, for the Pareto chart of the report:

* **attended-key fraction** (``attended_fraction`` per layer, ``mean_attended_fraction``): in a decode step,
  the keys a layer attends divided by the row's keys, averaged over the decode steps of every cell and then
  over layers (dense layers count 1). Cells that carry the runner's measured ``attended_fraction`` (the
  decode probe counts the keys of each keep mask) give it as measured; older cells (e.g.
  results/eval_qwen_gpu) do not, and then it follows from the method's definition at each decode step's
  key count: k = topk_budget(n) keys on a sparse layer, Quest's pages of 16. Also
  ``mean_prefill_attended_fraction``: attended (query, key) pairs over causal pairs of the prompt
  (rolling tiles for Kascade's sparse prefill, sinks + window for StreamingLLM, 1 for dense prefill).
* **modelled decode speedup** (``model_speedup``, the name `kascade bench decode` gives the same quantity):
  `kascade bench decode` measures, at one (context, batch, Top-k fraction, head geometry) point, the best
  dense decode kernel and Kascade's three decode kernels, as ``ratio_to_dense``: ``layer0`` (dense output +
  Top-k selection), ``anchor`` (selection + sparse attention) and ``reuse`` (sparse attention over given
  indices), and models a model as layers x dense / (sum of its layers' kernel times). Here each method's
  decode step is written as the kernel each of its layers would run (``model_kernels``), and the same
  measured ratios give ``model_speedup = layers / sum of the layers' ratios``. Only methods whose every
  layer is one of those measured kernels are modelled; for the others (per-query-head selections, page
  summaries, per-layer or adaptive budgets, re-ranking) no committed measurement says what they cost, and
  they get no speedup (the report puts them on the attended-fraction panel only).

No number here is invented: the ratios come from one committed bench JSON (path, sha256, device and commit
are recorded), for budgets the bench measured (others get no speedup).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from ..baselines import make_method, method_base
from ..budget import topk_budget
from ..plan import ModelSpec, Plan, PlanError
from ..validation import KascadeInputError
from .report import label

# The bench point the decode target is stated at (128K, batch 64: "4.64x today").
DEFAULT_BENCH = Path("benchmarks") / "results" / "decode_b64.json"
DEFAULT_CONTEXT = 131072
DEFAULT_BATCH = 64
KERNELS = ("dense", "layer0", "anchor", "reuse")


@dataclass(frozen=True)
class MethodLayers:
    """One method's per-layer behaviour: what each layer attends in decode and prefill and, where a measured
    kernel does exactly that layer's work, which kernel (``decode_kernels`` is None when some layer has none).

    decode_attend: per layer "all" (every key), "budget" (k = topk_budget(n) keys), "pages" (Quest: its top
    pages of ``page_size`` keys) or "variable" (adaptive: only a measurement says). prefill_attend: per layer
    "all", "rolling" (Kascade's tiles: k of the tile's prefix + the tile causally) or "streaming" (sinks +
    window of topk_budget(position + 1) keys)."""

    name: str
    decode_attend: tuple[str, ...]
    prefill_attend: tuple[str, ...]
    decode_kernels: tuple[str, ...] | None
    how: str
    tile_size: int = 32
    page_size: int = 16
    min_pages: int = 3


def method_layers(name: str, plan: Plan | None, spec: ModelSpec, topk_fraction: float | None = 0.1,
                  topk_floor: int = 128) -> MethodLayers:
    """The per-layer description of eval method ``name``, read off the method object `kascade eval` builds
    (its plan's anchors, its baseline's dense and selection layers)."""
    frac = 0.1 if topk_fraction is None else topk_fraction
    m = make_method(name, plan, spec, frac, topk_floor)
    base = method_base(name)
    L = spec.num_layers
    all_ = ("all",) * L
    if base == "dense":
        return MethodLayers(name, all_, all_, ("dense",) * L, "every layer the best dense decode kernel (ratio 1)")
    if base.startswith("kascade") or base == "oracle":
        p = m.plan
        attend = ("all",) + ("budget",) * (L - 1)
        sparse_prefill = getattr(m, "sparse_prefill", False)
        prefill = ("all",) + ("rolling",) * (L - 1) if sparse_prefill else all_
        kascade_kernels = tuple("layer0" if j == 0 else "anchor" if p.is_anchor(j) else "reuse" for j in range(L))
        anchors = f"{len(p.anchor_layers)} anchors of {L} layers"
        kernels, how = None, ""
        if base in ("kascade", "kascade_decode_only", "kascade_no_remap"):
            kernels = kascade_kernels
            how = f"layer 0 the layer-0 kernel, {anchors}: anchor kernel, the rest reuse kernel (as the bench)"
        elif base == "kascade_sinks_window":
            kernels = kascade_kernels
            how = (f"as kascade ({anchors}): the same kernels and keys per layer, the sinks and window forced into "
                   "each anchor's set (run with the reference selection in the eval)")
        elif base == "kascade_dense_tail":
            kernels = kascade_kernels
            how = (f"as kascade in decode ({anchors}); its prefill also attends the last {m.tokens} queries of each "
                   "prefill pass densely (not in the prefill attended share)")
        elif base == "kascade_all_anchors":
            kernels = ("layer0",) + ("anchor",) * (L - 1)
            how = "layer 0 the layer-0 kernel, every other layer the anchor kernel (no reuse)"
        elif base == "oracle":
            how = "not modelled: each query head its own exact Top-k; no measured kernel selects or gathers per query head"
        elif base == "kascade_all_heads_pooled":
            how = "not modelled: one set pooled over all heads; the measured anchor kernel pools per GQA group"
        elif base == "kascade_pre_softmax":
            how = "not modelled: pools raw scores; the measured anchor kernel pools post-softmax probabilities"
        elif base == "kascade_layer_budget":
            how = "not modelled: per-layer budgets; the bench measured the reuse kernel at one budget per point"
        elif base == "kascade_top_p":
            attend = ("all",) + ("variable",) * (L - 1)
            how = "not modelled: an adaptive budget; the bench measured fixed budgets"
        elif base == "kascade_two_sets":
            how = ("not modelled: reuse layers read k keys as the reuse kernel does, but each anchor runs a second "
                   "Top-k (all heads pooled) that the measured anchor kernel does not")
        elif base == "kascade_rerank":
            how = "not modelled: reuse layers also read and rank the anchor's 2k candidates; no measured kernel does"
        else:
            how = f"not modelled: no cost model for {base}"
        return MethodLayers(name, attend, prefill, kernels, how, tile_size=p.tile_size)
    if base == "streamingllm":
        return MethodLayers(name, ("budget",) * L, ("streaming",) * L, ("reuse",) * L,
                            "every layer the reuse kernel over its 4 sinks + recent window (the same k keys per KV "
                            "head; a contiguous window can only be cheaper)")
    if base == "quest":
        dense = set(m.dense_layers)
        attend = tuple("all" if j in dense else "pages" for j in range(L))
        return MethodLayers(name, attend, all_, None,
                            "not modelled: per-query-head page sets and page min/max scoring; no measured kernel",
                            page_size=m.page_size, min_pages=m.min_pages)
    if base in ("omnikv", "lessismore", "tidaldecode"):
        sel = set(m.selection_layers)
        first = min(sel)
        attend = tuple("all" if j < first or j in sel else "budget" for j in range(L))
        if base == "tidaldecode":
            return MethodLayers(name, attend, all_, None,
                                "not modelled: reuse layers attend each query head's own set; the measured reuse "
                                "kernel gathers one set per KV head")
        kernels = tuple("dense" if j < first else "layer0" if j in sel else "reuse" for j in range(L))
        return MethodLayers(name, attend, all_, kernels,
                            f"layers before {first} the dense kernel; selection layers {sorted(sel)} the layer-0 "
                            "kernel (dense output + a Top-k selection over the same scores); the rest the reuse "
                            "kernel (one set shared by all heads: the same k keys per KV head)")
    raise ValueError(f"no per-layer description for method {name!r}")


def kernel_counts(kernels: tuple[str, ...]) -> dict[str, int]:
    return {k: kernels.count(k) for k in KERNELS if k in kernels}


# ------------------------------------------------------------------------------------ attended fraction
@lru_cache(maxsize=None)
def _decode_layer_fraction(kind: str, n: int, frac: float, floor: int, page_size: int, min_pages: int) -> float:
    """Keys attended / keys of the row for one decode step with ``n`` keys on a layer of ``kind``."""
    if kind == "all" or n <= 0:
        return 1.0
    k = topk_budget(n, frac, floor)
    if kind == "budget":
        return k / n
    if kind == "pages":  # Quest: all keys once k covers them, else its top pages (the last may be partial)
        if k >= n:
            return 1.0
        pages = min(-(-n // page_size), max(min_pages, k // page_size))
        return min(n, pages * page_size) / n
    raise ValueError(f"no attended-key definition for decode layer kind {kind!r}")


def decode_attended(layers: MethodLayers, key_counts, topk_fraction: float | None, topk_floor: int) -> list[float] | None:
    """Per layer, the mean over decode steps (one per entry of ``key_counts``, the row's keys at that step)
    of the attended-key fraction; None if some layer's count is adaptive ("variable")."""
    if "variable" in layers.decode_attend:
        return None
    frac = 1.0 if topk_fraction is None else topk_fraction
    counts = list(key_counts)
    out = []
    for kind in layers.decode_attend:
        vals = [_decode_layer_fraction(kind, int(n), frac, topk_floor, layers.page_size, layers.min_pages) for n in counts]
        out.append(sum(vals) / len(vals))
    return out


@lru_cache(maxsize=None)
def _prefill_layer_fraction(kind: str, n: int, frac: float, floor: int, tile: int) -> float:
    """Attended (query, key) pairs / causal pairs of an ``n``-token prompt on a layer of ``kind``."""
    if kind == "all" or n <= 0:
        return 1.0
    pos = torch.arange(n, dtype=torch.long)
    visible = pos + 1
    if kind == "rolling":
        start = (pos // tile) * tile  # the query's tile starts here: k of the prefix + the tile causally
        attended = topk_budget(start, frac, floor) + (pos - start + 1)
    elif kind == "streaming":
        attended = topk_budget(visible, frac, floor)
    else:
        raise ValueError(f"no attended-key definition for prefill layer kind {kind!r}")
    return float(attended.sum()) / float(visible.sum())


def prefill_attended(layers: MethodLayers, prompt_lengths, topk_fraction: float | None, topk_floor: int) -> float:
    """Mean over prompts and layers of attended (query, key) pairs / causal pairs in prefill."""
    frac = 1.0 if topk_fraction is None else topk_fraction
    lengths = list(prompt_lengths)
    per_layer = [sum(_prefill_layer_fraction(kind, int(n), frac, topk_floor, layers.tile_size) for n in lengths)
                 / len(lengths) for kind in layers.prefill_attend]
    return sum(per_layer) / len(per_layer)


def decode_key_counts(cell: dict) -> list[int]:
    """The row's key count at each decode step of a cell: the first token comes from the prefill's logits,
    and the step that feeds generated token i (1 <= i < new_tokens) sees n_tokens + i keys. A cell that
    stopped after one token has no decode step; it counts as one step at n_tokens + 1."""
    n0, new = int(cell["n_tokens"]), int(cell.get("new_tokens") or 1)
    return [n0 + i for i in range(1, max(2, new))]


# ------------------------------------------------------------------------------------ measured kernel costs
@dataclass
class DecodeCosts:
    """Per-kernel decode cost ratios of one `kascade bench decode` point per Top-k fraction."""

    path: str
    sha256: str
    context: int
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    geometry: str  # why this geometry
    env: dict
    points: dict[float, dict] = field(default_factory=dict)  # topk_fraction -> bench row

    def ratios(self, topk_fraction: float) -> dict[str, float] | None:
        row = self.points.get(_fkey(topk_fraction))
        if row is None:
            return None
        return {"dense": 1.0, **{k: float(row["ratio_to_dense"][k]) for k in ("layer0", "anchor", "reuse")}}

    def model_speedup(self, layers: MethodLayers, topk_fraction: float | None, topk_floor: int) -> tuple[float | None, str]:
        """(speedup, why) of a method's decode step at this point: layers / sum of its layers' ratios.
        None (with the reason) when a layer has no measured kernel, or when the bench did not measure this
        budget (its Top-k fraction, or another floor that changes k at this context)."""
        kernels = layers.decode_kernels
        if kernels is None:
            return None, layers.how
        if all(k == "dense" for k in kernels):
            return 1.0, layers.how
        row = self.points.get(_fkey(topk_fraction)) if topk_fraction is not None else None
        if row is None:
            return None, (f"not modelled at Top-k {_pct(topk_fraction)}: {self.path} has no point at that fraction "
                          f"(measured: {', '.join(_pct(f) for f in sorted(self.points))})")
        k = topk_budget(self.context, topk_fraction, topk_floor)
        if int(row["budget"]) != k:
            return None, (f"not modelled: floor {topk_floor} gives k = {k} at {self.context} keys, the bench "
                          f"measured k = {row['budget']}")
        r = self.ratios(topk_fraction)
        return len(kernels) / sum(r[kind] for kind in kernels), layers.how

    def describe(self) -> dict:
        return {"source": self.path, "sha256": self.sha256, "bench": "kascade bench decode",
                "device": self.env.get("device"), "git_commit": self.env.get("git_commit"),
                "time_utc": self.env.get("time_utc"), "context": self.context, "batch": self.batch,
                "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim, "dtype": self.dtype,
                "geometry": self.geometry,
                "ratio_to_dense": {str(f): {k: round(v, 4) for k, v in self.ratios(f).items()}
                                   for f in sorted(self.points)},
                "best_dense_ms": {str(f): round(float(r["best_dense_ms"]), 4) for f, r in sorted(self.points.items())},
                "formula": "model_speedup = layers / sum over layers of ratio_to_dense[kernel] (dense = 1)"}


def _fkey(f: float) -> float:
    return round(float(f), 6)


def _pct(f) -> str:
    return "-" if f is None else f"{100 * f:g}%"


def default_bench_path() -> Path | None:
    """benchmarks/results/decode_b64.json of the working directory, else of the checkout this package sits
    in (src/kascade/eval -> repo root); None where neither has it (an installed wheel)."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        p = root / DEFAULT_BENCH
        if p.is_file():
            return p
    return None


def _display_path(path: Path) -> str:
    """The path relative to the checkout root or the working directory when inside them (what a reader can
    find in the repository), else as given."""
    path = Path(path).resolve()
    for root in (Path(__file__).resolve().parents[3], Path.cwd()):
        try:
            return str(path.relative_to(root.resolve()))
        except ValueError:
            continue
    return str(path)


def load_decode_costs(path, spec: ModelSpec, *, context: int = DEFAULT_CONTEXT, batch: int = DEFAULT_BATCH,
                      dtype: str = "bf16") -> DecodeCosts:
    """The measured points of a `kascade bench decode` JSON at (context, batch, dtype), for the head
    geometry nearest ``spec``: the same GQA group size if measured (else the nearest), then the nearest
    KV-head count and head dim. Raises ValueError naming what the file holds when nothing matches."""
    path = Path(path)
    raw = path.read_bytes()
    doc = json.loads(raw)
    if doc.get("meta", {}).get("bench") != "decode":
        raise ValueError(f"{path} is not a `kascade bench decode` result (meta.bench = {doc.get('meta', {}).get('bench')!r})")
    rows = [r for r in doc["rows"] if r["context"] == context and r["batch"] == batch and r["dtype"] == dtype]
    if not rows:
        have = sorted({(r["context"], r["batch"], r["dtype"]) for r in doc["rows"]})
        raise ValueError(f"{path} has no decode point at context {context}, batch {batch}, {dtype}; it has "
                         f"(context, batch, dtype) {have}")
    group = spec.num_heads / spec.num_kv_heads
    geoms = sorted({(r["heads"], r["kv_heads"], r["head_dim"]) for r in rows},
                   key=lambda g: (abs(g[0] / g[1] - group), abs(g[1] - spec.num_kv_heads), abs(g[2] - spec.head_dim)))
    hq, hkv, d = geoms[0]
    exact = (hq, hkv, d) == (spec.num_heads, spec.num_kv_heads, spec.head_dim)
    why = ("the model's own geometry" if exact else
           f"the measured geometry nearest the model's {spec.num_heads}/{spec.num_kv_heads}/{spec.head_dim} "
           f"(GQA group {hq // hkv} vs {group:g}; measured: {', '.join(f'{a}/{b}/{c}' for a, b, c in geoms)})")
    costs = DecodeCosts(path=_display_path(path), sha256=hashlib.sha256(raw).hexdigest(), context=context,
                        batch=batch, heads=hq, kv_heads=hkv, head_dim=d, dtype=dtype, geometry=why,
                        env=doc.get("meta", {}).get("env", {}))
    for r in rows:
        if (r["heads"], r["kv_heads"], r["head_dim"]) == (hq, hkv, d):
            # the first point of a fraction wins (a sweep over --layers/--anchors repeats the same kernels)
            costs.points.setdefault(_fkey(r["topk_fraction"]), r)
    return costs


# ------------------------------------------------------------------------------------ the summary's fields
def annotate(summary: dict, cells: list[dict], *, plan: Plan | None, spec: ModelSpec,
             costs: DecodeCosts | None, topk_floor: int = 128, costs_note: str | None = None) -> dict:
    """Add to every row of ``summary`` (from :func:`kascade.eval.report.summarize` of ``cells``) its
    attended-key fractions and, where modelled, ``model_speedup`` and ``model_kernels``; add
    ``summary["decode_speed_model"]`` (the bench point, its provenance and how each method is modelled).
    Returns ``summary``."""
    by_row: dict[tuple, list[dict]] = {}
    for c in cells:
        by_row.setdefault((c["method"], c["topk_fraction"], c["context_length"]), []).append(c)
    how: dict[str, str] = {}  # method -> how its decode step is modelled, or why not
    missing: dict[str, str] = {}  # row label -> why a modelled method has no speedup at that budget
    for row in summary["rows"]:
        name, frac = row["method"], row["topk_fraction"]
        rc = by_row.get((name, frac, row["context_length"]), [])
        if not rc:
            continue
        floor = rc[0].get("topk_floor") or topk_floor
        try:
            layers = method_layers(name, plan, spec, frac, floor)
        except (KascadeInputError, PlanError, ValueError) as exc:  # e.g. a Kascade method without a plan
            how[name] = f"not modelled: {exc}"
            continue
        measured = [c["attended_fraction"] for c in rc if c.get("attended_fraction")]
        if len(measured) == len(rc) and len({len(m) for m in measured}) == 1:
            att = [sum(m[i] for m in measured) / len(measured) for i in range(len(measured[0]))]
            row["attended_fraction_source"] = "measured"
        else:
            att = decode_attended(layers, [n for c in rc for n in decode_key_counts(c)], frac, floor)
            row["attended_fraction_source"] = "definition"
        if att is not None:
            row["attended_fraction"] = [round(a, 5) for a in att]
            row["mean_attended_fraction"] = round(sum(att) / len(att), 5)
        else:
            row.pop("attended_fraction_source")
        row["mean_prefill_attended_fraction"] = round(prefill_attended(layers, [c["n_tokens"] for c in rc], frac, floor), 5)
        how.setdefault(name, layers.how)
        if costs is not None:
            speedup, why = costs.model_speedup(layers, frac, floor)
            if speedup is not None:
                row["model_speedup"] = round(speedup, 4)
                row["model_kernels"] = kernel_counts(layers.decode_kernels)
            elif layers.decode_kernels is not None:  # a modelled method at a budget the bench did not measure
                missing[label(name, frac)] = why
    model = {"eval_model": {"name": spec.name, "num_layers": spec.num_layers, "num_heads": spec.num_heads,
                            "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim},
             "methods": how, "not_modelled": missing}
    if costs is not None:
        model = {**costs.describe(), **model}
    else:
        model = {"source": None, "note": costs_note or "no decode benchmark JSON: no method has a modelled speedup",
                 **model}
    summary["decode_speed_model"] = model
    return summary
