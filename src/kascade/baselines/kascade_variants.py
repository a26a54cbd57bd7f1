"""Kascade variants aimed at the cross-layer reuse gap (issue 14), as named eval methods.

Each keeps the plan's anchors and head map, runs dense prefill (decode-only, like ``kascade_decode_only``)
and changes only the decode-time selection, computed with the reference math of :mod:`kascade.variants`
(pure PyTorch, any device; no kernels). Layer 0 attends densely and selects for the layers after it, like
the paper's method. Options can be given in the method name, ``name:key=value,key=value`` (e.g.
``kascade_top_p:p=0.9,max=0.25``); the whole string is the method's name in results.

* ``kascade_sinks_window`` (:class:`KascadeSinksWindow`): the first ``sinks`` (default 4) and the last
  ``window`` (default 32) keys of the row are always selected, inside the same budget: the Top-k part gets
  k - sinks - window keys, so every layer attends exactly the paper's k keys.
* ``kascade_layer_budget`` (:class:`KascadeLayerBudget`): per-layer budgets from the plan's
  ``layer_budget_scale`` (``kascade calibrate --layer-budgets``): each anchor selects the largest budget
  of its segment (Top-k in decreasing score order), each layer attends the first k_j of its (mapped) set;
  the k_j average exactly the paper's k over layers 1..L-1.
* ``kascade_top_p`` (:class:`KascadeTopP`): per (row, KV head) the smallest set holding a share ``p``
  (default 0.9) of the anchor's pooled mass, at least topk_budget(L, ``min``) and at most
  topk_budget(L, ``max``) keys (defaults 0.02 and 0.3 of L, both with the plan's floor); reuse layers
  attend their mapped anchor head's set. Its attended fraction varies: read it beside its accuracy.
* ``kascade_rerank`` (:class:`KascadeRerank`): anchors select ``candidates`` (default 2) x k keys; each
  reuse layer keeps the k of them its own queries weigh most (reads 2k keys, attends k).
* ``kascade_two_sets`` (:class:`KascadeTwoSets`): a reuse head attends the first (1 - ``share``) x k keys of
  its mapped anchor head's set and fills the rest of the same k from the anchor's set pooled over all its KV
  heads (the paper's "all heads pooled" set): a second anchor set as insurance for a head its map serves badly.
* ``kascade_group_pool`` (:class:`KascadeGroupPool`): anchors pool the GQA group's probabilities as
  sum_g p_g^``power`` (default 2; ``inf``: the max) instead of their sum: one shared set that leans toward
  each head's own heaviest keys.
* ``kascade_dense_tail`` (:class:`KascadeDenseTail`): the full method (rolling sparse prefill and sparse decode),
  except that the last ``tokens`` (default 64) queries of each prefill pass attend densely at every layer: in
  the task suite the prompt ends with the question, whose hidden states the answer is decoded from. The only
  variant here with a sparse prefill; decode is the paper's.
* ``kascade_all_anchors`` (:class:`KascadeAllAnchors`): diagnostic, every layer selects its own pooled
  Top-k (no reuse): separates the cost of reuse from the cost of GQA pooling.
"""

from __future__ import annotations

import torch

from .. import attention, reference
from ..budget import topk_budget
from ..plan import PlanError
from ..validation import KascadeInputError, check_attention_inputs
from .. import variants as V
from ._common import expand_keep, scale_of
from .kascade_methods import KascadeMethod, indices_to_keep


def _check_options(name: str, given: dict, allowed: dict) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise KascadeInputError(f"method {name!r}: unknown options {unknown}; expected some of {sorted(allowed)}")


