"""Which keys each query attends, one batch row at a time: shared by the reference (kascade.reference)
and the CPU SDPA path of the ops (kascade.attention), so that both use exactly the same masks.

Conventions (padding, row-relative positions, prefill tiles, index layout) are kascade.reference's.
Depends only on kascade.budget; tests/naive.py is the independent check of these masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .budget import prefill_tile_is_dense

# Keep chunked score tensors under ~64M floats (256 MB) so a 32K prompt fits a small CPU machine.
CHUNK_ELEMENTS = 1 << 26


@dataclass
class Row:
    """One batch row's valid region, already sliced."""

    q: torch.Tensor  # [Hq, n, D] float32, the n valid queries
    k: torch.Tensor  # [Hkv, L, D] float32
    v: torch.Tensor  # [Hkv, L, D] float32
    start: int  # kv_start: absolute position of row-relative key 0
    q_index: int  # index (along Lq) of the first valid query
    q_pos: int  # row-relative position of the first valid query


def rows(q, k, v, kv_start, kv_end):
    """Yield (b, Row) for each batch row: its valid queries and keys, as float32."""
    Lq = q.shape[2]
    for b in range(q.shape[0]):
        s, e = int(kv_start[b]), int(kv_end[b])
        L = e - s
        n = min(Lq, L)
        yield b, Row(
            q=q[b, :, Lq - n :].float(),
            k=k[b, :, s:e].float(),
            v=v[b, :, s:e].float(),
            start=s,
            q_index=Lq - n,
            q_pos=L - n,
        )


def softmax_scale(scale: float | None, head_dim: int) -> float:
    """The score scale: 1/sqrt(head_dim) unless given."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def query_chunk(n_heads: int, L: int, granularity: int = 1) -> int:
    """Queries per chunk so that a [n_heads, chunk, L] score tensor stays under CHUNK_ELEMENTS."""
    size = max(1, CHUNK_ELEMENTS // max(1, n_heads * L))
    return max(granularity, size // granularity * granularity)


def selected_mask(idx: torch.Tensor, start: int, L: int) -> torch.Tensor:
    """Indices [..., k] (absolute, -1 padded) -> bool mask [..., L] over row-relative keys."""
    rel = idx.long() - start
    valid = (idx >= 0) & (rel >= 0) & (rel < L)
    rel = torch.where(valid, rel, torch.full_like(rel, L))
    mask = torch.zeros(*idx.shape[:-1], L + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, rel, True)
    return mask[..., :L]


def allowed_keys(
    row: Row, lo: int, hi: int, L: int, indices_b: torch.Tensor | None, decode: bool,
    topk_fraction: float, topk_floor: int, tile_size: int,
) -> torch.Tensor:
    """Which keys each valid query lo..hi-1 attends: [Hkv, 1, hi-lo, L] bool."""
    device = row.q.device
    n_kv = row.k.shape[0]
    if decode:
        sel = selected_mask(indices_b, row.start, L)  # [Hkv, L]
        return sel[:, None, None, :]
    T = tile_size
    pos = row.q_pos + torch.arange(lo, hi, device=device)
    keys = torch.arange(L, device=device)
    tile = pos // T
    causal = keys[None, :] <= pos[:, None]
    own_tile = causal & (keys[None, :] >= (tile * T)[:, None])  # [nq, L]
    dense_tile = torch.tensor(
        [prefill_tile_is_dense(int(t) * T, topk_fraction, topk_floor) for t in tile.tolist()],
        dtype=torch.bool, device=device,
    )
    t_lo, t_hi = int(tile.min()), int(tile.max()) + 1
    sel = selected_mask(indices_b[:, t_lo:t_hi], row.start, L)  # [Hkv, nt, L]
    sel = sel[:, tile - t_lo, :]  # [Hkv, nq, L]
    sel = sel & (keys[None, None, :] < (tile * T)[None, :, None])  # only the prefix counts
    allowed = torch.where(dense_tile[None, :, None], causal[None], sel | own_tile[None])
    return allowed.reshape(n_kv, 1, hi - lo, L)
