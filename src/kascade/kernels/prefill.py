"""Triton kernels of rolling Kascade prefill (launchers and checks: kascade.ops.prefill).

Conventions are those of kascade.reference: q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], per-row valid keys
[kv_start, kv_end), queries bottom-right aligned, tiles of T tokens by row-relative position r.

Every kernel packs the query rows that share keys into one block of M = G_BLOCK * BLOCK_T rows: row m
is query head hkv * G + gb * G_BLOCK + m // BLOCK_T (one GQA group, or a slice of it) at row-relative
position r0 + m % BLOCK_T. K/V are loaded once per block for all those heads, and in the pooling kernel
the tile's pooled score is the plain column sum of the block's probabilities.

Scores are kept in base 2 (scale * log2(e) folded into one factor); the log-sum-exp buffer holds
base-2 values, -inf for rows without keys.

PAGED=True (launchers: kascade.ops.paged) compiles the same kernels for vLLM's layout: queries packed
along one token axis (sequence b's queries are rows query_start_loc[b] .. query_start_loc[b+1] - 1, the
last ones of the sequence), K/V in a paged cache read through the block table (TABLE=True,
kernels/paged.py) or, TABLE=False, gathered from the pages into [B, Hkv, Lk, D] once per layer
(kascade.ops.paged.gather_kv: the contiguous kernels' K/V loads, no block-table read per key).
Everything else stays in row-relative (= logical, kv_start = 0) positions; the tile axis of the pooled
buffer and of the indices then counts from each sequence's first query tile (see _geometry).
"""

import triton
import triton.language as tl

from .paged import physical_slots
from .softmax import accumulate_pv, softmax_update
from .topk import load_key_bits, radix_digit


@triton.jit
def _row_geometry(kv_start_ptr, kv_end_ptr, b, Lq):
    """(start, L, q_pos): row b's first valid key, its length, and the row-relative position of its
    first query present in this call."""
    start = tl.load(kv_start_ptr + b).to(tl.int32)
    end = tl.load(kv_end_ptr + b).to(tl.int32)
    L = end - start
    n = tl.minimum(L, Lq)
    return start, L, L - n


@triton.jit
def _geometry(kv_start_ptr, kv_end_ptr, qsl_ptr, b, Lq, PAGED: tl.constexpr):
    """(start, L, q_pos, q_row0): _row_geometry, plus q_row0, the index along q's token axis of the
    row's query at row-relative position q_pos (the query at r is then q_row0 + r - q_pos).
    Contiguous: q_row0 = Lq - n (queries aligned to the row's end). PAGED (packed varlen queries):
    start = 0, L = seq_lens[b] (passed as kv_end_ptr), the queries are q rows
    query_start_loc[b] .. query_start_loc[b+1] - 1, so q_row0 = query_start_loc[b]."""
    if PAGED:
        L = tl.load(kv_end_ptr + b).to(tl.int32)
        q_row0 = tl.load(qsl_ptr + b).to(tl.int32)
        n = tl.load(qsl_ptr + b + 1).to(tl.int32) - q_row0
        return L * 0, L, L - n, q_row0
    else:
        start, L, q_pos = _row_geometry(kv_start_ptr, kv_end_ptr, b, Lq)
        return start, L, q_pos, Lq - (L - q_pos)


@triton.jit
def _program_block(n_gblocks, Hkv):
    """The program's (slot, head block, batch row, KV head) in the grid (slots x head blocks, batch x KV
    heads) of the attention, pooling and sparse kernels: programs running together share one KV head
    (its K/V stay in L2) and the head blocks of one slot sit next to each other. Slots are counted from
    the last (the largest blocks, with the most keys, go first): slot = n_slots - 1 - program_id(0) //
    n_gblocks, which the caller computes where it needs it (returned here: n_slots)."""
    n_slots = tl.num_programs(0) // n_gblocks
    gb = tl.program_id(0) % n_gblocks
    b = tl.program_id(1) // Hkv
    hkv = tl.program_id(1) % Hkv
    return n_slots, gb, b, hkv


