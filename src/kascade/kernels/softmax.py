"""The online-softmax block update shared by the attention kernels of both phases (kernels/decode.py:
split and sparse passes; kernels/prefill.py: flash / LSE, sparse gather and own-tile blocks).

Scores are in base 2 (the softmax scale times log2(e) is the kernels' qk_scale). The running state of a
block of rows is (acc, m, l): the row max of the scaled scores seen so far, the sum of exp2(s - m) and
the unnormalised output sum exp2(s - m) v. Triton inlines @triton.jit helpers, and every variant below
is a constexpr branch, so each kernel compiles to the instructions it had with the update written in
place (checked for sm_90 with Triton 3.9: the same PTX instructions, and byte-identical SASS without
line info; with line info ptxas may number registers differently).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def softmax_update(m_i, l_i, s, qk_scale, SCALED: tl.constexpr, GUARD: tl.constexpr):
    """One block of scores s [rows, keys] into the running max m_i and sum l_i. Returns (p, alpha, m_new,
    l_new): p = exp2(s - m_new) per score and alpha = exp2(m_i - m_new) per row, with which the caller
    rescales its accumulator (accumulate_pv) after loading V.

    SCALED: s already holds scaled scores (decode multiplies once after the dot, since it stores or
    gathers them). Otherwise s is the raw dot and qk_scale folds into the exponent's subtraction: one
    FFMA per score (s * qk_scale - m) instead of a multiply and a subtraction; qk_scale > 0, so the max
    of the scaled scores is the scaled max (prefill: its loops are instruction-bound,
    benchmarks/notes_prefill.md).
    GUARD: a row may have seen no key yet (all of its scores -inf so far): it keeps m = -inf, and 0 is
    subtracted there so that exp2 gives 0, not NaN. Without GUARD the caller guarantees every row a
    finite score in this block (prefill's unmasked full blocks), which saves the select per row."""
    if SCALED:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    if GUARD:
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    if SCALED:
        p = tl.math.exp2(s - m_sub[:, None])
    else:
        p = tl.math.exp2(s * qk_scale - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i


@triton.jit
def accumulate_pv(acc, alpha, p, v, PRECISION: tl.constexpr):
    """acc * alpha + p @ v (p in V's dtype for the tensor-core dot)."""
    return acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
