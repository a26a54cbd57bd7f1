"""Triton prefill kernels (kascade.ops.prefill) under the interpreter, against kascade.reference.

TRITON_INTERPRET=1 runs the kernels on CPU tensors (bf16 arithmetic is broken there, so fp16/fp32).
Selections are compared by the pooled post-softmax mass they capture (ties may pick other keys);
outputs against the reference over the kernel's own selection, with the FlashAttention rule for
low precision: at most twice the error of a plain same-precision PyTorch run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import pytest
import torch

# The interpreter must be on before the kernels are decorated (at import of kascade.kernels.prefill).
_ALREADY_COMPILED = "kascade.kernels.prefill" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ.setdefault("TRITON_INTERPRET", "1")
if _ALREADY_COMPILED:
    pytest.skip("needs TRITON_INTERPRET=1 before the prefill kernels load; run this file on its own",
                allow_module_level=True)
triton = pytest.importorskip("triton")

import kascade.reference as R  # noqa: E402
from kascade import KascadeInputError  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or CUDA", allow_module_level=True)

from kascade import attention as ops  # noqa: E402
from kascade.ops import prefill as P  # noqa: E402

DEV = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def make(B, Hq, Hkv, Lq, Lk, D, dtype, seed=0, layout="bhld"):
    g = torch.Generator().manual_seed(seed)
    if layout == "blhd":  # [B, L, H, D] storage seen through a transpose, as Hugging Face gives it
        q = torch.randn(B, Lq, Hq, D, generator=g).to(dtype).to(DEV).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, Lq, D, generator=g).to(dtype).to(DEV)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype).to(DEV)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype).to(DEV)
    return q, k, v


def plain_error(q, k, v, idx, ks, ke, kw):
    """Error of a plain same-precision PyTorch run of the same masked attention vs a float64 one."""
    allowed = _allowed(q, k, idx, ks, ke, kw)  # [B, Hq, Lq, Lk]
    G = q.shape[1] // k.shape[1]
    out = {}
    for name, dt in (("low", q.dtype), ("ref", torch.float64)):
        qq, kk, vv = (t.to(dt).repeat_interleave(G, 1) if t is not q else t.to(dt) for t in (q, k, v))
        s = (qq @ kk.transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1]))
        p = torch.nan_to_num(torch.softmax(s.masked_fill(~allowed, float("-inf")), -1), nan=0.0)
        out[name] = p @ vv
    return (out["low"].double() - out["ref"]).abs().max().item(), out["ref"]


def _allowed(q, k, idx, ks, ke, kw):
    """Full [B, Hq, Lq, Lk] mask of a rolling sparse layer, built from the reference's helpers."""
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    Hkv = k.shape[1]
    m = torch.zeros(B, Hq, Lq, Lk, dtype=torch.bool, device=q.device)
    for b, row in R._rows(q, k, k, ks, ke):
        n, L = row.q.shape[1], row.k.shape[1]
        a = R._allowed_keys(row, 0, n, L, idx[b], False, kw["topk_fraction"], kw["topk_floor"], kw["tile_size"])
        a = a & R._causal(row, 0, n, L, q.device)[None, None]
        m[b, :, row.q_index:, row.start:row.start + L] = a.repeat_interleave(Hq // Hkv, 0).reshape(Hq, n, L)
    return m


def check_selection(q, k, idx, ks, ke, kw):
    """Shape, budget, range, uniqueness of the kernel's indices; captured mass equal to the reference's."""
    ref_idx = R.select_prefill(q, k, ks, ke, **kw)
    assert idx.dtype == torch.int32
    assert idx.shape[:3] == ref_idx.shape[:3] and idx.shape[3] >= ref_idx.shape[3]
    T = kw["tile_size"]
    for b in range(q.shape[0]):
        for t in range(idx.shape[2]):
            want = int((ref_idx[b, 0, t] >= 0).sum())
            for h in range(k.shape[1]):
                sel = idx[b, h, t]
                real = sel[sel >= 0]
                assert len(real) == want, f"row {b} tile {t} head {h}: {len(real)} indices, budget {want}"
                assert bool((sel[want:] == -1).all()), "real indices first, -1 after"
                rel = real.long() - int(ks[b])
                assert bool(((rel >= 0) & (rel < t * T)).all()), "indices must come from the tile's prefix"
                assert len(set(real.tolist())) == want, "no duplicates"
    # The selection's objective: pooled post-softmax mass of the chosen keys, per (row, head, tile),
    # equal to the exact Top-k's up to the select's tie resolution (2^-11 relative with float16 pooling).
    for b, row in R._rows(q.float(), k.float(), k.float(), ks, ke):
        n, L = row.q.shape[1], row.k.shape[1]
        s = R._group_scores(row, 0, n, 1 / math.sqrt(q.shape[-1])).double()
        p = torch.softmax(s.masked_fill(~R._causal(row, 0, n, L, q.device), float("-inf")), -1)
        tile_of = (row.q_pos + torch.arange(n, device=q.device)) // T
        for t in range(idx.shape[2]):
            want = int((ref_idx[b, 0, t] >= 0).sum())
            if not want:
                continue
            pooled = p[:, :, tile_of == t, : t * T].sum((1, 2))  # [Hkv, prefix]
            for h in range(k.shape[1]):
                got = pooled[h][idx[b, h, t, :want].long() - row.start].sum()
                best = pooled[h].topk(want).values.sum()
                assert float(best - got) <= 1e-3 * float(best), (b, t, h, float(best), float(got))
    mass_k, att_k, _ = R.selection_stats(q, k, idx, ks, ke, **kw)
    mass_r, att_r, _ = R.selection_stats(q, k, ref_idx, ks, ke, **kw)
    assert torch.equal(att_k, att_r)
    assert float((mass_r - mass_k).mean()) < 1e-3


CASES = [
    # B, Hq, Hkv, Lq, Lk, D, T, frac, floor, kv_start, kv_end
    (2, 4, 4, 157, 157, 64, 16, 0.1, 8, [0, 13], [157, 157]),
    (2, 8, 2, 113, 113, 64, 16, 0.2, 4, [0, 30], [113, 101]),
    (1, 7, 1, 150, 150, 64, 32, 0.1, 4, [0], [150]),
    (2, 8, 2, 40, 200, 128, 16, 0.1, 8, [0, 17], [200, 200]),  # chunked prefill: Lq < Lk
    (2, 8, 2, 50, 70, 64, 16, 0.1, 4, [0, 40], [70, 70]),  # row 1 shorter than Lq: padding queries
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-{c[1]}x{c[2]}-Lq{c[3]}-Lk{c[4]}-D{c[5]}-T{c[6]}")
def test_anchor_and_reuse_match_reference(dtype, case):
    B, Hq, Hkv, Lq, Lk, D, T, frac, floor, s, e = case
    q, k, v = make(B, Hq, Hkv, Lq, Lk, D, dtype, seed=Lq + Hq)
    ks, ke = torch.tensor(s, device=DEV), torch.tensor(e, device=DEV)
    kw = dict(topk_fraction=frac, topk_floor=floor, tile_size=T)
    out0, idx0 = P.anchor(q, k, v, ks, ke, scale=None, dense_output=True, **kw)
    out1, idx1 = P.anchor(q, k, v, ks, ke, scale=None, dense_output=False, **kw)
    reuse = P.sparse(q, k, v, idx1, ks, ke, scale=None, **kw)
    dense = P.dense(q, k, v, ks, ke, scale=None)
    assert torch.equal(idx0, idx1)
    check_selection(q, k, idx1, ks, ke, kw)
    for out in (out0, out1, reuse, dense):
        assert out.dtype == dtype and out.shape == q.shape and bool(torch.isfinite(out).all())
    tol_sparse, ref_sparse = plain_error(q, k, v, idx1, ks, ke, kw)
    ref_dense = R.dense_attention(q, k, v, ks, ke).double()
    if dtype == torch.float32:
        tol_sparse = tol_dense = 1e-4
    else:
        full = torch.full((B, Hkv, idx1.shape[2], 1), -1, dtype=torch.int32, device=DEV)
        tol_dense, _ = plain_error(q, k, v, full, ks, ke, dict(kw, topk_fraction=1.0))
        tol_sparse, tol_dense = max(2 * tol_sparse, 1e-5), max(2 * tol_dense, 1e-5)
    assert (out1.double() - ref_sparse).abs().max().item() <= tol_sparse
    assert (reuse.double() - ref_sparse).abs().max().item() <= tol_sparse
    assert (out0.double() - ref_dense).abs().max().item() <= tol_dense
    assert (dense.double() - ref_dense).abs().max().item() <= tol_dense
    # padding queries are zero
    for b in range(B):
        n_pad = Lq - min(Lq, e[b] - s[b])
        if n_pad:
            assert float(out1[b, :, :n_pad].abs().max()) == 0.0
            assert float(out0[b, :, :n_pad].abs().max()) == 0.0


@pytest.mark.parametrize("knobs", [dict(sparse_rows_per_program=32), dict(sparse_block_n=16, sparse_warps=4)],
                         ids=["rows32", "n16-w4"])
def test_sparse_launch_variants(knobs):
    """The reuse kernel's launch variants (kascade bench prefill --tune): several head blocks per group
    (rows32) and a full-block / tail split at another block size give the reference's output over the
    reference's indices, padding and chunked rows included."""
    cfg = dataclasses.replace(P.DEFAULT_CONFIG, **knobs)
    for B, Hq, Hkv, Lq, Lk, D, T, frac, floor, s, e in (CASES[1], CASES[3], CASES[4]):
        q, k, v = make(B, Hq, Hkv, Lq, Lk, D, torch.float32, seed=Lq)
        ks, ke = torch.tensor(s, device=DEV), torch.tensor(e, device=DEV)
        kw = dict(topk_fraction=frac, topk_floor=floor, tile_size=T)
        idx = R.select_prefill(q, k, ks, ke, **kw)
        got = P.sparse(q, k, v, idx, ks, ke, scale=None, config=cfg, **kw)
        want = R.sparse_attention(q, k, v, idx, ks, ke, **kw)
        assert (got.double() - want.double()).abs().max().item() < 1e-4


def test_sparse_refuses_a_hole_inside_a_budget():
    """The reuse kernel reads a sparse tile's budget slots without a mask: a -1 among them is refused
    with its position, while -1 after the budget (and in dense tiles) is fine."""
    B, Hq, Hkv, Lq, Lk, D, T, frac, floor, s, e = CASES[1]
    q, k, v = make(B, Hq, Hkv, Lq, Lk, D, torch.float32, seed=3)
    ks, ke = torch.tensor(s, device=DEV), torch.tensor(e, device=DEV)
    kw = dict(topk_fraction=frac, topk_floor=floor, tile_size=T)
    idx = R.select_prefill(q, k, ks, ke, **kw)
    P.sparse(q, k, v, idx, ks, ke, **kw)  # as selected: accepted
    t = idx.shape[2] - 1
    budget = int((idx[0, 1, t] >= 0).sum())
    holed = idx.clone()
    holed[0, 1, t, budget // 2] = -1
    with pytest.raises(KascadeInputError, match=rf"indices\[0, 1, {t}, {budget // 2}\] is -1"):
        P.sparse(q, k, v, holed, ks, ke, **kw)
    with pytest.raises(KascadeInputError, match="is -1, inside tile"):
        ops.sparse_attention(q, k, v, holed, ks, ke, backend="triton", **kw)


def test_first_tiles_dense_and_reuse_over_reference_indices():
    """Dense tiles (prefix within budget) hold -1 and attend to their whole prefix; the reuse kernel on
    the reference's own indices gives the reference's output."""
    q, k, v = make(1, 8, 2, 130, 130, 64, torch.float32, seed=11)
    ks, ke = torch.tensor([0]), torch.tensor([130])
    kw = dict(topk_fraction=0.25, topk_floor=32, tile_size=16)
    out, idx = P.anchor(q.to(DEV), k.to(DEV), v.to(DEV), ks.to(DEV), ke.to(DEV), scale=None, dense_output=False, **kw)
    for t in range(idx.shape[2]):
        dense_tile = R.prefill_tile_is_dense(t * 16, 0.25, 32)
        assert bool((idx[0, :, t] == -1).all()) == dense_tile
    assert R.prefill_tile_is_dense(32, 0.25, 32) and not R.prefill_tile_is_dense(48, 0.25, 32)
    ref_idx = R.select_prefill(q, k, ks, ke, **kw)
    got = P.sparse(q, k, v, ref_idx.to(DEV), ks.to(DEV), ke.to(DEV), scale=None, **kw)
    want = R.sparse_attention(q, k, v, ref_idx, ks, ke, **kw)
    assert (got.cpu() - want).abs().max().item() < 1e-4


def test_ties_take_exactly_the_budget():
    """Zero queries: every prefix key gets the same pooled score; the select must still take exactly
    the budget of distinct keys (the lowest positions, by its tie rule)."""
    q, k, v = make(1, 4, 1, 96, 96, 64, torch.float32, seed=5)
    q = torch.zeros_like(q)
    ks, ke = torch.tensor([0], device=DEV), torch.tensor([96], device=DEV)
    kw = dict(topk_fraction=0.1, topk_floor=5, tile_size=16)
    _, idx = P.anchor(q, k, v, ks, ke, scale=None, dense_output=False, **kw)
    for t in range(1, idx.shape[2]):
        kb = R.topk_budget(t * 16, 0.1, 5)
        assert idx[0, 0, t, :kb].tolist() == list(range(kb))


def test_strided_queries_and_triton_dispatch():
    """q viewed from a [B, L, H, D] tensor (non-contiguous heads), through kascade.attention with backend=triton."""
    from kascade import attention as ops

    q, k, v = make(1, 8, 2, 100, 100, 64, torch.float16, seed=7, layout="blhd")
    assert not q.is_contiguous()
    kw = dict(topk_fraction=0.1, topk_floor=8, tile_size=16)
    out, idx = ops.anchor_attention(q, k, v, backend="triton", **kw)
    ref_out, ref_idx = ops.anchor_attention(q, k, v, backend="reference", **kw)
    ks, ke = torch.tensor([0], device=DEV), torch.tensor([100], device=DEV)
    check_selection(q, k, idx, ks, ke, kw)
    ref = R.sparse_attention(q, k, v, idx, **kw)
    assert (out.float() - ref.float()).abs().max().item() < 5e-3
    dense = ops.dense_attention(q, k, v, backend="triton")
    assert (dense.float() - R.dense_attention(q, k, v).float()).abs().max().item() < 5e-3


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(D=96), "head_dim in \\(64, 128\\), got 96"),
        (dict(T=8), "tile_size in \\(16, 32, 64\\), got 8"),
        (dict(Hq=34, Hkv=2), "GQA group sizes 1..16 .* got 34/2=17"),
        (dict(Lq=1), "Lq > 1 .* got Lq=1"),
        (dict(strided=True), "contiguous in head_dim"),
    ],
)
def test_bad_inputs_name_the_value(bad, match):
    D, T, Hq, Hkv, Lq = bad.get("D", 64), bad.get("T", 16), bad.get("Hq", 4), bad.get("Hkv", 2), bad.get("Lq", 32)
    q, k, v = make(1, Hq, Hkv, Lq, 32, D, torch.float32)
    if bad.get("strided"):
        q = torch.randn(1, Hq, Lq, D * 2)[..., ::2]
    ks, ke = torch.tensor([0]), torch.tensor([32])
    with pytest.raises(KascadeInputError, match=match):
        P.anchor(q, k, v, ks, ke, topk_fraction=0.1, topk_floor=4, tile_size=T, scale=None)
