"""The reference against naive formulas (float64, full masks, per-query loops) and its properties."""

from __future__ import annotations

import math

import pytest
import torch

import kascade.reference as R
from kascade import KascadeInputError

import naive

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(B, Hq, Hkv, Lq, Lk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    return q, k, v


def lowp_error_bound(q, k, v, start, end, ref64):
    """Twice the error of a plain same-precision PyTorch run (the FlashAttention test rule)."""
    Lq, Lk = q.shape[1], k.shape[1]
    G = q.shape[0] // k.shape[0]
    mask = naive.allowed_mask(Lq, Lk, start, end)[0]
    s = (q @ k.repeat_interleave(G, 0).transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1]))
    p = torch.nan_to_num(torch.softmax(s.masked_fill(~mask, float("-inf")), -1), nan=0.0)
    plain = p @ v.repeat_interleave(G, 0)
    return max(2 * (plain.double() - ref64).abs().max().item(), 1e-5)


# ------------------------------------------------------------------------------------------ budget
@pytest.mark.parametrize(
    "n,fraction,floor,expected",
    [(30, 0.1, 1, 3), (31, 0.1, 1, 4), (1000, 0.1, 128, 128), (2000, 0.1, 128, 200), (100, 0.1, 128, 100),
     (0, 0.1, 128, 0), (7, 1.0, 1, 7), (12345, 0.2, 128, 2469)],
)
def test_topk_budget(n, fraction, floor, expected):
    assert R.topk_budget(n, fraction, floor) == expected
    assert int(R.topk_budget(torch.tensor([n]), fraction, floor)[0]) == expected
    assert expected == naive.budget(n, fraction, floor)


# ------------------------------------------------------------------------------------------ dense
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "Hq,Hkv,Lq,Lk,D",
    [(4, 4, 1, 1, 64), (3, 1, 7, 7, 64), (8, 2, 113, 113, 128), (7, 1, 1, 1031, 64), (12, 3, 40, 1031, 64)],
)
def test_dense_matches_naive(dtype, Hq, Hkv, Lq, Lk, D):
    q, k, v = make(2, Hq, Hkv, Lq, Lk, D, dtype)
    kv_start = torch.tensor([0, min(5, Lk - 1)])
    kv_end = torch.tensor([Lk, Lk])
    out, lse = R.dense_attention(q, k, v, kv_start, kv_end, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    for b in range(2):
        s, e = int(kv_start[b]), int(kv_end[b])
        mask = naive.allowed_mask(Lq, Lk, s, e)[0]
        ref = naive.attention(q[b], k[b], v[b], mask[None].expand(Hkv, -1, -1))
        tol = lowp_error_bound(q[b], k[b], v[b], s, e, ref) if dtype != torch.float32 else 1e-5
        assert (out[b].double() - ref).abs().max().item() <= tol
        # log-sum-exp of the valid queries
        G = Hq // Hkv
        sc = (q[b].double() @ k[b].double().repeat_interleave(G, 0).transpose(-1, -2)) / math.sqrt(D)
        want = torch.logsumexp(sc.masked_fill(~mask, float("-inf")), -1)
        valid = torch.tensor(naive.positions(Lq, s, e)) >= s
        assert torch.allclose(lse[b][:, valid].double(), want[:, valid], atol=1e-3)


def test_dense_right_padded_rows_and_padding_queries_are_zero():
    q, k, v = make(2, 4, 2, 5, 20, 64)
    out = R.dense_attention(q, k, v, torch.tensor([0, 18]), torch.tensor([12, 20]))
    # row 1 has 2 valid keys, so only its last 2 queries are real
    assert out[1, :, :3].abs().max() == 0
    alone = R.dense_attention(q[:1], k[:1, :, :12], v[:1, :, :12])
    torch.testing.assert_close(out[:1], alone)


# ------------------------------------------------------------------------------------------ selection
def pooled_decode_naive(q, k, s, e, group_pool=True):
    p = naive.probabilities(q, k, s, e)[:, 0]  # [Hq, Lk]
    Hkv = k.shape[0]
    pooled = p.reshape(Hkv, -1, p.shape[-1]).sum(1)
    return pooled if group_pool else pooled.sum(0, keepdim=True)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (3, 1), (8, 2), (7, 1)])
