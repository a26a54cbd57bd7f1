"""Calibration: choose anchor layers and head maps for a model from dense runs over a development set.

Steps (``kascade calibrate`` runs them all):

1. :func:`collect` runs the model densely over the prompts and gathers the similarity tensor
   [anchor layer, reuse layer, reuse head, anchor head] and the layer importance (see :mod:`.stats`).
2. :func:`~.dp.best_anchors` picks the anchors maximising sum_j w_j * S[anchor(j)][j] (exact dynamic
   program); :func:`~.dp.anchor_table` lists the best sets for M = 3..8.
3. :func:`~.dp.head_map` maps each reuse head to the anchor head whose Top-k captures most of its mass.
4. :func:`make_plan` writes it all into a :class:`~kascade.plan.Plan` with provenance.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable

import torch

from ..plan import Plan
from .dp import AnchorChoice, anchor_table, best_anchors, fewest_anchors, head_map, same_shard, shard_tp_size
from .stats import CalibrationStats, StatsCollector


def _decoder_layers(model) -> list[torch.nn.Module]:
    layers = [m for m in model.modules() if hasattr(m, "self_attn") and hasattr(m.self_attn, "layer_idx")]
    return sorted(layers, key=lambda m: m.self_attn.layer_idx)


def collect(
    model,
    inputs: Iterable[torch.Tensor],
    *,
    stats_k: int = 64,
    tile_size: int = 32,
    progress: bool = True,
    total: int | None = None,
    info: dict[str, Any] | None = None,
    budget: tuple[float, int] | None = None,
    on_prompt=None,
) -> CalibrationStats:
    """Dense forward passes over ``inputs`` (token ids [1, n] each) with statistics collection.

    ``budget=(topk_fraction, topk_floor)`` also records the budget-k variants (see :mod:`.stats`);
    ``on_prompt(collector)`` is called after every prompt (e.g. to checkpoint partial statistics)."""
    from ..integrations import hf

    spec = hf.model_spec(model)
    collector = StatsCollector(spec, stats_k=stats_k, tile_size=tile_size, budget=budget)
    previous = hf.method_of(model)
    hf.enable(model, collector)
    hooks = []
    pending: dict[int, torch.Tensor] = {}
    for layer in _decoder_layers(model):
        j = layer.self_attn.layer_idx

        def pre(module, args, kwargs, j=j):
            pending[j] = args[0] if args else kwargs["hidden_states"]

        def post(module, args, output, j=j):
            attn_out = output[0] if isinstance(output, tuple) else output
            collector.record_importance(j, pending.pop(j), attn_out)

        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(layer.self_attn.register_forward_hook(post))
    bar = _progress(total, progress)
    skipped = 0
    try:
        for ids in inputs:
            start = time.perf_counter()
            collector.begin_prompt()
            with torch.no_grad():
                model(ids.to(model.device), use_cache=False, logits_to_keep=1)
            if not collector.end_prompt():
                skipped += 1
            elif on_prompt is not None:
                on_prompt(collector)
            bar(ids.shape[1], time.perf_counter() - start)
    finally:
        for h in hooks:
            h.remove()
        hf.disable(model)
        if previous is not None:
            hf.enable(model, previous)
        bar(None, None)
    result = collector.result(info)
    result.info["skipped_short_prompts"] = skipped
    return result


def _progress(total: int | None, enabled: bool):
    """A progress callback: tqdm when available, else one line per prompt on stderr."""
    if not enabled:
        return lambda n, dt: None
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="calibrating", unit="prompt")

        def step(n, dt):
            if n is None:
                bar.close()
                return
            bar.set_postfix(tokens=n, s=f"{dt:.1f}")
            bar.update(1)

        return step
    except ImportError:
        count = [0]

        def step(n, dt):
            if n is None:
                return
            count[0] += 1
            print(f"calibrating: prompt {count[0]}/{total or '?'} ({n} tokens, {dt:.1f} s)", file=sys.stderr)

        return step


def make_plan(
    stats: CalibrationStats,
    num_anchors: int | None = 5,
    *,
    quality_target: float | None = None,
    topk_fraction: float = 0.10,
    topk_floor: int = 128,
    tile_size: int = 32,
    provenance: dict[str, Any] | None = None,
    aggregate: str = "min",
    stats_budget: bool = False,
    weighting: str = "importance",
    tp_sizes: tuple[int, ...] = (),
    layer_budgets: bool = False,
    layer_budget_power: float = 0.5,
    layer_budget_miss_floor: float = 0.05,
    layer_budget_range: tuple[float, float] = (0.5, 2.0),
) -> tuple[Plan, list[AnchorChoice]]:
    """The plan with ``num_anchors`` anchors, and the DP table (best sets for M = 3..8, and up to the
    chosen M). ``num_anchors=None`` with ``quality_target`` T: the fewest anchors whose best set reaches
    a relative score (objective / objective with every layer an anchor) of at least T (dp.fewest_anchors).

    The defaults are the paper's objective: per-prompt minimum over tiles at k = stats_k, importance
    weighted. ``aggregate="mean"`` averages over tiles instead; ``aggregate="decode"`` scores decode-time
    selections (single GQA-pooled queries at the decode budget, the statistics' "decode" variant);
    ``stats_budget=True`` scores at the plan's per-tile budget k (needs statistics collected with ``budget``);
    ``weighting="uniform"`` drops w_j.

    ``tp_sizes`` (e.g. (2, 4)): a shard-constrained plan, valid under each of these tensor-parallel sizes:
    every reuse head maps only to anchor heads of its own shard for the least common multiple t of the sizes
    (the largest, when the others divide it), the anchor objective scores what that constrained map can reach,
    and the plan records ``tp_sizes`` (1 included).

    ``layer_budgets=True`` also writes ``layer_budget_scale`` (for ``kascade_layer_budget``): from each layer's
    reuse similarity under the chosen anchors and head map, r_j = mean over its KV heads h of
    similarity[anchor(j), j, h, head_map[j][h]] (1 at anchors), taken from the tile-mean statistics at the
    plan's budget when collected ("budget_mean"; else "mean", else the plan's own variant), the scales of
    :func:`kascade.variants.scales_from_reuse` (``layer_budget_power``, ``layer_budget_miss_floor``,
    ``layer_budget_range``): layers whose reused selection captures less get more keys, mean 1 over layers
    1..L-1."""
    if aggregate not in ("min", "mean", "decode"):
        raise ValueError(f"aggregate={aggregate!r}; expected 'min', 'mean' or 'decode'")
    # "decode" is always scored at the plan's decode budget, so stats_budget does not change it
    variant = "decode" if aggregate == "decode" else ("budget_" if stats_budget else "") + aggregate
    all_stats = stats
    stats = stats.variant(variant)
    tp = shard_tp_size(stats.spec.num_kv_heads, tp_sizes) if tp_sizes else 1
    if tp > 1:  # cross-shard anchor heads can not serve a reuse head: out of the objective (similarity >= 0)
        from dataclasses import replace as _replace

        allowed = same_shard(stats.spec.num_kv_heads, tp).to(stats.similarity.device)
        stats = _replace(stats, similarity=stats.similarity * allowed.to(stats.similarity.dtype))
    score = stats.weighted_similarity(weighting)
    if num_anchors is None:
        if quality_target is None:
            raise ValueError("num_anchors=None needs a quality_target (the share of the all-anchor score to reach)")
        choice = fewest_anchors(score, quality_target)
    else:
        choice = best_anchors(score, num_anchors)
    m = len(choice.anchor_layers)
    table = anchor_table(score, range(min(3, m), max(9, m + 1)))
    layer_sim = stats.layer_similarity()
    prov = dict(provenance or {})
    k_desc = "per-tile plan budget k" if stats_budget else "k = stats_k"
    w_desc = "importance-weighted" if weighting == "importance" else "unweighted"
    prov.update({
        "method": (f"kascade calibrate (post-softmax tile pooling, {aggregate} over tiles, mean over prompts, "
                   f"{w_desc} exact DP, head remapping)" + ("" if variant == "min" else f" [{k_desc}]")
                   if variant != "decode" else
                   "kascade calibrate (post-softmax GQA pooling of single queries at the prompts' last positions, "
                   f"decode budget k, mean over rows and prompts, {w_desc} exact DP, head remapping)"),
        "samples": stats.num_prompts,
        "tokens": stats.num_tokens,
        "stats_k": stats.stats_k,
        "stats_tile_size": stats.tile_size,
        **({"anchor_rule": f"fewest anchors with relative objective >= {quality_target:g}",
            "quality_target": quality_target} if num_anchors is None else {}),
        "objective": round(choice.score, 6),
        "objective_all_anchors": round(choice.max_score, 6),
        "dp_table": [{"num_anchors": len(c.anchor_layers), "anchor_layers": list(c.anchor_layers),
                      "score": round(c.score, 6), "relative": round(c.relative, 6)} for c in table],
        "layer_importance": [round(float(w), 6) for w in stats.importance],
        "reuse_similarity": [round(float(layer_sim[stats_anchor(choice.anchor_layers, j), j]), 6)
                             for j in range(stats.spec.num_layers)],
    })
    if tp > 1:
        prov["method"] += f" [head map constrained to TP shards of size {stats.spec.num_kv_heads // tp} KV heads]"
    prov.update({k: v for k, v in stats.info.items() if k not in prov})
    hmap = head_map(stats.similarity, choice.anchor_layers, tp)
    scales: tuple[float, ...] = ()
    if layer_budgets:
        from ..variants import scales_from_reuse

        src = next((n for n in ("budget_mean", "mean") if n in all_stats.variants), None)
        sim = all_stats.variants[src] if src else stats.similarity
        reuse = [float(sum(sim[stats_anchor(choice.anchor_layers, j), j, h, g] for h, g in enumerate(hmap[j]))
                       / len(hmap[j])) for j in range(stats.spec.num_layers)]
        lo, hi = layer_budget_range
        scales = tuple(scales_from_reuse(reuse, power=layer_budget_power, miss_floor=layer_budget_miss_floor,
                                         lo=lo, hi=hi))
        prov["layer_budget"] = {"statistic": src or variant, "reuse_similarity": [round(r, 6) for r in reuse],
                                "power": layer_budget_power, "miss_floor": layer_budget_miss_floor,
                                "range": [lo, hi],
                                "rule": "scale_j ~ ((1 - r_j) + miss_floor) ** power, mean 1 over layers 1..L-1, "
                                        "clipped to range"}
    plan = Plan(model=stats.spec, anchor_layers=choice.anchor_layers,
                head_map=hmap, topk_fraction=topk_fraction,
                topk_floor=topk_floor, tile_size=tile_size, provenance=prov,
                tp_sizes=tuple(sorted({1, *(int(t) for t in tp_sizes)})) if tp_sizes else (),
                layer_budget_scale=scales)
    return plan, table


def stats_anchor(anchors, j: int) -> int:
    return max(a for a in anchors if a <= j)


def format_table(table: list[AnchorChoice], speedups: dict[int, float] | None = None) -> str:
    """The DP table; with ``speedups`` (number of anchors -> modelled decode speedup) a column for it."""
    head = "anchors  score     relative" + ("  decode x" if speedups else "") + "  anchor_layers"
    lines = [head]
    for c in table:
        m = len(c.anchor_layers)
        speed = (f"  {speedups[m]:8.2f}" if m in speedups else f"  {'-':>8}") if speedups else ""
        lines.append(f"{m:>7}  {c.score:8.4f}  {c.relative:8.4f}{speed}  {list(c.anchor_layers)}")
    return "\n".join(lines)


__all__ = ["collect", "make_plan", "format_table", "CalibrationStats", "StatsCollector", "best_anchors",
           "anchor_table", "head_map", "AnchorChoice"]
