"""Triton kernels of decode attention (one query per row): split-KV scores / dense attention, sparse
attention over gathered keys, and the combine step. Launchers live in :mod:`kascade.ops.decode`.

All kernels work on one (batch row, KV head) pair per program row ("row" = b * Hkv + h) and process the
GQA group's G query heads together, so every K/V element is read once per KV head. The G rows are padded
to GP >= 16 for ``tl.dot``. Scores are kept in the base-2 domain (scaled by ``scale * log2(e)``); every
log-sum-exp here is base 2.

Partial results of a split (one program of the key or slot axis) are (m, l, acc): the running max of
its scores, the sum of exp2(s - m) and the unnormalised output sum exp2(s - m) v; the combine kernel
merges the splits of a row.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .paged import physical_slots
from .softmax import accumulate_pv, softmax_update


@triton.jit
def _group_rows(Q, K, V, b, h, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
                G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The prologue of the split and sparse passes for row (b, h): the G query heads of KV head h padded
    to GP rows (offs_g, g_mask), offs_d, offs_n, q [GP, D] (zeros past G), and the row's K/V bases."""
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < G
    q = tl.load(Q + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    return offs_g, offs_d, offs_n, g_mask, q, k_base, v_base


@triton.jit
def _split_state(SCORES, SREF, BT, row, b, Lk, stride_btb, GP: tl.constexpr, D: tl.constexpr, GS: tl.constexpr,
                 MG: tl.constexpr):
    """The row's bases in the stored scores ([rows, Lk, GS]) and their references ([rows, cdiv(Lk, MG), GS]),
    its block-table row, and an empty running state (m = -inf, l = 0, acc = 0) of a split."""
    s_base = SCORES + row.to(tl.int64) * GS * Lk
    r_base = SREF + row.to(tl.int64) * GS * tl.cdiv(Lk, MG)
    bt_row = BT + b * stride_btb
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    return s_base, r_base, bt_row, m_i, l_i, acc


# Stored scores are exp2(s - m) * 2^SCORE_SHIFT, m the split's running max when the key was seen: <= 2^15
# (float16's largest power of two below 65504), and float16 stays normal (2^-11 relative) down to
# exp2(s - m) = 2^-29, keys ~1e9 times lighter than the split's heaviest. One float16 per head instead of
# a float32 score halves the bytes the score pass writes and the pooling and the sparse step read back.
SCORE_SHIFT = tl.constexpr(15.0)
SCORE_SCALE = tl.constexpr(32768.0)  # 2^SCORE_SHIFT


@triton.jit
def _store_scores(s_base, r_base, p, m_i, n, n_mask, n0, start, hi, offs_g, g_mask, GP: tl.constexpr,
                  BLOCK_N: tl.constexpr, GS: tl.constexpr, MG: tl.constexpr):
    """Store a block's scores relative to the running max m_i (p = exp2(s - m_i) from softmax_update) as
    p * 2^SCORE_SHIFT in the scores' dtype, key-major [Lk, GS] (heads past G hold 0, so a key's GS values
    are one aligned vector), and m_i as the reference of each group of MG keys of the block (groups are
    counted from the row's start; splits and blocks begin on group boundaries: the launcher's MG divides
    both the split alignment and BLOCK_N)."""
    s_mask = offs_g < GS
    e = tl.where(g_mask[:, None], p * SCORE_SCALE, 0.0)
    tl.store(s_base + n[None, :] * GS + offs_g[:, None], e.to(s_base.dtype.element_ty),
             mask=s_mask[:, None] & n_mask[None, :])
    grp = (n0 - start) // MG + tl.arange(0, BLOCK_N // MG)
    ref = tl.where(m_i == float("-inf"), 0.0, m_i)
    tl.store(r_base + grp[None, :] * GS + offs_g[:, None], tl.broadcast_to(ref[:, None], [GP, BLOCK_N // MG]),
             mask=s_mask[:, None] & ((grp * MG + start) < hi)[None, :])


@triton.jit
def stored_score_weight(ref, lse):
    """The factor that turns a stored score (p * 2^SCORE_SHIFT relative to ref) into exp2(s - lse)."""
    return tl.math.exp2(ref - lse - SCORE_SHIFT)


@triton.jit
def _key_slots(n, ok, bt_row, stride_kn, stride_kblk, PAGED: tl.constexpr, PAGE: tl.constexpr):
    """(block, slot, K offset) of logical keys n of a row. PAGED: through the block table (entries read
    where ok); contiguous: block and slot are unused placeholders and the offset is n * stride_kn. The
    V offset is formed later (_attend_v), after the softmax, so that it is not live across it."""
    if PAGED:
        blk, slot = physical_slots(n, ok, bt_row, PAGE)
        return blk, slot, blk * stride_kblk + slot * stride_kn
    else:
        return n, n, n * stride_kn


@triton.jit
def _attend_v(acc, alpha, p, v_base, n, blk, slot, mask, stride_vn, stride_vblk, offs_d, PRECISION: tl.constexpr,
              PAGED: tl.constexpr):
    """Load the V rows of keys n (PAGED: their (block, slot) from physical_slots) where mask, and add
    p @ V into the rescaled accumulator."""
    if PAGED:
        v_off = blk * stride_vblk + slot * stride_vn
    else:
        v_off = n * stride_vn
    v = tl.load(v_base + v_off[:, None] + offs_d[None, :], mask=mask[:, None], other=0.0)
    return accumulate_pv(acc, alpha, p, v, PRECISION)


@triton.jit
def _store_split(M_PART, L_PART, O_PART, OUT, COUNTER, row, split, b, h, n_splits, stride_ob, stride_oh, m_i, l_i,
                 acc, offs_g, offs_d, g_mask, G: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr, SP: tl.constexpr,
                 SB: tl.constexpr, ACC_V: tl.constexpr, FUSE_COMBINE: tl.constexpr):
    """Store a split's partials (m, l and with ACC_V acc) at [row, split]; with FUSE_COMBINE the last
    split of the row to finish merges the row's splits into OUT."""
    part = (row.to(tl.int64) * n_splits + split) * G + offs_g
    tl.store(M_PART + part, m_i, mask=g_mask)
    tl.store(L_PART + part, l_i, mask=g_mask)
    if ACC_V:
        tl.store(O_PART + part[:, None] * D + offs_d[None, :], acc, mask=g_mask[:, None])
    if FUSE_COMBINE:
        _last_split_combines(M_PART, L_PART, O_PART, OUT, COUNTER, row, b, h, n_splits, stride_ob, stride_oh,
                             G, GQ, D, SP, SB)


@triton.jit
def row_chunk(length, n_splits, ALIGN: tl.constexpr):
    """Length of each of a row's n_splits splits (a multiple of ALIGN): the row's own length, not the
    cache's, is cut over the whole grid. The grid is sized from the cache capacity (fixed when a CUDA
    graph is captured), so a row shorter than the capacity still spreads over every program instead of
    leaving most of them empty (a 32K row in a cache sized for 128K used a quarter of the splits)."""
    return tl.cdiv(tl.cdiv(length, n_splits), ALIGN) * ALIGN


# Lengths and split counts are runtime values: Triton would otherwise compile a variant per divisibility
# class of each (a new prompt length = a new compile); they only bound loops and masks.
@triton.jit(do_not_specialize=["Lk", "n_splits"])
def decode_split_kernel(
    Q, K, V, KV_START, KV_END, SCORES, SREF, M_PART, L_PART, O_PART, OUT, COUNTER, BT,
    qk_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh,
    stride_btb, stride_kblk, stride_vblk,
    H_KV, Lk, n_splits,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    WRITE_SCORES: tl.constexpr, ACC_V: tl.constexpr, PRECISION: tl.constexpr,
    FUSE_COMBINE: tl.constexpr, GQ: tl.constexpr, SP: tl.constexpr, SB: tl.constexpr,
    ALIGN: tl.constexpr, PAGED: tl.constexpr = False, PAGE: tl.constexpr = 16, GS: tl.constexpr = 1,
    MG: tl.constexpr = 1,
):
    """One split of one row's valid keys (split s of n_splits takes keys [start + s * chunk, + chunk),
    chunk from the row's own length: row_chunk): scores of the G heads (with WRITE_SCORES stored relative to
    the running max, _store_scores: SCORES [rows, Lk, GS], references SREF), their split max/sum, and
    with ACC_V the unnormalised split output. With
    FUSE_COMBINE (needs ACC_V) the last split of a row to finish merges the row's splits into OUT.
    PAGED: K/V are vLLM paged caches (kernels/paged.py): positions are logical, a key's address goes
    through the row's block table BT[b] (stride_kb / stride_vb are then 0, stride_kn the slot stride,
    stride_kblk the block stride, PAGE the block size)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = (row // H_KV).to(tl.int64)
    h = (row % H_KV).to(tl.int64)
    start = tl.load(KV_START + b).to(tl.int32)
    end = tl.load(KV_END + b).to(tl.int32)
    chunk = row_chunk(end - start, n_splits, ALIGN)
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, end)

    offs_g, offs_d, offs_n, g_mask, q, k_base, v_base = _group_rows(
        Q, K, V, b, h, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, G, GP, D, BLOCK_N)
    s_base, r_base, bt_row, m_i, l_i, acc = _split_state(SCORES, SREF, BT, row, b, Lk, stride_btb, GP, D, GS, MG)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + offs_n
        n_mask = n < hi
        blk, slot, k_off = _key_slots(n, n_mask, bt_row, stride_kn, stride_kblk, PAGED, PAGE)
        k = tl.load(k_base + k_off[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # scores scaled once after the dot; a split may start with masked keys only: GUARD
        p, alpha, m_i, l_i = softmax_update(m_i, l_i, s, qk_scale, True, True)
        if WRITE_SCORES:
            _store_scores(s_base, r_base, p, m_i, n, n_mask, n0, start, hi, offs_g, g_mask, GP, BLOCK_N, GS, MG)
        if ACC_V:
            acc = _attend_v(acc, alpha, p, v_base, n, blk, slot, n_mask, stride_vn, stride_vblk, offs_d, PRECISION,
                            PAGED)

    _store_split(M_PART, L_PART, O_PART, OUT, COUNTER, row, split, b, h, n_splits, stride_ob, stride_oh, m_i, l_i,
                 acc, offs_g, offs_d, g_mask, G, GQ, D, SP, SB, ACC_V, FUSE_COMBINE)


@triton.jit
def _sparse_block(acc, m_i, l_i, q, slot, hi, i_base, k_base, v_base, s_base, r_base, start, end, stride_kn,
                  stride_vn, qk_scale, offs_g, offs_d, g_mask, PRECISION: tl.constexpr,
                  FROM_SCORES: tl.constexpr, bt_row, stride_kblk, stride_vblk, PAGED: tl.constexpr,
                  PAGE: tl.constexpr, PHYSICAL: tl.constexpr, GS: tl.constexpr, MG: tl.constexpr):
    """One block of index slots of the sparse pass into the running (acc, max, sum). PAGED: indices are
    logical positions, translated through the row's block table bt_row (kernels/paged.py). PHYSICAL (with
    PAGED): indices are already cache rows (block * PAGE + slot, -1 skipped; physical_indices_kernel), so
    a key costs one dependent load less: no block-table read."""
    idx = tl.load(i_base + slot, mask=slot < hi, other=-1).to(tl.int64)
    if PHYSICAL:
        valid = idx >= 0
        idx = tl.where(valid, idx, 0)
        # cache row r = block * PAGE + slot; blocks stride_kblk apart (vLLM interleaves K and V per block)
        blk, pslot = idx // PAGE, idx % PAGE
        k_off = blk * stride_kblk + pslot * stride_kn
    else:
        valid = (idx >= start) & (idx < end)
        idx = tl.where(valid, idx, 0)
        blk, pslot, k_off = _key_slots(idx, valid, bt_row, stride_kn, stride_kblk, PAGED, PAGE)
    if FROM_SCORES:
        # s = log2(stored) + ref - SCORE_SHIFT: the scaled score (a stored 0, a key ~1e9 times lighter than
        # its split's heaviest, gives -inf: weight 0)
        sm = (offs_g < GS)[:, None] & valid[None, :]
        e = tl.load(s_base + idx[None, :] * GS + offs_g[:, None], mask=sm, other=0.0).to(tl.float32)
        ref = tl.load(r_base + ((idx - start) // MG)[None, :] * GS + offs_g[:, None], mask=sm, other=0.0)
        s = tl.math.log2(e) + (ref - SCORE_SHIFT)
    else:
        k = tl.load(k_base + k_off[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = tl.where(valid[None, :], s, float("-inf"))
    # scores scaled (or gathered scaled); a block may hold only skipped slots: GUARD
    p, alpha, m_new, l_i = softmax_update(m_i, l_i, s, qk_scale, True, True)
    # V is loaded after the score dot: loaded before it, its registers stay live across the softmax
    # (202 instead of 104 registers per thread, Triton 3.9 sm_90 build)
    acc = _attend_v(acc, alpha, p, v_base, idx, blk, pslot, valid, stride_vn, stride_vblk, offs_d, PRECISION, PAGED)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["Lk", "W", "n_splits", "ppm", "floor"])
def decode_sparse_kernel(
    Q, K, V, IDX, HEAD_MAP, KV_START, KV_END, SCORES, SREF, M_PART, L_PART, O_PART, OUT, COUNTER, BT,
    qk_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ib, stride_ih,
    stride_ob, stride_oh,
    stride_btb, stride_kblk, stride_vblk,
    H_KV, Lk, W, n_splits, ppm, floor,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    FROM_SCORES: tl.constexpr, FUSE_COMBINE: tl.constexpr, GQ: tl.constexpr, SP: tl.constexpr,
    SB: tl.constexpr, ALIGN: tl.constexpr, DIRECT: tl.constexpr = False, MAPPED: tl.constexpr = False,
    BUDGET_BOUND: tl.constexpr = False, PAGED: tl.constexpr = False, PAGE: tl.constexpr = 16,
    PHYSICAL: tl.constexpr = False, GS: tl.constexpr = 1, MG: tl.constexpr = 1,
):
    """One split of one row's index slots: gather K/V at the indices (absolute positions; -1 or
    positions outside [kv_start, kv_end) are skipped) and attend, writing the split's (m, l, acc).
    With FROM_SCORES (an anchor layer, right after its score pass) the scores are gathered from the
    score pass's SCORES [rows, Lk, GS] (one GS-vector per key, _store_scores) and references SREF
    instead of recomputed, so K is not read again.
    DIRECT (only with one split per row): the normalised output goes straight to OUT (no partials, no
    merge). MAPPED: KV head h reads the index row HEAD_MAP[h] (a reuse layer's head map, applied here
    instead of copying the indices). BUDGET_BOUND: slots past the row's budget (computed from its length,
    ppm and floor as in topk.py) are not visited: with a cache wider than the row, W is the budget of the
    whole cache while a row needs only its own. PAGED: a vLLM paged cache, as in decode_split_kernel
    (indices stay logical positions; each is translated through the row's block table; with PHYSICAL they
    are cache rows already, see physical_indices_kernel). (A loop
    pipelined by hand, indices two blocks and K/V one block ahead, measured slower at every point on
    the H100: benchmarks/notes_decode.md, v6.)"""
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = (row // H_KV).to(tl.int64)
    h = (row % H_KV).to(tl.int64)
    start = tl.load(KV_START + b)
    end = tl.load(KV_END + b)
    slots = W
    if BUDGET_BOUND:
        length = (end - start).to(tl.int64)
        slots = tl.minimum(tl.maximum((length * ppm + 999_999) // 1_000_000, floor), length).to(tl.int32)
    # the row's own slots cut over every split (row_chunk): a short row still fills the grid
    chunk = row_chunk(slots, n_splits, ALIGN)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, slots)

    offs_g, offs_d, offs_n, g_mask, q, k_base, v_base = _group_rows(
        Q, K, V, b, h, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, G, GP, D, BLOCK_N)
    h_sel = h
    if MAPPED:
        h_sel = tl.load(HEAD_MAP + h).to(tl.int64)
    i_base = IDX + b * stride_ib + h_sel * stride_ih
    s_base, r_base, bt_row, m_i, l_i, acc = _split_state(SCORES, SREF, BT, row, b, Lk, stride_btb, GP, D, GS, MG)
    # (A tl.range loop that also pipelines the index load measured no faster: notes_decode.md, session 4.)
    for n0 in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _sparse_block(acc, m_i, l_i, q, n0 + offs_n, hi, i_base, k_base, v_base, s_base, r_base,
                                      start, end, stride_kn, stride_vn, qk_scale, offs_g, offs_d, g_mask,
                                      PRECISION, FROM_SCORES, bt_row, stride_kblk, stride_vblk, PAGED, PAGE,
                                      PHYSICAL, GS, MG)

    if DIRECT:
        # the only split of its row: normalise and store (a head that saw no key gets zeros)
        out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        o_base = OUT + b * stride_ob + (h * G) * stride_oh  # scalar 64-bit base, 32-bit offsets
        tl.store(o_base + offs_g[:, None] * stride_oh + offs_d[None, :], out.to(OUT.dtype.element_ty),
                 mask=g_mask[:, None])
    else:
        _store_split(M_PART, L_PART, O_PART, OUT, COUNTER, row, split, b, h, n_splits, stride_ob, stride_oh, m_i,
                     l_i, acc, offs_g, offs_d, g_mask, G, GQ, D, SP, SB, True, FUSE_COMBINE)


@triton.jit
def _last_split_combines(M_PART, L_PART, O_PART, OUT, COUNTER, row, b, h, n_splits, stride_ob, stride_oh,
                         G: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr, SP: tl.constexpr, SB: tl.constexpr):
    """Take a ticket on the row's counter after this split's partials are stored; the split taking the
    last ticket merges all of the row's splits (saves a launch and its latency at small batch) and
    resets the counter to 0 for the next launch. The barrier + acq_rel atomic publish every thread's
    partial stores before the ticket (the usual split-K semaphore); the merge reads with .cg (L2)."""
    tl.debug_barrier()
    ticket = tl.atomic_add(COUNTER + row, 1, sem="acq_rel")
    tl.debug_barrier()
    if ticket == n_splits - 1:
        _combine_row(M_PART, L_PART, O_PART, OUT, row, b, h, n_splits, stride_ob, stride_oh, G, GQ, D, SP, SB)
        tl.atomic_xchg(COUNTER + row, 0)


@triton.jit
def _combine_row(M_PART, L_PART, O_PART, OUT, row, b, h, n_splits, stride_ob, stride_oh,
                 G: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr, SP: tl.constexpr, SB: tl.constexpr):
    """out[g] = sum_s w_sg acc_sg / sum_s w_sg l_sg with w_sg = exp2(m_sg - max_s m_sg), for the G heads of
    one row at once. A head whose splits saw no key gets zeros."""
    base = row.to(tl.int64) * n_splits
    offs_s = tl.arange(0, SP)
    offs_g = tl.arange(0, GQ)
    offs_d = tl.arange(0, D)
    g_mask = offs_g < G
    pm = (offs_s[:, None] < n_splits) & g_mask[None, :]
    part = (base + offs_s[:, None]) * G + offs_g[None, :]
    m = tl.load(M_PART + part, mask=pm, other=float("-inf"), cache_modifier=".cg")
    l = tl.load(L_PART + part, mask=pm, other=0.0, cache_modifier=".cg")
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_tot = tl.sum(l * tl.math.exp2(m - m_safe[None, :]), 0)

    offs_b = tl.arange(0, SB)
    acc = tl.zeros([GQ, D], tl.float32)
    for s0 in range(0, n_splits, SB):
        sb = s0 + offs_b
        bm = (sb[:, None] < n_splits) & g_mask[None, :]
        pb = (base + sb[:, None]) * G + offs_g[None, :]
        w = tl.math.exp2(tl.load(M_PART + pb, mask=bm, other=float("-inf"), cache_modifier=".cg") - m_safe[None, :])
        o = tl.load(O_PART + pb[:, :, None] * D + offs_d[None, None, :], mask=bm[:, :, None], other=0.0,
                    cache_modifier=".cg")
        acc += tl.sum(o * w[:, :, None], 0)
    out = tl.where(l_tot[:, None] > 0, acc / tl.where(l_tot > 0, l_tot, 1.0)[:, None], 0.0)
    heads = (h * G + offs_g).to(tl.int64)
    tl.store(OUT + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=g_mask[:, None])


@triton.jit
def decode_combine_kernel(
    M_PART, L_PART, O_PART, OUT,
    stride_ob, stride_oh,
    H_KV, n_splits,
    G: tl.constexpr, D: tl.constexpr, SP: tl.constexpr, SB: tl.constexpr,
):
    """Merge the splits of one query head (program = b * Hq + head) into OUT: a separate launch, used when
    a row has too many splits for its last split to merge them alone quickly."""
    pid = tl.program_id(0)
    row = pid // G
    g = pid % G
    b = (row // H_KV).to(tl.int64)
    head = ((row % H_KV) * G + g).to(tl.int64)
    base = row.to(tl.int64) * n_splits

    offs_s = tl.arange(0, SP)
    s_mask = offs_s < n_splits
    m = tl.load(M_PART + (base + offs_s) * G + g, mask=s_mask, other=float("-inf"))
    l = tl.load(L_PART + (base + offs_s) * G + g, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_tot = tl.sum(l * tl.math.exp2(m - m_safe), 0)

    offs_d = tl.arange(0, D)
    offs_b = tl.arange(0, SB)
    acc = tl.zeros([D], tl.float32)
    for s0 in range(0, n_splits, SB):
        sb = s0 + offs_b
        sb_mask = sb < n_splits
        w = tl.math.exp2(tl.load(M_PART + (base + sb) * G + g, mask=sb_mask, other=float("-inf")) - m_safe)
        o = tl.load(O_PART + ((base + sb) * G + g)[:, None] * D + offs_d[None, :], mask=sb_mask[:, None], other=0.0)
        acc += tl.sum(o * w[:, None], 0)
    out = tl.where(l_tot > 0, acc / tl.where(l_tot > 0, l_tot, 1.0), 0.0)
    tl.store(OUT + b * stride_ob + head * stride_oh + offs_d, out.to(OUT.dtype.element_ty))


@triton.jit
def physical_indices_kernel(IDX, PIDX, BT, SEQ_LENS, H_KV, W, stride_ib, stride_ih, stride_btb,
                            PAGE: tl.constexpr, BLOCK: tl.constexpr):
    """PIDX = the cache rows (block_table[b, i // PAGE] * PAGE + i % PAGE) of an anchor's logical indices i,
    -1 where i is -1 or past seq_len: run once per anchor layer so that every reuse layer after it gathers
    K/V without reading the block table (all layers of a vLLM step share one block table)."""
    row = tl.program_id(0)
    b = (row // H_KV).to(tl.int64)
    h = (row % H_KV).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_w = offs < W
    idx = tl.load(IDX + b * stride_ib + h * stride_ih + offs, mask=in_w, other=-1)
    valid = (idx >= 0) & (idx < tl.load(SEQ_LENS + b))
    blk = tl.load(BT + b * stride_btb + idx // PAGE, mask=valid, other=0)
    phys = tl.where(valid, blk * PAGE + idx % PAGE, -1)
    tl.store(PIDX + row.to(tl.int64) * W + offs, phys.to(tl.int32), mask=in_w)
