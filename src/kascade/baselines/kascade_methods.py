"""Kascade and its ablations as comparison methods: thin Engine subclasses that can also report, for a
decode step, the keys each query head attended (for budget checks and attention-mass statistics)."""

from __future__ import annotations

import torch

from ..engine import Engine
from ..budget import topk_budget
from ._common import decode_probs, expand_keep, key_valid, scale_of, topk_keep
from ..validation import check_attention_inputs


def indices_to_keep(indices: torch.Tensor, Lk: int) -> torch.Tensor:
    """Decode indices [B, Hsel, k] (absolute, -1 padded) -> keep mask [B, Hsel, Lk]."""
    idx = indices.long()
    idx = torch.where(idx >= 0, idx, torch.full_like(idx, Lk))
    keep = torch.zeros(*idx.shape[:-1], Lk + 1, dtype=torch.bool, device=idx.device)
    keep.scatter_(-1, idx, True)
    return keep[..., :Lk]


class KascadeMethod(Engine):
    """An Engine that also records decode selections when ``record_selection`` is on."""

    def __init__(self, plan, *, name: str = "kascade", record_selection: bool = False, **kw) -> None:
        super().__init__(plan, **kw)
        self.name = name
        self.record_selection = record_selection
        self.last_selection: dict[int, torch.Tensor | None] = {}

    @property
    def decode_only(self) -> bool:
        """True when prefill is dense (so it can share a dense prefill with other methods)."""
        return self.variant == "dense" or not self.sparse_prefill

    @property
    def model_spec(self):
        return self.plan.model

    @property
    def topk_fraction(self) -> float:
        return self.plan.topk_fraction

    @property
    def topk_floor(self) -> int:
        return self.plan.topk_floor

    def describe(self) -> dict:
        p = self.plan
        return {"name": self.name, "variant": self.variant, "sparse_prefill": self.sparse_prefill,
                "topk_fraction": p.topk_fraction, "topk_floor": p.topk_floor, "tile_size": p.tile_size,
                "anchor_layers": list(p.anchor_layers), "decode_only": self.decode_only,
                "plan": p.model.name or p.model.architecture}

    def reset(self) -> None:
        super().reset()
        self.last_selection = {}

    def __call__(self, layer, q, k, v, kv_start=None, kv_end=None, *, scale=None):
        out = super().__call__(layer, q, k, v, kv_start, kv_end, scale=scale)
        if self.record_selection and q.shape[2] == 1:
            self.last_selection[layer] = self._decode_keep(layer, q, k, kv_start, kv_end, scale)
        return out

    def _decode_keep(self, layer, q, k, kv_start, kv_end, scale):
        if self.variant == "dense" or layer == 0:
            return None
        Hq, Hkv, Lk = q.shape[1], k.shape[1], k.shape[2]
        kv_start, kv_end = check_attention_inputs(q, k, k, kv_start, kv_end)
        if self.variant == "oracle":
            p = decode_probs(q, k, kv_start, kv_end, scale_of(scale, q.shape[-1]))
            return topk_keep(p, key_valid(kv_start, kv_end, Lk),
                             topk_budget(kv_end - kv_start, self.plan.topk_fraction, self.plan.topk_floor))
        indices = self._indices if self.plan.is_anchor(layer) else self._mapped(layer, self._indices)
        return expand_keep(indices_to_keep(indices, Lk), Hq, Hkv)
