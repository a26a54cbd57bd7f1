"""The per-forward-pass engine that integrations wrap.

An ``Engine`` is built from a plan and called once per layer, in layer order, within each forward pass
(prefill, chunked prefill or one decode step). Anchor layers select Top-k indices and keep them; the
reuse layers after an anchor attend over those indices through the plan's head map. Layer 0 is always
dense (and selects for the layers after it).

Variants (the paper's ablations and the upper bound), by name:
* "kascade": post-softmax pooling over the GQA group (x tile in prefill), head-mapped reuse.
* "all_heads_pooled": one index set per layer shared by every head.
* "no_remap": reuse layers keep their own head numbering (identity head map).
* "pre_softmax": pools raw scores instead of probabilities.
* "oracle": every layer but 0 takes each query head's own exact Top-k (no reuse): the upper bound.
* "dense": plain attention everywhere (a baseline through the same code path).
``sparse_prefill=False`` keeps prefill dense and sparsifies decode only ("decode-only" Kascade).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from . import ops, reference
from .plan import Plan, PlanError
from .validation import KascadeInputError

Variant = Literal["kascade", "all_heads_pooled", "no_remap", "pre_softmax", "oracle", "dense"]
VARIANTS: tuple[str, ...] = ("kascade", "all_heads_pooled", "no_remap", "pre_softmax", "oracle", "dense")


@dataclass
class LayerStats:
    """Per-layer selection quality gathered when ``track_stats`` is on (reference math; slow)."""

    captured_mass: list[float] = field(default_factory=list)  # mean over valid queries and heads
    attended_fraction: list[float] = field(default_factory=list)  # attended keys / visible keys


class Engine:
    def __init__(
        self,
        plan: Plan,
        *,
        variant: Variant = "kascade",
        sparse_prefill: bool = True,
        backend: ops.Backend | None = None,
        track_stats: bool = False,
    ) -> None:
        if variant not in VARIANTS:
            raise KascadeInputError(f"variant={variant!r}; expected one of {VARIANTS}")
        self.plan = plan
        self.variant = variant
        self.sparse_prefill = sparse_prefill
        self.backend = backend
        self.track_stats = track_stats
        self.stats: dict[int, LayerStats] = {}
        self._indices: torch.Tensor | None = None
        self._indices_layer: int | None = None
        self._indices_shape: tuple[int, ...] | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def _budget(self) -> dict:
        p = self.plan
        return dict(topk_fraction=p.topk_fraction, topk_floor=p.topk_floor, tile_size=p.tile_size)

    def _check_layer_input(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        spec = self.plan.model
        if not 0 <= layer < spec.num_layers:
            raise PlanError(f"layer {layer} out of range: the plan has {spec.num_layers} layers")
        if q.dim() != 4 or k.dim() != 4:
            raise KascadeInputError(f"q and k must be 4-D, got {tuple(q.shape)} and {tuple(k.shape)}")
        if q.shape[1] != spec.num_heads or k.shape[1] != spec.num_kv_heads or q.shape[3] != spec.head_dim:
            raise PlanError(
                f"layer {layer} got {q.shape[1]} query heads, {k.shape[1]} KV heads, head dim {q.shape[3]}; "
                f"the plan expects {spec.num_heads}, {spec.num_kv_heads}, {spec.head_dim}"
            )

    def reset(self) -> None:
        """Forget kept indices (a new sequence); anchors overwrite them anyway on every pass."""
        self._indices = None
        self._indices_layer = None

    # ------------------------------------------------------------------ the call
    def __call__(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_start: torch.Tensor | None = None,
        kv_end: torch.Tensor | None = None,
        *,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Attention output [B, Hq, Lq, D] of ``layer`` for this pass (decode when Lq == 1)."""
        self._check_layer_input(layer, q, k)
        decode = q.shape[2] == 1
        common = dict(scale=scale, backend=self.backend)
        if self.variant == "dense" or (not decode and not self.sparse_prefill):
            return ops.dense_attention(q, k, v, kv_start, kv_end, **common)
        if self.variant == "oracle":
            if layer == 0:
                return ops.dense_attention(q, k, v, kv_start, kv_end, **common)
            return reference.oracle_attention(q, k, v, kv_start, kv_end, scale=scale, **self._budget)

        if self.plan.is_anchor(layer):
            out, indices = ops.anchor_attention(
                q, k, v, kv_start, kv_end,
                dense_output=layer == 0,
                pooling="pre_softmax" if self.variant == "pre_softmax" else "post_softmax",
                head_pooling="all" if self.variant == "all_heads_pooled" else "group",
                **self._budget, **common,
            )
            self._indices, self._indices_layer = indices, layer
            self._indices_shape = (q.shape[0], q.shape[2], k.shape[2])
        else:
            anchor = self.plan.anchor_of(layer)
            if self._indices_layer != anchor or self._indices_shape != (q.shape[0], q.shape[2], k.shape[2]):
                raise KascadeInputError(
                    f"layer {layer} reuses anchor layer {anchor}, but the engine holds indices of layer "
                    f"{self._indices_layer} for another pass; call the layers of a pass in order"
                )
            indices = self._mapped(layer, self._indices)
            out = ops.sparse_attention(q, k, v, indices, kv_start, kv_end, indices_from_anchor=True,
                                       **self._budget, **common)
        if self.track_stats:
            self._record(layer, q, k, self._mapped(layer, self._indices), kv_start, kv_end, scale)
        return out

    def _mapped(self, layer: int, indices: torch.Tensor) -> torch.Tensor:
        if indices.shape[1] == 1 or self.variant == "no_remap" or self.plan.is_anchor(layer):
            return indices
        head_map = torch.tensor(self.plan.head_map[layer], device=indices.device)
        return indices.index_select(1, head_map)

    def _record(self, layer, q, k, indices, kv_start, kv_end, scale) -> None:
        budget = self._budget
        if layer == 0:  # layer 0's output is dense whatever it selected
            indices = None
        if indices is None:
            return
        mass, attended, visible = reference.selection_stats(q, k, indices, kv_start, kv_end, scale=scale, **budget)
        valid = visible > 0
        st = self.stats.setdefault(layer, LayerStats())
        st.captured_mass.append(float(mass[valid].mean()))
        st.attended_fraction.append(float(attended[valid].sum() / visible[valid].sum()))
