"""Pure-PyTorch reference of every Kascade op: the one definition of correct.

Runs on CPU and GPU, computes in float32 and returns the input dtype. Every fast kernel is tested
against these functions. They favour clarity over speed but never build a [batch, heads, L, L] tensor:
work is done one batch row at a time and in chunks of query tiles.

Conventions (shared by the ops, the kernels and the engine)
-----------------------------------------------------------
* Layout: q [B, Hq, Lq, D]; k, v [B, Hkv, Lk, D]. Hq is a multiple of Hkv; query head h reads KV head
  h // (Hq // Hkv) (the GQA group of KV head g is query heads g*G .. g*G+G-1).
* Per-row key range: row b's valid keys are positions kv_start[b] <= j < kv_end[b] of the key axis
  (left padding: kv_start > 0; a right-padded cache: kv_end < Lk). Defaults: 0 and Lk.
* Queries align bottom-right to each row's end: query i sits at key position kv_end[b] - Lq + i, and
  attends causally. Queries that fall before kv_start[b] are padding; their output is zero.
* Row-relative position r = position - kv_start[b]; a row has L = kv_end - kv_start valid keys.
* Budget: topk_budget(n) = min(max(ceil(topk_fraction * n), topk_floor), n).
* Decode (Lq == 1): the query heads of a GQA group share one Top-k set over all L valid keys of the row,
  chosen from the sum of their post-softmax probabilities; k = topk_budget(L).
* Prefill (Lq > 1), "rolling": queries are split into tiles of tile_size tokens by row-relative
  position (tile t holds r in [t*T, (t+1)*T)). A tile's prefix is the P = t*T keys before it. If
  P <= topk_budget(P) the tile attends densely (causally). Otherwise the tile x GQA group shares one
  set of topk_budget(P) keys from its prefix, chosen from the summed post-softmax probabilities of the
  tile's queries (present in this call) over the group; every query attends to that set plus its own
  tile's keys causally.
* Selected indices are absolute key positions (into the padded key axis), int32, with -1 in unused
  slots. Decode: [B, Hsel, kmax]; prefill: [B, Hsel, n_tiles, kmax] with n_tiles = ceil(max L / T) and
  tile t meaning row-relative tile t of each row (tiles that are dense or outside the queries of this
  call hold -1). Hsel is Hkv, or 1 when all heads are pooled into one set.
"""

from __future__ import annotations

import math

import torch

from .budget import prefill_tile_is_dense, topk_budget
from .masks import Row as _Row  # noqa: F401  (the row slices: kascade.masks)
from .masks import allowed_keys as _allowed_keys
from .masks import query_chunk as _query_chunk
from .masks import rows as _rows
from .masks import selected_mask as _selected_mask  # noqa: F401
from .masks import softmax_scale as _scale
from .validation import (
    HeadPooling,
    KascadeInputError,
    Pooling,
    check_attention_inputs,
    check_budget,
    check_indices,
    check_tile_size,
)
from .validation import expand_heads as _expand_heads