@triton.jit
def _query_rows(q_ptr, b, hkv, gb, r0, q_pos, q_row0, L, G, sqb, sqh, sqt,
                M: tl.constexpr, ROWS: tl.constexpr, G_BLOCK: tl.constexpr, D: tl.constexpr):
    """The program's M = G_BLOCK * ROWS query rows: row m is query head hkv * G + gb * G_BLOCK + m // ROWS
    at row-relative position r0 + m % ROWS. Returns (g, r, row_ok, head, lq_idx, offs_d, q): the group
    index and position of each row, whether it holds a query of this call, its head and q index
    (lq_idx), and q [M, D] (zeros where not row_ok)."""
    offs_m = tl.arange(0, M)
    g = gb * G_BLOCK + offs_m // ROWS
    r = r0 + offs_m % ROWS
    row_ok = (g < G) & (r >= q_pos) & (r < L)
    head = hkv * G + g
    lq_idx = q_row0 + r - q_pos
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + b * sqb + head[:, None] * sqh + lq_idx[:, None] * sqt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    return g, r, row_ok, head, lq_idx, offs_d, q


@triton.jit
def _kv_offsets(kn, ok, bt_row, skt, svt, skblk, svblk, TABLE: tl.constexpr, PAGE: tl.constexpr):
    """Offsets of the K and V rows of row-relative keys kn from the row's K/V base. Contiguous (also
    gathered paged K/V): kn * stride. TABLE: through the row's block table bt_row (entries loaded where
    ok, so the caller masks its loads with ok too); skt / svt are then the slot strides, skblk / svblk
    the block strides."""
    if TABLE:
        blk, slot = physical_slots(kn, ok, bt_row, PAGE)
        return blk * skblk + slot * skt, blk * svblk + slot * svt
    else:
        return kn * skt, kn * svt


