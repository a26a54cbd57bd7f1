"""The radix Top-k selection of both phases, over pooled post-softmax scores (one tie rule).

Pooled scores are non-negative floats, so their bit patterns (as int32) order like the values: the
k-th largest is found digit by digit (a histogram of one digit among the keys whose higher digits equal
the boundary found so far; no sort), then a compaction writes every key above the threshold and the
first keys at it until the budget is filled.

Tie rule (both phases): keys are the top KEY_BITS = 8 + B2 + B3 = 22 bits of the float32 value (bits
30..9: the exponent and 14 mantissa bits), so scores within 2^-14 relative of each other tie, and ties
at the threshold are taken in key order. Why this one: swapping two tied keys changes the captured mass
by at most 2^-14 of the smaller one, far inside what the tests allow against the exact Top-k of the
reference (1e-5 x G absolute per row for float32 in decode, 1e-3 mean per tile in prefill), while 7-bit
refinement digits keep tl.histogram cheap (its cost grows with the bin count: about 100 instructions
per 32 keys at 256 bins; 8-bit digits, a 24-bit key, made the decode selection slower for nothing the
tests or the method can see; coarser digits, 6 + 6, were measured no faster at the decode target
points). Prefill stores its pooled scores as float16 when one program holds a whole tile x group (half
the bytes the select reads): a float16 value has 5 exponent and 10 mantissa bits, so its exact 16-bit
pattern is a monotone, one-to-one image of its 22-bit key, and the select takes the 16 bits whole (two
8-bit digits) -- the same rule on the stored value. The rounding to float16 (2^-11 relative) is the
pooling's storage precision, before the selection, not a second tie rule.

Two drivers share the digits, the boundary search and the key rule:

* decode (this module's kernels, launched by kascade.ops.decode): rows are long and few, so a row is
  split over several programs; level 1 histograms bits 30..23 (the exponent, 256 bins; fused with
  pooling), level 2 the next B2 bits of the keys inside level 1's boundary bin, level 3 the next B3
  bits. Level histograms are summed with atomics into a zero-initialised [rows, 3 * 256] int32 buffer.
  The level-3 pass also stores each program's own level-3 histogram and count of keys above the level-2
  prefix, from which the compaction pass derives where each program writes: indices come out in key
  order (keys above the threshold first, then ties), deterministically, with no atomics.
* prefill (kascade.kernels.prefill._select_kernel): one program per (row, KV head, tile) reads its
  pooled row once per digit (radix_digit) and compacts the selected positions in ascending order.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .decode import row_chunk, stored_score_weight

NBINS = 256  # level 1: the 8 exponent bits
B2 = 7  # bits of the level-2 digit
B3 = 7  # bits of the level-3 digit
KEY_SHIFT = 23 - B2 - B3  # a float32 key is bits >> KEY_SHIFT: 8 + B2 + B3 = 22 bits
HIST_STRIDE = 3 * NBINS  # the three level histograms of a row
PART_STRIDE = NBINS + 1  # a program's level-3 histogram and its count above the level-2 prefix
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
def load_key_bits(ptrs, ok, KEY16: tl.constexpr):
    """Pooled scores (>= 0, float32 or float16) as int32 bit patterns, which order like the values (0
    where not ok)."""
    if KEY16:
        bits = tl.load(ptrs, mask=ok, other=0.0).to(tl.int16, bitcast=True).to(tl.int32)
    else:
        bits = tl.load(ptrs, mask=ok, other=0.0).to(tl.int32, bitcast=True)
    return bits


@triton.jit
def radix_digit(row_ptr, length, shift: tl.constexpr, prefix_bits, need, check_prefix: tl.constexpr,
                BITS: tl.constexpr, BLOCK: tl.constexpr, KEY16: tl.constexpr):
    """One radix digit of the need-th largest of row_ptr[0:length], read by one program: histogram of
    bits [shift, shift+BITS) among the elements whose higher bits equal prefix_bits (check_prefix; the
    first digit takes all); returns (digit, need left within that digit)."""
    NB: tl.constexpr = 1 << BITS
    hist = tl.zeros([NB], tl.int32)
    others = 0
    offs = tl.arange(0, BLOCK)
    for i0 in range(0, length, BLOCK):
        idx = i0 + offs
        ok = idx < length
        x = load_key_bits(row_ptr + idx, ok, KEY16)
        match = ok
        if check_prefix:
            match = ok & ((x >> (shift + BITS)) == prefix_bits)
        digit = tl.where(match, (x >> shift) & (NB - 1), 0)
        hist += tl.histogram(digit, NB)
        others += tl.sum((~match).to(tl.int32), 0)
    bins = tl.arange(0, NB)
    # Elements that do not take part were counted in bin 0.
    hist = hist - tl.where(bins == 0, others, 0)
    # _boundary's search, written with a reverse scan: need >= 1 keys always remain, so no bin -1 case
    # and no total (sharing _boundary added two block reductions and four barriers per digit to the
    # prefill select, compiled for sm_90).
    at_or_above = tl.cumsum(hist, 0, reverse=True)
    digit = tl.max(tl.where(at_or_above >= need, bins, 0), 0)
    above = tl.sum(tl.where(bins > digit, hist, 0), 0)
    return digit, need - above


@triton.jit
def _pool_hist(
    row, sp, SCORES, SREF, M_PART, L_PART, KV_START, KV_END, POOLED, HIST,
    H_KV, Lk, n_splits, n_sel,
    G: tl.constexpr, GS: tl.constexpr, MG: tl.constexpr, SP: tl.constexpr, BLOCK: tl.constexpr,
    NB: tl.constexpr, PB: tl.constexpr,
):
    """Pooled post-softmax score of each key (sum over the G heads of exp2(s - lse)), written to
    POOLED [rows, Lk]; level-1 histogram added into HIST. The stored scores are relative to a reference
    per group of MG keys (kernels/decode.py, _store_scores: SCORES [rows, Lk, GS], SREF); the base-2
    log-sum-exp of each head comes from the split partials (m, l) of decode_split_kernel. PB keys per
    iteration (a divisor of BLOCK, the programs' key grain): PB * GS values in flight at any group size."""
    b = row // H_KV
    start = tl.load(KV_START + b).to(tl.int32)
    end = tl.load(KV_END + b).to(tl.int32)
    chunk = row_chunk(end - start, n_sel, BLOCK)
    lo = start + sp * chunk
    hi = tl.minimum(lo + chunk, end)

    offs_g = tl.arange(0, GS)
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

    s_base = SCORES + row.to(tl.int64) * GS * Lk
    r_base = SREF + row.to(tl.int64) * GS * tl.cdiv(Lk, MG)
    p_base = POOLED + row.to(tl.int64) * Lk
    offs = tl.arange(0, PB)
    bins = tl.arange(0, NB)
    hist = tl.zeros([NB], tl.int32)
    for n0 in range(lo, hi, PB):
        n = n0 + offs
        n_mask = n < hi
        # key-major [BLOCK, GS]: a key's GS stored values are one contiguous vector (heads past G hold 0)
        e = tl.load(s_base + n[:, None] * GS + offs_g[None, :], mask=n_mask[:, None], other=0.0)
        ref = tl.load(r_base + ((n - start) // MG)[:, None] * GS + offs_g[None, :], mask=n_mask[:, None],
                      other=0.0)
        p = tl.sum(e.to(tl.float32) * stored_score_weight(ref, lse[None, :]), 1)
        tl.store(p_base + n, p, mask=n_mask)
        hist += tl.histogram(p.to(tl.int32, bitcast=True) >> 23, NB, mask=n_mask)
    tl.atomic_add(HIST + row.to(tl.int64) * (3 * 256) + bins, hist)


@triton.jit
def _threshold(h_base, kk, LEVELS: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr):
    """From the first LEVELS histograms: the boundary prefix (8, 8 + B2 or 8 + B2 + B3 bits) and how many
    keys lie strictly above it."""
    prefix, gt = _boundary(tl.load(h_base + tl.arange(0, 256)), kk, 256)
    if LEVELS >= 2:
        b2, gt2 = _boundary(tl.load(h_base + 256 + tl.arange(0, 1 << B2)), kk - gt, 1 << B2)
        prefix = (prefix << B2) | b2
        gt += gt2
    if LEVELS >= 3:
        b3, gt3 = _boundary(tl.load(h_base + 512 + tl.arange(0, 1 << B3)), kk - gt, 1 << B3)
        prefix = (prefix << B3) | b3
        gt += gt3
    return prefix, gt


@triton.jit
def _row_keys(row, sp, KV_START, KV_END, HIST, H_KV, n_sel, ppm, floor, BLOCK: tl.constexpr):
    """Prologue of the refinement and compaction passes: the row's budget kk, the keys [lo, hi) of
    program sp of n_sel (the row's own length cut over the row's programs, as in the pooling pass), and
    the row's histograms."""
    b = row // H_KV
    start = tl.load(KV_START + b).to(tl.int32)
    end = tl.load(KV_END + b).to(tl.int32)
    kk = _budget(end - start, ppm, floor)
    chunk = row_chunk(end - start, n_sel, BLOCK)
    lo = start + sp * chunk
    hi = tl.minimum(lo + chunk, end)
    h_base = HIST + row.to(tl.int64) * (3 * 256)
    return kk, lo, hi, h_base


@triton.jit
def _refine_hist(
    row, sp, POOLED, KV_START, KV_END, HIST, PART,
    H_KV, Lk, ppm, floor, n_sel,
    LEVEL: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr, NB: tl.constexpr, B: tl.constexpr,
    SHIFT: tl.constexpr, BLOCK: tl.constexpr, ATOMIC_MAX: tl.constexpr, ZERO_PART: tl.constexpr,
):
    """Level-2 or level-3 histogram (NB = 2^B2 or 2^B3 bins of the bits just below bit SHIFT = 23 or
    23 - B2) of the keys inside the boundary prefix of the levels before. Level 3 also stores this
    program's histogram and its count of keys above the level-2 prefix in PART.

    ATOMIC_MAX > 0: a block with at most ATOMIC_MAX keys inside the prefix adds them one by one with
    relaxed atomics (into HIST, and at level 3 also into this program's PART histogram, which must then
    be zero: the level-2 launch zeroes its first ZERO_PART bins); fuller blocks use tl.histogram. The
    counts, and so the selection, are the same either way."""
    kk, lo, hi, h_base = _row_keys(row, sp, KV_START, KV_END, HIST, H_KV, n_sel, ppm, floor, BLOCK)
    prefix, _ = _threshold(h_base, kk, LEVEL - 1, B2, B3)
    bins = tl.arange(0, NB)

    p_base = POOLED + row.to(tl.int64) * Lk
    part = PART + (row.to(tl.int64) * n_sel + sp) * (256 + 1)
    h_level = h_base + (LEVEL - 1) * 256
    offs = tl.arange(0, BLOCK)
    hist = tl.zeros([NB], tl.int32)
    above = 0
    for n0 in range(lo, hi, BLOCK):
        n = n0 + offs
        n_mask = n < hi
        bits = tl.load(p_base + n, mask=n_mask, other=0.0).to(tl.int32, bitcast=True)
        top = bits >> SHIFT
        inside = n_mask & (top == prefix)
        digit = (bits >> (SHIFT - B)) & (NB - 1)
        if ATOMIC_MAX > 0:
            n_in = tl.sum(inside.to(tl.int32), 0)
            if n_in > ATOMIC_MAX:
                hist += tl.histogram(digit, NB, mask=inside)
            elif n_in > 0:
                tl.atomic_add(h_level + digit, 1, mask=inside, sem="relaxed")
                if LEVEL == 3:
                    tl.atomic_add(part + digit, 1, mask=inside, sem="relaxed")
        else:
            hist += tl.histogram(digit, NB, mask=inside)
        if LEVEL == 3:
            above += tl.sum((n_mask & (top > prefix)).to(tl.int32), 0)
    tl.atomic_add(h_level + bins, hist)
    if LEVEL == 3:
        if ATOMIC_MAX > 0:
            tl.atomic_add(part + bins, hist, sem="relaxed")
        else:
            tl.store(part + bins, hist)
        tl.store(part + 256, above)
    if ZERO_PART > 0:
        tl.store(part + tl.arange(0, ZERO_PART), tl.zeros([ZERO_PART], tl.int32))


@triton.jit
def _compact(
    row, sp, POOLED, KV_START, KV_END, HIST, PART, IDX,
    H_KV, Lk, W, w_chunk, ppm, floor, n_sel,
    B2: tl.constexpr, B3: tl.constexpr, NB3: tl.constexpr, SPP: tl.constexpr, BLOCK: tl.constexpr,
):
    """Write the absolute positions of each row's Top-k keys to IDX [rows, W]; slots >= k get -1. Keys above
    the threshold fill slots [0, n_gt) in key order, ties at the threshold fill [n_gt, k) in key order."""
    kk, lo, hi, h_base = _row_keys(row, sp, KV_START, KV_END, HIST, H_KV, n_sel, ppm, floor, BLOCK)
    thr, n_gt = _threshold(h_base, kk, 3, B2, B3)
    need = kk - n_gt
    b3 = thr & (NB3 - 1)

    # where this program starts writing: what the programs before it in the row found
    offs_p = tl.arange(0, SPP)
    bins = tl.arange(0, NB3)
    p_mask = offs_p < sp
    part = PART + (row.to(tl.int64) * n_sel + offs_p) * (256 + 1)
    h3 = tl.load(part[:, None] + bins[None, :], mask=p_mask[:, None], other=0)
    gt_run = tl.sum(tl.load(part + 256, mask=p_mask, other=0), 0) + tl.sum(tl.sum(
        tl.where(bins[None, :] > b3, h3, 0), 1), 0)
    eq_run = tl.sum(tl.sum(tl.where(bins[None, :] == b3, h3, 0), 1), 0)

    p_base = POOLED + row.to(tl.int64) * Lk
    i_base = IDX + row.to(tl.int64) * W
    offs = tl.arange(0, BLOCK)
    for n0 in range(lo, hi, BLOCK):
        n = n0 + offs
        n_mask = n < hi
        key = tl.load(p_base + n, mask=n_mask, other=0.0).to(tl.int32, bitcast=True) >> (23 - B2 - B3)
        gt = n_mask & (key > thr)
        eq = n_mask & (key == thr)
        # one scan for both ranks: the counts of a block (< 2^16) share an int32
        both = tl.cumsum(gt.to(tl.int32) + (eq.to(tl.int32) << 16), 0)
        r_gt = both & 0xFFFF
        r_eq = both >> 16
        tl.store(i_base + gt_run + r_gt - 1, n, mask=gt)
        pos = eq_run + r_eq - 1
        tl.store(i_base + n_gt + pos, n, mask=eq & (pos < need))
        total = tl.max(both, 0)  # the last element holds the block's totals
        gt_run += total & 0xFFFF
        eq_run += total >> 16

    w_lo = sp * w_chunk
    w_hi = tl.minimum(w_lo + w_chunk, W)
    for s0 in range(w_lo, w_hi, BLOCK):
        slot = s0 + offs
        tl.store(i_base + slot, tl.full([BLOCK], -1, tl.int32), mask=(slot < w_hi) & (slot >= kk))


# Lengths, split sizes and budgets are runtime values (see kernels/decode.py): no variant per length.
@triton.jit(do_not_specialize=["Lk", "n_splits", "n_sel"])
def pool_hist_kernel(
    SCORES, SREF, M_PART, L_PART, KV_START, KV_END, POOLED, HIST,
    H_KV, Lk, n_splits, n_sel,
    G: tl.constexpr, GS: tl.constexpr, MG: tl.constexpr, SP: tl.constexpr, BLOCK: tl.constexpr,
    NB: tl.constexpr, PB: tl.constexpr,
):
    _pool_hist(tl.program_id(0), tl.program_id(1), SCORES, SREF, M_PART, L_PART, KV_START, KV_END, POOLED, HIST,
               H_KV, Lk, n_splits, n_sel, G, GS, MG, SP, BLOCK, NB, PB)


@triton.jit(do_not_specialize=["Lk", "ppm", "floor", "n_sel"])
def refine_hist_kernel(
    POOLED, KV_START, KV_END, HIST, PART,
    H_KV, Lk, ppm, floor, n_sel,
    LEVEL: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr, NB: tl.constexpr, B: tl.constexpr,
    SHIFT: tl.constexpr, BLOCK: tl.constexpr, ATOMIC_MAX: tl.constexpr = 0, ZERO_PART: tl.constexpr = 0,
):
    _refine_hist(tl.program_id(0), tl.program_id(1), POOLED, KV_START, KV_END, HIST, PART,
                 H_KV, Lk, ppm, floor, n_sel, LEVEL, B2, B3, NB, B, SHIFT, BLOCK, ATOMIC_MAX, ZERO_PART)


@triton.jit(do_not_specialize=["Lk", "W", "w_chunk", "ppm", "floor", "n_sel"])
def compact_kernel(
    POOLED, KV_START, KV_END, HIST, PART, IDX,
    H_KV, Lk, W, w_chunk, ppm, floor, n_sel,
    B2: tl.constexpr, B3: tl.constexpr, NB3: tl.constexpr, SPP: tl.constexpr, BLOCK: tl.constexpr,
):
    _compact(tl.program_id(0), tl.program_id(1), POOLED, KV_START, KV_END, HIST, PART, IDX,
             H_KV, Lk, W, w_chunk, ppm, floor, n_sel, B2, B3, NB3, SPP, BLOCK)


@triton.jit
def _row_barrier(BAR, target):
    """Wait until `target` arrivals were counted at BAR (this row's programs, all resident: the launcher
    sizes the grid to select_fused_programs_per_sm per SM and launches it as a cooperative grid). The
    release/acquire pair makes every store and atomic of the row's programs before the barrier visible
    after it."""
    tl.debug_barrier()  # every thread of this program has issued its stores
    tl.atomic_add(BAR, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit(do_not_specialize=["Lk", "W", "n_splits", "w_chunk", "ppm", "floor", "n_sel"])
def select_fused_kernel(
    SCORES, SREF, M_PART, L_PART, KV_START, KV_END, POOLED, HIST, PART, IDX, BAR,
    H_KV, Lk, W, n_splits, w_chunk, ppm, floor, n_sel,
    G: tl.constexpr, GS: tl.constexpr, MG: tl.constexpr, SP: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr,
    PB: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr, SPP: tl.constexpr, ATOMIC2: tl.constexpr,
    ATOMIC3: tl.constexpr,
    ZERO_PART: tl.constexpr,
):
    """The whole selection in one launch (batch 1: few rows, each split over n_sel programs): pooling +
    level-1 histogram, level 2, level 3, compaction, with a barrier over the row's programs between the
    passes instead of a kernel boundary. Same passes, same counts, same indices as the four kernels."""
    row = tl.program_id(0)
    sp = tl.program_id(1)
    bar = BAR + row
    _pool_hist(row, sp, SCORES, SREF, M_PART, L_PART, KV_START, KV_END, POOLED, HIST, H_KV, Lk, n_splits, n_sel,
               G, GS, MG, SP, BLOCK, NB, PB)
    _row_barrier(bar, n_sel)
    _refine_hist(row, sp, POOLED, KV_START, KV_END, HIST, PART, H_KV, Lk, ppm, floor, n_sel,
                 2, B2, B3, 1 << B2, B2, 23, BLOCK, ATOMIC2, ZERO_PART)
    _row_barrier(bar, 2 * n_sel)
    _refine_hist(row, sp, POOLED, KV_START, KV_END, HIST, PART, H_KV, Lk, ppm, floor, n_sel,
                 3, B2, B3, 1 << B3, B3, 23 - B2, BLOCK, ATOMIC3, 0)
    _row_barrier(bar, 3 * n_sel)
    _compact(row, sp, POOLED, KV_START, KV_END, HIST, PART, IDX, H_KV, Lk, W, w_chunk, ppm, floor, n_sel,
             B2, B3, 1 << B3, SPP, BLOCK)