class KascadeVariant(KascadeMethod):
    """Decode-time selection hook on top of the plan's anchors and head map; prefill dense.

    Subclasses may override ``_select(layer, pooled, kv_start, kv_end) -> indices`` (anchor layers; int32
    [B, Hkv, K], -1 padded, ordered by priority; default: the paper's Top-k of the pooled scores),
    ``_limit(layer, indices, kv_start, kv_end)`` (the slots a layer attends of its mapped set; default: all)
    and ``pool_power`` (how the anchors pool a GQA group's probabilities; default: their sum)."""

    options: dict = {}
    pool_power = 1.0  # the GQA pooling of the anchors' scores (kascade.variants.pooled_decode_probs)

    def __init__(self, plan, *, name: str, record_selection: bool = False, backend=None, **options) -> None:
        _check_options(name, options, self.options)
        super().__init__(plan, name=name, variant="kascade", sparse_prefill=False, backend=backend,
                         record_selection=record_selection)
        self.opts = {**self.options, **{k: type(self.options[k])(v) for k, v in options.items()}}
        self._sel: torch.Tensor | None = None
        self._sel_layer: int | None = None
        self._sel_key: tuple | None = None

    def describe(self) -> dict:
        return {**super().describe(), "decode_selection": type(self).__name__, **self.opts}

    def reset(self) -> None:
        super().reset()
        self._sel, self._sel_layer, self._sel_key = None, None, None

    # ------------------------------------------------------------------ hooks
    def _select(self, layer, pooled, kv_start, kv_end) -> torch.Tensor:
        """The paper's selection: each row's Top-k of the pooled scores, in decreasing order."""
        return V.topk_ordered(pooled, kv_start, kv_end, self._row_budgets(kv_start, kv_end))

    def _limit(self, layer, indices, kv_start, kv_end, **_) -> torch.Tensor:
        return indices

    def _is_anchor(self, layer: int) -> bool:
        return self.plan.is_anchor(layer)

    # ------------------------------------------------------------------ the call
    def __call__(self, layer, q, k, v, kv_start=None, kv_end=None, *, scale=None):
        self._check_layer_input(layer, q, k)
        if q.shape[2] != 1:  # prefill: dense (decode-only variant)
            return attention.dense_attention(q, k, v, kv_start, kv_end, scale=scale, backend=self.backend)
        kv_start, kv_end = check_attention_inputs(q, k, v, kv_start, kv_end)
        key = (q.shape[0], k.shape[2], tuple(kv_start.tolist()), tuple(kv_end.tolist()))
        plan = self.plan
        if self._is_anchor(layer):
            pooled = V.pooled_decode_probs(q, k, kv_start, kv_end, scale_of(scale, q.shape[-1]),
                                           power=self.pool_power)
            self._sel = self._select(layer, pooled, kv_start, kv_end)
            self._sel_layer, self._sel_key = layer, key
            indices = self._sel
        else:
            anchor = plan.anchor_of(layer)
            if self._sel_layer != anchor or self._sel_key != key:
                raise KascadeInputError(f"layer {layer} reuses anchor layer {anchor}, but the method holds the "
                                        f"selection of layer {self._sel_layer} for another pass; call the layers "
                                        "of a pass in order")
            head_map = torch.tensor(plan.head_map[layer], device=self._sel.device)
            indices = self._sel.index_select(1, head_map)
        indices = self._limit(layer, indices, kv_start, kv_end, q=q, k=k, scale=scale_of(scale, q.shape[-1]))
        if layer == 0:
            out = attention.dense_attention(q, k, v, kv_start, kv_end, scale=scale, backend=self.backend)
        else:
            out = reference.sparse_attention(q, k, v, indices, kv_start, kv_end, scale=scale, **self._budget)
        if self.record_selection:
            self.last_selection[layer] = None if layer == 0 else \
                expand_keep(indices_to_keep(indices, k.shape[2]), q.shape[1], k.shape[1])
        return out

    def _row_budgets(self, kv_start, kv_end) -> torch.Tensor:
        return topk_budget((kv_end - kv_start).cpu(), self.plan.topk_fraction, self.plan.topk_floor)


class KascadeSinksWindow(KascadeVariant):
    """Kascade with ``sinks`` attention-sink keys and a recent ``window`` always selected, inside the same
    budget k (the Top-k part gets k - sinks - window keys): equal attended keys to the paper's method."""

    options = {"sinks": 4, "window": 32}

    def _select(self, layer, pooled, kv_start, kv_end):
        return V.select_sinks_window(pooled, kv_start, kv_end, self._row_budgets(kv_start, kv_end),
                                     self.opts["sinks"], self.opts["window"])


