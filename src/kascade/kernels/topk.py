"""Triton kernels of Top-k selection over pooled post-softmax scores: a three-level radix select.

Pooled scores are non-negative float32, so their bit patterns (as int32) order like the values. Level 1
histograms bits 30..23 (the exponent, 256 bins), level 2 bits 22..15 of the keys inside level 1's
boundary bin, level 3 bits 14..7 inside level 2's; the 24-bit key (bits 30..7, relative resolution
2^-16) then splits each row's keys into "above the threshold" (all taken) and "at the threshold" (taken
until the budget is filled). Keys closer than 2^-16 relative are treated as ties. Four passes over a
row's pooled scores (the first fused with pooling), no sort. 256 bins because tl.histogram's cost grows
with the bin count: 4096 bins made a pass compute-bound (measured 10x slower, notes_decode.md).

A row may be split over several programs (fills the GPU at batch 1): histograms are summed with
atomics into a zero-initialised [rows, 3 * 256 + 2] int32 buffer (its last two entries are slot
counters used by the compaction pass). With several programs per row, the order of the written
indices, and which of the threshold ties are taken, depends on scheduling; the selected set otherwise
does not.
"""

from __future__ import annotations

import triton
import triton.language as tl

NBINS = 256
HIST_STRIDE = 3 * NBINS + 2


@triton.jit
def _budget(length, ppm, floor):
    """reference.topk_budget on the device: min(max(ceil(length * ppm / 1e6), floor), length)."""
    length = length.to(tl.int64)
    k = (length * ppm + 999_999) // 1_000_000
    k = tl.maximum(k, floor)
    return tl.minimum(k, length).to(tl.int32)


@triton.jit
def _boundary(hist, kk, NB: tl.constexpr):
    """The highest bin b with count(bin >= b) >= kk, and count(bin > b)."""
    offs = tl.arange(0, NB)
    cum = tl.cumsum(hist, 0)
    total = tl.sum(hist, 0)
    ge = total - cum + hist
    bsel = tl.max(tl.where(ge >= kk, offs, -1), 0)
    greater = tl.sum(tl.where(offs > bsel, hist, 0), 0)
    return bsel, greater


@triton.jit
def pool_hist_kernel(
    SCORES, M_PART, L_PART, KV_START, KV_END, POOLED, HIST,
    H_KV, Lk, n_splits, chunk,
    G: tl.constexpr, GP: tl.constexpr, SP: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr,
):
    """Pooled post-softmax score of each key (sum over the G heads of exp2(s - lse)), written to
    POOLED [rows, Lk]; level-1 histogram added into HIST. The base-2 log-sum-exp of each head comes
    from the split partials (m, l) of decode_split_kernel."""
    row = tl.program_id(0)
    sp = tl.program_id(1)
    b = row // H_KV
    start = tl.load(KV_START + b).to(tl.int32)
    end = tl.load(KV_END + b).to(tl.int32)
    lo = start + sp * chunk
    hi = tl.minimum(lo + chunk, end)

    offs_g = tl.arange(0, GP)
    offs_s = tl.arange(0, SP)
    g_mask = offs_g < G
    pm = (offs_s[:, None] < n_splits) & g_mask[None, :]
    part = (row.to(tl.int64) * n_splits + offs_s[:, None]) * G + offs_g[None, :]
    m = tl.load(M_PART + part, mask=pm, other=float("-inf"))
    l = tl.load(L_PART + part, mask=pm, other=0.0)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_tot = tl.sum(l * tl.math.exp2(m - m_safe[None, :]), 0)
    lse = tl.where(g_mask & (l_tot > 0), m_safe + tl.math.log2(tl.where(l_tot > 0, l_tot, 1.0)), 0.0)

    s_base = SCORES + row.to(tl.int64) * G * Lk
    p_base = POOLED + row.to(tl.int64) * Lk
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, NB)
    hist = tl.zeros([NB], tl.int32)
    for n0 in range(lo, hi, BLOCK):
        n = n0 + offs
        n_mask = n < hi
        s = tl.load(s_base + offs_g[:, None] * Lk + n[None, :], mask=g_mask[:, None] & n_mask[None, :],
                    other=float("-inf"))
        p = tl.sum(tl.math.exp2(s - lse[:, None]), 0)
        tl.store(p_base + n, p, mask=n_mask)
        key = tl.where(n_mask, p.to(tl.int32, bitcast=True) >> 23, 0)
        hist += tl.histogram(key, NB)
        # masked lanes were counted in bin 0
        hist -= tl.where(bins == 0, BLOCK - tl.sum(n_mask.to(tl.int32), 0), 0)
    tl.atomic_add(HIST + row.to(tl.int64) * (3 * NB + 2) + bins, hist)


