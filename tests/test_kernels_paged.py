"""The paged-KV decode kernels (kascade.ops.paged) under the CPU interpreter.

A random contiguous cache [B, Hkv, Lk, D] is scattered into a vLLM paged cache
[num_blocks, block_size, Hkv, D] through a random block table (shuffled physical blocks, unused blocks
in between); the paged kernels are checked against the reference ops on the contiguous cache with
kv_end = seq_lens. Cache slots no sequence owns (unused blocks, the tail of each sequence's last block)
hold NaN, and block-table entries past a sequence's last block hold -1, so a kernel that reads a key
outside its sequence, or a block-table entry it should not, produces NaN (or an invalid address).

Rules as in test_kernels_decode.py: outputs within twice the error of a same-precision PyTorch run of
an fp32 reference (plus a floor); selections by the pooled attention mass they capture (>= the
reference selection's, up to near-ties) plus count / range / uniqueness.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest

_ALREADY_COMPILED = "kascade.kernels.decode" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ.setdefault("TRITON_INTERPRET", "1")
if _ALREADY_COMPILED or os.environ["TRITON_INTERPRET"] != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before the decode kernels load; run this file on its own",
                allow_module_level=True)

import torch  # noqa: E402

pytest.importorskip("triton")

import kascade.reference as R  # noqa: E402
from kascade.ops import decode as D  # noqa: E402
from kascade.ops import paged as P  # noqa: E402
from kascade.validation import KascadeInputError  # noqa: E402
from test_kernels_decode import allowed_from, check_close, check_selection  # noqa: E402


def make_paged(B, Hq, Hkv, lens, Dh, block_size, dtype, seed=0, spread=1.0, extra_blocks=5, layout="nhd"):
    """Returns (q [B, Hq, D], contiguous k, v [B, Hkv, Lk, D], k_cache, v_cache, block_table, seq_lens int32).

    The block table has one more column than the longest sequence needs (Lk = max_blocks * block_size);
    layout "hnd" builds the caches as [num_blocks, Hkv, block_size, D] and passes a transposed view, "vllm"
    as vLLM's FlashAttention backend does: one [num_blocks, 2, block_size, Hkv, D] tensor, K and V of a
    block side by side (unbind(1): block stride 2 * block_size slots)."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    need = [-(-n // block_size) for n in lens]
    max_blocks = max(need) + 1
    Lk = max_blocks * block_size
    q = (torch.randn(B, Hq, Dh, generator=g) * spread).to(dtype)
    k = torch.randn(B, Hkv, Lk, Dh, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Lk, Dh, generator=g).to(dtype)
    num_blocks = sum(need) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g)
    shape = (num_blocks, block_size, Hkv, Dh) if layout == "nhd" else (num_blocks, Hkv, block_size, Dh)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    if layout == "vllm":
        k_cache, v_cache = torch.full((num_blocks, 2, block_size, Hkv, Dh), float("nan"), dtype=dtype).unbind(1)
    if layout == "hnd":
        k_cache, v_cache = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    block_table = torch.full((B, max_blocks), -1, dtype=torch.int32)
    used = 0
    for b in range(B):
        for j in range(need[b]):
            phys = int(perm[used])
            used += 1
            block_table[b, j] = phys
            lo, hi = j * block_size, min((j + 1) * block_size, lens[b])
            k_cache[phys, : hi - lo] = k[b, :, lo:hi].transpose(0, 1)
            v_cache[phys, : hi - lo] = v[b, :, lo:hi].transpose(0, 1)
    return q, k, v, k_cache, v_cache, block_table, seq_lens


