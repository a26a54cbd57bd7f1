"""Shared pieces of the comparison methods: the per-layer interface, decode probabilities, masked attention.

Every method here is called like :class:`kascade.engine.Engine`: once per layer, in layer order, within
each forward pass, as ``method(layer, q, k, v, kv_start, kv_end, *, scale) -> out [B, Hq, Lq, D]``
(decode when Lq == 1), with the layout and key-range conventions of :mod:`kascade.reference`.

A method states which keys each query head attends as a boolean *keep mask* over the key axis,
``[B, Hq, Lk]`` for a decode step. With ``record_selection=True`` it keeps the mask of the last decode
call of each layer in ``last_selection[layer]`` (``None`` for a dense layer): the tests count the keys in
it against the budget, and the runner measures the attention mass it captures.
"""

from __future__ import annotations

import math

import torch

from .. import attention
from ..plan import ModelSpec
from ..budget import topk_budget
from ..validation import KascadeInputError, check_attention_inputs, check_budget

# Layers the baselines' papers fix for 32-layer Llama-3.1-8B; other depths map them to the same
# relative depth (see scaled_layer).
REFERENCE_DEPTH = 32


def scaled_layer(layer: int, num_layers: int, reference_depth: int = REFERENCE_DEPTH) -> int:
    """Layer ``layer`` of a ``reference_depth``-layer model placed at the same relative depth of a
    ``num_layers``-layer model (rounded half up, clamped to the last layer)."""
    return min(num_layers - 1, int(math.floor(layer * num_layers / reference_depth + 0.5)))