@pytest.mark.parametrize("head_pooling", ["group", "all"])
def test_select_decode_captures_naive_topk_mass(Hq, Hkv, head_pooling):
    Lk = 203
    q, k, _ = make(3, Hq, Hkv, 1, Lk, 64, seed=1)
    kv_start = torch.tensor([0, 10, 0])
    kv_end = torch.tensor([Lk, Lk, 150])
    idx = R.select_decode(q, k, kv_start, kv_end, topk_fraction=0.1, topk_floor=8, head_pooling=head_pooling)
    for b in range(3):
        s, e = int(kv_start[b]), int(kv_end[b])
        kb = naive.budget(e - s, 0.1, 8)
        pooled = pooled_decode_naive(q[b], k[b], s, e, head_pooling == "group")
        for h in range(idx.shape[1]):
            sel = idx[b, h]
            real = sel[sel >= 0].long()
            assert len(real) == kb and len(set(real.tolist())) == kb
            assert bool(((real >= s) & (real < e)).all())
            best = pooled[h].topk(kb).values.sum()
            assert abs(pooled[h][real].sum() - best) <= 1e-5 * max(1.0, float(best))


def prefill_tile_sets_naive(q, k, s, e, T, fraction, floor, pooling="post_softmax"):
    """tile -> per-KV-head best pooled mass over its prefix, and the pooled scores themselves."""
    Hkv = k.shape[0]
    G = q.shape[0] // Hkv
    Lq = q.shape[1]
    p = naive.probabilities(q, k, s, e)
    if pooling == "pre_softmax":
        sc = (q.double() @ k.double().repeat_interleave(G, 0).transpose(-1, -2)) / math.sqrt(q.shape[-1])
        p = sc
    rel = [pos - s for pos in naive.positions(Lq, s, e)]
    out = {}
    for t in sorted({r // T for r in rel if r >= 0}):
        prefix = t * T
        if prefix <= naive.budget(prefix, fraction, floor):
            continue
        rows = [i for i, r in enumerate(rel) if r >= 0 and r // T == t]
        pooled = p[:, rows, s : s + prefix].sum(1).reshape(Hkv, G, prefix).sum(1)
        out[t] = pooled
    return out


@pytest.mark.parametrize("Hq,Hkv,T", [(4, 4, 16), (3, 1, 8), (8, 2, 16), (7, 1, 32)])
@pytest.mark.parametrize("pooling", ["post_softmax", "pre_softmax"])
def test_select_prefill_captures_naive_topk_mass(Hq, Hkv, T, pooling):
    Lk = 157
    q, k, _ = make(2, Hq, Hkv, Lk, Lk, 64, seed=2)
    kv_start = torch.tensor([0, 13])
    fraction, floor = 0.1, 4
    idx = R.select_prefill(q, k, kv_start, None, topk_fraction=fraction, topk_floor=floor, tile_size=T,
                           pooling=pooling)
    assert idx.shape[2] == math.ceil(Lk / T)
    for b in range(2):
        s = int(kv_start[b])
        pooled = prefill_tile_sets_naive(q[b], k[b], s, Lk, T, fraction, floor, pooling)
        assert pooled, "the test should exercise sparse tiles"
        for t in range(idx.shape[2]):
            if t not in pooled:
                assert bool((idx[b, :, t] == -1).all()), f"tile {t} is dense or absent: no indices"
                continue
            kt = naive.budget(t * T, fraction, floor)
            for h in range(Hkv):
                sel = idx[b, h, t]
                real = sel[sel >= 0].long() - s
                assert len(real) == kt and len(set(real.tolist())) == kt
                assert bool(((real >= 0) & (real < t * T)).all()), "selection must come from the prefix"
                best = pooled[t][h].topk(kt).values.sum()
                got = pooled[t][h][real].sum()
                assert abs(got - best) <= 1e-4 * max(1.0, abs(float(best)))


# ------------------------------------------------------------------------------------------ sparse attention
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (7, 1)])
def test_sparse_prefill_matches_naive_mask(dtype, Hq, Hkv):
    Lk, T, fraction, floor = 75, 8, 0.1, 3
    q, k, v = make(2, Hq, Hkv, Lk, Lk, 64, dtype, seed=3)
    kv_start = torch.tensor([0, 9])
    kw = dict(topk_fraction=fraction, topk_floor=floor, tile_size=T)
    idx = R.select_prefill(q, k, kv_start, None, **kw)
    out = R.sparse_attention(q, k, v, idx, kv_start, None, **kw)
    for b in range(2):
        s = int(kv_start[b])
        sets = {t: [set(idx[b, h, t][idx[b, h, t] >= 0].tolist()) for h in range(Hkv)] for t in range(idx.shape[2])}
        mask = naive.allowed_mask(Lk, Lk, s, Lk, tile_sets=sets, tile=T, fraction=fraction, floor=floor)
        ref = naive.attention(q[b], k[b], v[b], mask)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        assert (out[b].double() - ref).abs().max().item() <= tol


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (7, 1)])
def test_sparse_decode_matches_naive_mask(Hq, Hkv):
    Lk = 90
    q, k, v = make(2, Hq, Hkv, 1, Lk, 64, seed=4)
    kv_start, kv_end = torch.tensor([0, 3]), torch.tensor([61, 90])
    idx = R.select_decode(q, k, kv_start, kv_end, topk_fraction=0.2, topk_floor=5)
    out = R.sparse_attention(q, k, v, idx, kv_start, kv_end)
    for b in range(2):
        sets = [set(idx[b, h][idx[b, h] >= 0].tolist()) for h in range(Hkv)]
        mask = naive.allowed_mask(1, Lk, int(kv_start[b]), int(kv_end[b]), decode_sets=sets)
        ref = naive.attention(q[b], k[b], v[b], mask)
        assert (out[b].double() - ref).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------ properties
