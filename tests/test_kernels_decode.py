"""The Triton decode kernels (kascade.ops.decode) under the CPU interpreter, against the reference.

TRITON_INTERPRET=1 must be set before the kernels are decorated, so it is set before anything imports
triton. Small shapes, fp16/fp32 (the interpreter's bf16 arithmetic is broken; bf16 is tested on the
GPU in tests/gpu/test_decode_gpu.py).

Rules: outputs are compared with an fp32 run of the reference; the allowed error is twice the error of
a plain PyTorch run in the same precision, plus a small floor (the FlashAttention test rule). Selections
are compared by the attention mass they capture (pooled over the GQA group), not as sets, since keys
with equal or near-equal scores may be chosen either way.
"""

from __future__ import annotations

import os
import sys

import pytest

# The interpreter must be on before the kernels are decorated; in a session that already loaded them
# compiled (GPU tests collected first on a CUDA machine) these CPU tests cannot run.
_ALREADY_COMPILED = "kascade.kernels.decode" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ.setdefault("TRITON_INTERPRET", "1")
if _ALREADY_COMPILED or os.environ["TRITON_INTERPRET"] != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before the decode kernels load; run this file on its own",
                allow_module_level=True)

import dataclasses  # noqa: E402
import math  # noqa: E402

import torch  # noqa: E402

pytest.importorskip("triton")

import kascade.attention as ops  # noqa: E402
import kascade.reference as R  # noqa: E402
from kascade.ops import decode as D  # noqa: E402
from kascade.validation import KascadeInputError  # noqa: E402


def make(B, Hq, Hkv, Lk, Dh, dtype, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, 1, Dh, generator=g) * spread).to(dtype)
    k = torch.randn(B, Hkv, Lk, Dh, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Lk, Dh, generator=g).to(dtype)
    return q, k, v