class KascadeLayerBudget(KascadeVariant):
    """Kascade with per-layer budgets from the plan's ``layer_budget_scale`` (calibrated: layers whose reused
    selection captures less mass get more keys); the budgets average exactly the paper's k over layers
    1..L-1 (:func:`kascade.variants.layer_budgets`)."""

    def __init__(self, plan, **kw) -> None:
        if not plan.layer_budget_scale:
            raise PlanError("kascade_layer_budget needs a plan with layer_budget_scale (make one with "
                            "`kascade calibrate ... --layer-budgets`, or --from-stats on saved statistics)")
        super().__init__(plan, **kw)
        anchors = list(plan.anchor_layers) + [plan.model.num_layers]
        # layers whose selection anchor a provides (a itself and its reuse layers)
        self._segment = {a: range(a, anchors[i + 1]) for i, a in enumerate(anchors[:-1])}
        self._table: torch.Tensor | None = None

    def _budgets(self, kv_start, kv_end) -> torch.Tensor:
        L = (kv_end - kv_start).cpu()
        return V.layer_budget_table(topk_budget(L, self.plan.topk_fraction, self.plan.topk_floor), L,
                                    self.plan.layer_budget_scale)

    def _select(self, layer, pooled, kv_start, kv_end):
        table = self._table = self._budgets(kv_start, kv_end)  # [num_layers, B]
        seg = list(self._segment[layer])
        if layer == 0:
            seg = seg[1:] or [0]  # layer 0 attends densely; it selects for its reuse layers only
        need = table[seg].amax(dim=0)
        return V.topk_ordered(pooled, kv_start, kv_end, need)

    def _limit(self, layer, indices, kv_start, kv_end, **_):
        if layer == 0:
            return indices
        kj = self._table[layer].to(indices.device)  # [B]
        slot = torch.arange(indices.shape[-1], device=indices.device)
        keep = slot[None, None, :] < kj[:, None, None]
        out = torch.where(keep, indices, torch.full_like(indices, -1))
        return out[..., : int(kj.max())]


class KascadeTopP(KascadeVariant):
    """Kascade with an adaptive budget: per (row, KV head) the smallest set of keys holding a share ``p`` of
    the anchor's pooled post-softmax mass, between topk_budget(L, ``min``) and topk_budget(L, ``max``) keys
    (the plan's floor applies to both); reuse layers attend their mapped anchor head's set."""

    options = {"p": 0.9, "min": 0.02, "max": 0.3}

    def __init__(self, plan, **kw) -> None:
        super().__init__(plan, **kw)
        if not 0.0 < self.opts["min"] <= self.opts["max"] <= 1.0:
            raise KascadeInputError(f"{self.name}: need 0 < min <= max <= 1, got min={self.opts['min']}, "
                                    f"max={self.opts['max']}")

    def _select(self, layer, pooled, kv_start, kv_end):
        L = (kv_end - kv_start).cpu()
        floor = self.plan.topk_floor
        k_min = topk_budget(L, self.opts["min"], floor)
        k_max = topk_budget(L, self.opts["max"], floor)
        indices, _ = V.select_top_p(pooled, kv_start, kv_end, self.opts["p"], k_min, k_max)
        return indices


class KascadeTwoSets(KascadeVariant):
    """Kascade where each reuse head hedges its mapped anchor head's set with the anchor's all-heads set: the
    first ceil((1 - ``share``) x k) keys of the mapped head's Top-k, then the anchor's Top-k of its pooled
    scores summed over KV heads, in order, until k keys (equal attended keys; ``share=0`` is the paper's
    method, ``share=1`` its "all heads pooled" ablation at the reuse layers). Anchors attend their own sets."""

    options = {"share": 0.5}

    def __init__(self, plan, **kw) -> None:
        super().__init__(plan, **kw)
        if not 0.0 <= self.opts["share"] <= 1.0:
            raise KascadeInputError(f"{self.name}: share must be in [0, 1], got {self.opts['share']}")
        self._shared: torch.Tensor | None = None

    def _select(self, layer, pooled, kv_start, kv_end):
        kb = self._row_budgets(kv_start, kv_end)
        self._shared = V.topk_ordered(pooled.sum(dim=1, keepdim=True), kv_start, kv_end, kb)
        return V.topk_ordered(pooled, kv_start, kv_end, kb)

    def _limit(self, layer, indices, kv_start, kv_end, **_):
        if self._is_anchor(layer):
            return indices
        kb = self._row_budgets(kv_start, kv_end)
        own = torch.ceil(kb.double() * (1.0 - self.opts["share"])).long()
        return V.hedge_with_shared(indices, self._shared, kb, own)


class KascadeGroupPool(KascadeVariant):
    """Kascade whose anchors rank keys by sum_g p_g^``power`` over the query heads g of a GQA group instead
    of the paper's sum of probabilities (``power=1``); ``power=inf`` ranks by the group's max. Equal keys:
    only which k keys the shared set holds changes, from the keys all heads weigh a little toward the keys
    some head weighs most."""

    options = {"power": 2.0}

    def __init__(self, plan, **kw) -> None:
        super().__init__(plan, **kw)
        if not self.opts["power"] > 0.0:
            raise KascadeInputError(f"{self.name}: power must be > 0 (inf for the max), got {self.opts['power']}")
        self.pool_power = self.opts["power"]