# --------------------------------------------------------------------------------------------- rows
def _group_scores(row: _Row, lo: int, hi: int, scale: float) -> torch.Tensor:
    """Scaled scores of valid queries lo..hi-1 against all row keys: [Hkv, G, hi-lo, L]."""
    Hq, _, D = row.q.shape
    Hkv = row.k.shape[0]
    qg = row.q[:, lo:hi].reshape(Hkv, Hq // Hkv, hi - lo, D)
    return torch.einsum("hgqd,hkd->hgqk", qg, row.k) * scale


def _causal(row: _Row, lo: int, hi: int, L: int, device) -> torch.Tensor:
    """[hi-lo, L] bool: key j visible to valid query i (row-relative causality)."""
    pos = row.q_pos + torch.arange(lo, hi, device=device)
    return torch.arange(L, device=device)[None, :] <= pos[:, None]


# --------------------------------------------------------------------------------------------- dense
def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Causal GQA attention over each row's valid keys. Returns out [B, Hq, Lq, D] (q's dtype) and,
    with return_lse, the natural-log log-sum-exp of each query's scaled scores, [B, Hq, Lq] float32
    (-inf for padding queries)."""
    kv_start, kv_end = check_attention_inputs(q, k, v, kv_start, kv_end)
    scale = _scale(scale, q.shape[-1])
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:3], -math.inf, dtype=torch.float32, device=q.device)
    for b, row in _rows(q, k, v, kv_start, kv_end):
        n, L = row.q.shape[1], row.k.shape[1]
        step = _query_chunk(q.shape[1], L)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            s = _group_scores(row, lo, hi, scale)
            s = s.masked_fill(~_causal(row, lo, hi, L, q.device), -math.inf)
            o, l = _softmax_out(s, row.v)
            out[b, :, row.q_index + lo : row.q_index + hi] = o.flatten(0, 1)
            lse[b, :, row.q_index + lo : row.q_index + hi] = l.flatten(0, 1)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def _softmax_out(s: torch.Tensor, v: torch.Tensor):
    """Softmax of masked scores [Hkv, G, n, L] applied to v [Hkv, L, D]; also the log-sum-exp."""
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    return torch.einsum("hgqk,hkd->hgqd", p, v), lse


# --------------------------------------------------------------------------------------------- selection
def select_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    *,
    topk_fraction: float = 0.10,
    topk_floor: int = 128,
    scale: float | None = None,
    pooling: Pooling = "post_softmax",
    head_pooling: HeadPooling = "group",
) -> torch.Tensor:
    """Top-k keys of each (row, KV head) for one decode step: [B, Hsel, kmax] int32, -1 padded.

    Scores are each query head's softmax over all valid keys, summed over the GQA group (or over all
    heads with head_pooling="all"); pooling="pre_softmax" sums the raw scaled scores instead (ablation).
    """
    if q.shape[2] != 1:
        raise KascadeInputError(f"select_decode takes one query per row (Lq=1), got Lq={q.shape[2]}")
    kv_start, kv_end = check_attention_inputs(q, k, k, kv_start, kv_end)
    check_budget(topk_fraction, topk_floor)
    scale = _scale(scale, q.shape[-1])
    budgets = topk_budget(kv_end - kv_start, topk_fraction, topk_floor)
    kmax = max(1, int(budgets.max())) if q.shape[0] else 1
    h_sel = 1 if head_pooling == "all" else k.shape[1]
    out = torch.full((q.shape[0], h_sel, kmax), -1, dtype=torch.int32, device=q.device)
    for b, row in _rows(q, k, k, kv_start, kv_end):
        s = _group_scores(row, 0, 1, scale)[:, :, 0]  # [Hkv, G, L]
        pooled = _pool(s, pooling, head_pooling)  # [Hsel, L]
        kb = int(budgets[b])
        idx = torch.topk(pooled, kb, dim=-1).indices
        out[b, :, :kb] = (idx + row.start).to(torch.int32)
    return out


def _pool(s: torch.Tensor, pooling: Pooling, head_pooling: HeadPooling) -> torch.Tensor:
    """Pool scores [Hkv, G, ..., L] (already masked with -inf) over G (and Hkv) and any query axis."""
    if pooling == "post_softmax":
        x = torch.softmax(s, dim=-1)
    elif pooling == "pre_softmax":
        # Masked keys must stay last after summing, so they get -inf back below.
        x = s.masked_fill(torch.isinf(s), 0.0)
    else:
        raise KascadeInputError(f"pooling must be 'post_softmax' or 'pre_softmax', got {pooling!r}")
    dims = (0, 1) if head_pooling == "all" else (1,)
    if head_pooling not in ("group", "all"):
        raise KascadeInputError(f"head_pooling must be 'group' or 'all', got {head_pooling!r}")
    pooled = x.sum(dim=dims, keepdim=head_pooling == "all")
    if head_pooling == "all":
        pooled = pooled[0]
    return pooled


def select_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    *,
    topk_fraction: float = 0.10,
    topk_floor: int = 128,
    tile_size: int = 32,
    scale: float | None = None,
    pooling: Pooling = "post_softmax",
    head_pooling: HeadPooling = "group",
) -> torch.Tensor:
    """Rolling Top-k of each (row, KV head, query tile) over the tile's prefix: [B, Hsel, n_tiles, kmax].

    Probabilities are each query's full causal softmax (its own tile included), summed over the tile's
    queries and the GQA group on keys strictly before the tile.
    """
    kv_start, kv_end = check_attention_inputs(q, k, k, kv_start, kv_end)
    check_budget(topk_fraction, topk_floor)
    check_tile_size(tile_size)
    scale = _scale(scale, q.shape[-1])
    T = tile_size
    lengths = kv_end - kv_start
    max_len = int(lengths.max()) if q.shape[0] else 0
    n_tiles = max(1, -(-max_len // T))
    kmax = max([1] + [topk_budget(t * T, topk_fraction, topk_floor) for t in range(n_tiles)
                      if not prefill_tile_is_dense(t * T, topk_fraction, topk_floor)])
    h_sel = 1 if head_pooling == "all" else k.shape[1]
    out = torch.full((q.shape[0], h_sel, n_tiles, kmax), -1, dtype=torch.int32, device=q.device)
    for b, row in _rows(q, k, k, kv_start, kv_end):
        n, L = row.q.shape[1], row.k.shape[1]
        first_tile, last_tile = row.q_pos // T, (row.q_pos + n - 1) // T
        tiles_per_chunk = max(1, _query_chunk(q.shape[1], L, T) // T)
        for t0 in range(first_tile, last_tile + 1, tiles_per_chunk):
            t1 = min(last_tile + 1, t0 + tiles_per_chunk)
            sparse = [t for t in range(t0, t1) if not prefill_tile_is_dense(t * T, topk_fraction, topk_floor)]
            if not sparse:
                continue
            lo = max(0, t0 * T - row.q_pos)
            hi = min(n, t1 * T - row.q_pos)
            s = _group_scores(row, lo, hi, scale)
            s = s.masked_fill(~_causal(row, lo, hi, L, q.device), -math.inf)
            if pooling == "post_softmax":
                x = torch.softmax(s, dim=-1)
            else:
                x = s.masked_fill(torch.isinf(s), 0.0)
            tile_of_query = (row.q_pos + torch.arange(lo, hi, device=q.device)) // T
            for t in sparse:
                rows_t = tile_of_query == t
                prefix = t * T
                xt = x[:, :, rows_t, :prefix]  # [Hkv, G, nq_t, prefix]
                pooled = xt.sum(dim=(1, 2))  # [Hkv, prefix]
                if head_pooling == "all":
                    pooled = pooled.sum(dim=0, keepdim=True)
                kt = topk_budget(prefix, topk_fraction, topk_floor)
                idx = torch.topk(pooled, kt, dim=-1).indices
                out[b, :, t, :kt] = (idx + row.start).to(torch.int32)
    return out


# --------------------------------------------------------------------------------------------- sparse
def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    *,
    topk_fraction: float = 0.10,
    topk_floor: int = 128,
    tile_size: int = 32,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of each query over its selected keys (decode: [B, Hsel, k] indices; prefill:
    [B, Hsel, n_tiles, k], plus the own tile causally, dense tiles attending causally to all keys).

    The budget settings only decide which prefill tiles are dense; they must match the selection's.
    """
    kv_start, kv_end = check_attention_inputs(q, k, v, kv_start, kv_end)
    decode = q.shape[2] == 1
    check_indices(indices, q, k, kv_start, kv_end, tile_size)
    indices = _expand_heads(indices, k.shape[1])
    scale = _scale(scale, q.shape[-1])
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for b, row in _rows(q, k, v, kv_start, kv_end):
        n, L = row.q.shape[1], row.k.shape[1]
        step = _query_chunk(q.shape[1], L)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            s = _group_scores(row, lo, hi, scale)
            allowed = _allowed_keys(row, lo, hi, L, indices[b], decode, topk_fraction, topk_floor, tile_size)
            o, _ = _softmax_out(s.masked_fill(~allowed, -math.inf), row.v)
            out[b, :, row.q_index + lo : row.q_index + hi] = o.flatten(0, 1)
    return out.to(q.dtype)