def ref_ranges(seq_lens):
    return torch.zeros(len(seq_lens), dtype=torch.int64), seq_lens.long()


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
BLOCKS = [pytest.param(16, id="bs16"), pytest.param(32, id="bs32")]
# (Hq, Hkv): GQA 1 and 4
HEADS = [pytest.param(4, 4, id="gqa1"), pytest.param(8, 2, id="gqa4")]
# per-row lengths: a long row, lengths off the block size, a multiple of it, one shorter than the floor
LENS = [150, 37, 96, 5]
FRAC, FLOOR = 0.10, 12


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("Hq,Hkv", HEADS)
def test_paged_dense(Hq, Hkv, block_size, dtype):
    q, k, v, kc, vc, bt, lens = make_paged(len(LENS), Hq, Hkv, LENS, 64, block_size, dtype, seed=1)
    out = P.paged_decode_dense(q, kc, vc, bt, lens, validate_values=True)
    assert out.shape == q.shape
    starts, ends = ref_ranges(lens)
    q4 = q[:, :, None]
    ref32 = R.dense_attention(q4.float(), k.float(), v.float(), starts, ends)
    Lk = k.shape[2]
    full = allowed_from(torch.arange(Lk, dtype=torch.int32).expand(len(LENS), Hkv, Lk), starts, ends, Hkv, Lk)
    check_close(out[:, :, None], q4, k, v, full, ref32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("Hq,Hkv", HEADS)
@pytest.mark.parametrize("dense_output", [False, True], ids=["anchor", "layer0"])
def test_paged_anchor(Hq, Hkv, block_size, dtype, dense_output):
    q, k, v, kc, vc, bt, lens = make_paged(len(LENS), Hq, Hkv, LENS, 64, block_size, dtype, seed=2, spread=2.0)
    out, indices = P.paged_decode_anchor(q, kc, vc, bt, lens, topk_fraction=FRAC, topk_floor=FLOOR,
                                         dense_output=dense_output, validate_values=True)
    assert out.shape == q.shape
    W = indices.shape[2]
    assert W % 16 == 0 and W >= R.topk_budget(k.shape[2], FRAC, FLOOR)
    starts, ends = ref_ranges(lens)
    q4 = q[:, :, None]
    check_selection(indices, q4, k, starts, ends, FRAC, FLOOR)
    Lk = k.shape[2]
    if dense_output:
        ref32 = R.dense_attention(q4.float(), k.float(), v.float(), starts, ends)
        allowed = allowed_from(torch.arange(Lk, dtype=torch.int32).expand(len(LENS), Hkv, Lk), starts, ends, Hkv, Lk)
    else:
        ref32 = R.sparse_attention(q4.float(), k.float(), v.float(), indices, starts, ends)
        allowed = allowed_from(indices, starts, ends, Hkv, Lk)
    check_close(out[:, :, None], q4, k, v, allowed, ref32)


def _head_map(Hkv):
    """A non-identity head map, many-to-one where there are more than two heads."""
    hm = [(h * 3 + 1) % Hkv for h in range(Hkv)]
    if Hkv > 2:
        hm[-1] = hm[0]
    return torch.tensor(hm, dtype=torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("Hq,Hkv", HEADS)
def test_paged_sparse_reuse(Hq, Hkv, block_size, dtype):
    """A reuse layer: another layer's selection (logical positions), head-mapped in the kernel, with holes
    of -1 and positions past a row's seq_len (both skipped)."""
    q, k, v, kc, vc, bt, lens = make_paged(len(LENS), Hq, Hkv, LENS, 64, block_size, dtype, seed=3)
    starts, ends = ref_ranges(lens)
    g = torch.Generator().manual_seed(4)
    qa = torch.randn(len(LENS), Hq, 1, 64, generator=g).to(dtype) * 2
    sel = R.select_decode(qa, k, starts, ends, topk_fraction=FRAC, topk_floor=FLOOR)
    sel[..., 1::5] = -1
    sel[0, :, 2] = int(lens[0]) + 3  # beyond the row's keys (inside its last table column): ignored
    head_map = _head_map(Hkv)
    out = P.paged_decode_sparse(q, kc, vc, bt, lens, sel, head_map=head_map, validate_values=True)
    mapped = sel[:, head_map.long()]
    q4 = q[:, :, None]
    ref32 = R.sparse_attention(q4.float(), k.float(), v.float(), mapped, starts, ends)
    check_close(out[:, :, None], q4, k, v, allowed_from(mapped, starts, ends, Hkv, k.shape[2]), ref32)
    # the same without head_map equals the kernel on pre-mapped indices
    out2 = P.paged_decode_sparse(q, kc, vc, bt, lens, mapped.contiguous())
    assert torch.equal(out, out2)
    # physical indices (cache rows, translated once): the same keys, the same arithmetic, the same output
    phys = P.paged_physical_indices(sel.to(torch.int32), bt, lens, block_size)
    want = torch.full_like(phys, -1)
    for b in range(len(LENS)):
        for h in range(Hkv):
            for j, i in enumerate(sel[b, h].tolist()):
                if 0 <= i < int(lens[b]):
                    want[b, h, j] = int(bt[b, i // block_size]) * block_size + i % block_size
    assert torch.equal(phys, want)
    out3 = P.paged_decode_sparse(q, kc, vc, bt, lens, phys, head_map=head_map, physical=True)
    assert torch.equal(out3, out)


@pytest.mark.parametrize("layout", ["hnd", "vllm"])
def test_paged_physical_rows_in_any_block_layout(layout):
    """Physical indices (cache rows block * block_size + slot) address blocks by the cache's block stride: an
    HND-strided cache and vLLM's K/V-interleaved blocks give the logical path's output; scores are refused."""
    q, k, v, kc, vc, bt, lens = make_paged(len(LENS), 8, 2, LENS, 64, 16, torch.float32, seed=3, layout=layout)
    assert kc.stride(0) != 16 * kc.stride(1)  # not the plain NHD layout
    starts, ends = ref_ranges(lens)
    sel = R.select_decode(q[:, :, None], k, starts, ends, topk_fraction=FRAC, topk_floor=FLOOR).to(torch.int32)
    phys = P.paged_physical_indices(sel, bt, lens, 16)
    want = P.paged_decode_sparse(q, kc, vc, bt, lens, sel)
    assert torch.equal(P.paged_decode_sparse(q, kc, vc, bt, lens, phys, physical=True), want)
    assert not bool(want.isnan().any())
    q4, *_ = P._prepare(q, kc, vc, bt, lens, False)
    with pytest.raises(KascadeInputError, match="physical indices need a paged cache"):
        D.sparse(q4, k, v, phys, starts, ends, physical=True)  # contiguous K/V


@pytest.mark.parametrize("dense_output", [False, True], ids=["anchor", "layer0"])
@pytest.mark.parametrize("block_size", BLOCKS)
def test_paged_anchor_equals_contiguous(block_size, dense_output):
    """The paged anchor gives exactly the contiguous anchor's indices and output on the same keys (same
    Lk, splits and arithmetic; only the K/V addresses differ)."""
    q, k, v, kc, vc, bt, lens = make_paged(len(LENS), 8, 2, LENS, 64, block_size, torch.float16, seed=5, spread=2.0)
    starts, ends = ref_ranges(lens)
    out_c, idx_c = D.anchor(q[:, :, None], k, v, starts, ends, topk_fraction=FRAC, topk_floor=FLOOR,
                            dense_output=dense_output)
    out_p, idx_p = P.paged_decode_anchor(q, kc, vc, bt, lens, topk_fraction=FRAC, topk_floor=FLOOR,
                                         dense_output=dense_output)
    assert torch.equal(idx_p, idx_c)
    assert torch.equal(out_p, out_c[:, :, 0])


@pytest.mark.parametrize("case", ["hnd-bs64-d128-gqa16", "many-splits-fused", "many-splits-combine",
                                  "fused-select"])
def test_paged_variants(case, monkeypatch):
    """Cache given as a strided view (HND storage), block size 64, head_dim 128, GQA 16; splits that cut
    through blocks, merged by the last split or by the combine kernel; the one-launch selection."""
    Hq, Hkv, Dh, bs, layout, lens = 8, 2, 64, 16, "nhd", [300, 37, 129, 5]
    cfg = D.DEFAULT_CONFIG
    if case.startswith("hnd"):
        Hq, Hkv, Dh, bs, layout, lens = 16, 1, 128, 64, "hnd", [200, 64, 7]
    elif case.startswith("many-splits"):
        # splits of 40 keys / 24 slots (multiples of 8): split boundaries inside blocks of 16
        cfg = dataclasses.replace(cfg, fuse_max_splits=1000 if case.endswith("fused") else 0, block_n=32,
                                  min_chunk=40, chunk_align=8, sparse_block_n=16, sparse_min_chunk=24,
                                  sparse_chunk_align=8, select_block=32, select_min_chunk=40)
        monkeypatch.setattr(D, "sm_count", lambda device: 64)
    else:
        cfg = dataclasses.replace(cfg, select_fused="always", select_block=64)
    q, k, v, kc, vc, bt, lens = make_paged(len(lens), Hq, Hkv, lens, Dh, bs, torch.float32, seed=6, spread=2.0,
                                           layout=layout)
    starts, ends = ref_ranges(lens)
    q4 = q[:, :, None]
    out, indices = P.paged_decode_anchor(q, kc, vc, bt, lens, topk_fraction=FRAC, topk_floor=FLOOR, config=cfg)
    check_selection(indices, q4, k, starts, ends, FRAC, FLOOR)
    ref32 = R.sparse_attention(q4, k, v, indices, starts, ends)
    check_close(out[:, :, None], q4, k, v, allowed_from(indices, starts, ends, Hkv, k.shape[2]), ref32)
    for _ in range(2):  # the combine tickets must be back at 0 after a launch
        dense = P.paged_decode_dense(q, kc, vc, bt, lens, config=cfg)
        ref_d = R.dense_attention(q4, k, v, starts, ends)
        Lk = k.shape[2]
        full = allowed_from(torch.arange(Lk, dtype=torch.int32).expand(len(lens), Hkv, Lk), starts, ends, Hkv, Lk)
        check_close(dense[:, :, None], q4, k, v, full, ref_d)


def test_paged_empty_sequence():
    """A padding slot of the batch (seq_len 0) gets a zero output and all -1 indices; the others are as
    without it."""
    lens = [70, 0, 33]
    q, k, v, kc, vc, bt, seq_lens = make_paged(3, 8, 2, [70, 1, 33], 64, 16, torch.float32, seed=7)
    seq_lens[1] = 0
    out, idx = P.paged_decode_anchor(q, kc, vc, bt, seq_lens, topk_fraction=FRAC, topk_floor=FLOOR,
                                     validate_values=True)
    dense = P.paged_decode_dense(q, kc, vc, bt, seq_lens)
    assert (idx[1] == -1).all()
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(dense[1], torch.zeros_like(dense[1]))
    keep = torch.tensor([0, 2])
    starts, ends = ref_ranges(torch.tensor([lens[0], lens[2]], dtype=torch.int32))
    q4 = q[keep][:, :, None]
    check_selection(idx[keep], q4, k[keep], starts, ends, FRAC, FLOOR)
    ref32 = R.sparse_attention(q4, k[keep], v[keep], idx[keep], starts, ends)
    check_close(out[keep][:, :, None], q4, k[keep], v[keep], allowed_from(idx[keep], starts, ends, 2, k.shape[2]),
                ref32)


def _inputs():
    q, _, _, kc, vc, bt, lens = make_paged(2, 8, 2, [40, 20], 64, 16, torch.float32, seed=8)
    return dict(q=q, k_cache=kc, v_cache=vc, block_table=bt, seq_lens=lens)


BAD = {
    "q-4d": (lambda a: a.update(q=a["q"][:, :, None]), r"q must be \[batch, num_q_heads, head_size\]"),
    "q-int": (lambda a: a.update(q=a["q"].int()), "q has dtype torch.int32"),
    "head-size-96": (lambda a: a.update(q=torch.zeros(2, 8, 96), k_cache=torch.zeros(4, 16, 2, 96),
                                        v_cache=torch.zeros(4, 16, 2, 96)),
                     r"head_size in \(64, 128\), got q head_size 96"),
    "k-dtype": (lambda a: a.update(k_cache=a["k_cache"].half()), "k_cache has dtype torch.float16"),
    "k-3d": (lambda a: a.update(k_cache=a["k_cache"][0]), r"k_cache must be \[num_blocks, block_size"),
    "v-shape": (lambda a: a.update(v_cache=a["v_cache"][:-1]), "same shape"),
    "block-size-24": (lambda a: a.update(k_cache=torch.zeros(4, 24, 2, 64), v_cache=torch.zeros(4, 24, 2, 64)),
                      "power of two >= 16, got 24"),
    "block-size-8": (lambda a: a.update(k_cache=torch.zeros(4, 8, 2, 64), v_cache=torch.zeros(4, 8, 2, 64)),
                     "power of two >= 16, got 8"),
    "heads": (lambda a: a.update(k_cache=torch.zeros(4, 16, 3, 64), v_cache=torch.zeros(4, 16, 3, 64)),
              r"multiple of num_kv_heads \(3"),
    "gqa-32": (lambda a: a.update(q=torch.zeros(2, 32, 64), k_cache=a["k_cache"][:, :, :1],
                                  v_cache=a["v_cache"][:, :, :1]), "GQA group sizes 1..16"),
    "bt-int64": (lambda a: a.update(block_table=a["block_table"].long()), "block_table must be int32, got torch.int64"),
    "bt-batch": (lambda a: a.update(block_table=a["block_table"][:1]), r"block_table must be \[batch=2"),
    "lens-int64": (lambda a: a.update(seq_lens=a["seq_lens"].long()), "seq_lens must be int32, got torch.int64"),
    "lens-shape": (lambda a: a.update(seq_lens=a["seq_lens"][:1]), r"seq_lens must be \[batch=2\], got \(1,\)"),
    "lens-too-long": (lambda a: a["seq_lens"].fill_(1000), r"seq_lens must lie in \[0, max_blocks_per_seq"),
    "bt-entry": (lambda a: a["block_table"].__setitem__((1, 0), 99), r"block_table\[1, 0\] = 99 is not a block"),
    "bt-unused-ok": (lambda a: a["block_table"].__setitem__((1, 2), 99), None),
}


@pytest.mark.parametrize("name", list(BAD))
def test_paged_rejects(name):
    args = _inputs()
    BAD[name][0](args)
    match = BAD[name][1]
    if match is None:  # an entry past the sequence's blocks is never read and not checked
        P.paged_decode_dense(**args, validate_values=True)
        return
    with pytest.raises(KascadeInputError, match=match):
        P.paged_decode_dense(**args, validate_values=True)
    with pytest.raises(KascadeInputError, match=match):
        P.paged_decode_anchor(**args, topk_fraction=0.1, topk_floor=8, validate_values=True)


def test_paged_sparse_rejects():
    args = _inputs()
    idx = torch.zeros(2, 2, 16, dtype=torch.int32)
    with pytest.raises(KascadeInputError, match=r"indices must be \[batch=2, num_kv_heads=2, W\], got \(2, 1, 16\)"):
        P.paged_decode_sparse(**args, indices=idx[:, :1])
    with pytest.raises(KascadeInputError, match="head_map must be int32"):
        P.paged_decode_sparse(**args, indices=idx, head_map=torch.tensor([1, 0]))
    with pytest.raises(KascadeInputError, match="topk_fraction"):
        P.paged_decode_anchor(**args, topk_fraction=0.0, topk_floor=8)
