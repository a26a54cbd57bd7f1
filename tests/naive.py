"""Naive formulas, written independently of kascade.reference: full masks, per-query loops, float64.

Only for small shapes. Each function takes the same arguments as its reference counterpart.
"""

from __future__ import annotations

import math

import torch


def budget(n: int, fraction: float, floor: int) -> int:
    return min(max(math.ceil(round(fraction * n, 9)), floor), n)


def positions(Lq: int, start: int, end: int) -> list[int]:
    """Absolute key position of each query (bottom-right aligned to the row end)."""
    return [end - Lq + i for i in range(Lq)]


def allowed_mask(Lq, Lk, start, end, *, decode_sets=None, tile_sets=None, tile=None, fraction=None, floor=None):
    """[Hkv, Lq, Lk] bool: which keys each query may attend, built one query at a time.

    decode_sets: per KV head, a set of absolute positions (decode). tile_sets: dict tile -> per-head sets
    (prefill). With neither: dense causal.
    """
    if decode_sets is None and tile_sets is None:  # dense causal, vectorised so long rows stay cheap
        pos = torch.tensor(positions(Lq, start, end))[:, None]
        keys = torch.arange(Lk)[None, :]
        return ((keys <= pos) & (keys >= start))[None]
    n_kv = len(decode_sets) if decode_sets is not None else (len(next(iter(tile_sets.values()))) if tile_sets else 1)
    m = torch.zeros(n_kv, Lq, Lk, dtype=torch.bool)
    for i, p in enumerate(positions(Lq, start, end)):
        if p < start:
            continue
        for h in range(n_kv):
            for j in range(start, p + 1):
                if decode_sets is not None:
                    ok = j in decode_sets[h]
                elif tile_sets is not None:
                    r, rj = p - start, j - start
                    t = r // tile
                    prefix = t * tile
                    if prefix <= budget(prefix, fraction, floor):
                        ok = True
                    else:
                        ok = rj >= prefix or j in tile_sets[t][h]
                else:
                    ok = True
                m[h, i, j] = ok
    return m


def attention(q, k, v, mask_kv, scale=None):
    """One batch row: q [Hq, Lq, D], k/v [Hkv, Lk, D], mask [Hkv, Lq, Lk]; float64; zero rows stay zero."""
    Hq, Hkv = q.shape[0], k.shape[0]
    G = Hq // Hkv
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    kk = k.double().repeat_interleave(G, 0)
    vv = v.double().repeat_interleave(G, 0)
    mask = mask_kv.repeat_interleave(G, 0)
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1)
    p = torch.nan_to_num(p, nan=0.0)
    return p @ vv


def probabilities(q, k, start, end, scale=None):
    """One row: causal softmax [Hq, Lq, Lk] in float64 (zeros for padding queries)."""
    Lq, Lk = q.shape[1], k.shape[1]
    mask = allowed_mask(Lq, Lk, start, end)[0]
    G = q.shape[0] // k.shape[0]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.double() @ k.double().repeat_interleave(G, 0).transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