# --------------------------------------------------------------------------------------------- oracle
def oracle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    *,
    topk_fraction: float = 0.10,
    topk_floor: int = 128,
    tile_size: int = 32,
    scale: float | None = None,
    return_mass: bool = False,
):
    """The upper bound: every query head of every query keeps the Top-k keys of its own softmax.

    Same budgets and own-tile rule as Kascade (decode: k of all keys; prefill: k of the tile's prefix
    plus the own tile causally). With return_mass, also the attention mass each query keeps [B, Hq, Lq].
    """
    kv_start, kv_end = check_attention_inputs(q, k, v, kv_start, kv_end)
    check_budget(topk_fraction, topk_floor)
    scale = _scale(scale, q.shape[-1])
    decode = q.shape[2] == 1
    T = tile_size
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    mass = torch.ones(q.shape[:3], dtype=torch.float32, device=q.device)  # padding queries lose nothing
    for b, row in _rows(q, k, v, kv_start, kv_end):
        n, L = row.q.shape[1], row.k.shape[1]
        step = _query_chunk(q.shape[1], L)
        keys = torch.arange(L, device=q.device)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            s = _group_scores(row, lo, hi, scale)
            causal = _causal(row, lo, hi, L, q.device)
            s = s.masked_fill(~causal, -math.inf)
            p = torch.softmax(s, dim=-1)
            pos = row.q_pos + torch.arange(lo, hi, device=q.device)
            if decode:
                prefix = torch.full_like(pos, L)  # the whole cache is candidate; no own tile
            else:
                prefix = pos // T * T
            allowed = causal & (keys[None, :] >= prefix[:, None])  # own tile (empty in decode)
            for i, P in enumerate(prefix.tolist()):
                if not decode and prefill_tile_is_dense(P, topk_fraction, topk_floor):
                    allowed[i] = causal[i]
                    continue
                kq = topk_budget(P, topk_fraction, topk_floor)
                top = torch.topk(p[:, :, i, :P], kq, dim=-1).indices  # [Hkv, G, kq]
                per_head = torch.zeros(*top.shape[:2], L, dtype=torch.bool, device=q.device)
                per_head.scatter_(-1, top, True)
                s[:, :, i] = s[:, :, i].masked_fill(~(per_head | allowed[i]), -math.inf)
            o, _ = _softmax_out(s, row.v)
            out[b, :, row.q_index + lo : row.q_index + hi] = o.flatten(0, 1)
            kept = torch.where(torch.isinf(s), torch.zeros_like(p), p).sum(-1)
            mass[b, :, row.q_index + lo : row.q_index + hi] = kept.flatten(0, 1)
    out = out.to(q.dtype)
    return (out, mass) if return_mass else out