@pytest.mark.parametrize("Lq", [1, 64])
def test_fraction_one_equals_dense(Lq):
    q, k, v = make(2, 6, 2, Lq, 64, 64, seed=5)
    kv_start = torch.tensor([0, 7])
    kw = dict(topk_fraction=1.0, topk_floor=1, tile_size=16)
    sel = R.select_decode if Lq == 1 else R.select_prefill
    idx = sel(q, k, kv_start, None, **({} if Lq == 1 else {"tile_size": 16}), topk_fraction=1.0, topk_floor=1)
    out = R.sparse_attention(q, k, v, idx, kv_start, None, **kw)
    torch.testing.assert_close(out, R.dense_attention(q, k, v, kv_start), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("Lq", [1, 80])
def test_budget_covering_all_keys_equals_dense(Lq):
    q, k, v = make(1, 4, 2, Lq, 80, 64, seed=6)
    kw = dict(topk_fraction=0.1, topk_floor=1000)  # floor >= L: every tile and step is dense
    idx = R.select_decode(q, k, **kw) if Lq == 1 else R.select_prefill(q, k, tile_size=16, **kw)
    out = R.sparse_attention(q, k, v, idx, tile_size=16, **kw)
    torch.testing.assert_close(out, R.dense_attention(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("Lq", [1, 96])
@pytest.mark.parametrize("head_pooling", ["group", "all"])
def test_selection_never_beats_oracle(Lq, head_pooling):
    q, k, v = make(2, 8, 2, Lq, 96, 64, seed=7)
    kv_start = torch.tensor([0, 11])
    kw = dict(topk_fraction=0.1, topk_floor=4, tile_size=16)
    if Lq == 1:
        idx = R.select_decode(q, k, kv_start, None, topk_fraction=0.1, topk_floor=4, head_pooling=head_pooling)
    else:
        idx = R.select_prefill(q, k, kv_start, None, head_pooling=head_pooling, **kw)
    mass, attended, visible = R.selection_stats(q, k, idx, kv_start, None, **kw)
    _, oracle_mass = R.oracle_attention(q, k, v, kv_start, None, return_mass=True, **kw)
    assert bool((mass <= oracle_mass + 1e-5).all())
    assert bool((attended <= visible).all())
    assert float(mass.mean()) < 1.0  # the selection is really sparse here


def test_oracle_with_full_budget_is_dense():
    q, k, v = make(1, 4, 1, 50, 50, 64, seed=8)
    out = R.oracle_attention(q, k, v, topk_fraction=1.0, topk_floor=1, tile_size=8)
    torch.testing.assert_close(out, R.dense_attention(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("Lq", [1, 70])
def test_padding_does_not_change_a_row(Lq):
    """A left-padded (prefill) or right-padded (decode cache) batch row equals the row run alone."""
    q, k, v = make(2, 6, 3, Lq, 70, 64, seed=9)
    kw = dict(topk_fraction=0.1, topk_floor=4, tile_size=8)
    pad = 13
    if Lq == 1:
        kv_start, kv_end = torch.tensor([0, 0]), torch.tensor([70, 70 - pad])
        idx = R.select_decode(q, k, kv_start, kv_end, topk_fraction=0.1, topk_floor=4)
        out = R.sparse_attention(q, k, v, idx, kv_start, kv_end, **kw)
        k1, v1 = k[1:, :, : 70 - pad], v[1:, :, : 70 - pad]
        alone_idx = R.select_decode(q[1:], k1, topk_fraction=0.1, topk_floor=4)
        alone = R.sparse_attention(q[1:], k1, v1, alone_idx, **kw)
    else:
        kv_start = torch.tensor([0, pad])
        idx = R.select_prefill(q, k, kv_start, None, **kw)
        out = R.sparse_attention(q, k, v, idx, kv_start, None, **kw)
        q1, k1, v1 = q[1:, :, pad:], k[1:, :, pad:], v[1:, :, pad:]
        alone_idx = R.select_prefill(q1, k1, **kw)
        alone = R.sparse_attention(q1, k1, v1, alone_idx, **kw)
        out = out[:, :, pad:]
    torch.testing.assert_close(out[1:], alone, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_is_consistent_with_one_pass_on_aligned_chunks():
    """Queries split at a tile boundary see exactly what they saw in one pass."""
    q, k, v = make(1, 4, 2, 64, 64, 64, seed=10)
    kw = dict(topk_fraction=0.1, topk_floor=4, tile_size=16)
    idx = R.select_prefill(q, k, **kw)
    full = R.sparse_attention(q, k, v, idx, **kw)
    q2 = q[:, :, 32:]
    idx2 = R.select_prefill(q2, k, **kw)
    part = R.sparse_attention(q2, k, v, idx2, **kw)
    torch.testing.assert_close(part, full[:, :, 32:], atol=1e-5, rtol=1e-5)
    assert bool((idx2[:, :, :2] == -1).all())  # tiles before the chunk are not selected for


def test_chunking_does_not_change_results(monkeypatch):
    q, k, v = make(2, 4, 2, 100, 100, 64, seed=11)
    kw = dict(topk_fraction=0.1, topk_floor=4, tile_size=8)
    kv_start = torch.tensor([0, 21])
    before = (R.dense_attention(q, k, v, kv_start), R.select_prefill(q, k, kv_start, None, **kw))
    from kascade import masks
    monkeypatch.setattr(masks, "CHUNK_ELEMENTS", 4 * 100 * 9)  # a few queries at a time
    assert R._query_chunk(4, 100) == 9
    after = (R.dense_attention(q, k, v, kv_start), R.select_prefill(q, k, kv_start, None, **kw))
    torch.testing.assert_close(before[0], after[0])
    for b in range(2):  # same sets (ties are unlikely with random floats)
        assert torch.equal(before[1][b].sort(-1).values, after[1][b].sort(-1).values)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_name_the_value():
    q, k, v = make(1, 6, 4, 4, 16, 64)
    with pytest.raises(KascadeInputError, match=r"query heads \(6\) must be a multiple of KV heads \(4\)"):
        R.dense_attention(q, k, v)
    q, k, v = make(1, 4, 2, 20, 16, 64)
    with pytest.raises(KascadeInputError, match="query length 20 exceeds key length 16"):
        R.dense_attention(q, k, v)
    q, k, v = make(1, 4, 2, 4, 16, 64)
    with pytest.raises(KascadeInputError, match="dtype torch.int64"):
        R.dense_attention(q.long(), k, v)
    with pytest.raises(KascadeInputError, match="must share a dtype"):
        R.dense_attention(q.half(), k, v)
    with pytest.raises(KascadeInputError, match=r"k has head_dim 32, q has head_dim 64"):
        R.dense_attention(q, k[..., :32], v[..., :32])
    with pytest.raises(KascadeInputError, match=r"kv_start must have shape \(1,\)"):
        R.dense_attention(q, k, v, torch.tensor([0, 0]))
    with pytest.raises(KascadeInputError, match=r"0 <= kv_start < kv_end <= 16"):
        R.dense_attention(q, k, v, torch.tensor([3]), torch.tensor([3]))
    with pytest.raises(KascadeInputError, match=r"topk_fraction must be in \(0, 1\], got 1.5"):
        R.select_prefill(q, k, topk_fraction=1.5)
    with pytest.raises(KascadeInputError, match="topk_floor must be a positive integer, got 0"):
        R.select_prefill(q, k, topk_floor=0)
    with pytest.raises(KascadeInputError, match="select_decode takes one query per row"):
        R.select_decode(q, k)
    with pytest.raises(KascadeInputError, match=r"index 16 out of range for key length 16"):
        R.sparse_attention(q[:, :, :1], k, v, torch.full((1, 2, 3), 16, dtype=torch.int32))
    with pytest.raises(KascadeInputError, match=r"prefill indices must be \[B, Hsel, n_tiles, k\] with B=1, Hsel=2 \(KV heads\) or 1"):
        R.sparse_attention(q, k, v, torch.zeros(1, 2, 3, dtype=torch.int32))
    with pytest.raises(KascadeInputError, match="must have 4 dims"):
        R.dense_attention(q[0], k, v)
