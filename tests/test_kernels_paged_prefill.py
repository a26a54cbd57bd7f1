"""Paged-KV rolling prefill (kascade.ops.paged.paged_prefill_*) under the CPU interpreter.

vLLM's packed varlen batch: per sequence, random contiguous q [1, Hq, q_len, D] and k, v
[1, Hkv, seq_len, D]; the queries are packed into q [total_tokens, Hq, D] (plus padding rows past
query_start_loc[B], which must come out zero) and K/V scattered into a paged cache through a shuffled
block table. Cache slots no sequence owns (unused blocks, the tail of each last block) hold NaN, and
block-table entries past a sequence's last block hold -1, so reading a key outside a sequence, or a
table entry that should not be read, shows up as NaN or a bad address.

The batch mixes a whole prompt (q_len == seq_len), a chunk whose first query starts a tile, one whose
first query does not, and a decode row (q_len 1). Each sequence is compared with the reference on its
contiguous data (queries aligned to the end, kv range [0, seq_len)): outputs by the FlashAttention rule
of tests/test_kernels_prefill.py (fp32: 1e-4; fp16: twice the error of a plain fp16 PyTorch run),
selections by the pooled post-softmax mass they capture (equal to the exact Top-k's up to near-ties) plus
count / range / uniqueness. Also: exact equality with the contiguous kernels (kascade.ops.prefill) on
one sequence, and input validation.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import pytest

_ALREADY_COMPILED = "kascade.kernels.prefill" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ.setdefault("TRITON_INTERPRET", "1")
if _ALREADY_COMPILED or os.environ["TRITON_INTERPRET"] != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before the prefill kernels load; run this file on its own",
                allow_module_level=True)

import torch  # noqa: E402

pytest.importorskip("triton")

import kascade.reference as R  # noqa: E402
from kascade.ops import paged as PG  # noqa: E402
from kascade.ops import prefill as P  # noqa: E402
from kascade.validation import KascadeInputError  # noqa: E402
from test_kernels_prefill import plain_error  # noqa: E402

PAD_ROWS = 3  # rows of q past query_start_loc[B] (a CUDA-graph bucket's padding)


class Batch:
    """A packed varlen batch on a paged cache, with each sequence's contiguous data for the reference."""

    def __init__(self, seqs, Hq, Hkv, Dh, block_size, dtype, seed=0, extra_blocks=4, spread=1.5):
        g = torch.Generator().manual_seed(seed)
        self.seqs = seqs  # [(seq_len, q_len)]
        self.B, self.Hq, self.Hkv, self.dtype = len(seqs), Hq, Hkv, dtype
        self.q, self.k, self.v = [], [], []
        for L, n in seqs:
            self.q.append((torch.randn(1, Hq, n, Dh, generator=g) * spread).to(dtype))
            self.k.append(torch.randn(1, Hkv, L, Dh, generator=g).to(dtype))
            self.v.append(torch.randn(1, Hkv, L, Dh, generator=g).to(dtype))
        qs = [x[0].transpose(0, 1) for x in self.q]  # [n, Hq, D]
        qs.append(torch.randn(PAD_ROWS, Hq, Dh, generator=g).to(dtype))
        self.q_packed = torch.cat(qs).contiguous()
        q_lens = [n for _, n in seqs]
        self.query_start_loc = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
        self.seq_lens = torch.tensor([L for L, _ in seqs], dtype=torch.int32)
        self.max_query_len, self.max_seq_len = max(q_lens), max(L for L, _ in seqs)
        need = [-(-L // block_size) for L, _ in seqs]
        max_blocks = max(need) + 1
        num_blocks = sum(need) + extra_blocks
        perm = torch.randperm(num_blocks, generator=g)
        self.k_cache = torch.full((num_blocks, block_size, Hkv, Dh), float("nan"), dtype=dtype)
        self.v_cache = torch.full_like(self.k_cache, float("nan"))
        self.block_table = torch.full((self.B, max_blocks), -1, dtype=torch.int32)
        used = 0
        for b, (L, _) in enumerate(seqs):
            for j in range(need[b]):
                phys = int(perm[used])
                used += 1
                self.block_table[b, j] = phys
                lo, hi = j * block_size, min((j + 1) * block_size, L)
                self.k_cache[phys, : hi - lo] = self.k[b][0, :, lo:hi].transpose(0, 1)
                self.v_cache[phys, : hi - lo] = self.v[b][0, :, lo:hi].transpose(0, 1)

    def args(self):
        return (self.q_packed, self.k_cache, self.v_cache, self.block_table, self.seq_lens, self.query_start_loc)

    def rows(self, out, b):
        """Sequence b's rows of a packed output, as [1, Hq, q_len, D]."""
        lo, hi = int(self.query_start_loc[b]), int(self.query_start_loc[b + 1])
        return out[lo:hi].transpose(0, 1)[None]

    def ref_indices(self, indices, b, T):
        """Sequence b's indices in the reference layout [1, Hkv, ceil(seq_len / T), W] (absolute tiles)."""
        L, n = self.seqs[b]
        first, last = (L - n) // T, (L - 1) // T
        n_used = last - first + 1
        assert bool((indices[b, :, n_used:] == -1).all()), "slots past the sequence's last tile hold -1"
        out = torch.full((1, self.Hkv, -(-L // T), indices.shape[3]), -1, dtype=torch.int32)
        out[0, :, first : last + 1] = indices[b, :, :n_used]
        return out


def check_selection(batch, indices, kw):
    """Per sequence: count, order of the -1 padding, range, uniqueness; captured pooled mass equal to the
    exact Top-k's (up to the select's near-ties)."""
    T = kw["tile_size"]
    assert indices.dtype == torch.int32 and indices.shape[:2] == (batch.B, batch.Hkv)
    assert indices.shape[3] % 16 == 0
    for b, (L, n) in enumerate(batch.seqs):
        q, k = batch.q[b], batch.k[b]
        ref = R.select_prefill(q, k, **kw)
        idx = batch.ref_indices(indices, b, T)
        assert idx.shape[3] >= ref.shape[3]
        row = next(R._rows(q.float(), k.float(), k.float(), torch.tensor([0]), torch.tensor([L])))[1]
        s = R._group_scores(row, 0, n, 1 / math.sqrt(q.shape[-1])).double()
        p = torch.softmax(s.masked_fill(~R._causal(row, 0, n, L, q.device), float("-inf")), -1)
        tile_of = (row.q_pos + torch.arange(n)) // T
        for t in range(idx.shape[2]):
            want = int((ref[0, 0, t] >= 0).sum())
            pooled = p[:, :, tile_of == t, : t * T].sum((1, 2))  # [Hkv, prefix]
            for h in range(batch.Hkv):
                sel = idx[0, h, t]
                real = sel[sel >= 0]
                assert len(real) == want, f"seq {b} tile {t} head {h}: {len(real)} indices, budget {want}"
                assert bool((sel[want:] == -1).all()), "real indices first, -1 after"
                assert bool(((real >= 0) & (real < t * T)).all()), "indices come from the tile's prefix"
                assert len(set(real.tolist())) == want, "no duplicates"
                if want:
                    got = pooled[h][real.long()].sum()
                    best = pooled[h].topk(want).values.sum()
                    assert float(best - got) <= 1e-3 * float(best), (b, t, h, float(best), float(got))


def check_outputs(batch, out, want, tol_fn):
    """out: packed kernel output; want(b) -> float64 reference of sequence b; tol_fn(b) -> tolerance."""
    assert out.shape == batch.q_packed.shape and out.dtype == batch.dtype
    assert bool(torch.isfinite(out).all())
    assert float(out[-PAD_ROWS:].abs().max()) == 0.0, "rows past query_start_loc[B] stay zero"
    for b in range(batch.B):
        err = (batch.rows(out, b).double() - want(b)).abs().max().item()
        assert err <= tol_fn(b), (b, batch.seqs[b], err, tol_fn(b))


def _head_map(Hkv):
    hm = [(h * 3 + 1) % Hkv for h in range(Hkv)]
    if Hkv > 2:
        hm[-1] = hm[0]
    return torch.tensor(hm, dtype=torch.int32)


# (seq_len, q_len) per sequence for T = 16 and 32: a whole prompt; a chunk starting at position 160 (a
# tile boundary); a chunk starting at 81 (mid-tile); a decode row.
SEQS = [(150, 150), (200, 40), (131, 50), (77, 1)]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
BLOCKS = [pytest.param(16, id="bs16"), pytest.param(32, id="bs32")]
# (Hq, Hkv, D, T, fraction, floor)
SHAPES = [
    pytest.param(8, 2, 64, 16, 0.2, 24, id="gqa4-d64-T16"),
    pytest.param(16, 1, 128, 32, 0.1, 12, id="gqa16-d128-T32"),  # pooled by two head blocks (atomic)
    pytest.param(3, 3, 64, 64, 0.1, 12, id="gqa1-d64-T64"),
]


def _run_all(batch, kw, head_map):
    common = dict(max_query_len=batch.max_query_len, **kw)
    out0, idx0 = PG.paged_prefill_anchor(*batch.args(), dense_output=True, validate_values=True, **common)
    out1, idx1 = PG.paged_prefill_anchor(*batch.args(), validate_values=True, **common)
    reuse = PG.paged_prefill_sparse(*batch.args(), idx1, head_map=head_map, validate_values=True, **common)
    dense = PG.paged_prefill_dense(*batch.args(), max_query_len=batch.max_query_len, validate_values=True)
    return out0, idx0, out1, idx1, reuse, dense


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("Hq,Hkv,Dh,T,frac,floor", SHAPES)
def test_paged_prefill_matches_reference(Hq, Hkv, Dh, T, frac, floor, block_size, dtype):
    if T == 64 and (block_size == 32 or dtype == torch.float32):
        pytest.skip("T=64 runs once (bs16, fp16): the interpreter is slow")
    if Dh == 128 and block_size == 32 and dtype == torch.float32:
        pytest.skip("interpreter time")
    batch = Batch(SEQS, Hq, Hkv, Dh, block_size, dtype, seed=Hq * 10 + block_size)
    kw = dict(topk_fraction=frac, topk_floor=floor, tile_size=T)
    head_map = _head_map(Hkv)
    out0, idx0, out1, idx1, reuse, dense = _run_all(batch, kw, head_map)
    assert torch.equal(idx0, idx1)
    n_slots = (batch.max_query_len + T - 2) // T + 1
    assert idx1.shape[2] == n_slots
    check_selection(batch, idx1, kw)

    def args_b(b, idx):
        return batch.q[b], batch.k[b], batch.v[b], batch.ref_indices(idx, b, T)

    zero, L_of = torch.tensor([0]), (lambda b: torch.tensor([batch.seqs[b][0]]))
    sparse_ref = {b: plain_error(*args_b(b, idx1), zero, L_of(b), kw) for b in range(batch.B)}
    mapped = idx1[:, head_map.long()]
    reuse_ref = {b: plain_error(*args_b(b, mapped), zero, L_of(b), kw) for b in range(batch.B)}

    def dense_tol(b):
        full = torch.full((1, Hkv, -(-batch.seqs[b][0] // T), 1), -1, dtype=torch.int32)
        return plain_error(batch.q[b], batch.k[b], batch.v[b], full, zero, L_of(b), dict(kw, topk_fraction=1.0))[0]

    def tol(err):
        return 1e-4 if dtype == torch.float32 else max(2 * err, 1e-5)

    dense_ref = {b: R.dense_attention(batch.q[b], batch.k[b], batch.v[b]).double() for b in range(batch.B)}
    dense_tols = {b: tol(dense_tol(b)) for b in range(batch.B)}
    check_outputs(batch, out1, lambda b: sparse_ref[b][1], lambda b: tol(sparse_ref[b][0]))
    check_outputs(batch, reuse, lambda b: reuse_ref[b][1], lambda b: tol(reuse_ref[b][0]))
    check_outputs(batch, out0, dense_ref.__getitem__, dense_tols.__getitem__)
    check_outputs(batch, dense, dense_ref.__getitem__, dense_tols.__getitem__)
    # the head map matters: heads read other heads' indices
    if Hkv > 1:
        assert not torch.equal(reuse, out1)


@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("seq", [(131, 50), (96, 96)], ids=["chunk-mid-tile", "prompt"])
def test_paged_prefill_equals_contiguous(seq, block_size):
    """One sequence: the paged kernels give exactly the contiguous kernels' indices (shifted to the first
    query tile) and outputs; same arithmetic, only the addresses differ."""
    L, n = seq
    T, kw = 16, dict(topk_fraction=0.15, topk_floor=10, tile_size=16)
    batch = Batch([seq], 8, 2, 64, block_size, torch.float16, seed=L + block_size)
    q, k, v = batch.q[0], batch.k[0], batch.v[0]
    ks, ke = torch.tensor([0]), torch.tensor([L])
    common = dict(max_query_len=n, max_seq_len=L, **kw)
    head_map = _head_map(2)
    for dense_output in (False, True):
        out_c, idx_c = P.anchor(q, k, v, ks, ke, dense_output=dense_output, **kw)
        out_p, idx_p = PG.paged_prefill_anchor(*batch.args(), dense_output=dense_output, **common)
        assert idx_p.shape[3] == idx_c.shape[3]
        assert torch.equal(batch.ref_indices(idx_p, 0, T), idx_c)
        assert torch.equal(batch.rows(out_p, 0), out_c)
    reuse_c = P.sparse(q, k, v, idx_c[:, head_map.long()], ks, ke, **kw)
    reuse_p = PG.paged_prefill_sparse(*batch.args(), idx_p, head_map=head_map, **common)
    assert torch.equal(batch.rows(reuse_p, 0), reuse_c)
    dense_c = P.dense(q, k, v, ks, ke)
    dense_p = PG.paged_prefill_dense(*batch.args(), max_query_len=n)
    assert torch.equal(batch.rows(dense_p, 0), dense_c)


@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("Hq,Hkv,T", [(8, 2, 16), (16, 1, 32)], ids=["gqa4-T16", "gqa16-T32-atomic"])
def test_paged_prefill_gather_kv_equals_block_table(Hq, Hkv, T, block_size):
    """gather_kv=True (K/V copied out of the pages once, read without the block table) gives exactly the
    block-table path's indices and outputs on the mixed batch (the unused slots the copy brings along hold
    NaN: reading one would show); and gather_kv lays each sequence's keys out in logical order."""
    batch = Batch(SEQS, Hq, Hkv, 64, block_size, torch.float16, seed=5 + block_size)
    kw = dict(max_query_len=batch.max_query_len, max_seq_len=batch.max_seq_len, topk_fraction=0.2, topk_floor=8,
              tile_size=T)
    hm = _head_map(Hkv)
    for dense_output in (False, True):
        out_t, idx_t = PG.paged_prefill_anchor(*batch.args(), dense_output=dense_output, **kw)
        out_g, idx_g = PG.paged_prefill_anchor(*batch.args(), dense_output=dense_output, gather_kv=True, **kw)
        assert torch.equal(idx_t, idx_g) and torch.equal(out_t, out_g)
    reuse_t = PG.paged_prefill_sparse(*batch.args(), idx_t, head_map=hm, **kw)
    reuse_g = PG.paged_prefill_sparse(*batch.args(), idx_t, head_map=hm, gather_kv=True, **kw)
    assert torch.equal(reuse_t, reuse_g) and bool(torch.isfinite(reuse_g).all())
    dense = dict(max_query_len=batch.max_query_len, max_seq_len=batch.max_seq_len)
    assert torch.equal(PG.paged_prefill_dense(*batch.args(), **dense),
                       PG.paged_prefill_dense(*batch.args(), gather_kv=True, **dense))
    k, v = PG.gather_kv(batch.k_cache, batch.v_cache, batch.block_table, batch.max_seq_len)
    assert k.shape == (batch.B, Hkv, -(-batch.max_seq_len // block_size) * block_size, 64)
    for b, (L, _) in enumerate(batch.seqs):
        assert torch.equal(k[b, :, :L], batch.k[b][0]) and torch.equal(v[b, :, :L], batch.v[b][0])


@pytest.mark.parametrize("layout", ["nhd", "vllm"])
def test_paged_prefill_physical_indices_equal_logical(layout):
    """A reuse layer reading the anchor's indices translated once to cache rows (paged_physical_indices, in
    place) gives exactly the block-table path's output, also on vLLM's K/V-interleaved blocks; validation
    checks physical rows against the cache; with gather_kv it is refused."""
    batch = Batch(SEQS, 8, 2, 64, 16, torch.float16, seed=17)
    if layout == "vllm":  # one [num_blocks, 2, block_size, Hkv, D] tensor, as vLLM allocates it
        kv = torch.stack([batch.k_cache, batch.v_cache], dim=1)
        batch.k_cache, batch.v_cache = kv.unbind(1)
        assert batch.k_cache.stride(0) == 2 * 16 * batch.k_cache.stride(1)
    kw = dict(max_query_len=batch.max_query_len, max_seq_len=batch.max_seq_len, topk_fraction=0.2, topk_floor=8,
              tile_size=16)
    _, idx = PG.paged_prefill_anchor(*batch.args(), **kw)
    hm = _head_map(2)
    want = PG.paged_prefill_sparse(*batch.args(), idx, head_map=hm, **kw)
    phys = PG.paged_physical_indices(idx.clone(), batch.block_table, batch.seq_lens, 16)
    for b, (L, _) in enumerate(batch.seqs):  # the translation itself, against the block table
        sel = idx[b] >= 0
        rows = batch.block_table[b].long()[idx[b][sel].long() // 16] * 16 + idx[b][sel].long() % 16
        assert torch.equal(phys[b][sel].long(), rows) and bool((phys[b][~sel] == -1).all())
    in_place = idx.clone()
    assert PG.paged_physical_indices(in_place, batch.block_table, batch.seq_lens, 16, out=in_place) is in_place
    assert torch.equal(in_place, phys)
    got = PG.paged_prefill_sparse(*batch.args(), phys, head_map=hm, physical=True, validate_values=True, **kw)
    assert torch.equal(got, want) and bool(torch.isfinite(got[: batch.query_start_loc[-1]]).all())
    bad = phys.clone()
    sel = (bad >= 0).nonzero()[0].tolist()
    bad[tuple(sel)] = batch.k_cache.shape[0] * 16  # one past the cache's last row
    with pytest.raises(KascadeInputError, match="is not a cache row"):
        PG.paged_prefill_sparse(*batch.args(), bad, physical=True, validate_values=True, **kw)
    with pytest.raises(KascadeInputError, match="cannot address a gather_kv copy"):
        PG.paged_prefill_sparse(*batch.args(), phys, physical=True, gather_kv=True, **kw)


def _reference_lse(batch) -> torch.Tensor:
    """Natural-log log-sum-exp of each packed query's causal scores, float32 [Hq, total_tokens] (FlashAttention's
    varlen layout; padding rows -inf), from the contiguous data."""
    lse = torch.full((batch.Hq, batch.q_packed.shape[0]), float("-inf"))
    for b, (L, n) in enumerate(batch.seqs):
        q, k = batch.q[b][0].float(), batch.k[b][0].float().repeat_interleave(batch.Hq // batch.Hkv, 0)
        s = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # [Hq, n, L]
        s = s.masked_fill(torch.arange(L)[None, :] > torch.arange(L - n, L)[:, None], float("-inf"))
        lo = int(batch.query_start_loc[b])
        lse[:, lo : lo + n] = torch.logsumexp(s, dim=-1)
    return lse


def test_paged_prefill_anchor_takes_a_given_dense_output():
    """Layer 0 with dense=(out, natural-log lse) from elsewhere (FlashAttention 3 in the vLLM backend): the
    given output comes back unchanged and the selection equals the one from the call's own flash pass
    (the exact Top-k's captured mass: the two log-sum-exps differ in the last bits); bad shapes are refused."""
    batch = Batch(SEQS, 8, 2, 64, 16, torch.float32, seed=13)
    kw = dict(max_query_len=batch.max_query_len, max_seq_len=batch.max_seq_len, topk_fraction=0.2, topk_floor=8,
              tile_size=16)
    out, idx = PG.paged_prefill_anchor(*batch.args(), dense_output=True, **kw)
    given = torch.randn_like(out)  # any tensor: the call must return it, not recompute
    lse = _reference_lse(batch)
    out_g, idx_g = PG.paged_prefill_anchor(*batch.args(), dense_output=True, dense=(given, lse), **kw)
    assert out_g is given
    sel = dict(topk_fraction=0.2, topk_floor=8, tile_size=16)
    check_selection(batch, idx, sel)
    check_selection(batch, idx_g, sel)  # the exact Top-k's captured mass, count, range, uniqueness
    with pytest.raises(KascadeInputError, match="dense_output=True"):
        PG.paged_prefill_anchor(*batch.args(), dense=(given, lse), **kw)
    with pytest.raises(KascadeInputError, match="log-sum-exp"):
        PG.paged_prefill_anchor(*batch.args(), dense_output=True, dense=(given, lse.t()), **kw)
    with pytest.raises(KascadeInputError, match="dense output"):
        PG.paged_prefill_anchor(*batch.args(), dense_output=True, dense=(given[:-1], lse), **kw)


def test_paged_prefill_bounds_from_block_table():
    """max_seq_len left out: the budget table and the index width come from max_blocks * block_size; the
    selection and outputs are unchanged (only the -1 padding of the width grows)."""
    batch = Batch([(90, 30), (40, 1)], 4, 2, 64, 16, torch.float32, seed=9)
    kw = dict(topk_fraction=0.2, topk_floor=8, tile_size=16)
    a_out, a_idx = PG.paged_prefill_anchor(*batch.args(), max_query_len=30, max_seq_len=90, **kw)
    b_out, b_idx = PG.paged_prefill_anchor(*batch.args(), max_query_len=30, **kw)
    lk_max = batch.block_table.shape[1] * 16
    assert b_idx.shape[3] == P.pad16(R.topk_budget((lk_max - 1) // 16 * 16, 0.2, 8)) > a_idx.shape[3]
    assert torch.equal(b_idx[..., : a_idx.shape[3]], a_idx) and bool((b_idx[..., a_idx.shape[3]:] == -1).all())
    assert torch.equal(a_out, b_out)


@pytest.mark.parametrize("atomic", [False, True], ids=["one-head-block", "atomic"])
def test_paged_prefill_pool_chunks(atomic):
    """A pooled buffer of one tile slot per launch (pool_buffer_bytes tiny): the pooling / select launches
    then start at slot offsets tile_lo > 0 (zeroing the buffer between launches when atomic); the
    selection equals the one-launch selection."""
    Hq, Hkv = (16, 1) if atomic else (8, 2)
    batch = Batch([(131, 50), (200, 40), (77, 1)], Hq, Hkv, 64, 16, torch.float32, seed=21)
    T = 32 if atomic else 16
    kw = dict(max_query_len=50, topk_fraction=0.1, topk_floor=6, tile_size=T)
    assert (P._group_blocking(Hq // Hkv, T, P.DEFAULT_CONFIG.pool_rows_per_program)[1] > 1) == atomic
    out_a, idx_a = PG.paged_prefill_anchor(*batch.args(), **kw)
    one_slot = dataclasses.replace(P.DEFAULT_CONFIG, pool_buffer_bytes=1)
    out_b, idx_b = PG.paged_prefill_anchor(*batch.args(), **kw, config=one_slot)
    assert idx_a.shape[2] > 1 and bool((idx_a[:, :, 1:] >= 0).any())
    assert torch.equal(idx_a, idx_b) and torch.equal(out_a, out_b)
    check_selection(batch, idx_b, {k: kw[k] for k in ("topk_fraction", "topk_floor", "tile_size")})


def _args():
    batch = Batch([(40, 20), (30, 5)], 4, 2, 64, 16, torch.float32, seed=3)
    return dict(zip(("q", "k_cache", "v_cache", "block_table", "seq_lens", "query_start_loc"), batch.args()))


KW = dict(max_query_len=20, topk_fraction=0.2, topk_floor=4, tile_size=16)

BAD = {
    "q-2d": (lambda a, k: a.update(q=a["q"][:, 0]), r"q must be \[total_tokens, num_q_heads, head_size\]"),
    "head-size-96": (lambda a, k: a.update(q=torch.zeros(28, 4, 96)), r"head_size in \(64, 128\), got q head_size 96"),
    "qsl-int64": (lambda a, k: a.update(query_start_loc=a["query_start_loc"].long()),
                  "query_start_loc must be int32, got torch.int64"),
    "qsl-batch": (lambda a, k: a.update(query_start_loc=a["query_start_loc"][:2]), r"block_table must be \[batch=1"),
    "max-query-len": (lambda a, k: k.update(max_query_len=0), "max_query_len must be a host int >= 1"),
    "max-query-len-tensor": (lambda a, k: k.update(max_query_len=torch.tensor(20)), "max_query_len must be a host int"),
    "max-seq-len": (lambda a, k: k.update(max_seq_len=1000), r"max_seq_len must be a host int in \[1, "),
    "tile-8": (lambda a, k: k.update(tile_size=8), r"tile_size in \(16, 32, 64\), got 8"),
    "gqa-32": (lambda a, k: a.update(q=torch.zeros(28, 32, 64), k_cache=a["k_cache"][:, :, :1],
                                     v_cache=a["v_cache"][:, :, :1]), "paged prefill kernels support GQA group sizes"),
    "block-size-24": (lambda a, k: a.update(k_cache=torch.zeros(8, 24, 2, 64), v_cache=torch.zeros(8, 24, 2, 64)),
                      "power of two >= 16, got 24"),
    "q-len-over-seq-len": (lambda a, k: a["seq_lens"].__setitem__(1, 4), "sequence 1 has q_len 5 > seq_lens 4"),
    "q-len-over-max": (lambda a, k: k.update(max_query_len=10), "sequence 0 has q_len 20 > max_query_len 10"),
    "seq-len-over-max": (lambda a, k: k.update(max_seq_len=35), r"exceed max_seq_len 35"),
    "qsl-decreasing": (lambda a, k: a["query_start_loc"].__setitem__(1, 26), "query_start_loc must start at 0"),
    "qsl-past-q": (lambda a, k: a["query_start_loc"].__setitem__(2, 40), "end at most at total_tokens = 28"),
    "bt-entry": (lambda a, k: a["block_table"].__setitem__((1, 0), 99), r"block_table\[1, 0\] = 99 is not a block"),
    "budget": (lambda a, k: k.update(topk_fraction=0.0), "topk_fraction must be in"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_paged_prefill_rejects(name):
    args, kw = _args(), dict(KW)
    BAD[name][0](args, kw)
    with pytest.raises(KascadeInputError, match=BAD[name][1]):
        PG.paged_prefill_anchor(**args, **kw, validate_values=True)
    if name != "budget":
        dense_kw = {key: kw[key] for key in ("max_query_len", "max_seq_len") if key in kw}
        if name != "tile-8":
            with pytest.raises(KascadeInputError, match=BAD[name][1]):
                PG.paged_prefill_dense(**args, **dense_kw, validate_values=True)


def test_paged_prefill_sparse_rejects():
    args = _args()
    _, idx = PG.paged_prefill_anchor(**args, **KW)
    PG.paged_prefill_sparse(**args, indices=idx, **KW, validate_values=True)  # as selected: accepted
    with pytest.raises(KascadeInputError, match=r"indices must be \[batch=2, num_kv_heads=2, n_slots, W\]"):
        PG.paged_prefill_sparse(**args, indices=idx[:, :1], **KW)
    with pytest.raises(KascadeInputError, match="too small: max_query_len 20 needs 3 tile slots"):
        PG.paged_prefill_sparse(**args, indices=idx[:, :, :2], **KW)
    with pytest.raises(KascadeInputError, match="head_map must be int32"):
        PG.paged_prefill_sparse(**args, indices=idx, head_map=torch.tensor([1, 0]), **KW)
    # sequence 0 (seq_len 40, q_len 20): first query at 20, tile 1 is slot 0, its budget is 4 keys
    holed = idx.clone()
    assert int((idx[0, 1, 0] >= 0).sum()) == 4
    holed[0, 1, 0, 2] = -1
    with pytest.raises(KascadeInputError, match=r"indices\[0, 1, 0, 2\] = -1 \(sequence 0, tile 1\)"):
        PG.paged_prefill_sparse(**args, indices=holed, **KW, validate_values=True)
    holed[0, 1, 0, 2] = 16  # not in the tile's prefix [0, 16)
    with pytest.raises(KascadeInputError, match=r"indices\[0, 1, 0, 2\] = 16"):
        PG.paged_prefill_sparse(**args, indices=holed, **KW, validate_values=True)