def scale_of(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def decode_probs(q, k, kv_start, kv_end, scale) -> torch.Tensor:
    """Each query head's full softmax over its row's valid keys for one decode step: [B, Hq, Lk] float32,
    zero outside [kv_start, kv_end)."""
    B, Hq, _, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    qg = q[:, :, 0].float().reshape(B, Hkv, Hq // Hkv, D)
    s = torch.einsum("bhgd,bhkd->bhgk", qg, k.float()) * scale
    valid = key_valid(kv_start, kv_end, Lk)  # [B, Lk]
    s = s.masked_fill(~valid[:, None, None, :], -math.inf)
    return torch.softmax(s, dim=-1).reshape(B, Hq, Lk)


def key_valid(kv_start: torch.Tensor, kv_end: torch.Tensor, Lk: int) -> torch.Tensor:
    keys = torch.arange(Lk, device=kv_start.device)
    return (keys[None, :] >= kv_start[:, None]) & (keys[None, :] < kv_end[:, None])


def masked_decode_attention(q, k, v, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one decode query per head over the keys in ``keep`` ([B, Hq or Hkv or 1, Lk] bool,
    already restricted to valid keys). Returns [B, Hq, 1, D] in q's dtype."""
    B, Hq, _, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    keep = expand_keep(keep, Hq, Hkv)
    qg = q[:, :, 0].float().reshape(B, Hkv, G, D)
    s = torch.einsum("bhgd,bhkd->bhgk", qg, k.float()) * scale
    s = s.masked_fill(~keep.reshape(B, Hkv, G, Lk), -math.inf)
    p = torch.softmax(s, dim=-1)
    out = torch.einsum("bhgk,bhkd->bhgd", p, v.float()).reshape(B, Hq, 1, D)
    return out.to(q.dtype)


def expand_keep(keep: torch.Tensor, Hq: int, Hkv: int) -> torch.Tensor:
    """A keep mask with 1, Hkv or Hq heads -> [B, Hq, Lk] (KV head g covers query heads g*G..g*G+G-1)."""
    h = keep.shape[1]
    if h == Hq:
        return keep
    if h == 1:
        return keep.expand(keep.shape[0], Hq, keep.shape[2])
    if h == Hkv:
        return keep.repeat_interleave(Hq // Hkv, dim=1)
    raise KascadeInputError(f"keep mask has {h} heads; expected 1, {Hkv} (KV heads) or {Hq} (query heads)")


def topk_keep(scores: torch.Tensor, valid: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """Top-``budgets[b]`` valid keys of ``scores`` [B, H, Lk] per (row, head) as a bool mask [B, H, Lk]."""
    B, H, Lk = scores.shape
    s = scores.float().masked_fill(~valid[:, None, :], -math.inf)
    keep = torch.zeros(B, H, Lk, dtype=torch.bool, device=scores.device)
    for b in range(B):
        kb = int(budgets[b])
        idx = torch.topk(s[b], kb, dim=-1).indices
        keep[b].scatter_(-1, idx, True)
    return keep & valid[:, None, :]


class LayerMethod:
    """Base class of the comparison methods: the Engine's per-layer interface plus a budget.

    Subclasses implement ``_decode(layer, q, k, v, kv_start, kv_end, scale) -> (out, keep or None)``
    and, when they sparsify prefill, ``_prefill``. Decode-only methods run dense prefill.
    """

    name: str = "method"
    decode_only: bool = True

    def __init__(
        self,
        model_spec: ModelSpec,
        *,
        topk_fraction: float = 0.10,
        topk_floor: int = 128,
        record_selection: bool = False,
        backend: attention.Backend | None = None,
    ) -> None:
        check_budget(topk_fraction, topk_floor)
        self.model_spec = model_spec
        self.topk_fraction = float(topk_fraction)
        self.topk_floor = int(topk_floor)
        self.record_selection = record_selection
        self.backend = backend
        self.last_selection: dict[int, torch.Tensor | None] = {}

    @property
    def num_layers(self) -> int:
        return self.model_spec.num_layers

    def budget(self, length):
        return topk_budget(length, self.topk_fraction, self.topk_floor)

    def reset(self) -> None:
        """Forget state carried between layers (a new sequence)."""
        self.last_selection = {}

    def describe(self) -> dict:
        """The settings that define this method, for result files."""
        return {"name": self.name, "topk_fraction": self.topk_fraction, "topk_floor": self.topk_floor,
                "decode_only": self.decode_only}

    def __call__(self, layer, q, k, v, kv_start=None, kv_end=None, *, scale=None):
        if not 0 <= layer < self.num_layers:
            raise KascadeInputError(f"layer {layer} out of range: {self.name} was set up for {self.num_layers} layers")
        kv_start, kv_end = check_attention_inputs(q, k, v, kv_start, kv_end)
        scale = scale_of(scale, q.shape[-1])
        if q.shape[2] == 1:
            out, keep = self._decode(layer, q, k, v, kv_start, kv_end, scale)
            if self.record_selection:
                self.last_selection[layer] = None if keep is None else expand_keep(keep, q.shape[1], k.shape[1])
            return out
        if self.decode_only:
            return self.dense(q, k, v, kv_start, kv_end, scale)
        return self._prefill(layer, q, k, v, kv_start, kv_end, scale)

    # ---------------------------------------------------------------- helpers for subclasses
    def dense(self, q, k, v, kv_start, kv_end, scale):
        return attention.dense_attention(q, k, v, kv_start, kv_end, scale=scale, backend=self.backend)

    def dense_decode(self, q, k, v, kv_start, kv_end, scale):
        return self.dense(q, k, v, kv_start, kv_end, scale), None

    def _decode(self, layer, q, k, v, kv_start, kv_end, scale):  # pragma: no cover - abstract
        raise NotImplementedError

    def _prefill(self, layer, q, k, v, kv_start, kv_end, scale):  # pragma: no cover - abstract
        raise NotImplementedError


def masked_prefill_attention(q, k, v, kv_start, kv_end, scale, allow) -> torch.Tensor:
    """Causal prefill attention where query i of a row sees only keys ``allow(pos, L)`` ([n, L] bool over
    row-relative keys, ``pos`` the row-relative positions of the n queries). Chunked over queries, and each
    chunk computes scores only against the keys some query of the chunk may see (a sliding window then
    costs its window, not the whole prefix), so no score tensor is larger than ~32M floats."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for b in range(B):
        s0, e0 = int(kv_start[b]), int(kv_end[b])
        L = e0 - s0
        n = min(Lq, L)
        qb = q[b, :, Lq - n:].float().reshape(Hkv, G, n, D)
        kb, vb = k[b, :, s0:e0].float(), v[b, :, s0:e0].float()
        keys = torch.arange(L, device=q.device)
        # keys the last query sees bound the chunk's key set: a chunk of `step` queries sees at most
        # that many plus step (exact for windows; dense masks fall back to L)
        widest = int(allow(torch.tensor([L - 1], device=q.device), L).sum())
        step = 1
        while step < n and Hq * (2 * step) * min(L, widest + 2 * step) <= 1 << 25:
            step *= 2
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            pos = (L - n) + torch.arange(lo, hi, device=q.device)
            mask = allow(pos, L) & (keys[None, :] <= pos[:, None])
            cols = mask.any(0).nonzero().squeeze(1)
            mask = mask[:, cols]
            sc = torch.einsum("hgqd,hkd->hgqk", qb[:, :, lo:hi], kb[:, cols]) * scale
            p = torch.softmax(sc.masked_fill(~mask, -math.inf), dim=-1)
            out[b, :, Lq - n + lo: Lq - n + hi] = torch.einsum("hgqk,hkd->hgqd", p, vb[:, cols]).reshape(Hq, hi - lo, D)
    return out.to(q.dtype)