@triton.jit
def _threshold(h_base, kk, LEVELS: tl.constexpr, NB: tl.constexpr):
    """From the first LEVELS histograms: the boundary prefix (LEVELS * 8 bits of bits 30..7) and how many
    keys lie strictly above it."""
    bins = tl.arange(0, NB)
    b1, gt = _boundary(tl.load(h_base + bins), kk, NB)
    prefix = b1
    if LEVELS >= 2:
        b2, gt2 = _boundary(tl.load(h_base + NB + bins), kk - gt, NB)
        prefix = (prefix << 8) | b2
        gt += gt2
    if LEVELS >= 3:
        b3, gt3 = _boundary(tl.load(h_base + 2 * NB + bins), kk - gt, NB)
        prefix = (prefix << 8) | b3
        gt += gt3
    return prefix, gt


@triton.jit
def refine_hist_kernel(
    POOLED, KV_START, KV_END, HIST,
    H_KV, Lk, chunk, ppm, floor,
    LEVEL: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr,
):
    """Level-LEVEL histogram (LEVEL 2: bits 22..15, 3: bits 14..7) of the keys inside the boundary
    prefix of the levels before."""
    row = tl.program_id(0)
    sp = tl.program_id(1)
    b = row // H_KV
    start = tl.load(KV_START + b).to(tl.int32)
    end = tl.load(KV_END + b).to(tl.int32)
    kk = _budget(end - start, ppm, floor)
    lo = start + sp * chunk
    hi = tl.minimum(lo + chunk, end)

    h_base = HIST + row.to(tl.int64) * (3 * NB + 2)
    bins = tl.arange(0, NB)
    prefix, _ = _threshold(h_base, kk, LEVEL - 1, NB)
    shift = 31 - 8 * (LEVEL - 1)  # the level's 8 bits sit just below bit `shift`

    p_base = POOLED + row.to(tl.int64) * Lk
    offs = tl.arange(0, BLOCK)
    hist = tl.zeros([NB], tl.int32)
    for n0 in range(lo, hi, BLOCK):
        n = n0 + offs
        n_mask = n < hi
        bits = tl.load(p_base + n, mask=n_mask, other=0.0).to(tl.int32, bitcast=True)
        inside = n_mask & ((bits >> shift) == prefix)
        key = tl.where(inside, (bits >> (shift - 8)) & (NB - 1), 0)
        hist += tl.histogram(key, NB)
        hist -= tl.where(bins == 0, BLOCK - tl.sum(inside.to(tl.int32), 0), 0)
    tl.atomic_add(h_base + (LEVEL - 1) * NB + bins, hist)


@triton.jit
def compact_kernel(
    POOLED, KV_START, KV_END, HIST, IDX,
    H_KV, Lk, W, chunk, w_chunk, ppm, floor,
    BLOCK: tl.constexpr, NB: tl.constexpr,
):
    """Write the absolute positions of each row's Top-k keys to IDX [rows, W]; slots >= k get -1."""
    row = tl.program_id(0)
    sp = tl.program_id(1)
    b = row // H_KV
    start = tl.load(KV_START + b).to(tl.int32)
    end = tl.load(KV_END + b).to(tl.int32)
    kk = _budget(end - start, ppm, floor)
    lo = start + sp * chunk
    hi = tl.minimum(lo + chunk, end)

    h_base = HIST + row.to(tl.int64) * (3 * NB + 2)
    thr, n_gt = _threshold(h_base, kk, 3, NB)
    need = kk - n_gt

    p_base = POOLED + row.to(tl.int64) * Lk
    i_base = IDX + row.to(tl.int64) * W
    offs = tl.arange(0, BLOCK)
    for n0 in range(lo, hi, BLOCK):
        n = n0 + offs
        n_mask = n < hi
        key = tl.load(p_base + n, mask=n_mask, other=0.0).to(tl.int32, bitcast=True) >> 7
        gt = n_mask & (key > thr)
        eq = n_mask & (key == thr)
        gt_i = gt.to(tl.int32)
        eq_i = eq.to(tl.int32)
        base_gt = tl.atomic_add(h_base + 3 * NB, tl.sum(gt_i, 0))
        pos = base_gt + tl.cumsum(gt_i, 0) - 1
        tl.store(i_base + pos, n, mask=gt)
        base_eq = tl.atomic_add(h_base + 3 * NB + 1, tl.sum(eq_i, 0))
        pos = base_eq + tl.cumsum(eq_i, 0) - 1
        tl.store(i_base + n_gt + pos, n, mask=eq & (pos < need))

    w_lo = sp * w_chunk
    w_hi = tl.minimum(w_lo + w_chunk, W)
    for s0 in range(w_lo, w_hi, BLOCK):
        slot = s0 + offs
        tl.store(i_base + slot, tl.full([BLOCK], -1, tl.int32), mask=(slot < w_hi) & (slot >= kk))