class KascadeAllAnchors(KascadeVariant):
    """Diagnostic, not a practical method: every layer selects its own Top-k (the paper's GQA-pooled
    post-softmax scores, budget k) and attends it, i.e. Kascade with no reuse. Between it and ``kascade``
    lies the cost of reuse across layers; between it and ``oracle`` (each query head its own Top-k) the
    cost of sharing one set per KV head."""

    def _is_anchor(self, layer: int) -> bool:
        return True


class KascadeRerank(KascadeVariant):
    """Kascade with re-ranking: each anchor selects ``candidates`` x k keys (its pooled Top-C, C capped at L);
    the anchor attends its Top-k of them, and each reuse layer scores its mapped anchor head's C candidates
    with its own queries (softmax over the candidates, summed over the GQA group) and attends the best k.
    Attended keys equal the paper's k; a reuse layer also reads the C candidate keys (not their values)."""

    options = {"candidates": 2.0}

    def __init__(self, plan, **kw) -> None:
        super().__init__(plan, **kw)
        if self.opts["candidates"] < 1.0:
            raise KascadeInputError(f"{self.name}: candidates must be >= 1 (a multiple of k), got "
                                    f"{self.opts['candidates']}")

    def _select(self, layer, pooled, kv_start, kv_end):
        kb = self._row_budgets(kv_start, kv_end)
        c = torch.minimum(torch.ceil(kb.double() * self.opts["candidates"]).long(), (kv_end - kv_start).cpu())
        return V.topk_ordered(pooled, kv_start, kv_end, c)

    def _limit(self, layer, indices, kv_start, kv_end, *, q, k, scale, **_):
        kb = self._row_budgets(kv_start, kv_end)
        if self._is_anchor(layer):  # the anchor's own Top-k is the prefix of its ordered candidates
            slot = torch.arange(indices.shape[-1], device=indices.device)
            keep = slot[None, None, :] < kb.to(indices.device)[:, None, None]
            return torch.where(keep, indices, torch.full_like(indices, -1))[..., : int(kb.max())]
        return V.rerank(q, k, indices, kb, scale)


class KascadeDenseTail(KascadeMethod):
    """The paper's full method with a dense tail: the last ``tokens`` queries of a prefill pass (Lq > 1) attend
    every visible key at every layer (their output replaced by dense attention's; the anchors' selections,
    which the reuse layers read, are unchanged). Extra prefill work: ``tokens`` x L keys per layer, against
    ~L^2 x topk_fraction / 2 for the rolling prefill of an L-token prompt (about 4 % more at 32K and 64
    tokens). In chunked prefill it applies to each chunk's last queries."""

    options = {"tokens": 64}

    def __init__(self, plan, *, name: str, record_selection: bool = False, backend=None, **options) -> None:
        _check_options(name, options, self.options)
        super().__init__(plan, name=name, variant="kascade", sparse_prefill=True, backend=backend,
                         record_selection=record_selection)
        self.tokens = int(options.get("tokens", self.options["tokens"]))
        if self.tokens < 0:
            raise KascadeInputError(f"method {name!r}: tokens must be >= 0, got {self.tokens}")

    def describe(self) -> dict:
        return {**super().describe(), "dense_tail_tokens": self.tokens}

    def __call__(self, layer, q, k, v, kv_start=None, kv_end=None, *, scale=None):
        out = super().__call__(layer, q, k, v, kv_start, kv_end, scale=scale)
        n = min(self.tokens, q.shape[2])
        if q.shape[2] > 1 and n > 0:
            # queries align to the end of their row: the last n rows of q see the same keys as in the full pass
            out[:, :, -n:] = attention.dense_attention(q[:, :, -n:], k, v, kv_start, kv_end, scale=scale,
                                                       backend=self.backend)
        return out


VARIANTS = {
    "kascade_sinks_window": KascadeSinksWindow,
    "kascade_layer_budget": KascadeLayerBudget,
    "kascade_top_p": KascadeTopP,
    "kascade_two_sets": KascadeTwoSets,
    "kascade_all_anchors": KascadeAllAnchors,
    "kascade_group_pool": KascadeGroupPool,
    "kascade_rerank": KascadeRerank,
    "kascade_dense_tail": KascadeDenseTail,
}


def parse_name(name: str) -> tuple[str, dict[str, str]]:
    """``base:key=value,key=value`` -> (base, {key: value}); a name without ':' has no options."""
    base, _, rest = name.partition(":")
    opts = {}
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise KascadeInputError(f"method {name!r}: options must be key=value, got {part!r}")
        opts[key.strip()] = value.strip()
    return base, opts
