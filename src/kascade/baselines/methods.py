"""The training-free baselines the Kascade paper compares with, behind the Engine's per-layer interface.

Settings follow ../shared/docs/method.md (the paper authors' settings for 32-layer Llama-3.1-8B); fixed
layers move to the same relative depth of other models (:func:`scaled_layer`), e.g. Llama's layer 13
is layer 12 of a 30-layer model and layer 10 of a 24-layer one. Every method gets the Kascade budget
k = topk_budget(L) = min(max(ceil(topk_fraction * L), topk_floor), L) keys per decode step (L = the
row's current key length), counted per query head.

* StreamingLLM: 4 sink tokens + the most recent k - 4 tokens; sparsifies prefill too (each query at
  row-relative position r keeps sinks + recent keys, topk_budget(r + 1) in all).
* Quest: keys in pages of 16 summarised by per-channel min/max; each query head ranks pages by the
  upper bound of q.k and attends the top max(3, k // 16) pages (all pages once k covers every key);
  layers 0-1 dense; decode only.
* OmniKV: filter layers (Llama 2, 8, 18) attend densely and rank tokens by the max over heads of their
  post-softmax scores (current query only; the original sums a short window of recent queries); one
  Top-k set shared by all heads is reused until the next filter layer; earlier layers dense.
* LessIsMore: selection layers (Llama 2, 13) attend densely; per-head Top-k lists are unioned (ordered
  by each token's best rank over heads) and truncated to 75% of the budget, plus the most recent
  tokens including 4 sinks for the rest; one set shared by all heads; earlier layers dense.
* TidalDecode: layers 0-1 dense; selection layers (Llama 2, 13) attend densely and keep each query
  head's own Top-k; the layers after a selection layer reuse it head by head.
"""

from __future__ import annotations

import torch

from ._common import (
    LayerMethod,
    decode_probs,
    key_valid,
    masked_decode_attention,
    masked_prefill_attention,
    scaled_layer,
    topk_keep,
)

NUM_SINKS = 4


def _recent_keep(valid_start: torch.Tensor, valid_end: torch.Tensor, Lk: int, n_sinks, n_recent) -> torch.Tensor:
    """[B, Lk] bool: the first n_sinks[b] and last n_recent[b] valid keys of each row."""
    keys = torch.arange(Lk, device=valid_start.device)[None, :]
    s, e = valid_start[:, None], valid_end[:, None]
    sinks = (keys >= s) & (keys < s + n_sinks[:, None])
    recent = (keys >= e - n_recent[:, None]) & (keys < e)
    return sinks | recent


class StreamingLLM(LayerMethod):
    name = "streamingllm"
    decode_only = False

    def __init__(self, model_spec, *, num_sinks: int = NUM_SINKS, **kw) -> None:
        super().__init__(model_spec, **kw)
        self.num_sinks = num_sinks

    def describe(self) -> dict:
        return {**super().describe(), "num_sinks": self.num_sinks}

    def _decode(self, layer, q, k, v, kv_start, kv_end, scale):
        L = kv_end - kv_start
        budgets = self.budget(L)
        sinks = torch.clamp(budgets, max=self.num_sinks)
        keep = _recent_keep(kv_start, kv_end, k.shape[2], sinks, budgets - sinks)
        return masked_decode_attention(q, k, v, keep[:, None], scale), keep[:, None]

    def _prefill(self, layer, q, k, v, kv_start, kv_end, scale):
        frac, floor, n_sinks = self.topk_fraction, self.topk_floor, self.num_sinks
        from ..budget import topk_budget

        def allow(pos, L):
            keys = torch.arange(L, device=pos.device)[None, :]
            visible = pos + 1
            n = topk_budget(visible, frac, floor)
            sinks = torch.clamp(n, max=n_sinks)
            window = n - sinks
            return (keys < sinks[:, None]) | (keys >= (visible - window)[:, None])

        return masked_prefill_attention(q, k, v, kv_start, kv_end, scale, allow)