# --------------------------------------------------------------------------------------------- statistics
def selection_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    indices: torch.Tensor,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    *,
    topk_fraction: float = 0.10,
    topk_floor: int = 128,
    tile_size: int = 32,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """How good a selection is for these queries.

    Returns (captured_mass, attended, visible), each [B, Hq, Lq] float32: the share of each query's full
    causal attention mass that falls on the keys it attends, the number of keys it attends, and the
    number of keys it could see densely. Padding queries get mass 1 and zero counts.
    """
    kv_start, kv_end = check_attention_inputs(q, k, k, kv_start, kv_end)
    decode = q.shape[2] == 1
    check_indices(indices, q, k, kv_start, kv_end, tile_size)
    indices = _expand_heads(indices, k.shape[1])
    scale = _scale(scale, q.shape[-1])
    mass = torch.ones(q.shape[:3], dtype=torch.float32, device=q.device)
    attended = torch.zeros_like(mass)
    visible = torch.zeros_like(mass)
    for b, row in _rows(q, k, k, kv_start, kv_end):
        n, L = row.q.shape[1], row.k.shape[1]
        step = _query_chunk(q.shape[1], L)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            s = _group_scores(row, lo, hi, scale)
            causal = _causal(row, lo, hi, L, q.device)
            p = torch.softmax(s.masked_fill(~causal, -math.inf), dim=-1)
            allowed = _allowed_keys(row, lo, hi, L, indices[b], decode, topk_fraction, topk_floor, tile_size)
            allowed = allowed & causal
            sl = slice(row.q_index + lo, row.q_index + hi)
            mass[b, :, sl] = (p * allowed).sum(-1).flatten(0, 1)
            attended[b, :, sl] = allowed.sum(-1).float().expand(-1, s.shape[1], -1).flatten(0, 1)
            visible[b, :, sl] = causal.sum(-1).float()[None, :].expand(q.shape[1], -1)
    return mass, attended, visible
