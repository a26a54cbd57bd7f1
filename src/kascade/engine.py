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

Two ways to call it:
* ``engine(layer, q, k, v, kv_start, kv_end)``: every call validated (the public API, any caller).
* plan/run (FlashInfer's split): ``engine.begin(step, q, k)`` once per forward pass with a :class:`Step`
  (row bounds on the device, host lengths when known), then ``engine.run(layer, q, k, v)`` per layer:
  no validation, no host read, nothing a CUDA graph cannot capture; the per-layer head maps are device
  tensors made once and read inside the reuse kernels. Used by kascade's own KV cache and generation
  loop (:mod:`kascade.integrations.cache`, :mod:`kascade.generation`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from . import attention, reference
from .plan import Plan, PlanError
from .validation import KascadeInputError

Variant = Literal["kascade", "all_heads_pooled", "no_remap", "pre_softmax", "oracle", "dense"]
VARIANTS: tuple[str, ...] = ("kascade", "all_heads_pooled", "no_remap", "pre_softmax", "oracle", "dense")


@dataclass(frozen=True)
class Step:
    """What every layer of one forward pass shares, fixed before its first layer.

    kv_start, kv_end: int64 [B] on the device (row b's keys are kv_start[b] <= j < kv_end[b] after this
    pass's keys are written; queries align to kv_end). q_length: queries per row in this pass (1 =
    decode). lengths: host copy of kv_end - kv_start, or None where the host does not know it (a
    captured decode step); prefill needs it (tile counts, budgets). kv_length: keys the layers need to
    see (max kv_end), or None to use the whole K/V given to ``run``.
    """

    kv_start: torch.Tensor
    kv_end: torch.Tensor
    q_length: int
    lengths: tuple[int, ...] | None = None
    kv_length: int | None = None

    @property
    def decode(self) -> bool:
        return self.q_length == 1


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
        backend: attention.Backend | None = None,
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
        self._step: Step | None = None
        self._fast = False  # run() launches the Triton kernels directly (set by begin())
        self._head_maps: dict[str, torch.Tensor] = {}  # device -> int32 [num_layers, Hkv]

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

    # ------------------------------------------------------------------ plan / run
    def head_map_tensor(self, device: torch.device) -> torch.Tensor:
        """The plan's head maps as int32 [num_layers, Hkv] on ``device`` (made once per device)."""
        key = str(device)
        hm = self._head_maps.get(key)
        if hm is None:
            hm = torch.tensor(self.plan.head_map, dtype=torch.int32, device=device)
            self._head_maps[key] = hm
        return hm

    def begin(self, step: Step, q: torch.Tensor, k: torch.Tensor) -> None:
        """Fix the step every layer of this forward pass shares, validating it once (q, k: any layer's
        query and key tensors, for shapes and device). Then call :meth:`run` per layer."""
        self._check_layer_input(0, q, k)
        if q.shape[2] != step.q_length:
            raise KascadeInputError(f"the step has {step.q_length} queries per row, q has {q.shape[2]}")
        B = q.shape[0]
        for name, t in (("kv_start", step.kv_start), ("kv_end", step.kv_end)):
            if t.shape != (B,) or t.dtype != torch.int64 or t.device != q.device:
                raise KascadeInputError(f"step.{name} must be int64 [{B}] on {q.device}, got {t.dtype} "
                                        f"{tuple(t.shape)} on {t.device}")
        if not step.decode and step.lengths is None:
            raise KascadeInputError("a prefill step needs the host lengths (step.lengths)")
        if step.lengths is not None and len(step.lengths) != B:
            raise KascadeInputError(f"step.lengths has {len(step.lengths)} rows, the batch has {B}")
        if step.kv_length is not None and not 0 < step.kv_length <= k.shape[2]:
            raise KascadeInputError(f"step.kv_length={step.kv_length}; expected 1..{k.shape[2]} (keys given)")
        self._step = step
        self._fast = (self.variant in ("kascade", "no_remap", "dense") and self.track_stats is False
                      and attention._use_triton(q, self.backend) and _kernels_fit(q, k, self.plan.tile_size))
        if self._fast:
            self.head_map_tensor(q.device)

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
            scale: float | None = None) -> torch.Tensor:
        """Attention output [B, Hq, Lq, D] of ``layer`` in the step fixed by :meth:`begin`. k, v may be
        wider than the step's keys (a preallocated cache); in prefill they are cut to step.kv_length."""
        step = self._step
        if step is None:
            raise KascadeInputError("Engine.run() needs Engine.begin(step, ...) first")
        if step.kv_length is not None and k.shape[2] != step.kv_length:
            k, v = k[:, :, : step.kv_length], v[:, :, : step.kv_length]
        if not self._fast:  # reference / CPU / variants without kernels: the validated path
            return self(layer, q, k, v, step.kv_start, step.kv_end, scale=scale)
        from .ops import decode as dec, prefill as pre

        p = self.plan
        s0, s1 = step.kv_start, step.kv_end
        if self.variant == "dense" or (not step.decode and not self.sparse_prefill):
            if step.decode:
                return dec.dense(q, k, v, s0, s1, scale=scale)
            return pre.dense_fastest(q, k, v, s0, s1, step.lengths, scale=scale)
        if p.is_anchor(layer):
            if step.decode:
                out, indices = dec.anchor(q, k, v, s0, s1, topk_fraction=p.topk_fraction, topk_floor=p.topk_floor,
                                          scale=scale, dense_output=layer == 0)
            else:
                out, indices = pre.anchor(q, k, v, s0, s1, topk_fraction=p.topk_fraction, topk_floor=p.topk_floor,
                                          tile_size=p.tile_size, scale=scale, dense_output=layer == 0,
                                          lengths=step.lengths)
            self._indices, self._indices_layer = indices, layer
            return out
        anchor = p.anchor_of(layer)
        if self._indices_layer != anchor:
            raise KascadeInputError(f"layer {layer} reuses anchor layer {anchor}, but the engine holds indices of "
                                    f"layer {self._indices_layer}; call the layers of a pass in order")
        head_map = None if self.variant == "no_remap" or k.shape[1] == 1 else \
            self._head_maps[str(q.device)][layer]
        if step.decode:
            return dec.sparse(q, k, v, self._indices, s0, s1, scale=scale, head_map=head_map,
                              budget=(p.topk_fraction, p.topk_floor))
        return pre.sparse(q, k, v, self._indices, s0, s1, topk_fraction=p.topk_fraction, topk_floor=p.topk_floor,
                          tile_size=p.tile_size, scale=scale, indices_from_anchor=True, head_map=head_map,
                          lengths=step.lengths)

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
            return attention.dense_attention(q, k, v, kv_start, kv_end, **common)
        if self.variant == "oracle":
            if layer == 0:
                return attention.dense_attention(q, k, v, kv_start, kv_end, **common)
            return reference.oracle_attention(q, k, v, kv_start, kv_end, scale=scale, **self._budget)

        if self.plan.is_anchor(layer):
            out, indices = attention.anchor_attention(
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
            out = attention.sparse_attention(q, k, v, indices, kv_start, kv_end, indices_from_anchor=True,
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


def _kernels_fit(q: torch.Tensor, k: torch.Tensor, tile_size: int) -> bool:
    """Whether the Triton kernels take these shapes (else run() uses the validated ops, which fall back)."""
    from .ops import prefill as pre

    return q.shape[3] in pre.HEAD_DIMS and 1 <= q.shape[1] // k.shape[1] <= pre.MAX_GQA and tile_size in pre.TILE_SIZES