class Quest(LayerMethod):
    name = "quest"

    def __init__(self, model_spec, *, page_size: int = 16, min_pages: int = 3, **kw) -> None:
        super().__init__(model_spec, **kw)
        self.page_size = page_size
        self.min_pages = min_pages
        self.dense_layers = tuple(range(scaled_layer(2, self.num_layers)))

    def describe(self) -> dict:
        return {**super().describe(), "page_size": self.page_size, "min_pages": self.min_pages,
                "dense_layers": list(self.dense_layers)}

    def _decode(self, layer, q, k, v, kv_start, kv_end, scale):
        if layer in self.dense_layers:
            return self.dense_decode(q, k, v, kv_start, kv_end, scale)
        B, Hq, _, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        G, P = Hq // Hkv, self.page_size
        keep = torch.zeros(B, Hq, Lk, dtype=torch.bool, device=q.device)
        for b in range(B):
            s, e = int(kv_start[b]), int(kv_end[b])
            L = e - s
            kb = self.budget(L)
            n_pages_total = -(-L // P)
            if kb >= L:
                keep[b, :, s:e] = True
                continue
            n_pages = min(n_pages_total, max(self.min_pages, kb // P))
            keys = k[b, :, s:e].float()
            pad = n_pages_total * P - L
            if pad:  # pad the last page with copies of its last key so min/max stay those of real keys
                keys = torch.cat([keys, keys[:, -1:].expand(Hkv, pad, D)], dim=1)
            pages = keys.reshape(Hkv, n_pages_total, P, D)
            kmin, kmax = pages.amin(dim=2), pages.amax(dim=2)  # [Hkv, n_pages, D]
            qh = q[b, :, 0].float().reshape(Hkv, G, 1, D)
            upper = torch.maximum(qh * kmin[:, None], qh * kmax[:, None]).sum(-1)  # [Hkv, G, n_pages]
            top = torch.topk(upper.reshape(Hq, n_pages_total), n_pages, dim=-1).indices
            page_keep = torch.zeros(Hq, n_pages_total, dtype=torch.bool, device=q.device)
            page_keep.scatter_(-1, top, True)
            keep[b, :, s:e] = page_keep.repeat_interleave(P, dim=-1)[:, :L]
        return masked_decode_attention(q, k, v, keep, scale), keep


class _SelectThenReuse(LayerMethod):
    """Dense layers before the first selection layer; selection layers attend densely and pick a keep
    mask from their full post-softmax attention; the layers after reuse the last mask of this pass."""

    reference_selection_layers: tuple[int, ...] = ()

    def __init__(self, model_spec, *, selection_layers: tuple[int, ...] | None = None, **kw) -> None:
        super().__init__(model_spec, **kw)
        if selection_layers is None:
            selection_layers = tuple(sorted({scaled_layer(l, self.num_layers) for l in self.reference_selection_layers}))
        self.selection_layers = tuple(selection_layers)
        self._keep: torch.Tensor | None = None
        self._keep_key: tuple | None = None

    def describe(self) -> dict:
        return {**super().describe(), "selection_layers": list(self.selection_layers)}

    def reset(self) -> None:
        super().reset()
        self._keep, self._keep_key = None, None

    def _select(self, p, valid, budgets) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _decode(self, layer, q, k, v, kv_start, kv_end, scale):
        if layer < self.selection_layers[0]:
            return self.dense_decode(q, k, v, kv_start, kv_end, scale)
        shape_key = (q.shape[0], k.shape[2], tuple(kv_start.tolist()), tuple(kv_end.tolist()))
        if layer in self.selection_layers:
            p = decode_probs(q, k, kv_start, kv_end, scale)
            valid = key_valid(kv_start, kv_end, k.shape[2])
            self._keep = self._select(p, valid, self.budget(kv_end - kv_start))
            self._keep_key = shape_key
            return self.dense_decode(q, k, v, kv_start, kv_end, scale)
        if self._keep is None or self._keep_key != shape_key:
            raise RuntimeError(
                f"{self.name}: layer {layer} reuses the selection of layer "
                f"{max(l for l in self.selection_layers if l <= layer)}, which did not run in this pass; "
                "call the layers of a pass in order"
            )
        return masked_decode_attention(q, k, v, self._keep, scale), self._keep


class OmniKV(_SelectThenReuse):
    name = "omnikv"
    reference_selection_layers = (2, 8, 18)

    def _select(self, p, valid, budgets):
        importance = p.amax(dim=1, keepdim=True)  # [B, 1, Lk]: max over heads
        return topk_keep(importance, valid, budgets)


class TidalDecode(_SelectThenReuse):
    name = "tidaldecode"
    reference_selection_layers = (2, 13)

    def _select(self, p, valid, budgets):
        return topk_keep(p, valid, budgets)  # each query head its own set


class LessIsMore(_SelectThenReuse):
    name = "lessismore"
    reference_selection_layers = (2, 13)

    def __init__(self, model_spec, *, selected_share: float = 0.75, num_sinks: int = NUM_SINKS, **kw) -> None:
        super().__init__(model_spec, **kw)
        self.selected_share = selected_share
        self.num_sinks = num_sinks

    def describe(self) -> dict:
        return {**super().describe(), "selected_share": self.selected_share, "num_sinks": self.num_sinks}

    def _select(self, p, valid, budgets):
        B, H, Lk = p.shape
        keep = torch.zeros(B, 1, Lk, dtype=torch.bool, device=p.device)
        for b in range(B):
            kb = int(budgets[b])
            vb = valid[b]
            L = int(vb.sum())
            if kb >= L:
                keep[b, 0] = vb
                continue
            n_recent = kb - int(self.selected_share * kb)  # the recent share (25%), sinks included
            sinks = min(self.num_sinks, n_recent)
            idx = torch.nonzero(vb).flatten()
            recent = torch.zeros(Lk, dtype=torch.bool, device=p.device)
            recent[idx[:sinks]] = True
            if n_recent - sinks:
                recent[idx[L - (n_recent - sinks):]] = True
            # Union of per-head rankings: a token's best rank over heads orders it (ties: larger max prob).
            pb = p[b].masked_fill(~vb[None], -1.0)
            order = torch.argsort(pb, dim=-1, descending=True)  # [H, Lk]
            rank = torch.empty_like(order)
            rank.scatter_(-1, order, torch.arange(Lk, device=p.device).expand(H, Lk))
            best = rank.amin(dim=0).float() - pb.amax(dim=0).clamp(min=0) * 0.5  # prob < 1 keeps rank order
            best = best.masked_fill(recent | ~vb, float("inf"))
            fill = kb - int(recent.sum())
            chosen = torch.topk(best, fill, largest=False).indices
            keep[b, 0] = recent
            keep[b, 0, chosen] = True
        return keep
