"""Property-based fuzzing of the public ops against the naive formulas of tests/naive.py.

Each example is tiny (a few heads, at most 24 keys, head_dim 4 or 8) and the example counts are capped,
so this module stays a few seconds. Two paths are fuzzed: backend="reference" and the default CPU path
(torch SDPA over the reference's masks). Shapes cover odd lengths, GQA ratios 1..4, left and right
padding, budgets near 0 (floor 1, tiny fraction) and near L (fraction 1 or a floor >= L), and indices
shared by all heads (Hsel = 1). Malformed inputs must raise KascadeInputError, never a raw error.
"""

from __future__ import annotations

import naive
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kascade
from kascade import KascadeInputError

FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BACKENDS = ["reference", None]  # None: the default ("auto"), which on CPU is the SDPA path
TOL = dict(atol=2e-5, rtol=1e-4)


@st.composite
def problems(draw, decode=None):
    """A small attention problem: tensors, per-row key ranges, budget and tile size."""
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    G = draw(st.integers(1, 4))
    D = draw(st.sampled_from([4, 8]))
    Lk = draw(st.integers(1, 24))
    if decode is None:
        decode = draw(st.booleans())
    Lk = max(Lk, 1 if decode else 2)
    Lq = 1 if decode else draw(st.integers(2, Lk))
    starts, ends = [], []
    for _ in range(B):
        s = draw(st.integers(0, Lk - 1))  # left padding
        e = draw(st.integers(s + 1, Lk))  # right padding (a cache not yet full)
        starts.append(s)
        ends.append(e)
    frac = draw(st.sampled_from([0.01, 0.1, 0.3, 0.5, 1.0]))
    floor = draw(st.sampled_from([1, 2, 5, Lk, Lk + 3]))
    tile = draw(st.sampled_from([1, 2, 3, 4, 8]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, Lq, D, generator=g)
    k = torch.randn(B, Hkv, Lk, D, generator=g)
    v = torch.randn(B, Hkv, Lk, D, generator=g)
    return dict(q=q, k=k, v=v, kv_start=torch.tensor(starts), kv_end=torch.tensor(ends), frac=frac,
                floor=floor, tile=tile, g=g)


def naive_out(p, mask_of_row):
    """Naive attention of every row; mask_of_row(b) -> [Hkv, Lq, Lk] bool."""
    q, k, v = p["q"], p["k"], p["v"]
    outs = [naive.attention(q[b], k[b], v[b], mask_of_row(b)) for b in range(q.shape[0])]
    return torch.stack(outs).float()


def dense_mask(p, b):
    q, k = p["q"], p["k"]
    m = naive.allowed_mask(q.shape[2], k.shape[2], int(p["kv_start"][b]), int(p["kv_end"][b]))
    return m.expand(k.shape[1], -1, -1)


def sets_of(indices_bh) -> set[int]:
    return {int(i) for i in indices_bh.tolist() if i >= 0}


def sparse_mask(p, indices, b):
    """Naive mask of row b for indices [B, Hsel, k] (decode) or [B, Hsel, n_tiles, k] (prefill)."""
    q, k = p["q"], p["k"]
    Hkv, Lq, Lk = k.shape[1], q.shape[2], k.shape[2]
    s, e = int(p["kv_start"][b]), int(p["kv_end"][b])
    heads = [min(h, indices.shape[1] - 1) for h in range(Hkv)]  # Hsel = 1 serves every KV head
    if Lq == 1:
        return naive.allowed_mask(Lq, Lk, s, e, decode_sets=[sets_of(indices[b, h]) for h in heads])
    tile_sets = {t: [sets_of(indices[b, h, t]) for h in heads] for t in range(indices.shape[2])}
    m = naive.allowed_mask(Lq, Lk, s, e, tile_sets=tile_sets, tile=p["tile"], fraction=p["frac"],
                           floor=p["floor"])
    return m.expand(Hkv, -1, -1)


def random_indices(p, hsel_one: bool, width: int):
    """Random selections: absolute positions anywhere in [-1, Lk) (the ops ignore those outside a row),
    and for decode one guaranteed key inside each row (a decode query with no key has no softmax)."""
    q, k, g = p["q"], p["k"], p["g"]
    B, Hkv, Lk = q.shape[0], k.shape[1], k.shape[2]
    hsel = 1 if hsel_one else Hkv
    if q.shape[2] == 1:
        idx = torch.randint(-1, Lk, (B, hsel, width), generator=g)
        for b in range(B):
            s, e = int(p["kv_start"][b]), int(p["kv_end"][b])
            idx[b, :, 0] = torch.randint(s, e, (hsel,), generator=g)
    else:
        n_tiles = -(-int((p["kv_end"] - p["kv_start"]).max()) // p["tile"])
        idx = torch.randint(-1, Lk, (B, hsel, n_tiles, width), generator=g)
    return idx.to(torch.int32)


# --------------------------------------------------------------------------------------------- agreement
@FUZZ
@given(p=problems(), backend=st.sampled_from(BACKENDS))
def test_dense_attention_matches_naive(p, backend):
    out = kascade.dense_attention(p["q"], p["k"], p["v"], p["kv_start"], p["kv_end"], backend=backend)
    torch.testing.assert_close(out, naive_out(p, lambda b: dense_mask(p, b)), **TOL)


@FUZZ
@given(p=problems(), backend=st.sampled_from(BACKENDS), hsel_one=st.booleans(), width=st.integers(1, 6))
def test_sparse_attention_matches_naive(p, backend, hsel_one, width):
    idx = random_indices(p, hsel_one, width)
    out = kascade.sparse_attention(p["q"], p["k"], p["v"], idx, p["kv_start"], p["kv_end"],
                                   topk_fraction=p["frac"], topk_floor=p["floor"], tile_size=p["tile"],
                                   backend=backend)
    torch.testing.assert_close(out, naive_out(p, lambda b: sparse_mask(p, idx, b)), **TOL)


def _check_topk(chosen: set[int], pooled: torch.Tensor, offset: int, budget: int):
    """chosen (absolute positions) is a Top-`budget` set of pooled (indexed from offset), up to ties."""
    assert len(chosen) == budget
    rel = torch.tensor(sorted(chosen)) - offset
    assert bool((rel >= 0).all()) and bool((rel < pooled.numel()).all())
    got = pooled[rel].sort(descending=True).values
    want = pooled.topk(budget).values
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@FUZZ
@given(p=problems(), backend=st.sampled_from(BACKENDS), dense_output=st.booleans())
def test_anchor_attention_matches_naive(p, backend, dense_output):
    q, k, v = p["q"], p["k"], p["v"]
    B, Hq, Lq, _ = q.shape
    Hkv, T = k.shape[1], p["tile"]
    out, idx = kascade.anchor_attention(q, k, v, p["kv_start"], p["kv_end"], topk_fraction=p["frac"],
                                        topk_floor=p["floor"], tile_size=T, dense_output=dense_output,
                                        backend=backend)
    for b in range(B):
        s, e = int(p["kv_start"][b]), int(p["kv_end"][b])
        L = e - s
        prob = naive.probabilities(q[b], k[b], s, e).reshape(Hkv, Hq // Hkv, Lq, -1)  # [Hkv, G, Lq, Lk]
        if Lq == 1:
            pooled = prob[:, :, 0].sum(1)  # [Hkv, Lk]
            for h in range(Hkv):
                _check_topk(sets_of(idx[b, h]), pooled[h, s:e], s, naive.budget(L, p["frac"], p["floor"]))
            continue
        n = min(Lq, L)  # valid queries of this row, at row-relative positions L-n .. L-1
        rel_pos = torch.arange(L - n, L)
        for t in range(idx.shape[2]):
            prefix = t * T
            in_tile = (rel_pos // T) == t
            if not bool(in_tile.any()) or prefix <= naive.budget(prefix, p["frac"], p["floor"]):
                assert bool((idx[b, :, t] == -1).all()), "dense tiles and tiles without queries hold -1"
                continue
            rows = torch.arange(Lq - n, Lq)[in_tile]
            pooled = prob[:, :, rows, s : s + prefix].sum((1, 2))  # [Hkv, prefix]
            for h in range(Hkv):
                _check_topk(sets_of(idx[b, h, t]), pooled[h], s, naive.budget(prefix, p["frac"], p["floor"]))
    if dense_output:
        want = naive_out(p, lambda b: dense_mask(p, b))
    else:
        want = naive_out(p, lambda b: sparse_mask(p, idx, b))
    torch.testing.assert_close(out, want, **TOL)


# --------------------------------------------------------------------------------------------- bad input
def _bad_indices(p, kind: str, g: torch.Generator):
    q, k = p["q"], p["k"]
    B, Hkv, Lk = q.shape[0], k.shape[1], k.shape[2]
    decode = q.shape[2] == 1
    n_tiles = -(-int((p["kv_end"] - p["kv_start"]).max()) // p["tile"])
    shape = [B, Hkv, 3] if decode else [B, Hkv, n_tiles, 3]
    if kind == "rank":
        shape = shape + [1] if decode else shape[:3]
    elif kind == "rank_low":
        shape = shape[:2]
    elif kind == "batch":
        shape[0] = B + int(torch.randint(1, 3, (), generator=g))
    elif kind == "heads":
        shape[1] = Hkv + 1  # neither Hkv nor 1
    elif kind == "tiles":  # prefill: fewer tiles than the longest row needs
        shape[2] = int(torch.randint(0, n_tiles, (), generator=g))
    idx = torch.zeros(shape, dtype=torch.int32)
    if kind == "float":
        idx = idx.float()
    if kind == "range":
        idx.view(-1)[0] = Lk + int(torch.randint(0, 4, (), generator=g))
    return idx


BAD_INDICES = [(kind, decode) for kind in ("rank", "rank_low", "batch", "heads", "float", "range")
               for decode in (True, False)] + [("tiles", False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,decode", BAD_INDICES)
@FUZZ
@given(data=st.data())
def test_malformed_indices_raise_input_error(kind, decode, backend, data):
    p = data.draw(problems(decode=decode))
    idx = _bad_indices(p, kind, p["g"])
    with pytest.raises(KascadeInputError, match="indices|index"):
        kascade.sparse_attention(p["q"], p["k"], p["v"], idx, p["kv_start"], p["kv_end"],
                                 topk_fraction=p["frac"], topk_floor=p["floor"], tile_size=p["tile"],
                                 backend=backend)


BAD_INPUTS = ["q_rank", "gqa", "lq_gt_lk", "head_dim", "batch", "dtype", "start_ge_end", "end_gt_lk",
              "start_neg", "lengths_shape", "lengths_float", "fraction", "floor", "tile"]


def _bad_call(p, kind):
    q, k, v = p["q"], p["k"], p["v"]
    B, Lk = q.shape[0], k.shape[2]
    ks, ke = p["kv_start"].clone(), p["kv_end"].clone()
    kw = dict(topk_fraction=p["frac"], topk_floor=p["floor"], tile_size=p["tile"])
    if kind == "q_rank":
        q = q[0]
    elif kind == "gqa":
        if k.shape[1] == 1:  # two KV heads, then an odd number of query heads
            k, v = torch.cat([k, k], dim=1), torch.cat([v, v], dim=1)
        if q.shape[1] % k.shape[1] == 0:
            q = torch.cat([q, q[:, :1]], dim=1)
    elif kind == "lq_gt_lk":
        k, v = k[:, :, : q.shape[2] - 1], v[:, :, : q.shape[2] - 1]
    elif kind == "head_dim":
        k, v = k[..., :-1], v[..., :-1]
    elif kind == "batch":
        k, v = torch.cat([k, k]), torch.cat([v, v])
    elif kind == "dtype":
        k = k.double()
    elif kind == "start_ge_end":
        ks[-1] = ke[-1]
    elif kind == "end_gt_lk":
        ke[0] = Lk + 1
    elif kind == "start_neg":
        ks[0] = -1
    elif kind == "lengths_shape":
        ks = torch.zeros(B + 1, dtype=torch.int64)
    elif kind == "lengths_float":
        ke = ke.float()
    elif kind == "fraction":
        kw["topk_fraction"] = 0.0
    elif kind == "floor":
        kw["topk_floor"] = 0
    elif kind == "tile":
        kw["tile_size"] = 0
    return q, k, v, ks, ke, kw


@pytest.mark.parametrize("kind,op", [(kind, op) for kind in BAD_INPUTS for op in ("dense", "anchor", "sparse")
                                     if op != "dense" or kind not in ("fraction", "floor", "tile")])
@settings(FUZZ, max_examples=8)
@given(p=problems(), backend=st.sampled_from(BACKENDS))
def test_malformed_inputs_raise_input_error(kind, op, p, backend):
    q, k, v, ks, ke, kw = _bad_call(p, kind)
    idx = torch.zeros(p["q"].shape[0], p["k"].shape[1], *([] if p["q"].shape[2] == 1 else [64]), 1,
                      dtype=torch.int32)
    with pytest.raises(KascadeInputError):
        if op == "dense":
            kascade.dense_attention(q, k, v, ks, ke, backend=backend)
        elif op == "anchor":
            kascade.anchor_attention(q, k, v, ks, ke, backend=backend, **kw)
        else:
            kascade.sparse_attention(q, k, v, idx, ks, ke, backend=backend, **kw)