def ranges(B, Lk, kind):
    if kind == "full":
        return torch.zeros(B, dtype=torch.int64), torch.full((B,), Lk, dtype=torch.int64)
    # rows of different lengths: left padding on some rows, right padding on others
    starts = torch.tensor([(7 * b) % max(1, Lk // 3) for b in range(B)], dtype=torch.int64)
    ends = torch.tensor([Lk - (13 * b) % max(1, Lk // 4) for b in range(B)], dtype=torch.int64)
    return starts, ends


def lowp_attention(q, k, v, allowed, scale=None):
    """Plain attention in q's dtype (the same-precision baseline). allowed [B, Hkv, Lk] bool."""
    B, Hq, _, Dh = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(Dh) if scale is None else scale
    qg = q.reshape(B, Hkv, G, Dh)
    s = torch.einsum("bhgd,bhkd->bhgk", qg, k) * scale
    s = s.masked_fill(~allowed[:, :, None, :], -math.inf)
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhgk,bhkd->bhgd", p, v).reshape(B, Hq, 1, Dh)


def allowed_from(indices, starts, ends, Hkv, Lk):
    rows = []
    idx = R._expand_heads(indices, Hkv)
    for b in range(indices.shape[0]):
        m = torch.zeros(Hkv, Lk, dtype=torch.bool)
        s, e = int(starts[b]), int(ends[b])
        m[:, s:e] = R._selected_mask(idx[b], s, e - s)
        rows.append(m)
    return torch.stack(rows)


def check_close(out, q, k, v, allowed, ref32):
    """|out - ref32| <= 2 |lowp - ref32| + floor, elementwise max."""
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    lowp = lowp_attention(q, k, v, allowed)
    err = (out.float() - ref32).abs().max().item()
    base = (lowp.float() - ref32).abs().max().item()
    floor = 1e-5 if q.dtype == torch.float32 else 1e-3
    assert err <= 2 * base + floor, f"kernel error {err:.3g} vs same-precision PyTorch {base:.3g}"


def check_selection(indices, q, k, starts, ends, frac, floor):
    """Each row holds exactly its budget of distinct in-range indices first, then -1; the pooled mass they
    capture is at least the reference selection's (up to near-ties)."""
    B, Hq, _, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    assert indices.dtype == torch.int32 and indices.shape[:2] == (B, Hkv)
    lengths = ends - starts
    assert indices.shape[2] >= int(R.topk_budget(lengths, frac, floor).max())
    for b in range(B):
        kb = R.topk_budget(int(lengths[b]), frac, floor)
        for h in range(Hkv):
            row = indices[b, h]
            real = row[:kb]
            assert (row[kb:] == -1).all(), "slots after the budget must be -1"
            assert (real >= starts[b]).all() and (real < ends[b]).all(), "index outside the row's keys"
            assert real.unique().numel() == kb, "duplicate indices"
    ref = R.select_decode(q, k, starts, ends, topk_fraction=frac, topk_floor=floor)
    stats = dict(topk_fraction=frac, topk_floor=floor)
    got_mass = R.selection_stats(q, k, indices, starts, ends, **stats)[0].reshape(B, Hkv, G).sum(-1)
    ref_mass = R.selection_stats(q, k, ref, starts, ends, **stats)[0].reshape(B, Hkv, G).sum(-1)
    tol = 1e-5 * G if q.dtype == torch.float32 else 1e-4 * G
    assert (got_mass >= ref_mass - tol).all(), f"captured mass {got_mass} < reference {ref_mass}"


# (B, Hq, Hkv, Lk, head_dim, ranges, topk_fraction, topk_floor)
CASES = [
    pytest.param(2, 4, 4, 77, 64, "varied", 0.10, 8, id="mha-odd-varied"),
    pytest.param(3, 8, 2, 301, 128, "varied", 0.10, 16, id="gqa4-d128-varied"),
    pytest.param(1, 7, 1, 513, 64, "full", 0.20, 16, id="gqa7"),
    pytest.param(2, 8, 2, 129, 64, "varied", 1e-6, 1, id="k1"),
    pytest.param(2, 8, 2, 95, 64, "varied", 1.0, 1, id="k=L"),
    pytest.param(2, 4, 1, 60, 64, "varied", 0.10, 128, id="floor>L"),
    pytest.param(1, 16, 1, 700, 64, "full", 0.05, 4, id="gqa16"),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,Lk,Dh,kind,frac,floor", CASES)
def test_dense(B, Hq, Hkv, Lk, Dh, kind, frac, floor, dtype):
    q, k, v = make(B, Hq, Hkv, Lk, Dh, dtype, seed=1)
    starts, ends = ranges(B, Lk, kind)
    out = ops.dense_attention(q, k, v, starts, ends, backend="triton")
    ref32 = R.dense_attention(q.float(), k.float(), v.float(), starts, ends)
    full = allowed_from(torch.arange(Lk, dtype=torch.int32).expand(B, Hkv, Lk), starts, ends, Hkv, Lk)
    check_close(out, q, k, v, full, ref32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dense_output", [False, True], ids=["anchor", "layer0"])
@pytest.mark.parametrize("B,Hq,Hkv,Lk,Dh,kind,frac,floor", CASES)
def test_anchor(B, Hq, Hkv, Lk, Dh, kind, frac, floor, dtype, dense_output):
    # A wider spread of q makes attention peaked, so the selection matters.
    q, k, v = make(B, Hq, Hkv, Lk, Dh, dtype, seed=2, spread=2.0)
    starts, ends = ranges(B, Lk, kind)
    out, indices = ops.anchor_attention(q, k, v, starts, ends, topk_fraction=frac, topk_floor=floor,
                                        dense_output=dense_output, backend="triton")
    check_selection(indices, q, k, starts, ends, frac, floor)
    if dense_output:
        ref32 = R.dense_attention(q.float(), k.float(), v.float(), starts, ends)
        allowed = allowed_from(torch.arange(Lk, dtype=torch.int32).expand(B, Hkv, Lk), starts, ends, Hkv, Lk)
    else:
        ref32 = R.sparse_attention(q.float(), k.float(), v.float(), indices, starts, ends)
        allowed = allowed_from(indices, starts, ends, Hkv, Lk)
    check_close(out, q, k, v, allowed, ref32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,Lk,Dh,kind,frac,floor", CASES)
def test_sparse_reuse(B, Hq, Hkv, Lk, Dh, kind, frac, floor, dtype):
    """Reuse layers: another layer's indices, head-mapped (many-to-one), with holes of -1."""
    q, k, v = make(B, Hq, Hkv, Lk, Dh, dtype, seed=3)
    starts, ends = ranges(B, Lk, kind)
    qa, ka, _ = make(B, Hq, Hkv, Lk, Dh, dtype, seed=4)
    sel = R.select_decode(qa, ka, starts, ends, topk_fraction=frac, topk_floor=floor)
    head_map = torch.tensor([(h * 3) % Hkv for h in range(Hkv)])
    mapped = sel[:, head_map].clone()
    mapped[..., 1::5] = -1  # holes must be ignored
    mapped[..., 0] = torch.where(mapped[..., 0] >= 0, mapped[..., 0], starts[:, None].to(torch.int32))
    out = ops.sparse_attention(q, k, v, mapped, starts, ends, topk_fraction=frac, topk_floor=floor,
                               backend="triton")
    ref32 = R.sparse_attention(q.float(), k.float(), v.float(), mapped, starts, ends)
    check_close(out, q, k, v, allowed_from(mapped, starts, ends, Hkv, Lk), ref32)


def test_sparse_shared_head_and_int64():
    """One index set shared by all heads (Hsel = 1), int64 indices."""
    q, k, v = make(2, 8, 4, 200, 64, torch.float32, seed=5)
    starts, ends = ranges(2, 200, "varied")
    sel = R.select_decode(q, k, starts, ends, topk_fraction=0.1, topk_floor=8, head_pooling="all").long()
    out = ops.sparse_attention(q, k, v, sel, starts, ends, backend="triton")
    ref32 = R.sparse_attention(q, k, v, sel, starts, ends)
    check_close(out, q, k, v, allowed_from(sel, starts, ends, 4, 200), ref32)


def test_ties():
    """Many keys with exactly equal scores: any of them may be chosen, but the count and mass hold."""
    q, k, v = make(2, 8, 2, 257, 64, torch.float32, seed=6)
    k[:, :, 100:200] = k[:, :, 100:101]  # 100 identical keys per head
    starts, ends = ranges(2, 257, "full")
    out, indices = ops.anchor_attention(q, k, v, starts, ends, topk_fraction=0.2, topk_floor=8, backend="triton")
    check_selection(indices, q, k, starts, ends, 0.2, 8)
    ref32 = R.sparse_attention(q, k, v, indices, starts, ends)
    check_close(out, q, k, v, allowed_from(indices, starts, ends, 2, 257), ref32)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused-combine", "combine-kernel"])
def test_split_combine_many_splits(monkeypatch, fuse):
    """Force many splits (and selection split over several programs per row, with atomics); the splits
    merged by the last split of each row (tickets) or by a separate combine kernel."""
    cfg = config(fuse_max_splits=1000 if fuse else 0, sparse_min_chunk=64, min_chunk=64, select_min_chunk=64,
                 select_block=64)
    monkeypatch.setattr(D, "sm_count", lambda device: 64)
    q, k, v = make(2, 8, 2, 1000, 64, torch.float32, seed=7, spread=2.0)
    starts, ends = ranges(2, 1000, "varied")
    out, indices = D.anchor(q, k, v, starts, ends, topk_fraction=0.1, topk_floor=16, dense_output=True, config=cfg)
    check_selection(indices, q, k, starts, ends, 0.1, 16)
    ref32 = R.dense_attention(q, k, v, starts, ends)
    full = allowed_from(torch.arange(1000, dtype=torch.int32).expand(2, 2, 1000), starts, ends, 2, 1000)
    check_close(out, q, k, v, full, ref32)
    for _ in range(2):  # the tickets must be back at 0 after a launch
        out = D.sparse(q, k, v, indices, starts, ends, config=cfg)
        check_close(out, q, k, v, allowed_from(indices, starts, ends, 2, 1000),
                    R.sparse_attention(q, k, v, indices, starts, ends))


@pytest.mark.parametrize(
    "shape_q,shape_kv,match",
    [
        ((1, 4, 1, 96), (1, 2, 50, 96), "head_dim in \\(64, 128\\)"),
        ((1, 32, 1, 64), (1, 1, 50, 64), "GQA group sizes 1..16"),
        ((1, 4, 2, 64), (1, 2, 50, 64), "Lq=1"),
    ],
)
def test_launcher_rejects(shape_q, shape_kv, match):
    q = torch.randn(shape_q)
    k = torch.randn(shape_kv)
    s, e = torch.zeros(1, dtype=torch.int64), torch.full((1,), shape_kv[2], dtype=torch.int64)
    with pytest.raises(KascadeInputError, match=match):
        D.dense(q, k, k, s, e)


def test_launcher_rejects_strided_head_dim():
    q = torch.randn(1, 4, 1, 64)
    k = torch.randn(1, 2, 64, 50).transpose(2, 3)
    s, e = torch.zeros(1, dtype=torch.int64), torch.full((1,), 50, dtype=torch.int64)
    with pytest.raises(KascadeInputError, match="stride 1"):
        D.dense(q, k, k, s, e)


# Launch variants: each runs a code path the default launch does not take in the small shapes above
# (tuning values that only change sizes of the same path are not repeated here); every one must give a
# correct result against the reference.
VARIANTS = {
    # one split per row: the program stores its output directly (no partials, no merge)
    "direct": dict(sparse_programs_per_sm=0.01),
    # several blocks per split and several splits per row, merged by the last split
    "small-blocks": dict(sparse_block_n=16, sparse_min_chunk=16, sparse_programs_per_sm=64),
    # hybrid histograms: small blocks so that both the atomic and the tl.histogram branch run
    "atomic-hist": dict(select_atomic_max=(8, 8), select_block=64, select_min_chunk=64),
    # atomics only, at both levels (level 2 zeroes level 3's per-program histograms)
    "atomic-only": dict(select_atomic_max=(4096, 4096)),
    # the default hybrid (level 3 only) over several programs per row
    "atomic-l3": dict(select_atomic_max=(0, 256), select_block=128, select_min_chunk=128),
    # the one-launch selection (in the interpreter: one program per row, several blocks per program)
    "fused-select": dict(select_fused="always", select_block=64),
    "fused-select-atomic": dict(select_fused="always", select_atomic_max=(8, 8), select_block=64),
}
# The variants whose selection differs in how colliding keys are counted (ties in one level-3 bin).
SELECT_VARIANTS = ["atomic-hist", "atomic-only", "atomic-l3", "fused-select", "fused-select-atomic"]


def config(**knobs):
    return dataclasses.replace(D.DEFAULT_CONFIG, **knobs)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_anchor_and_reuse(variant):
    """Anchor (selection + sparse over the stored scores) and reuse (another layer's q and K/V over the
    indices, with holes) under one launch variant, on GQA 4, head_dim 128, rows of varied lengths."""
    cfg = config(**VARIANTS[variant])
    B, Hq, Hkv, Lk, Dh, frac, floor = 3, 8, 2, 301, 128, 0.10, 16
    q, k, v = make(B, Hq, Hkv, Lk, Dh, torch.float32, seed=12, spread=2.0)
    starts, ends = ranges(B, Lk, "varied")
    out, indices = D.anchor(q, k, v, starts, ends, topk_fraction=frac, topk_floor=floor, config=cfg)
    check_selection(indices, q, k, starts, ends, frac, floor)
    allowed = allowed_from(indices, starts, ends, Hkv, Lk)
    check_close(out, q, k, v, allowed, R.sparse_attention(q.float(), k.float(), v.float(), indices, starts, ends))
    q2, k2, v2 = make(B, Hq, Hkv, Lk, Dh, torch.float32, seed=13)
    holed = indices.clone()
    holed[..., 2::7] = -1
    out2 = D.sparse(q2, k2, v2, holed, starts, ends, config=cfg)
    ref2 = R.sparse_attention(q2.float(), k2.float(), v2.float(), holed, starts, ends)
    check_close(out2, q2, k2, v2, allowed_from(holed, starts, ends, Hkv, Lk), ref2)


@pytest.mark.parametrize("variant", SELECT_VARIANTS)
def test_variants_ties(variant):
    """Identical keys put many keys in one level-3 bin (the atomics of the hybrid histogram collide)."""
    cfg = config(**VARIANTS[variant])
    q, k, v = make(2, 8, 2, 257, 64, torch.float32, seed=6)
    k[:, :, 100:200] = k[:, :, 100:101]
    starts, ends = ranges(2, 257, "full")
    out, indices = D.anchor(q, k, v, starts, ends, topk_fraction=0.2, topk_floor=8, config=cfg)
    check_selection(indices, q, k, starts, ends, 0.2, 8)
    ref32 = R.sparse_attention(q, k, v, indices, starts, ends)
    check_close(out, q, k, v, allowed_from(indices, starts, ends, 2, 257), ref32)


def test_atomic_hist_same_indices(monkeypatch):
    """The hybrid histograms give exactly the indices of tl.histogram (same counts, same compaction)."""
    monkeypatch.setattr(D, "sm_count", lambda device: 64)
    q, k, v = make(2, 8, 2, 1000, 64, torch.float32, seed=14, spread=2.0)
    starts, ends = ranges(2, 1000, "varied")
    base = dict(select_block=64, select_min_chunk=64)
    _, ref = D.anchor(q, k, v, starts, ends, topk_fraction=0.1, topk_floor=16, config=config(**base))
    for amax in ((8, 8), (0, 64), (4096, 4096)):
        _, got = D.anchor(q, k, v, starts, ends, topk_fraction=0.1, topk_floor=16,
                          config=config(**base, select_atomic_max=amax))
        assert torch.equal(got, ref), amax


def test_fused_select_same_indices():
    """The one-launch selection gives exactly the indices of the four-launch one."""
    q, k, v = make(2, 8, 2, 1000, 64, torch.float32, seed=15, spread=2.0)
    starts, ends = ranges(2, 1000, "varied")
    _, ref = D.anchor(q, k, v, starts, ends, topk_fraction=0.1, topk_floor=16, config=config(select_block=64))
    for amax in ((0, 64), (8, 8)):
        cfg = config(select_block=64, select_atomic_max=amax, select_fused="always")
        _, got = D.anchor(q, k, v, starts, ends, topk_fraction=0.1, topk_floor=16, config=cfg)
        assert torch.equal(got, ref), amax


def test_short_rows_fill_every_split(monkeypatch):
    """A row much shorter than the cache (an engine sized for 128K serving 32K) cuts its own length over
    every split of the grid, which is sized from the cache capacity: every split of the split pass sees
    keys (finite partial max), and anchor + reuse stay exact."""
    monkeypatch.setattr(D, "sm_count", lambda device: 64)
    cfg = config(min_chunk=64, max_splits=8, chunk_align=16, sparse_min_chunk=16, sparse_block_n=16, select_block=64,
                 select_min_chunk=64, fuse_max_splits=1000)
    B, Hq, Hkv, Lk, Dh = 2, 8, 2, 2048, 64
    q, k, v = make(B, Hq, Hkv, Lk, Dh, torch.float32, seed=21, spread=2.0)
    starts = torch.tensor([0, 100], dtype=torch.int64)
    ends = torch.tensor([600, 1100], dtype=torch.int64)  # rows of 600 and 1000 keys in a 2048-key cache
    _, m, _, _, n_splits = D._split_pass(q, k, v, starts, ends, None, write_scores=True, acc_v=False, config=cfg)
    assert n_splits == 8
    assert torch.isfinite(m).all(), "a split of a short row saw no key: the row was cut by the capacity"
    out, indices = D.anchor(q, k, v, starts, ends, topk_fraction=0.1, topk_floor=16, config=cfg)
    check_selection(indices, q, k, starts, ends, 0.1, 16)
    check_close(out, q, k, v, allowed_from(indices, starts, ends, Hkv, Lk),
                R.sparse_attention(q, k, v, indices, starts, ends))
    q2, _, _ = make(B, Hq, Hkv, Lk, Dh, torch.float32, seed=22)
    out2 = D.sparse(q2, k, v, indices, starts, ends, budget=(0.1, 16), config=cfg)
    check_close(out2, q2, k, v, allowed_from(indices, starts, ends, Hkv, Lk),
                R.sparse_attention(q2, k, v, indices, starts, ends))
    dense = D.dense(q, k, v, starts, ends, config=cfg)
    full = allowed_from(torch.arange(Lk, dtype=torch.int32).expand(B, Hkv, Lk), starts, ends, Hkv, Lk)
    check_close(dense, q, k, v, full, R.dense_attention(q, k, v, starts, ends))


@pytest.mark.parametrize("dtype,stored", [(torch.float16, torch.float16), (torch.float32, torch.float32)])
def test_stored_scores_are_relative_and_compact(dtype, stored):
    """The score pass stores exp2(s - m) * 2^15 per key and head (m: the split's running max, one
    reference per group of keys), GQA 7 padded to 8 stored heads (the pad is 0), float16 for 16-bit
    inputs: recovering s from values and references gives the reference scores; the sparse step and the
    selection refuse stored scores of another shape."""
    cfg = config(min_chunk=64, chunk_align=32, max_splits=4)
    B, Hq, Hkv, Lk, Dh = 1, 7, 1, 300, 64
    q, k, v = make(B, Hq, Hkv, Lk, Dh, dtype, seed=5)
    starts, ends = torch.tensor([11]), torch.tensor([Lk])
    scores, m, l, _, n_splits = D._split_pass(q, k, v, starts, ends, None, write_scores=True, acc_v=False, config=cfg)
    assert scores.values.dtype == stored and scores.values.shape == (1, Lk, 8) and scores.group == 32
    vals = scores.values[0, 11:].float()
    assert (vals[:, 7] == 0).all() and (vals[:, :7] <= 2**15).all()
    ref = scores.ref[0, (torch.arange(11, Lk) - 11) // 32]  # [keys, 8]
    got = torch.log2(vals[:, :7]) + ref[:, :7] - 15
    want = (q[0, :, 0].float() @ k[0, 0, 11:].float().T).T / math.sqrt(Dh) * math.log2(math.e)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got, want, atol=tol, rtol=0), (got - want).abs().max()
    indices = D.select(scores, m, l, n_splits, starts, ends, Hkv=Hkv, topk_fraction=0.1, topk_floor=8, config=cfg)
    bad = dataclasses.replace(scores, values=scores.values[:, :, :7].contiguous())
    with pytest.raises(KascadeInputError, match="values"):
        D.sparse(q, k, v, indices, starts, ends, scores=bad, config=cfg)
    with pytest.raises(KascadeInputError, match="AnchorScores"):
        D.sparse(q, k, v, indices, starts, ends, scores=scores.values, config=cfg)