@triton.jit
def _online_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, key_ok, row_key_ok, qk_scale,
                  WITH_V: tl.constexpr, DOT_PREC: tl.constexpr):
    """One block of keys into the running (acc, max, sum): key_ok [N] masks the loads, row_key_ok
    [M, N] masks the scores (causality, padding)."""
    k = tl.load(k_ptrs, mask=key_ok[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    s = tl.where(row_key_ok, s, float("-inf"))
    # Rows that have seen no key yet (causal diagonal, padding) keep m = -inf: GUARD.
    p, alpha, m_new, l_i = softmax_update(m_i, l_i, s, qk_scale, False, True)
    if WITH_V:
        v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
        acc = accumulate_pv(acc, alpha, p, v, DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _online_block_fast(acc, m_i, l_i, q, k_ptrs, v_ptrs, key_bias, qk_scale,
                       HAS_BIAS: tl.constexpr, WITH_V: tl.constexpr, DOT_PREC: tl.constexpr):
    """_online_block for blocks whose addresses are all valid, need no per-element mask and hold at
    least one key that every row may see: keys to skip come as key_bias = -inf (one add per score
    instead of a mask and a select); rows without a query have q = 0, give finite scores and are never
    stored. Every row's max is then finite after this block, so no -inf guard is needed, and the
    scale folds into the exponent's subtraction (one FFMA per score instead of a multiply, a guard
    and a subtraction: the loop is instruction-bound, benchmarks/notes_prefill.md)."""
    k = tl.load(k_ptrs)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if HAS_BIAS:
        s = s + key_bias[None, :]
    p, alpha, m_new, l_i = softmax_update(m_i, l_i, s, qk_scale, False, False)
    if WITH_V:
        v = tl.load(v_ptrs)
        acc = accumulate_pv(acc, alpha, p, v, DOT_PREC)
    return acc, m_new, l_i


# The query length and tile counts are runtime values: otherwise each divisibility class of a new prompt
# length compiles another variant of every kernel (they only bound loops and masks).
@triton.jit(do_not_specialize=["Lq", "n_gblocks", "sbt"])
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, kv_start_ptr, kv_end_ptr, qsl_ptr, bt_ptr,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, slb, slh, sbt, skblk, svblk,
    Lq, Hkv, G, n_gblocks, qk_scale,
    D: tl.constexpr, G_BLOCK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    WITH_V: tl.constexpr, STORE_LSE: tl.constexpr, DOT_PREC: tl.constexpr,
    PAGED: tl.constexpr = False, PAGE: tl.constexpr = 16,
    TABLE: tl.constexpr = False,
):
    """Dense causal attention of BLOCK_T consecutive queries x G_BLOCK heads of one GQA group.

    WITH_V=False computes only the log-sum-exp (the anchor's first pass: half the matrix work).
    PAGED: vLLM layout (module docstring): qsl_ptr = query_start_loc, kv_end_ptr = seq_lens, bt_ptr the
    block table (row stride sbt), skblk / svblk the cache block strides; batch strides are 0."""
    M: tl.constexpr = G_BLOCK * BLOCK_T
    # Slots are query blocks (the last query block of a row has the most keys: first).
    n_qblocks, gb, b, hkv = _program_block(n_gblocks, Hkv)
    start, L, q_pos, q_row0 = _geometry(kv_start_ptr, kv_end_ptr, qsl_ptr, b, Lq, PAGED)
    r0 = (q_pos // BLOCK_T) * BLOCK_T + (n_qblocks - 1 - tl.program_id(0) // n_gblocks) * BLOCK_T
    if r0 >= L:
        return
    g, r, row_ok, head, lq_idx, offs_d, q = _query_rows(q_ptr, b, hkv, gb, r0, q_pos, q_row0, L, G, sqb, sqh, sqt,
                                                        M, BLOCK_T, G_BLOCK, D)

    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    k_base = k_ptr + b * skb + hkv * skh + start * skt
    v_base = v_ptr + b * svb + hkv * svh + start * svt
    bt_row = bt_ptr + b * sbt
    # Keys before the block need no causal mask.
    full_end = (r0 // BLOCK_N) * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        kn = n0 + offs_n
        k_off, v_off = _kv_offsets(kn, kn < full_end, bt_row, skt, svt, skblk, svblk, TABLE, PAGE)
        acc, m_i, l_i = _online_block_fast(
            acc, m_i, l_i, q, k_base + k_off[:, None] + offs_d[None, :],
            v_base + v_off[:, None] + offs_d[None, :], offs_n, qk_scale, False, WITH_V, DOT_PREC)
    diag_end = tl.minimum(r0 + BLOCK_T, L)
    for n0 in range(full_end, diag_end, BLOCK_N):
        kn = n0 + offs_n
        key_ok = kn < diag_end
        k_off, v_off = _kv_offsets(kn, key_ok, bt_row, skt, svt, skblk, svblk, TABLE, PAGE)
        acc, m_i, l_i = _online_block(
            acc, m_i, l_i, q, k_base + k_off[:, None] + offs_d[None, :],
            v_base + v_off[:, None] + offs_d[None, :], key_ok,
            row_ok[:, None] & key_ok[None, :] & (kn[None, :] <= r[:, None]), qk_scale, WITH_V, DOT_PREC)

    store_ok = (g < G) & (r < L) & (lq_idx >= 0)
    if PAGED:  # rows before the sequence's first query are the previous sequence's queries
        store_ok = store_ok & (r >= q_pos)
    if WITH_V:
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        o = tl.where(row_ok[:, None], o, 0.0)
        o_ptrs = out_ptr + b * sob + head[:, None] * soh + lq_idx[:, None] * sot + offs_d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=store_ok[:, None])
    if STORE_LSE:
        lse = tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * slb + head * slh + lq_idx, lse, mask=store_ok)


@triton.jit(do_not_specialize=["Lq", "n_gblocks", "tile_lo", "n_tiles", "sbt"])
def _pool_kernel(
    q_ptr, k_ptr, lse_ptr, pooled_ptr, tile_k_ptr, kv_start_ptr, kv_end_ptr, qsl_ptr, bt_ptr,
    sqb, sqh, sqt, skb, skh, skt, slb, slh, spb, sph, spt, sbt, skblk,
    Lq, Hkv, G, n_gblocks, tile_lo, n_tiles, qk_scale,
    D: tl.constexpr, G_BLOCK: tl.constexpr, T: tl.constexpr, BLOCK_N: tl.constexpr,
    ATOMIC: tl.constexpr, DOT_PREC: tl.constexpr, PAGED: tl.constexpr = False, PAGE: tl.constexpr = 16,
    TABLE: tl.constexpr = False,
):
    """Post-softmax probabilities of one tile's queries x G_BLOCK heads over the tile's prefix, summed
    over those rows: pooled[b, hkv, tile - tile_lo, :prefix]. With several head blocks per group
    (ATOMIC) the partial sums are added atomically into a zeroed buffer. PAGED (vLLM layout, as in
    _attn_fwd_kernel): tiles count from each sequence's first query tile q_pos // T, i.e. slot s of
    the launch is tile q_pos // T + tile_lo + s."""
    M: tl.constexpr = G_BLOCK * T
    n_slots, gb, b, hkv = _program_block(n_gblocks, Hkv)
    slot = n_slots - 1 - tl.program_id(0) // n_gblocks
    start, L, q_pos, q_row0 = _geometry(kv_start_ptr, kv_end_ptr, qsl_ptr, b, Lq, PAGED)
    tile = tile_lo + slot
    if PAGED:
        tile += q_pos // T
    if tile >= n_tiles:
        return
    prefix = tile * T
    # Dense tiles need no selection; tiles without queries of this call have none.
    if tl.load(tile_k_ptr + tile) < 0 or prefix + T <= q_pos or prefix >= L or q_pos >= L:
        return
    g, r, row_ok, head, lq_idx, offs_d, q = _query_rows(q_ptr, b, hkv, gb, prefix, q_pos, q_row0, L, G, sqb, sqh,
                                                        sqt, M, T, G_BLOCK, D)
    # Rows without a query get lse = +inf, so their probabilities are exactly 0.
    lse = tl.load(lse_ptr + b * slb + head * slh + lq_idx, mask=row_ok, other=float("inf"))
    lse = tl.where(row_ok, lse, float("inf"))
    # Scores transposed (keys x rows): the pooled sum is then a row reduction of the accumulator,
    # which stays inside a thread and its quad, instead of a reduction across warps.
    qt = tl.trans(q)
    offs_n = tl.arange(0, BLOCK_N)
    k_base = k_ptr + b * skb + hkv * skh + start * skt
    bt_row = bt_ptr + b * sbt
    out_base = pooled_ptr + b.to(tl.int64) * spb + hkv * sph + slot * spt
    for n0 in range(0, prefix, BLOCK_N):
        kn = n0 + offs_n
        key_ok = kn < prefix
        k_off, _ = _kv_offsets(kn, key_ok, bt_row, skt, skt, skblk, skblk, TABLE, PAGE)
        k = tl.load(k_base + k_off[:, None] + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        st = tl.dot(k, qt, input_precision=DOT_PREC) * qk_scale
        p = tl.math.exp2(st - lse[None, :])
        col = tl.sum(p, 1)
        if ATOMIC:
            tl.atomic_add(out_base + kn, col, mask=key_ok, sem="relaxed")
        else:
            tl.store(out_base + kn, col.to(pooled_ptr.dtype.element_ty), mask=key_ok)


@triton.jit(do_not_specialize=["Lq", "tile_lo", "n_tiles"])
def _select_kernel(
    pooled_ptr, idx_ptr, tile_k_ptr, kv_start_ptr, kv_end_ptr, qsl_ptr,
    spb, sph, spt, sib, sih, sit,
    Lq, Hkv, tile_lo, n_tiles, T,
    BLOCK: tl.constexpr, KEY16: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr, PAGED: tl.constexpr = False,
):
    """Top-k of one (row, KV head, tile) pooled row by the radix select of kernels/topk.py (its tie
    rule: 22-bit keys, float32 bits 30..9, digits of 8, B2 and B3 bits = kernels/topk.B2 / B3; a float16
    pooled row (KEY16) is keyed by its exact 16 bits, the same rule on the stored value), then one compaction pass writing the selected absolute
    positions in ascending order: all keys above the k-th key, and the first keys equal to it until
    the budget is met. PAGED: tiles (of the launch and of the indices' tile axis) count from each
    sequence's first query tile, as in _pool_kernel; positions are logical."""
    b = tl.program_id(1) // Hkv
    hkv = tl.program_id(1) % Hkv
    slot = tl.num_programs(0) - 1 - tl.program_id(0)
    start, L, q_pos, _ = _geometry(kv_start_ptr, kv_end_ptr, qsl_ptr, b, Lq, PAGED)
    tile = tile_lo + slot
    tile0 = 0  # the tile at index 0 of the indices' tile axis
    if PAGED:
        tile0 = q_pos // T
        tile += tile0
    if tile >= n_tiles:
        return
    k_budget = tl.load(tile_k_ptr + tile)
    prefix = tile * T
    if k_budget < 0 or prefix + T <= q_pos or prefix >= L or q_pos >= L:
        return
    row_ptr = pooled_ptr + b.to(tl.int64) * spb + hkv * sph + slot * spt
    # At most 256 bins per pass: tl.histogram costs about (bins / 32) * log2(bins) instructions per
    # lane for every 32 elements, so 2048-bin passes were compute-bound (235 ms at 128K).
    if KEY16:
        # float16 pooled scores: two 8-bit digits give the exact k-th value.
        KEY_SHIFT: tl.constexpr = 0
        d1, need = radix_digit(row_ptr, prefix, 8, 0, k_budget, False, 8, BLOCK, KEY16)
        d2, need = radix_digit(row_ptr, prefix, 0, d1, need, True, 8, BLOCK, KEY16)
        thresh = (d1 << 8) | d2
    else:
        # float32: the decode digits (exponent, B2, B3 bits): a 22-bit key.
        KEY_SHIFT: tl.constexpr = 23 - B2 - B3
        d1, need = radix_digit(row_ptr, prefix, 23, 0, k_budget, False, 8, BLOCK, KEY16)
        d2, need = radix_digit(row_ptr, prefix, 23 - B2, d1, need, True, B2, BLOCK, KEY16)
        d3, need = radix_digit(row_ptr, prefix, KEY_SHIFT, (d1 << B2) | d2, need, True, B3, BLOCK, KEY16)
        thresh = (((d1 << B2) | d2) << B3) | d3
    out_base = idx_ptr + b.to(tl.int64) * sib + hkv.to(tl.int64) * sih + (tile - tile0).to(tl.int64) * sit
    offs = tl.arange(0, BLOCK)
    written = 0
    ties_taken = 0
    for i0 in range(0, prefix, BLOCK):
        idx = i0 + offs
        ok = idx < prefix
        x = load_key_bits(row_ptr + idx, ok, KEY16) >> KEY_SHIFT
        eq = ok & (x == thresh)
        eq_rank = ties_taken + tl.cumsum(eq.to(tl.int32), 0) - 1
        sel = (ok & (x > thresh)) | (eq & (eq_rank < need))
        sel_i = sel.to(tl.int32)
        pos = written + tl.cumsum(sel_i, 0) - 1
        tl.store(out_base + pos, (idx + start).to(tl.int32), mask=sel)
        written += tl.sum(sel_i, 0)
        ties_taken += tl.sum(eq.to(tl.int32), 0)


@triton.jit
def _gather_block(acc, m_i, l_i, q, i_base, slot, k_budget, start, k_base, v_base, skt, svt, offs_d, qk_scale,
                  bt_row, skblk, svblk, TAIL: tl.constexpr, DOT_PREC: tl.constexpr, TABLE: tl.constexpr,
                  PAGE: tl.constexpr, PHYSICAL: tl.constexpr = False):
    """One block of a sparse tile's selected keys into the running (acc, max, sum). Full blocks
    (TAIL=False) hold BLOCK_N selected keys; the tail block masks the slots past the budget. TABLE:
    the indices are logical positions, translated through the row's block table. PHYSICAL: they are
    cache rows (block * PAGE + slot, translated once per anchor layer): no block-table read."""
    if TAIL:
        kn = tl.load(i_base + slot, mask=slot < k_budget, other=-1)
        bias = tl.where(kn >= 0, 0.0, float("-inf"))
        kn = tl.where(kn >= 0, kn, start)
    else:
        kn = tl.load(i_base + slot)
        bias = slot.to(tl.float32)  # placeholder: HAS_BIAS=False ignores it
    if PHYSICAL:
        blk, pslot = (kn // PAGE).to(tl.int64), kn % PAGE
        k_off, v_off = blk * skblk + pslot * skt, blk * svblk + pslot * svt
    else:
        k_off, v_off = _kv_offsets(kn, kn >= 0, bt_row, skt, svt, skblk, svblk, TABLE, PAGE)
    return _online_block_fast(acc, m_i, l_i, q, k_base + k_off[:, None] + offs_d[None, :],
                              v_base + v_off[:, None] + offs_d[None, :], bias, qk_scale, TAIL, True, DOT_PREC)


@triton.jit(do_not_specialize=["Lq", "n_gblocks", "n_tiles", "sbt"])
def _sparse_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, idx_ptr, head_map_ptr, tile_k_ptr, kv_start_ptr, kv_end_ptr, qsl_ptr, bt_ptr,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sib, sih, sit, sbt, skblk, svblk,
    Lq, Hkv, G, n_gblocks, n_tiles, qk_scale,
    D: tl.constexpr, G_BLOCK: tl.constexpr, T: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr, MAPPED: tl.constexpr = False, PAGED: tl.constexpr = False, PAGE: tl.constexpr = 16,
    TABLE: tl.constexpr = False, PHYSICAL: tl.constexpr = False,
):
    """Rolling sparse prefill of one tile x G_BLOCK heads: the tile's selected prefix keys (gathered by
    index; all prefix keys when the tile is dense), then its own tile causally. MAPPED: KV head h reads
    the index rows of head_map[h] (a reuse layer's head map, applied here instead of copying indices).
    PAGED: vLLM layout as in _attn_fwd_kernel; the indices' tile axis counts from each sequence's first
    query tile (as _select_kernel writes it). PHYSICAL (with TABLE): the selected indices are cache rows;
    dense tiles and the own tile still go through the block table."""
    M: tl.constexpr = G_BLOCK * T
    # Grid as in _attn_fwd_kernel (the head blocks of one tile gather the same keys), largest tiles first.
    n_slots, gb, b, hkv = _program_block(n_gblocks, Hkv)
    start, L, q_pos, q_row0 = _geometry(kv_start_ptr, kv_end_ptr, qsl_ptr, b, Lq, PAGED)
    idx_tile = n_slots - 1 - tl.program_id(0) // n_gblocks
    tile = q_pos // T + idx_tile
    if not PAGED:
        idx_tile = tile
    prefix = tile * T
    if prefix >= L:
        return
    g, r, row_ok, head, lq_idx, offs_d, q = _query_rows(q_ptr, b, hkv, gb, prefix, q_pos, q_row0, L, G, sqb, sqh,
                                                        sqt, M, T, G_BLOCK, D)
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    k_base = k_ptr + b * skb + hkv * skh
    v_base = v_ptr + b * svb + hkv * svh
    bt_row = bt_ptr + b * sbt
    k_budget = tl.load(tile_k_ptr + tile)
    h_sel = hkv
    if MAPPED:
        h_sel = tl.load(head_map_ptr + hkv)
    i_base = idx_ptr + b.to(tl.int64) * sib + h_sel.to(tl.int64) * sih + idx_tile.to(tl.int64) * sit
    if k_budget < 0:
        for n0 in range(0, prefix, BLOCK_N):
            rel = n0 + offs_n
            bias = tl.where(rel < prefix, 0.0, float("-inf"))
            kn = start + tl.minimum(rel, prefix - 1)
            k_off, v_off = _kv_offsets(kn, kn >= 0, bt_row, skt, svt, skblk, svblk, TABLE, PAGE)
            acc, m_i, l_i = _online_block_fast(
                acc, m_i, l_i, q, k_base + k_off[:, None] + offs_d[None, :],
                v_base + v_off[:, None] + offs_d[None, :], bias, qk_scale, True, True, DOT_PREC)
    else:
        # Measured on the H100 (benchmarks/notes_prefill.md): loading the next block's indices one
        # iteration ahead stops Triton from pipelining the gathers (+80 %), one loop body shared with
        # dense tiles is 10 % slower, and a tl.range that pipelines the index load too gains nothing;
        # so: plain index load, two loops.
        # Full blocks without a mask, then the tail block (budgets are rarely multiples of BLOCK_N).
        n_full = (k_budget // BLOCK_N) * BLOCK_N
        for n0 in range(0, n_full, BLOCK_N):
            acc, m_i, l_i = _gather_block(acc, m_i, l_i, q, i_base, n0 + offs_n, k_budget, start, k_base,
                                          v_base, skt, svt, offs_d, qk_scale, bt_row, skblk, svblk,
                                          False, DOT_PREC, TABLE, PAGE, PHYSICAL)
        if n_full < k_budget:
            acc, m_i, l_i = _gather_block(acc, m_i, l_i, q, i_base, n_full + offs_n, k_budget, start, k_base,
                                          v_base, skt, svt, offs_d, qk_scale, bt_row, skblk, svblk,
                                          True, DOT_PREC, TABLE, PAGE, PHYSICAL)
    # Own tile, causally.
    offs_t = tl.arange(0, T)
    rk = prefix + offs_t
    key_ok = rk < L
    kn = start + rk
    k_off, v_off = _kv_offsets(kn, key_ok, bt_row, skt, svt, skblk, svblk, TABLE, PAGE)
    acc, m_i, l_i = _online_block(
        acc, m_i, l_i, q, k_base + k_off[:, None] + offs_d[None, :],
        v_base + v_off[:, None] + offs_d[None, :], key_ok,
        row_ok[:, None] & key_ok[None, :] & (rk[None, :] <= r[:, None]), qk_scale, True, DOT_PREC)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = tl.where(row_ok[:, None], acc / l_safe[:, None], 0.0)
    store_ok = (g < G) & (r < L) & (lq_idx >= 0)
    if PAGED:
        store_ok = store_ok & (r >= q_pos)
    o_ptrs = out_ptr + b * sob + head[:, None] * soh + lq_idx[:, None] * sot + offs_d[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=store_ok[:, None])
