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


@triton.jit
def decode_split_kernel(
    Q, K, V, KV_START, KV_END, SCORES, M_PART, L_PART, O_PART,
    qk_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    H_KV, Lk, n_splits, chunk,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    WRITE_SCORES: tl.constexpr, ACC_V: tl.constexpr, PRECISION: tl.constexpr,
):
    """One split of one row's valid keys: scores of the G heads (written to SCORES [rows, G, Lk] when
    WRITE_SCORES), their split max/sum, and with ACC_V the unnormalised split output."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = (row // H_KV).to(tl.int64)
    h = (row % H_KV).to(tl.int64)
    start = tl.load(KV_START + b).to(tl.int32)
    end = tl.load(KV_END + b).to(tl.int32)
    lo = tl.maximum(split * chunk, start)
    hi = tl.minimum(split * chunk + chunk, end)

    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < G
    q = tl.load(Q + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    s_base = SCORES + row.to(tl.int64) * G * Lk

    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + offs_n
        n_mask = n < hi
        k = tl.load(k_base + n[:, None] * stride_kn + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        if WRITE_SCORES:
            tl.store(s_base + offs_g[:, None] * Lk + n[None, :], s, mask=g_mask[:, None] & n_mask[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if ACC_V:
            v = tl.load(v_base + n[:, None] * stride_vn + offs_d[None, :], mask=n_mask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    part = (row.to(tl.int64) * n_splits + split) * G + offs_g
    tl.store(M_PART + part, m_i, mask=g_mask)
    tl.store(L_PART + part, l_i, mask=g_mask)
    if ACC_V:
        tl.store(O_PART + part[:, None] * D + offs_d[None, :], acc, mask=g_mask[:, None])


@triton.jit
def decode_sparse_kernel(
    Q, K, V, IDX, KV_START, KV_END, SCORES, M_PART, L_PART, O_PART,
    qk_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ib, stride_ih,
    H_KV, Lk, W, n_splits, chunk,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    FROM_SCORES: tl.constexpr,
):
    """One split of one row's index slots: gather K/V at the indices (absolute positions; -1 or
    positions outside [kv_start, kv_end) are skipped) and attend, writing the split's (m, l, acc).
    With FROM_SCORES (an anchor layer, right after its score pass) the scores are gathered from
    SCORES [rows, G, Lk] instead of recomputed, so K is not read again."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = (row // H_KV).to(tl.int64)
    h = (row % H_KV).to(tl.int64)
    start = tl.load(KV_START + b)
    end = tl.load(KV_END + b)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, W)

    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < G
    q = tl.load(Q + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    i_base = IDX + b * stride_ib + h * stride_ih
    s_base = SCORES + row.to(tl.int64) * G * Lk

    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        slot = n0 + offs_n
        idx = tl.load(i_base + slot, mask=slot < hi, other=-1).to(tl.int64)
        valid = (idx >= start) & (idx < end)
        idx = tl.where(valid, idx, 0)
        if FROM_SCORES:
            s = tl.load(s_base + offs_g[:, None] * Lk + idx[None, :], mask=g_mask[:, None] & valid[None, :],
                        other=float("-inf"))
        else:
            k = tl.load(k_base + idx[:, None] * stride_kn + offs_d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + idx[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    part = (row.to(tl.int64) * n_splits + split) * G + offs_g
    tl.store(M_PART + part, m_i, mask=g_mask)
    tl.store(L_PART + part, l_i, mask=g_mask)
    tl.store(O_PART + part[:, None] * D + offs_d[None, :], acc, mask=g_mask[:, None])


@triton.jit
def decode_combine_kernel(
    M_PART, L_PART, O_PART, OUT,
    stride_ob, stride_oh,
    H_KV, n_splits,
    G: tl.constexpr, D: tl.constexpr, SP: tl.constexpr, SB: tl.constexpr,
):
    """Merge the splits of one query head (program = b * Hq + head): out = sum_s w_s acc_s / sum_s w_s l_s
    with w_s = exp2(m_s - max m). A head whose splits saw no key gets zeros."""
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
        ms = tl.load(M_PART + (base + sb) * G + g, mask=sb_mask, other=float("-inf"))
        w = tl.math.exp2(ms - m_safe)
        o = tl.load(O_PART + ((base + sb) * G + g)[:, None] * D + offs_d[None, :], mask=sb_mask[:, None], other=0.0)
        acc += tl.sum(o * w[:, None], 0)
    out = tl.where(l_tot > 0, acc / tl.where(l_tot > 0, l_tot, 1.0), 0.0)
    tl.store(OUT + b * stride_ob + head * stride_oh + offs_d, out.to(OUT.dtype.element_ty))
